//! Shard headers and other files, resolved through the chain: from the delta's stored blobs,
//! the level below's files, or the base directory; and what a base lacks, named before any
//! work.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::container::index::{AuxEntry, Blob, WeightFile};
use crate::container::Delta;
use crate::hash;
use crate::{dtype, BasePart, Error, MissingFile, Result};

use super::Ctx;

/// Files: shard headers and auxiliary files, resolved through the chain.
impl Ctx<'_> {
    fn wrong_base(&self, part: BasePart, reason: String) -> Error {
        let index = &self.levels[0].delta.index;
        Error::WrongBase {
            path: self.chain.base.root.clone(),
            part,
            reason,
            expected: index.base.expected(),
        }
    }

    /// The error for a file level `lvl` expects from below but does not find as recorded.
    fn wrong_below(&self, lvl: usize, part: BasePart, reason: &str) -> Error {
        match lvl {
            0 => self.wrong_base(part, reason.to_string()),
            _ => Error::WrongParent {
                path: self.levels[lvl].delta.path.clone(),
                reason: format!(
                    "{part} {reason} in the parent {}",
                    self.levels[lvl - 1].delta.path.display()
                ),
            },
        }
    }

    /// The error for base files the model rebuilt needs but the base lacks: bad input, not a
    /// wrong base, since the same tensors come in other layouts and without their files.
    fn missing_base(&self, files: Vec<MissingFile>) -> Error {
        let root = &self.chain.base.root;
        Error::MissingBaseFiles {
            path: root.clone(),
            files,
            single_file: !root.is_dir(),
        }
    }

    /// Fails, before anything is rebuilt, with every base file that the shard headers and
    /// auxiliary files of the model rebuilt need (followed through the chain) and the base
    /// lacks, so that one run names them all. Their contents are checked as they are read.
    pub(super) fn check_base_files(&self) -> Result<()> {
        let top = self.top();
        let index = &self.levels[top].delta.index;
        let mut needed = BTreeSet::new();
        for f in &index.files {
            self.base_needs(top, &f.header, true, &mut needed);
        }
        for a in &index.aux {
            self.base_needs(top, &a.blob, false, &mut needed);
        }
        let base = &self.chain.base;
        let missing: Vec<MissingFile> = needed
            .into_iter()
            .filter(|(path, header)| match header {
                true => !base.shards.iter().any(|s| &s.rel == path),
                false => !(base.root.is_dir() && base.root.join(path).is_file()),
            })
            .map(|(path, header)| MissingFile { path, header })
            .collect();
        match missing.is_empty() {
            true => Ok(()),
            false => Err(self.missing_base(missing)),
        }
    }

    /// Adds to `out` the base files (path, whether only its shard header) that `blob` of level
    /// `lvl` reads: itself if identical, or its dictionary; through the levels below for a
    /// link of a chain. A file a link misses below is left to the error of reading it.
    fn base_needs(&self, lvl: usize, blob: &Blob, header: bool, out: &mut BTreeSet<(String, bool)>) {
        let path = match blob {
            Blob::SameAsBase { path } => path,
            Blob::Zstd { dict: Some(p), .. } => p,
            Blob::Zstd { dict: None, .. } | Blob::External => return,
        };
        if lvl == 0 {
            out.insert((path.clone(), header));
            return;
        }
        let below = &self.levels[lvl - 1].delta.index;
        let blob = match header {
            true => below.files.iter().find(|f| &f.path == path).map(|f| &f.header),
            false => below.aux.iter().find(|a| &a.path == path).map(|a| &a.blob),
        };
        if let Some(b) = blob {
            self.base_needs(lvl - 1, b, header, out);
        }
    }

    /// The header of shard `path` of the model below level `lvl`.
    fn parent_header(&self, lvl: usize, path: &str) -> Result<Vec<u8>> {
        if lvl == 0 {
            let shard = self.chain.base.shards.iter().find(|s| s.rel == path);
            return shard.map(|s| s.header_bytes().to_vec()).ok_or_else(|| {
                self.missing_base(vec![MissingFile {
                    path: path.to_string(),
                    header: true,
                }])
            });
        }
        let below = &self.levels[lvl - 1].delta.index;
        let f = below.files.iter().find(|f| f.path == path);
        let f = f.ok_or_else(|| self.wrong_below(lvl, BasePart::ShardHeader(path.into()), "is missing"))?;
        self.header_bytes(lvl - 1, f)
    }

    /// The whole file `path` of the model below level `lvl`.
    fn parent_file(&self, lvl: usize, path: &str) -> Result<Vec<u8>> {
        if lvl == 0 {
            let p = self.base_file(path)?;
            return std::fs::read(&p).map_err(|e| self.unreadable_base_file(path, &p, e));
        }
        let below = &self.levels[lvl - 1].delta.index;
        let a = below.aux.iter().find(|a| a.path == path);
        let a = a.ok_or_else(|| self.wrong_below(lvl, BasePart::File(path.into()), "is missing"))?;
        let mut out = Vec::with_capacity(a.size as usize);
        self.stream_aux(lvl - 1, a, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// Where the base's file `p` is (checked up front by [`Ctx::check_base_files`]; a file
    /// gone since is still named as missing).
    fn base_file(&self, p: &str) -> Result<PathBuf> {
        let base = &self.chain.base;
        if !base.root.is_dir() {
            return Err(self.missing_base(vec![MissingFile {
                path: p.to_string(),
                header: false,
            }]));
        }
        Ok(base.root.join(p))
    }

    /// The error for a base file that cannot be opened: missing, or an I/O failure.
    fn unreadable_base_file(&self, rel: &str, path: &Path, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::NotFound => self.missing_base(vec![MissingFile {
                path: rel.to_string(),
                header: false,
            }]),
            _ => Error::io("reading", path, e),
        }
    }

    /// The header bytes of a weight file of level `lvl`, checked against the index.
    pub(super) fn header_bytes(&self, lvl: usize, f: &WeightFile) -> Result<Vec<u8>> {
        let delta = self.levels[lvl].delta;
        let bytes = self.blob_bytes(lvl, &f.header, f.header_len, "a shard header", |p| {
            self.parent_header(lvl, p)
        })?;
        if hash::hex(&hash::bytes(&bytes)) != f.header_hash {
            return Err(match &f.header {
                Blob::SameAsBase { path } => self.wrong_below(
                    lvl,
                    BasePart::ShardHeader(path.clone()),
                    "differs from the one the delta expects",
                ),
                _ => Error::corrupt(
                    &delta.path,
                    format!("header of {} does not match its fingerprint", f.path),
                ),
            });
        }
        check_header(delta, f, &bytes)?;
        Ok(bytes)
    }

    /// Streams an auxiliary file of level `lvl` to `out` in pieces, then checks its size and
    /// fingerprint (an error then still discards everything written).
    pub(super) fn stream_aux(&self, lvl: usize, a: &AuxEntry, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let delta = self.levels[lvl].delta;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut emit = |piece: &[u8]| -> Result<()> {
            hasher.update(piece);
            size += piece.len() as u64;
            out(piece)
        };
        match &a.blob {
            Blob::SameAsBase { path } if lvl == 0 => {
                let p = self.base_file(path)?;
                let f = std::fs::File::open(&p).map_err(|e| self.unreadable_base_file(path, &p, e))?;
                copy_pieces(f.take(a.size.saturating_add(1)), &mut emit, |e| {
                    Error::io("reading", &p, e)
                })?;
            }
            Blob::SameAsBase { path } => emit(&self.parent_file(lvl, path)?)?,
            Blob::Zstd { .. } => self.unzstd_blob(
                lvl,
                &a.blob,
                (a.size, &a.path),
                BasePart::File,
                |p| self.parent_file(lvl, p),
                &mut emit,
            )?,
            Blob::External => {
                let p = self.external_path(lvl, a)?;
                let f = std::fs::File::open(&p).map_err(|e| Error::io("reading", &p, e))?;
                copy_pieces(f.take(a.size.saturating_add(1)), &mut emit, |e| {
                    Error::io("reading", &p, e)
                })?;
            }
        }
        if size != a.size || hash::hex(hasher.finalize().as_bytes()) != a.hash {
            return Err(match &a.blob {
                Blob::SameAsBase { path } => self.wrong_below(
                    lvl,
                    BasePart::File(path.clone()),
                    "differs from the file the delta expects",
                ),
                Blob::Zstd { .. } => {
                    Error::corrupt(&delta.path, format!("file {} does not match its fingerprint", a.path))
                }
                Blob::External => Error::corrupt(
                    self.external_path(lvl, a)?,
                    format!("stored copy of {} does not match its fingerprint", a.path),
                ),
            });
        }
        Ok(())
    }

    /// Where the store keeps an external auxiliary file.
    fn external_path(&self, lvl: usize, a: &AuxEntry) -> Result<PathBuf> {
        match &self.chain.aux_store {
            Some(dir) => Ok(dir.join(&a.hash)),
            None => Err(Error::InvalidArgument(format!(
                "{}: file {} is kept in a deltapack store, not in the delta; rebuild it with `deltapack store get`",
                self.levels[lvl].delta.path.display(),
                a.path
            ))),
        }
    }

    /// The zstd dictionary a blob was compressed with (the `part` of the model below that
    /// `dict` names), checked against its recorded fingerprint.
    fn load_dict(
        &self,
        lvl: usize,
        (dict, dict_hash): (&Option<String>, &Option<String>),
        part: fn(String) -> BasePart,
        from_below: impl Fn(&str) -> Result<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        let (Some(p), Some(h)) = (dict, dict_hash) else {
            return Ok(None);
        };
        let d = from_below(p)?;
        if &hash::hex(&hash::bytes(&d)) != h {
            return Err(self.wrong_below(lvl, part(p.clone()), "differs from the one the delta was made with"));
        }
        Ok(Some(d))
    }

    fn blob_bytes(
        &self,
        lvl: usize,
        blob: &Blob,
        size: u64,
        what: &str,
        from_below: impl Fn(&str) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let delta = self.levels[lvl].delta;
        match blob {
            Blob::SameAsBase { path } => from_below(path),
            Blob::Zstd { .. } => {
                let mut out = Vec::new();
                self.unzstd_blob(lvl, blob, (size, what), BasePart::ShardHeader, from_below, &mut |b| {
                    out.extend_from_slice(b);
                    Ok(())
                })?;
                Ok(out)
            }
            Blob::External => Err(Error::corrupt(&delta.path, format!("{what} kept outside the delta"))),
        }
    }

    /// Decompresses a `zstd` blob of level `lvl` (`size` bytes of `what`) to `emit`, with its
    /// dictionary (a `part` of the model below, from `from_below`) checked first.
    fn unzstd_blob(
        &self,
        lvl: usize,
        blob: &Blob,
        (size, what): (u64, &str),
        part: fn(String) -> BasePart,
        from_below: impl Fn(&str) -> Result<Vec<u8>>,
        emit: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let Blob::Zstd {
            offset,
            len,
            dict,
            dict_hash,
        } = blob
        else {
            unreachable!("called for zstd blobs only");
        };
        let delta = self.levels[lvl].delta;
        let dict = self.load_dict(lvl, (dict, dict_hash), part, from_below)?;
        unzstd(delta, &delta.range(*offset, *len)?, dict.as_deref(), size, what, emit)
    }
}

/// A stored header must list exactly the tensors the index lists.
fn check_header(delta: &Delta, f: &WeightFile, bytes: &[u8]) -> Result<()> {
    let h = crate::checkpoint::header::parse(bytes, Some(f.size))
        .map_err(|r| Error::corrupt(&delta.path, format!("stored header of {}: {r}", f.path)))?;
    let listed: Vec<(&str, String, Vec<u64>, [u64; 2])> = f
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype.clone(), t.shape.clone(), t.data_offsets))
        .collect();
    let stored: Vec<(&str, String, Vec<u64>, [u64; 2])> = h
        .tensors
        .iter()
        .map(|t| {
            let shape = t.shape.iter().map(|&d| d as u64).collect();
            (
                t.name.as_str(),
                dtype::name(t.dtype),
                shape,
                [t.data_offsets.0 as u64, t.data_offsets.1 as u64],
            )
        })
        .collect();
    if listed != stored {
        return Err(Error::corrupt(
            &delta.path,
            format!("stored header of {} disagrees with the index", f.path),
        ));
    }
    Ok(())
}

/// Decompresses a stored blob to `emit` in pieces, reading at most one byte more than the
/// `size` promised, so that a hostile stream cannot run on forever.
fn unzstd(
    delta: &Delta,
    data: &[u8],
    dict: Option<&[u8]>,
    size: u64,
    what: &str,
    emit: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let corrupt = |e: std::io::Error| Error::corrupt(&delta.path, format!("stored {what} does not decompress: {e}"));
    let dec = match dict {
        Some(d) => zstd::stream::Decoder::with_dictionary(data, d),
        None => zstd::stream::Decoder::with_buffer(data),
    }
    .map_err(corrupt)?;
    copy_pieces(dec.take(size.saturating_add(1)), emit, corrupt)
}

/// Feeds `src` to `emit` in pieces of 1 MiB.
fn copy_pieces(
    mut src: impl Read,
    emit: &mut dyn FnMut(&[u8]) -> Result<()>,
    err: impl Fn(std::io::Error) -> Error,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).map_err(&err)?;
        if n == 0 {
            return Ok(());
        }
        emit(&buf[..n])?;
    }
}
