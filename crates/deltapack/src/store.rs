//! A store: a directory holding one or more bases and many named deltas, chained (and, in
//! the `bucket` module, the same in an object store, shared by many writers).
//!
//! ```text
//! STORE/deltapack-store.json   the manifest (the only file that says what the store holds)
//! STORE/lock                   advisory lock: exclusive to change the store, shared to read it
//! STORE/bases/NAME/            a copy of each base checkpoint
//! STORE/deltas/ID.dpk          each entry's delta, against its base or another entry
//! STORE/aux/BLAKE3             auxiliary files (configs, tokenizers), once per content
//! STORE/tmp/                   staging of the operation in progress
//! ```
//!
//! Every change is staged under `tmp/`, moved into place, and committed by renaming a new
//! manifest over the old one. A killed operation leaves only staging files and files the
//! manifest does not name; the next operation that takes the lock (or `fsck`) removes them,
//! so the store is always what its last committed manifest says. Every read is verified:
//! `get` checks every fingerprint along the chain, `fsck` rebuilds everything.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apply::{apply_chain, verify_chain, ApplyOptions, ChainReader};
use crate::chain::Chain;
use crate::checkpoint::Checkpoint;
use crate::codec::exact;
use crate::container::index::Blob;
use crate::container::Delta;
use crate::lineage::make_child;
use crate::make::{MakeOptions, MakeReport};
use crate::progress::Progress;
use crate::remote::Location;
use crate::{dtype, hash, Error, Result};

const MANIFEST: &str = "deltapack-store.json";
const FORMAT: &str = "deltapack-store";
const VERSION: u32 = 1;
/// One piece in this many is encoded when estimating the cost of a candidate parent...
const SAMPLE_EVERY: usize = 8;
/// ...unless the model is smaller than this, when all are.
const SAMPLE_ALL_BELOW: u64 = 64 << 20;
const SAMPLE_BYTES: usize = 2 << 20;

/// The store's manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always `"deltapack-store"`.
    pub format: String,
    /// Manifest version.
    pub version: u32,
    /// Bases, by name.
    pub bases: Vec<BaseEntry>,
    /// Deltas, by name, each after its parent.
    pub entries: Vec<Entry>,
}

/// A base held by the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BaseEntry {
    /// Name (the directory under `bases/`).
    pub name: String,
    /// Its files (relative path, size, BLAKE3), checked by `fsck`.
    pub files: Vec<StoredFile>,
}

/// A file of a stored base.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoredFile {
    /// Path relative to the base directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3, hex.
    pub hash: String,
}

/// A named fine-tune held as a delta.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Name.
    pub name: String,
    /// The base at the root of its chain.
    pub base: String,
    /// The entry it is coded against (`None`: the base itself).
    pub parent: Option<String>,
    /// Its delta, relative to the store.
    pub file: String,
    /// Size of the delta file.
    pub delta_bytes: u64,
    /// Size of the fine-tune's files.
    pub finetuned_bytes: u64,
    /// BLAKE3 of the delta file.
    pub hash: String,
    /// Codec summary (`exact`, or the lossy codecs used).
    pub codec: String,
}

mod bucket;

/// How old an object the manifest does not name must be before `fsck` removes it from a
/// store in object storage: older than any add still in progress.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// An opened store: a local directory, or a prefix in an object store (`s3://BUCKET/PREFIX`,
/// see the `bucket` module for its protocol).
pub struct Store {
    root: PathBuf,
    bucket: Option<bucket::Bucket>,
}

/// The lock on a store, held while it lives.
struct Lock(#[allow(dead_code)] File);

impl Store {
    /// Creates a store at `root` (if needed) and adds `base` to it under `name` (default: the
    /// base directory's name).
    pub fn init(root: &Path, base: &Path, name: Option<&str>) -> Result<Store> {
        if let Location::Object(o) = Location::of_path(root)? {
            let name = base_name(base, name)?;
            let bucket = Some(bucket::Bucket::init(o, base, &name)?);
            return Ok(Store {
                root: root.to_path_buf(),
                bucket,
            });
        }
        crate::checkpoint::check_output_disjoint(root, &[("base", base)])?;
        // Checked before anything is created, so a bad base leaves no store behind.
        let ck = Checkpoint::open(base)?;
        let created = !root.exists();
        std::fs::create_dir_all(root).map_err(|e| Error::io("creating", root, e))?;
        Self::init_into(root, &ck, base, name).inspect_err(|_| {
            if created {
                let _ = std::fs::remove_dir_all(root);
            }
        })
    }

    /// [`Store::init`] once `root` exists and the base is open.
    fn init_into(root: &Path, ck: &Checkpoint, base: &Path, name: Option<&str>) -> Result<Store> {
        let store = Store {
            root: root.to_path_buf(),
            bucket: None,
        };
        let _lock = store.lock(true)?;
        let mut m = match store.read_manifest_opt()? {
            Some(m) => m,
            None => Manifest {
                format: FORMAT.into(),
                version: VERSION,
                bases: Vec::new(),
                entries: Vec::new(),
            },
        };
        store.clean(&m)?;
        let name = base_name(base, name)?;
        if m.bases.iter().any(|b| b.name == name) {
            return Err(Error::InvalidArgument(format!(
                "the store already has a base named '{name}'"
            )));
        }
        let staged = store.tmp()?.join(format!("base-{name}"));
        let files = copy_model(ck, &staged)?;
        let dest = store.root.join("bases").join(&name);
        mkdirs(dest.parent().expect("under root"))?;
        rename(&staged, &dest)?;
        m.bases.push(BaseEntry { name, files });
        store.write_manifest(&m)?;
        Ok(store)
    }

    /// Opens an existing store.
    pub fn open(root: &Path) -> Result<Store> {
        if let Location::Object(o) = Location::of_path(root)? {
            return Ok(Store {
                root: root.to_path_buf(),
                bucket: Some(bucket::Bucket::open(o)?),
            });
        }
        let store = Store {
            root: root.to_path_buf(),
            bucket: None,
        };
        if !root.join(MANIFEST).is_file() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a deltapack store (no {MANIFEST}); create one with `deltapack store init`",
                root.display()
            )));
        }
        Ok(store)
    }

    /// The committed manifest (read under a shared lock).
    pub fn manifest(&self) -> Result<Manifest> {
        if let Some(b) = &self.bucket {
            return b.manifest();
        }
        let _lock = self.lock(false)?;
        self.read_manifest()
    }

    /// Adds the fine-tune `ft` as entry `name`, coded against `parent` (an entry name), or the
    /// base or entry that gives the smallest delta by a sampled estimate when `parent` is None.
    pub fn add(
        &self,
        name: &str,
        ft: &Path,
        parent: Option<&str>,
        opts: &MakeOptions,
        progress: &dyn Progress,
    ) -> Result<(Entry, MakeReport)> {
        if let Some(b) = &self.bucket {
            return b.add(name, ft, parent, opts, progress);
        }
        check_name(name)?;
        // A fine-tune inside the store could be cleaned away under it; a store inside the
        // fine-tune's directory would be read as the fine-tune's files.
        crate::checkpoint::check_output_disjoint(&self.root, &[("fine-tune", ft)])?;
        let _lock = self.lock(true)?;
        let mut m = self.read_manifest()?;
        self.clean(&m)?;
        if m.entries.iter().any(|e| e.name == name) {
            return Err(Error::InvalidArgument(format!(
                "the store already has an entry named '{name}'; remove it first"
            )));
        }
        let (base, parent) = match parent {
            Some(p) => {
                let e = find(&m, p)?;
                (e.base.clone(), Some(p.to_string()))
            }
            None => self.choose_parent(&m, ft)?,
        };
        let ft_ck = Checkpoint::open(ft)?;
        let staged_aux = self.stage_aux(&ft_ck)?;
        let id = unique_id(name);
        let staged = self.tmp()?.join(format!("{id}.dpk"));
        let chain = self.chain_files(&m, parent.as_deref())?;
        let mut o = opts.clone();
        o.external_aux = true;
        o.force = false;
        let report = make_child(
            &self.base_dir(&base),
            &chain,
            ft,
            &staged,
            &o,
            Some(&self.aux_dir()),
            progress,
        )?;
        let entry = Entry {
            name: name.to_string(),
            base,
            parent,
            file: format!("deltas/{id}.dpk"),
            delta_bytes: report.delta_bytes,
            finetuned_bytes: report.finetuned_bytes,
            hash: report.delta_hash.clone(),
            codec: codec_summary(&report),
        };
        self.commit_aux(staged_aux)?;
        mkdirs(&self.root.join("deltas"))?;
        rename(&staged, &self.root.join(&entry.file))?;
        m.entries.push(entry.clone());
        self.write_manifest(&m)?;
        Ok((entry, report))
    }

    /// Rebuilds entry `name` into the directory `out`, checking every fingerprint on the way.
    pub fn get(&self, name: &str, out: &Path, force: bool, progress: &dyn Progress) -> Result<crate::RebuildReport> {
        if let Some(b) = &self.bucket {
            return b.get(name, out, force, progress);
        }
        crate::checkpoint::check_output_disjoint(out, &[("store", &self.root)])?;
        let _lock = self.lock(false)?;
        let m = self.read_manifest()?;
        let (base, chain) = self.checked_chain(&m, name)?;
        let opts = ApplyOptions {
            force,
            sync: false,
            aux_store: Some(self.aux_dir()),
        };
        apply_chain(&base, &chain, out, &opts, progress)
    }

    /// The base directory and the delta files, in order from the base, that rebuild entry
    /// `name`: what `apply` and [`crate::hotswap::Resident::switch_to_chain`] take. Each file
    /// is checked against the size the manifest records. A later `store rm --reparent` may
    /// replace files of the chain (by a rename: a model switched to them keeps the old ones).
    pub fn chain(&self, name: &str) -> Result<(PathBuf, Vec<PathBuf>)> {
        if let Some(b) = &self.bucket {
            return b.chain(name);
        }
        let _lock = self.lock(false)?;
        self.checked_chain(&self.read_manifest()?, name)
    }

    /// The chain of entry `name`, opened, with the store's files at hand: what
    /// [`crate::load_chain`], [`crate::ChainReader`] and [`crate::verify_chain`] take.
    pub fn open_chain(&self, name: &str) -> Result<crate::Chain> {
        if let Some(b) = &self.bucket {
            return b.open_chain(name);
        }
        let (base, deltas) = self.chain(name)?;
        let mut chain = crate::Chain::open(&base, &deltas)?;
        chain.aux_store = Some(self.aux_dir());
        Ok(chain)
    }

    /// [`Store::chain`] under a lock the caller holds.
    fn checked_chain(&self, m: &Manifest, name: &str) -> Result<(PathBuf, Vec<PathBuf>)> {
        let e = find(m, name)?;
        self.check_files(m, name)?;
        Ok((self.base_dir(&e.base), self.chain_files(m, Some(name))?))
    }

    /// Removes entry `name`. Entries coded against it are re-coded against its parent
    /// (exactly, so that they rebuild the same bytes) when `reparent`, else it is an error.
    pub fn remove(&self, name: &str, reparent: bool, progress: &dyn Progress) -> Result<Vec<String>> {
        if let Some(b) = &self.bucket {
            return b.remove(name, reparent, progress);
        }
        let _lock = self.lock(true)?;
        let mut m = self.read_manifest()?;
        self.clean(&m)?;
        let e = find(&m, name)?.clone();
        let children = children_to_recode(&m, name, reparent)?;
        let mut moves = Vec::new();
        for c in &children {
            let staged = self.recode_child(&m, c, e.parent.as_deref(), progress)?;
            moves.push((c.name.clone(), staged));
        }
        for (child, (staged, report)) in &moves {
            let id = unique_id(child);
            let file = format!("deltas/{id}.dpk");
            rename(staged, &self.root.join(&file))?;
            let c = m.entries.iter_mut().find(|x| &x.name == child).expect("a child");
            c.parent = e.parent.clone();
            c.file = file;
            c.delta_bytes = report.delta_bytes;
            c.hash = hash::hex(
                &hash::file(&self.root.join(&c.file))
                    .map_err(|err| Error::io("reading", &c.file, err))?
                    .1,
            );
            c.codec = codec_summary(report);
        }
        m.entries.retain(|x| x.name != name);
        self.write_manifest(&m)?;
        // Superseded files are garbage now that the manifest no longer names them.
        self.clean(&m)?;
        Ok(moves.into_iter().map(|(c, _)| c).collect())
    }

    /// Checks the whole store: manifest, every file's fingerprint, every entry rebuilt
    /// through its chain; also removes leftovers of interrupted operations (in an object
    /// store, those older than [`DEFAULT_GRACE`]).
    pub fn fsck(&self, progress: &dyn Progress) -> Result<FsckReport> {
        self.fsck_with_grace(DEFAULT_GRACE, progress)
    }

    /// [`Store::fsck`], removing from an object store the objects its manifest does not name
    /// once they are older than `grace` (a local store removes them all: its lock rules out
    /// an add in progress).
    pub fn fsck_with_grace(&self, grace: std::time::Duration, progress: &dyn Progress) -> Result<FsckReport> {
        if let Some(b) = &self.bucket {
            return b.fsck(grace, progress);
        }
        let _lock = self.lock(true)?;
        let m = self.read_manifest()?;
        let removed = self.clean(&m)?;
        for b in &m.bases {
            for f in &b.files {
                let p = self.base_dir(&b.name).join(&f.path);
                check_file(&p, f.size, &f.hash)?;
            }
        }
        for e in &m.entries {
            let p = self.root.join(&e.file);
            check_file(&p, e.delta_bytes, &e.hash)?;
        }
        let mut aux = BTreeSet::new();
        for e in &m.entries {
            let mut chain = Chain::open(&self.base_dir(&e.base), &self.chain_files(&m, Some(&e.name))?)?;
            chain.aux_store = Some(self.aux_dir());
            for a in &chain.deltas.last().expect("a delta").index.aux {
                if a.blob == Blob::External && aux.insert(a.hash.clone()) {
                    check_file(&self.aux_dir().join(&a.hash), a.size, &a.hash)?;
                }
            }
            verify_chain(&chain, None, progress)?;
        }
        Ok(FsckReport {
            bases: m.bases.len(),
            entries: m.entries.len(),
            aux_files: aux.len(),
            leftovers_removed: removed,
        })
    }

    fn base_dir(&self, name: &str) -> PathBuf {
        self.root.join("bases").join(name)
    }

    fn aux_dir(&self) -> PathBuf {
        self.root.join("aux")
    }

    /// The staging directory (created if needed).
    fn tmp(&self) -> Result<PathBuf> {
        let t = self.root.join("tmp");
        mkdirs(&t)?;
        Ok(t)
    }

    fn lock(&self, exclusive: bool) -> Result<Lock> {
        let p = self.root.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| Error::io("opening", &p, e))?;
        let r = if exclusive { f.lock() } else { f.lock_shared() };
        r.map_err(|e| Error::io("locking", &p, e))?;
        Ok(Lock(f))
    }

    fn read_manifest_opt(&self) -> Result<Option<Manifest>> {
        let p = self.root.join(MANIFEST);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading", &p, e)),
        };
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| Error::corrupt(&p, format!("manifest does not parse: {e}")))?;
        validate(&m).map_err(|r| Error::corrupt(&p, r))?;
        Ok(Some(m))
    }

    fn read_manifest(&self) -> Result<Manifest> {
        self.read_manifest_opt()?
            .ok_or_else(|| Error::InvalidArgument(format!("{} is not a deltapack store", self.root.display())))
    }

    /// Commits `m`: written beside, synced, renamed over the old manifest.
    fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let p = self.root.join(MANIFEST);
        let tmp = self.tmp()?.join(MANIFEST);
        let bytes = serde_json::to_vec_pretty(m).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut f = File::create(&tmp).map_err(|e| Error::io("writing", &tmp, e))?;
        std::io::Write::write_all(&mut f, &bytes).map_err(|e| Error::io("writing", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("syncing", &tmp, e))?;
        rename(&tmp, &p)?;
        if let Ok(d) = File::open(&self.root) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes staging files and files the manifest does not name; returns how many.
    fn clean(&self, m: &Manifest) -> Result<usize> {
        let mut n = 0;
        let tmp = self.root.join("tmp");
        if tmp.exists() {
            n += std::fs::read_dir(&tmp)
                .map_err(|e| Error::io("listing", &tmp, e))?
                .count();
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("removing", &tmp, e))?;
        }
        let keep_deltas: BTreeSet<String> = m.entries.iter().map(|e| e.file.clone()).collect();
        n += remove_unlisted(&self.root.join("deltas"), |f| {
            keep_deltas.contains(&format!("deltas/{f}"))
        })?;
        let keep_bases: BTreeSet<&str> = m.bases.iter().map(|b| b.name.as_str()).collect();
        n += remove_unlisted(&self.root.join("bases"), |f| keep_bases.contains(f))?;
        let mut keep_aux = BTreeSet::new();
        for e in &m.entries {
            let p = self.root.join(&e.file);
            if let Ok((index, _)) = Delta::read_index(&p) {
                keep_aux.extend(
                    index
                        .aux
                        .iter()
                        .filter(|a| a.blob == Blob::External)
                        .map(|a| a.hash.clone()),
                );
            } else {
                // An unreadable delta is fsck's to report; keep every aux file meanwhile.
                return Ok(n);
            }
        }
        n += remove_unlisted(&self.aux_dir(), |f| keep_aux.contains(f))?;
        Ok(n)
    }

    /// Copies the fine-tune's auxiliary files the store lacks into staging, by content.
    fn stage_aux(&self, ft: &Checkpoint) -> Result<Vec<(PathBuf, PathBuf)>> {
        let mut staged = Vec::new();
        let mut seen = BTreeSet::new();
        for a in &ft.aux {
            let (_, digest) = hash::file(&a.path).map_err(|e| Error::io("reading", &a.path, e))?;
            let h = hash::hex(&digest);
            let dest = self.aux_dir().join(&h);
            if dest.exists() || !seen.insert(h.clone()) {
                continue;
            }
            let tmp = self.tmp()?.join(format!("aux-{h}"));
            std::fs::copy(&a.path, &tmp).map_err(|e| Error::io("copying", &a.path, e))?;
            let (_, copied) = hash::file(&tmp).map_err(|e| Error::io("reading", &tmp, e))?;
            if copied != digest {
                return Err(Error::bad_checkpoint(
                    &a.path,
                    "file changed while deltapack was reading it",
                ));
            }
            staged.push((tmp, dest));
        }
        Ok(staged)
    }

    fn commit_aux(&self, staged: Vec<(PathBuf, PathBuf)>) -> Result<()> {
        mkdirs(&self.aux_dir())?;
        for (from, to) in staged {
            rename(&from, &to)?;
        }
        Ok(())
    }

    /// The delta files from the base to entry `name` (empty for `None`, the base).
    fn chain_files(&self, m: &Manifest, name: Option<&str>) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        let mut cur = name;
        while let Some(n) = cur {
            let e = find(m, n)?;
            files.push(self.root.join(&e.file));
            cur = e.parent.as_deref();
            if files.len() > m.entries.len() {
                return Err(Error::corrupt(self.root.join(MANIFEST), "entries form a cycle"));
            }
        }
        files.reverse();
        Ok(files)
    }

    /// Every delta file of entry `name`'s chain must be the one the manifest recorded.
    fn check_files(&self, m: &Manifest, name: &str) -> Result<()> {
        let mut cur = Some(name);
        while let Some(n) = cur {
            let e = find(m, n)?;
            let p = self.root.join(&e.file);
            let size = std::fs::metadata(&p)
                .map_err(|err| Error::io("reading", &p, err))?
                .len();
            if size != e.delta_bytes {
                return Err(Error::corrupt(
                    &p,
                    "size differs from the store's manifest; run `deltapack store fsck`",
                ));
            }
            cur = e.parent.as_deref();
        }
        Ok(())
    }

    /// Re-codes `child` against `new_parent` (exactly), staged; returns the staged file.
    fn recode_child(
        &self,
        m: &Manifest,
        child: &Entry,
        new_parent: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<(PathBuf, MakeReport)> {
        let tmp = self.tmp()?;
        let rebuilt = tmp.join(format!("rebuilt-{}", unique_id(&child.name)));
        let opts = ApplyOptions {
            aux_store: Some(self.aux_dir()),
            ..ApplyOptions::default()
        };
        let base = self.base_dir(&child.base);
        apply_chain(
            &base,
            &self.chain_files(m, Some(&child.name))?,
            &rebuilt,
            &opts,
            progress,
        )?;
        let staged = tmp.join(format!("{}.dpk", unique_id(&child.name)));
        let o = MakeOptions {
            external_aux: true,
            ..MakeOptions::default()
        };
        let parents = self.chain_files(m, new_parent)?;
        let report = make_child(&base, &parents, &rebuilt, &staged, &o, Some(&self.aux_dir()), progress)?;
        let _ = std::fs::remove_dir_all(&rebuilt);
        Ok((staged, report))
    }

    /// The base or entry that gives `ft` the smallest delta (see [`choose_parent`]).
    fn choose_parent(&self, m: &Manifest, ft: &Path) -> Result<(String, Option<String>)> {
        choose_parent(m, ft, &|b| Ok(self.base_dir(b)), &|e| {
            let mut chain = Chain::open(&self.base_dir(&e.base), &self.chain_files(m, Some(&e.name))?)?;
            chain.aux_store = Some(self.aux_dir());
            Ok(chain)
        })
    }
}

/// The base or entry of `m` that gives `ft` the smallest delta, estimated by exact-coding
/// one piece in [`SAMPLE_EVERY`] of the model against each candidate; `base_dir` gives a
/// base's directory, `open_chain` an entry's chain.
fn choose_parent(
    m: &Manifest,
    ft: &Path,
    base_dir: &dyn Fn(&str) -> Result<PathBuf>,
    open_chain: &dyn Fn(&Entry) -> Result<Chain>,
) -> Result<(String, Option<String>)> {
    let ft = Checkpoint::open(ft)?;
    let mut best: Option<(u64, String, Option<String>)> = None;
    let mut consider = |cost: u64, base: &str, parent: Option<&str>| {
        if best.as_ref().is_none_or(|b| cost < b.0) {
            best = Some((cost, base.to_string(), parent.map(str::to_string)));
        }
    };
    for b in &m.bases {
        let base = Checkpoint::open(&base_dir(&b.name)?)?;
        let meta = |name: &str| base.tensor(name).map(|t| (t.dtype, t.shape.clone()));
        let read = |name: &str, r: std::ops::Range<usize>| {
            let t = base.tensor(name).expect("meta found it");
            Ok(base.bytes(t)[r].to_vec())
        };
        let cost = estimate(&ft, meta, read)?;
        consider(cost, &b.name, None);
    }
    for e in &m.entries {
        let chain = open_chain(e)?;
        let reader = ChainReader::new(&chain)?;
        let tensors: BTreeMap<&str, (safetensors::Dtype, Vec<usize>)> = reader
            .tensors()
            .map(|t| {
                let shape = t.shape.iter().map(|&d| d as usize).collect();
                (
                    t.name.as_str(),
                    (dtype::parse(&t.dtype).expect("validated dtype"), shape),
                )
            })
            .collect();
        let meta = |name: &str| tensors.get(name).cloned();
        let cost = estimate(&ft, meta, |name, r| Ok(reader.read(name, r)?.into_owned()))?;
        consider(cost, &e.base, Some(&e.name));
    }
    let (_, base, parent) = best
        .ok_or_else(|| Error::InvalidArgument("the store has no base; add one with `deltapack store init`".into()))?;
    Ok((base, parent))
}

/// The entries coded against `name`, which removing it re-codes; an error unless `reparent`
/// when there are any.
fn children_to_recode(m: &Manifest, name: &str, reparent: bool) -> Result<Vec<Entry>> {
    let children: Vec<Entry> = m
        .entries
        .iter()
        .filter(|c| c.parent.as_deref() == Some(name))
        .cloned()
        .collect();
    if !children.is_empty() && !reparent {
        let names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
        return Err(Error::InvalidArgument(format!(
            "entry '{name}' is the parent of {}; remove them first, or remove it reparenting them (they are re-coded against its parent)",
            names.join(", ")
        )));
    }
    Ok(children)
}

/// The name a base is stored under: `name`, or the base directory's name.
fn base_name(base: &Path, name: Option<&str>) -> Result<String> {
    let name = match name {
        Some(n) => n.to_string(),
        None => base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} has no directory name to name the base by: give the base a name",
                    base.display()
                ))
            })?,
    };
    check_name(&name)?;
    Ok(name)
}

/// Estimated exact-delta bytes of `ft` against a candidate whose tensors' dtype and shape
/// `meta` gives (`None`: it lacks the tensor, which then counts whole) and whose bytes
/// `read` returns.
fn estimate(
    ft: &Checkpoint,
    meta: impl Fn(&str) -> Option<(safetensors::Dtype, Vec<usize>)>,
    read: impl Fn(&str, std::ops::Range<usize>) -> Result<Vec<u8>>,
) -> Result<u64> {
    let mut scratch = exact::Scratch::default();
    let mut cost = 0u64;
    let every = if ft.weight_bytes() < SAMPLE_ALL_BELOW {
        1
    } else {
        SAMPLE_EVERY
    };
    let mut k = 0usize;
    for t in &ft.tensors {
        let same_kind = meta(&t.name).is_some_and(|(dt, shape)| dt == t.dtype && shape == t.shape);
        let bytes = ft.bytes(t);
        for (c, target) in bytes.chunks(SAMPLE_BYTES).enumerate() {
            k += 1;
            if !(k - 1).is_multiple_of(every) {
                continue;
            }
            if !same_kind {
                cost += target.len() as u64;
                continue;
            }
            let pred = read(&t.name, c * SAMPLE_BYTES..c * SAMPLE_BYTES + target.len())?;
            if pred != target {
                cost += exact::encode(dtype::layout(t.dtype), &pred, target, &mut scratch).len() as u64;
            }
        }
        ft.release(t, 0..t.len());
    }
    Ok(cost)
}

/// Report of [`Store::fsck`].
#[derive(Debug, Clone, Serialize)]
pub struct FsckReport {
    /// Bases checked.
    pub bases: usize,
    /// Entries rebuilt and checked.
    pub entries: usize,
    /// Auxiliary files checked.
    pub aux_files: usize,
    /// Leftovers of interrupted operations removed.
    pub leftovers_removed: usize,
}

fn find<'m>(m: &'m Manifest, name: &str) -> Result<&'m Entry> {
    m.entries
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| Error::InvalidArgument(format!("the store has no entry named '{name}'")))
}

/// Names are single path-safe words: they never become paths, but stay readable in listings.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b))
        && !name.starts_with('.');
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "'{name}' is not a valid name: use letters, digits and - _ . @ + (not starting with .)"
        )));
    }
    Ok(())
}

fn validate(m: &Manifest) -> Result<(), String> {
    if m.format != FORMAT || m.version != VERSION {
        return Err(format!(
            "format {} version {} is not {FORMAT} {VERSION}",
            m.format, m.version
        ));
    }
    let mut bases = BTreeSet::new();
    for b in &m.bases {
        check_name(&b.name).map_err(|e| e.to_string())?;
        if !bases.insert(b.name.as_str()) {
            return Err(format!("base '{}' appears twice", b.name));
        }
        for f in &b.files {
            if !crate::checkpoint::is_safe_rel_path(&f.path) || hash::parse_hex(&f.hash).is_none() {
                return Err(format!("base '{}': bad file record", b.name));
            }
        }
    }
    let mut names = BTreeSet::new();
    for e in &m.entries {
        check_name(&e.name).map_err(|err| err.to_string())?;
        let file_ok = e.file.strip_prefix("deltas/").is_some_and(|f| check_name(f).is_ok());
        if !file_ok || hash::parse_hex(&e.hash).is_none() {
            return Err(format!("entry '{}': bad file record", e.name));
        }
        if !bases.contains(e.base.as_str()) {
            return Err(format!("entry '{}': unknown base '{}'", e.name, e.base));
        }
        // Parents come first, which also rules out cycles.
        if let Some(p) = &e.parent {
            if !names.contains(p.as_str()) {
                return Err(format!("entry '{}': parent '{p}' is not listed before it", e.name));
            }
        }
        if !names.insert(e.name.as_str()) {
            return Err(format!("entry '{}' appears twice", e.name));
        }
    }
    Ok(())
}

/// The codecs an entry's delta used; `identical` when it codes nothing (a fine-tune equal
/// to its parent), whatever codec was asked for.
fn codec_summary(r: &MakeReport) -> String {
    if r.changed + r.resized + r.converted + r.tied + r.new + r.removed == 0 {
        return "identical".into();
    }
    let codecs: BTreeSet<&str> = r.tensors.iter().map(|t| t.codec.as_str()).collect();
    match codecs.len() {
        0 => "exact".into(),
        _ => codecs.into_iter().collect::<Vec<_>>().join("+"),
    }
}

/// A file name unique to this process and moment, starting with `name`: with 64 random
/// bits, since writers on other machines share an object store's names.
fn unique_id(name: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    format!("{name}-{:x}-{nanos:x}-{random:016x}", std::process::id())
}

fn mkdirs(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io("creating", p, e))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io("renaming into place", to, e))
}

fn check_file(p: &Path, size: u64, h: &str) -> Result<()> {
    let (n, d) = hash::file(p).map_err(|e| Error::io("reading", p, e))?;
    if n != size || hash::hex(&d) != h {
        return Err(Error::corrupt(p, "file differs from what the store recorded"));
    }
    Ok(())
}

/// Removes the entries of `dir` for which `keep` (given the file name) is false.
fn remove_unlisted(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<usize> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut n = 0;
    for e in rd {
        let e = e.map_err(|err| Error::io("listing", dir, err))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if keep(&name) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|err| Error::io("removing", &p, err))?;
        n += 1;
    }
    Ok(n)
}

/// Copies a checkpoint's files (weights and auxiliary) to `dest`, returning their records.
fn copy_model(ck: &Checkpoint, dest: &Path) -> Result<Vec<StoredFile>> {
    let mut files = Vec::new();
    let mut rels: Vec<(String, PathBuf)> = ck.shards.iter().map(|s| (s.rel.clone(), s.path.clone())).collect();
    rels.extend(ck.aux.iter().map(|a| (a.rel.clone(), a.path.clone())));
    if !ck.root.is_dir() {
        rels.truncate(ck.shards.len());
    }
    for (rel, src) in rels {
        let to = dest.join(&rel);
        mkdirs(to.parent().expect("inside dest"))?;
        std::fs::copy(&src, &to).map_err(|e| Error::io("copying", &src, e))?;
        let (size, d) = hash::file(&to).map_err(|e| Error::io("reading", &to, e))?;
        files.push(StoredFile {
            path: rel,
            size,
            hash: hash::hex(&d),
        });
    }
    Ok(files)
}
