//! A store in an object store (`s3://BUCKET/PREFIX`), shared by any number of writers.
//!
//! ```text
//! PREFIX/deltapack-store.json   the manifest: committed by conditional PUT, never rewritten blindly
//! PREFIX/bases/NAME/FILE        each base's files
//! PREFIX/deltas/ID.dpk          each entry's delta (ID: the name and 64 random bits)
//! PREFIX/aux/BLAKE3             auxiliary files, by content
//! PREFIX/.probe/ID              conditional-write probes of `init`
//! ```
//!
//! There is no lock. A writer uploads what it adds under fresh names (invisible to readers:
//! only the manifest says what the store holds), then commits a new manifest with `If-Match`
//! on the ETag it read (`If-None-Match: *` to create it). A writer that loses the race reads
//! the manifest again and retries; if the parent it coded against is gone, or (for a parent it
//! chose itself) another is now better, it codes the delta again. No entry is lost or
//! half-visible; a writer killed at any point leaves only objects the manifest does not name,
//! which `fsck` removes once they are older than its grace period.
//!
//! Bases are read from a local cache (see [`Cache`]): the engine memory-maps bases, and a base
//! serves every entry built on it, so each machine fetches it once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use object_store::UpdateVersion;

use super::{
    check_name, children_to_recode, choose_parent, codec_summary, find, unique_id, validate, BaseEntry, Entry,
    FsckReport, Manifest, StoredFile, FORMAT, MANIFEST, VERSION,
};
use crate::apply::{rebuild_chain, verify_chain, ApplyOptions};
use crate::chain::Chain;
use crate::checkpoint::Checkpoint;
use crate::container::index::Blob;
use crate::lineage::make_child;
use crate::make::{MakeOptions, MakeReport};
use crate::progress::Progress;
use crate::remote::{self, Cache, CachedFile, ObjectLocation, Put, Upload};
use crate::{hash, Error, Result};

/// How many times a writer retries a lost commit before giving up.
const COMMIT_TRIES: usize = 100;

/// An opened store in an object store.
pub(super) struct Bucket {
    loc: ObjectLocation,
    cache: Cache,
}

impl Bucket {
    /// Creates the store at `loc` if needed and adds `base` to it under `name`.
    pub(super) fn init(loc: ObjectLocation, base: &Path, name: &str) -> Result<Bucket> {
        check_name(name)?;
        let ck = Checkpoint::open(base)?;
        let bucket = Bucket {
            loc,
            cache: Cache::new()?,
        };
        bucket.check_conditional_writes()?;
        if bucket
            .read()?
            .is_some_and(|(m, _)| m.bases.iter().any(|b| b.name == name))
        {
            return Err(Error::InvalidArgument(format!(
                "the store already has a base named '{name}'"
            )));
        }
        let files = bucket.upload_base(&ck, name)?;
        bucket.commit(|m| {
            if m.bases.iter().any(|b| b.name == name) {
                return Err(Error::InvalidArgument(format!(
                    "the store already has a base named '{name}'"
                )));
            }
            m.bases.push(BaseEntry {
                name: name.to_string(),
                files: files.clone(),
            });
            Ok(())
        })?;
        Ok(bucket)
    }

    /// Opens the store at `loc` (its manifest must exist).
    pub(super) fn open(loc: ObjectLocation) -> Result<Bucket> {
        let bucket = Bucket {
            loc,
            cache: Cache::new()?,
        };
        if bucket.read()?.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a deltapack store (no {MANIFEST}); create one with `deltapack store init`",
                bucket.loc.url
            )));
        }
        Ok(bucket)
    }

    /// The committed manifest.
    pub(super) fn manifest(&self) -> Result<Manifest> {
        Ok(self.read_existing()?.0)
    }

    /// Adds the fine-tune `ft` as entry `name` (see [`super::Store::add`]).
    pub(super) fn add(
        &self,
        name: &str,
        ft: &Path,
        parent: Option<&str>,
        opts: &MakeOptions,
        progress: &dyn Progress,
    ) -> Result<(Entry, MakeReport)> {
        check_name(name)?;
        let ft_ck = Checkpoint::open(ft)?;
        self.upload_aux(&ft_ck)?;
        for _ in 0..COMMIT_TRIES {
            let (m, _) = self.read_existing()?;
            if m.entries.iter().any(|e| e.name == name) {
                return Err(Error::InvalidArgument(format!(
                    "the store already has an entry named '{name}'; remove it first"
                )));
            }
            let (base, chosen) = match parent {
                Some(p) => (find(&m, p)?.base.clone(), Some(p.to_string())),
                None => self.choose_parent(&m, ft)?,
            };
            let (entry, report) = self.make_entry(&m, name, &base, chosen.as_deref(), ft, opts, progress)?;
            // Commit while the parent still exists and (when chosen here) is still the choice;
            // otherwise code the delta again against the store as it is now.
            let mut stale = false;
            let committed = self.commit(|now| {
                if let Some(e) = now.entries.iter().find(|e| e.name == name) {
                    // Our own commit, whose answer was lost and whose retry then failed its
                    // condition: done.
                    if e.file == entry.file {
                        return Ok(());
                    }
                    return Err(Error::InvalidArgument(format!(
                        "the store already has an entry named '{name}' (added meanwhile by another writer)"
                    )));
                }
                let parent_gone = chosen.as_ref().is_some_and(|p| find(now, p).is_err());
                let better = parent.is_none() && now.entries.len() != m.entries.len() && {
                    let again = self.choose_parent(now, ft)?;
                    again != (base.clone(), chosen.clone())
                };
                stale = parent_gone || better;
                if !stale {
                    now.entries.push(entry.clone());
                }
                Ok(())
            });
            if committed.is_err() || stale {
                let _ = remote::delete(&self.loc.join(&entry.file));
            }
            committed?;
            if !stale {
                return Ok((entry, report));
            }
            // A parent the caller named is only stale when another writer removed it.
            if let Some(p) = parent {
                return Err(Error::InvalidArgument(format!(
                    "entry '{p}' was removed from the store while '{name}' was being coded against it"
                )));
            }
        }
        Err(self.too_busy())
    }

    /// Codes `ft` against `parent` (or the base) and uploads it under a fresh name.
    #[allow(clippy::too_many_arguments)]
    fn make_entry(
        &self,
        m: &Manifest,
        name: &str,
        base: &str,
        parent: Option<&str>,
        ft: &Path,
        opts: &MakeOptions,
        progress: &dyn Progress,
    ) -> Result<(Entry, MakeReport)> {
        let file = format!("deltas/{}.dpk", unique_id(name));
        let url = PathBuf::from(self.loc.join(&file).url);
        let chain = self.chain_urls(m, parent)?;
        let mut o = opts.clone();
        o.external_aux = true;
        o.force = false;
        let base_dir = self.base_dir(m, base)?;
        let aux = self.aux_for(&chain)?;
        let report = make_child(&base_dir, &chain, ft, &url, &o, Some(&aux), progress)?;
        let entry = Entry {
            name: name.to_string(),
            base: base.to_string(),
            parent: parent.map(str::to_string),
            file,
            delta_bytes: report.delta_bytes,
            finetuned_bytes: report.finetuned_bytes,
            hash: report.delta_hash.clone(),
            codec: codec_summary(&report),
        };
        Ok((entry, report))
    }

    /// Rebuilds entry `name` into the directory `out`.
    pub(super) fn get(
        &self,
        name: &str,
        out: &Path,
        force: bool,
        progress: &dyn Progress,
    ) -> Result<crate::RebuildReport> {
        let chain = self.open_chain(name)?;
        let opts = ApplyOptions {
            force,
            sync: false,
            aux_store: None,
        };
        rebuild_chain(&chain, out, &opts, progress)
    }

    /// The (cached) base directory and the delta URLs that rebuild entry `name`.
    pub(super) fn chain(&self, name: &str) -> Result<(PathBuf, Vec<PathBuf>)> {
        let (m, _) = self.read_existing()?;
        let e = find(&m, name)?;
        Ok((self.base_dir(&m, &e.base)?, self.chain_urls(&m, Some(name))?))
    }

    /// Entry `name`'s chain, opened, every delta checked against the manifest's size.
    pub(super) fn open_chain(&self, name: &str) -> Result<Chain> {
        let (m, _) = self.read_existing()?;
        self.open_chain_in(&m, find(&m, name)?)
    }

    fn open_chain_in(&self, m: &Manifest, e: &Entry) -> Result<Chain> {
        let mut chain = Chain::open(&self.base_dir(m, &e.base)?, &self.chain_urls(m, Some(&e.name))?)?;
        let mut cur = Some(e);
        for d in chain.deltas.iter().rev() {
            let entry = cur.expect("one entry per delta");
            if d.size != entry.delta_bytes {
                return Err(Error::corrupt(
                    &d.path,
                    "size differs from the store's manifest; run `deltapack store fsck`",
                ));
            }
            cur = entry.parent.as_deref().and_then(|p| find(m, p).ok());
        }
        // The chain's indexes are in memory: no need to fetch them again.
        let wanted = chain.deltas.iter().flat_map(|d| external_aux(&d.index)).collect();
        chain.aux_store = Some(self.aux_cached(wanted)?);
        Ok(chain)
    }

    /// Removes entry `name`, re-coding its children against its parent when `reparent`.
    pub(super) fn remove(&self, name: &str, reparent: bool, progress: &dyn Progress) -> Result<Vec<String>> {
        for _ in 0..COMMIT_TRIES {
            let (m, version) = self.read_existing()?;
            let e = find(&m, name)?.clone();
            let children = children_to_recode(&m, name, reparent)?;
            let mut next = m.clone();
            let mut uploaded = Vec::new();
            for c in &children {
                let recoded = self.recode(&m, c, e.parent.as_deref(), progress);
                let (new, _) = match recoded {
                    Ok(r) => r,
                    Err(err) => {
                        uploaded
                            .iter()
                            .for_each(|f: &String| drop(remote::delete(&self.loc.join(f))));
                        return Err(err);
                    }
                };
                uploaded.push(new.file.clone());
                let slot = next.entries.iter_mut().find(|x| x.name == c.name).expect("a child");
                *slot = new;
            }
            next.entries.retain(|x| x.name != name);
            match self.put_manifest(&next, Some(version))? {
                Put::Done => {
                    // Now garbage; fsck would remove them after its grace period anyway.
                    let old = std::iter::once(&e).chain(children.iter());
                    old.for_each(|x| drop(remote::delete(&self.loc.join(&x.file))));
                    return Ok(children.into_iter().map(|c| c.name).collect());
                }
                Put::Lost => uploaded.iter().for_each(|f| drop(remote::delete(&self.loc.join(f)))),
            }
        }
        Err(self.too_busy())
    }

    /// `child` coded again (exactly) against `new_parent`, uploaded under a fresh name.
    fn recode(
        &self,
        m: &Manifest,
        child: &Entry,
        new_parent: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<(Entry, MakeReport)> {
        let chain = self.open_chain_in(m, child)?;
        let scratch = tempfile::Builder::new()
            .prefix("deltapack-recode-")
            .tempdir()
            .map_err(|e| Error::io("creating a directory in", std::env::temp_dir(), e))?;
        let rebuilt = scratch.path().join("model");
        rebuild_chain(&chain, &rebuilt, &ApplyOptions::default(), progress)?;
        let o = MakeOptions::default();
        let (mut entry, report) = self.make_entry(m, &child.name, &child.base, new_parent, &rebuilt, &o, progress)?;
        entry.finetuned_bytes = child.finetuned_bytes;
        Ok((entry, report))
    }

    /// Checks the whole store (every entry rebuilt through its chain, every base file's
    /// hash) and removes objects the manifest does not name that are older than `grace`.
    pub(super) fn fsck(&self, grace: Duration, progress: &dyn Progress) -> Result<FsckReport> {
        let (m, _) = self.read_existing()?;
        for b in &m.bases {
            let dir = self.base_dir(&m, &b.name)?;
            for f in &b.files {
                super::check_file(&dir.join(&f.path), f.size, &f.hash)?;
            }
        }
        let mut aux = BTreeSet::new();
        for e in &m.entries {
            let chain = self.open_chain_in(&m, e)?;
            for d in &chain.deltas {
                aux.extend(external_aux(&d.index));
            }
            verify_chain(&chain, None, progress)?;
        }
        let removed = self.collect_garbage(&m, &aux, grace)?;
        Ok(FsckReport {
            bases: m.bases.len(),
            entries: m.entries.len(),
            aux_files: aux.len(),
            leftovers_removed: removed,
        })
    }

    /// Deletes objects under the prefix that `m` does not name, older than `grace`, and aborts
    /// the multipart uploads that markers among them record.
    fn collect_garbage(&self, m: &Manifest, aux: &BTreeSet<String>, grace: Duration) -> Result<usize> {
        let mut keep: BTreeSet<String> = m.entries.iter().map(|e| e.file.clone()).collect();
        keep.extend(aux.iter().map(|h| format!("aux/{h}")));
        for b in &m.bases {
            keep.extend(b.files.iter().map(|f| format!("bases/{}/{}", b.name, f.path)));
        }
        keep.insert(MANIFEST.to_string());
        let cutoff = chrono_cutoff(grace);
        let prefix = self.loc.key.as_ref();
        let mut n = 0;
        for o in remote::list(&self.loc)? {
            let full = o.location.as_ref();
            let rel = full.strip_prefix(prefix).unwrap_or(full).trim_start_matches('/');
            if keep.contains(rel) || o.last_modified > cutoff {
                continue;
            }
            match remote::is_upload_marker(rel) {
                // A writer killed while uploading: its parts are invisible but kept (and
                // billed) until the upload is aborted.
                true => remote::abort_abandoned(&self.loc.join(rel))?,
                false => remote::delete(&self.loc.join(rel))?,
            }
            n += 1;
        }
        Ok(n)
    }

    /// The delta URLs from the base to entry `name` (empty for `None`).
    fn chain_urls(&self, m: &Manifest, name: Option<&str>) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        let mut cur = name;
        while let Some(n) = cur {
            let e = find(m, n)?;
            files.push(PathBuf::from(self.loc.join(&e.file).url));
            cur = e.parent.as_deref();
        }
        files.reverse();
        Ok(files)
    }

    fn choose_parent(&self, m: &Manifest, ft: &Path) -> Result<(String, Option<String>)> {
        choose_parent(m, ft, &|b| self.base_dir(m, b), &|e| self.open_chain_in(m, e))
    }

    /// The manifest and its version, if there is one.
    fn read(&self) -> Result<Option<(Manifest, UpdateVersion)>> {
        let loc = self.loc.join(MANIFEST);
        let Some((bytes, version)) = remote::get(&loc)? else {
            return Ok(None);
        };
        let path = PathBuf::from(&loc.url);
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(&path, format!("manifest does not parse: {e}")))?;
        validate(&m).map_err(|r| Error::corrupt(&path, r))?;
        Ok(Some((m, version)))
    }

    fn read_existing(&self) -> Result<(Manifest, UpdateVersion)> {
        self.read()?
            .ok_or_else(|| Error::InvalidArgument(format!("{} is not a deltapack store", self.loc.url)))
    }

    fn put_manifest(&self, m: &Manifest, version: Option<UpdateVersion>) -> Result<Put> {
        let bytes = serde_json::to_vec_pretty(m).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        remote::put(&self.loc.join(MANIFEST), bytes, version)
    }

    /// Applies `change` to the manifest as it is now and commits it; on a lost race, reads it
    /// again and applies `change` again.
    fn commit(&self, mut change: impl FnMut(&mut Manifest) -> Result<()>) -> Result<()> {
        for attempt in 0..COMMIT_TRIES {
            let (mut m, version) = match self.read()? {
                Some((m, v)) => (m, Some(v)),
                None => (empty_manifest(), None),
            };
            let before = m.clone();
            change(&mut m)?;
            if m == before {
                return Ok(());
            }
            match self.put_manifest(&m, version)? {
                Put::Done => return Ok(()),
                Put::Lost => std::thread::sleep(backoff(attempt)),
            }
        }
        Err(self.too_busy())
    }

    fn too_busy(&self) -> Error {
        Error::Remote {
            op: "committing to",
            url: self.loc.join(MANIFEST).url,
            reason: format!("lost the race for the manifest {COMMIT_TRIES} times; try again"),
        }
    }

    /// Refuses a server that does not honour `If-None-Match: *` and `If-Match`: without them
    /// concurrent writers would overwrite each other's entries.
    fn check_conditional_writes(&self) -> Result<()> {
        let probe = self.loc.join(&format!(".probe/{}", unique_id("init")));
        let first = remote::put(&probe, b"1".to_vec(), None)?;
        let again = remote::put(&probe, b"2".to_vec(), None)?;
        let stale = UpdateVersion {
            e_tag: Some("\"deltapack-stale-etag\"".into()),
            version: None,
        };
        let update = remote::put(&probe, b"3".to_vec(), Some(stale))?;
        let _ = remote::delete(&probe);
        match (first, again, update) {
            (Put::Done, Put::Lost, Put::Lost) => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "the server behind {} does not honour conditional writes (If-None-Match: * and If-Match): a store shared by several writers needs them; use a server that does (S3 and MinIO do), or a local directory store",
                self.loc.url
            ))),
        }
    }

    /// Uploads a base's files under `bases/NAME/`; returns their records.
    fn upload_base(&self, ck: &Checkpoint, name: &str) -> Result<Vec<StoredFile>> {
        let mut rels: Vec<(String, PathBuf)> = ck.shards.iter().map(|s| (s.rel.clone(), s.path.clone())).collect();
        if ck.root.is_dir() {
            rels.extend(ck.aux.iter().map(|a| (a.rel.clone(), a.path.clone())));
        }
        let mut files = Vec::new();
        for (rel, src) in rels {
            let loc = self.loc.join(&format!("bases/{name}/{rel}"));
            // Create-only: files of a base the manifest does not list are another init's,
            // interrupted or in progress, and must not be replaced under it.
            let (size, digest) = upload_file(&src, &loc, false).map_err(|e| match e {
                Error::OutputExists { .. } => Error::InvalidArgument(format!(
                    "{} exists although the store has no base '{name}': another `store init` is running or was interrupted; run `deltapack store fsck` (with --grace 0 when none is running) and try again",
                    loc.url
                )),
                e => e,
            })?;
            files.push(StoredFile {
                path: rel,
                size,
                hash: hash::hex(&digest),
            });
        }
        Ok(files)
    }

    /// Uploads the fine-tune's auxiliary files the store lacks, by content.
    fn upload_aux(&self, ft: &Checkpoint) -> Result<()> {
        for a in &ft.aux {
            let (_, digest) = hash::file(&a.path).map_err(|e| Error::io("reading", &a.path, e))?;
            let h = hash::hex(&digest);
            let loc = self.loc.join(&format!("aux/{h}"));
            // Content-addressed: an object already there is this file.
            let (_, uploaded) = match upload_file(&a.path, &loc, false) {
                Err(Error::OutputExists { .. }) => continue,
                other => other?,
            };
            if uploaded != digest {
                let _ = remote::delete(&loc);
                return Err(Error::bad_checkpoint(
                    &a.path,
                    "file changed while deltapack was reading it",
                ));
            }
        }
        Ok(())
    }

    /// The cached directory of base `name`, fetched (and checked) if needed.
    fn base_dir(&self, m: &Manifest, name: &str) -> Result<PathBuf> {
        let b = m
            .bases
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("the store has no base named '{name}'")))?;
        let mut h = blake3::Hasher::new();
        for f in &b.files {
            h.update(format!("{}\0{}\0{}\n", f.path, f.size, f.hash).as_bytes());
        }
        let files: Vec<CachedFile> = b
            .files
            .iter()
            .map(|f| CachedFile {
                rel: f.path.clone(),
                loc: self.loc.join(&format!("bases/{}/{}", b.name, f.path)),
                size: f.size,
                blake3: Some(f.hash.clone()),
            })
            .collect();
        let key = &hash::hex(h.finalize().as_bytes())[..32];
        self.cache.dir(&format!("bases/{}-{key}", b.name), &files)
    }

    /// The cached directory of the auxiliary files the deltas at `urls` refer to.
    fn aux_for(&self, urls: &[PathBuf]) -> Result<PathBuf> {
        let mut wanted = BTreeSet::new();
        for u in urls {
            let (index, _) = crate::container::Delta::read_index(u)?;
            wanted.extend(external_aux(&index));
        }
        self.aux_cached(wanted)
    }

    /// The cached directory of auxiliary files, with each of `wanted` (by BLAKE3) fetched.
    fn aux_cached(&self, wanted: BTreeSet<String>) -> Result<PathBuf> {
        let files: Vec<(String, ObjectLocation)> = wanted
            .into_iter()
            .map(|h| (h.clone(), self.loc.join(&format!("aux/{h}"))))
            .collect();
        self.cache.by_content("aux", &files)
    }
}

fn external_aux(index: &crate::container::index::Index) -> impl Iterator<Item = String> + '_ {
    index
        .aux
        .iter()
        .filter(|a| a.blob == Blob::External)
        .map(|a| a.hash.clone())
}

fn empty_manifest() -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        bases: Vec::new(),
        entries: Vec::new(),
    }
}

/// Wait before retrying a lost commit: grows with the attempts, jittered so that two losers
/// do not collide again in step.
fn backoff(attempt: usize) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let jitter = std::collections::hash_map::RandomState::new().build_hasher().finish() % 1000;
    let base = 20u64 << attempt.min(5);
    Duration::from_millis(base + base * jitter / 1000)
}

fn chrono_cutoff(grace: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX)
}

/// Uploads the local file `src` to `loc`; returns its size and BLAKE3.
fn upload_file(src: &Path, loc: &ObjectLocation, force: bool) -> Result<(u64, hash::Digest)> {
    use std::io::Read;
    let mut f = std::fs::File::open(src).map_err(|e| Error::io("opening", src, e))?;
    let mut up = Upload::create(loc, force)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io("reading", src, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        up.write_all(&buf[..n])?;
        size += n as u64;
    }
    up.commit()?;
    Ok((size, *hasher.finalize().as_bytes()))
}
