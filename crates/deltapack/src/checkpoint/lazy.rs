//! Checkpoints at URLs read by ranges: each tensor fetched when it is first read.
//!
//! The engine reads checkpoints through memory maps. A checkpoint opened lazily is laid out in
//! a temporary directory as it would be on disk: its small files (configs, tokenizers, the
//! shard index) fetched whole, and each shard as a sparse file of the object's size holding
//! its header, memory-mapped as usual. A tensor's bytes are fetched by ranges (16 MiB at a
//! time, so memory stays bounded) and written into the sparse file the first time
//! [`Checkpoint::tensor_bytes`] asks for them; the shared map sees them through the page
//! cache, and releasing pages is as safe as for any file, since they fault back with the
//! same contents. One tensor's random access fetches the shard headers and that tensor only.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use super::{Checkpoint, TensorRef};
use crate::remote::{self, Location, RemoteFile};
use crate::{Error, Result};

/// Bytes fetched per request while filling a tensor.
const PIECE: u64 = 16 << 20;

/// The remote side of a lazily opened checkpoint.
pub(crate) struct Lazy {
    /// The temporary directory the checkpoint is laid out in.
    _dir: tempfile::TempDir,
    /// By shard index: the object, the sparse file, the tensors (by data start) fetched.
    shards: Vec<LazyShard>,
}

struct LazyShard {
    remote: RemoteFile,
    file: File,
    prefix_len: u64,
    fetched: Mutex<HashSet<usize>>,
}

impl Checkpoint {
    /// Opens a checkpoint for reading by ranges when `path` is a URL (see the module docs);
    /// a local path, or a checkpoint the local cache holds whole, opens as
    /// [`Checkpoint::open`] does. Read its tensors through [`Checkpoint::tensor_bytes`].
    pub fn open_lazy(path: &Path) -> Result<Checkpoint> {
        let Location::Object(o) = Location::of_path(path)? else {
            return Checkpoint::open(path);
        };
        let listing = remote::list_checkpoint(&o)?;
        let cache = remote::Cache::new()?;
        if let Some(dir) = cache.complete(&listing.name) {
            let local = match listing.single {
                true => dir.join(&listing.files[0].rel),
                false => dir,
            };
            return Checkpoint::open(&local);
        }
        let dir = tempfile::Builder::new()
            .prefix("deltapack-lazy-")
            .tempdir()
            .map_err(|e| Error::io("creating a directory in", std::env::temp_dir(), e))?;
        let mut sparse = Vec::new();
        for f in &listing.files {
            let dest = dir.path().join(&f.rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
            }
            if !f.rel.ends_with(".safetensors") {
                remote::download(&f.loc, &dest)?;
                continue;
            }
            sparse.push((f.rel.clone(), lay_out_shard(&f.loc, &dest)?));
        }
        let root = match listing.single {
            true => dir.path().join(&listing.files[0].rel),
            false => dir.path().to_path_buf(),
        };
        let mut ck = Checkpoint::open(&root)?;
        let mut shards = Vec::new();
        for s in &ck.shards {
            let Some(i) = sparse.iter().position(|(rel, _)| *rel == s.rel || listing.single) else {
                return Err(Error::bad_checkpoint(path, format!("shard {} was not fetched", s.rel)));
            };
            let (remote, file) = sparse.swap_remove(i).1;
            shards.push(LazyShard {
                remote,
                file,
                prefix_len: s.prefix_len as u64,
                fetched: Mutex::new(HashSet::new()),
            });
        }
        ck.lazy = Some(Lazy { _dir: dir, shards });
        Ok(ck)
    }

    /// The bytes of tensor `t`, fetched first if this checkpoint is read by ranges.
    pub fn tensor_bytes(&self, t: &TensorRef) -> Result<&[u8]> {
        if let Some(lazy) = &self.lazy {
            lazy.shards[t.shard].fill(t)?;
        }
        Ok(self.bytes(t))
    }

    /// Fetches every tensor not fetched yet (a lazily opened checkpoint that is about to be
    /// read whole, by code that reads it through [`Checkpoint::bytes`]).
    pub fn fetch_all(&self) -> Result<()> {
        let Some(lazy) = &self.lazy else { return Ok(()) };
        self.tensors.iter().try_for_each(|t| lazy.shards[t.shard].fill(t))
    }
}

impl LazyShard {
    /// Fetches tensor `t`'s bytes into the sparse file, unless they are there.
    fn fill(&self, t: &TensorRef) -> Result<()> {
        let (start, end) = t.data_offsets;
        let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        if start == end || fetched.contains(&start) {
            return Ok(());
        }
        let (from, to) = (self.prefix_len + start as u64, self.prefix_len + end as u64);
        let mut at = from;
        while at < to {
            let piece = self.remote.read(at..(at + PIECE).min(to))?;
            write_at(&self.file, &piece, at).map_err(|e| Error::io("writing", self.remote.url(), e))?;
            at += piece.len() as u64;
        }
        fetched.insert(start);
        Ok(())
    }
}

/// Creates `dest` as a sparse file of the shard object's size holding its header (8-byte
/// length and JSON); returns the opened object and the file.
fn lay_out_shard(loc: &remote::ObjectLocation, dest: &Path) -> Result<(RemoteFile, File)> {
    let (remote, _) = RemoteFile::open_tail(loc, 1)?;
    let path = || std::path::PathBuf::from(&loc.url);
    if remote.size() < 8 {
        return Err(Error::bad_checkpoint(path(), "file too short to be a safetensors file"));
    }
    let len = remote.read(0..8)?;
    let n = u64::from_le_bytes(len[..].try_into().expect("8 bytes"));
    if n > 100 << 20 || 8 + n > remote.size() {
        return Err(Error::bad_checkpoint(path(), "header length out of range"));
    }
    let header = remote.read(8..8 + n)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| Error::io("creating", dest, e))?;
    file.set_len(remote.size()).map_err(|e| Error::io("sizing", dest, e))?;
    write_at(&file, &len, 0).map_err(|e| Error::io("writing", dest, e))?;
    write_at(&file, &header, 8).map_err(|e| Error::io("writing", dest, e))?;
    Ok((remote, file))
}

#[cfg(unix)]
fn write_at(f: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, bytes, at)
}

#[cfg(not(unix))]
fn write_at(f: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = f;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(bytes)
}
