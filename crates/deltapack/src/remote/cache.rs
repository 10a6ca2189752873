//! The local cache of checkpoints and files fetched from object storage.
//!
//! The engine memory-maps checkpoints: a base in object storage is fetched whole, once per
//! machine, and read from here. Entries are named by what identifies their content (a store's
//! base by the BLAKE3 of its file records, a checkpoint at a URL by its objects' keys, sizes
//! and ETags, an auxiliary file by its BLAKE3), checked when fetched, and installed by an
//! atomic rename, so an entry never goes stale, concurrent processes never see half of one,
//! and none needs invalidating: a changed base has another name.

use std::path::{Path, PathBuf};

use super::{download, list, Location, ObjectLocation};
use crate::{hash, Error, Result};

/// Where fetched checkpoints and files are kept on this machine.
///
/// `DELTAPACK_CACHE_DIR`, else `$XDG_CACHE_HOME/deltapack`, else `~/.cache/deltapack`;
/// `DELTAPACK_CACHE=off` uses a temporary directory removed when the cache is dropped. It
/// grows by the checkpoints used and may be deleted at any time (what is needed is fetched
/// again).
pub(crate) struct Cache {
    root: PathBuf,
    _temporary: Option<tempfile::TempDir>,
}

/// One file of a cached directory: where it comes from, and what it must be.
pub(crate) struct CachedFile {
    /// Path inside the directory.
    pub rel: String,
    /// The object it is fetched from.
    pub loc: ObjectLocation,
    /// Its size.
    pub size: u64,
    /// Its BLAKE3 (hex), when known beforehand.
    pub blake3: Option<String>,
}

impl Cache {
    /// The cache of this process's environment.
    pub(crate) fn new() -> Result<Cache> {
        if std::env::var("DELTAPACK_CACHE").is_ok_and(|v| v == "off" || v == "0") {
            let t = tempfile::Builder::new()
                .prefix("deltapack-cache-")
                .tempdir()
                .map_err(|e| Error::io("creating a directory in", std::env::temp_dir(), e))?;
            return Ok(Cache {
                root: t.path().to_path_buf(),
                _temporary: Some(t),
            });
        }
        let root = std::env::var_os("DELTAPACK_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("deltapack")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("deltapack")))
            .unwrap_or_else(|| std::env::temp_dir().join("deltapack-cache"));
        Ok(Cache { root, _temporary: None })
    }

    /// The directory `name` (a name unique to its content), fetched with `files` if this
    /// machine lacks it.
    pub(crate) fn dir(&self, name: &str, files: &[CachedFile]) -> Result<PathBuf> {
        let dir = self.root.join(name);
        if dir.join(".complete").is_file() {
            return Ok(dir);
        }
        let staging = self.staging()?;
        for f in files {
            let dest = staging.path().join(&f.rel);
            mkdirs(dest.parent().expect("inside staging"))?;
            let (size, digest) = download(&f.loc, &dest)?;
            let wrong_hash = f.blake3.as_ref().is_some_and(|h| *h != hash::hex(&digest));
            if size != f.size || wrong_hash {
                return Err(Error::corrupt(
                    PathBuf::from(&f.loc.url),
                    "differs from what was recorded of it (size or BLAKE3); if it was replaced meanwhile, try again",
                ));
            }
        }
        let done = staging.path().join(".complete");
        std::fs::write(&done, b"").map_err(|e| Error::io("writing", &done, e))?;
        mkdirs(dir.parent().expect("inside the cache"))?;
        let from = staging.keep();
        if std::fs::rename(&from, &dir).is_err() {
            // Another process installed it first: theirs is as good.
            let _ = std::fs::remove_dir_all(&from);
            if !dir.join(".complete").is_file() {
                return Err(Error::io(
                    "installing into",
                    &dir,
                    std::io::Error::other("the cache directory could not be written"),
                ));
            }
        }
        Ok(dir)
    }

    /// The directory `sub` of files named by their BLAKE3, with each of `files` (hash,
    /// object) fetched into it if absent.
    pub(crate) fn by_content(&self, sub: &str, files: &[(String, ObjectLocation)]) -> Result<PathBuf> {
        let dir = self.root.join(sub);
        mkdirs(&dir)?;
        for (h, loc) in files {
            if dir.join(h).is_file() {
                continue;
            }
            let staging = self.staging()?;
            let tmp = staging.path().join(h);
            let (_, digest) = download(loc, &tmp)?;
            if hash::hex(&digest) != *h {
                return Err(Error::corrupt(
                    PathBuf::from(&loc.url),
                    "file does not hash to its name",
                ));
            }
            // Another process may have put the same content there first: either is right.
            let _ = std::fs::rename(&tmp, dir.join(h));
        }
        Ok(dir)
    }

    fn staging(&self) -> Result<tempfile::TempDir> {
        mkdirs(&self.root)?;
        tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(&self.root)
            .map_err(|e| Error::io("creating a directory in", &self.root, e))
    }
}

fn mkdirs(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io("creating", p, e))
}

/// A checkpoint at a URL, fetched: its local directory (or file), and the temporary
/// directory holding it when the cache is off (removed when dropped).
pub struct FetchedCheckpoint {
    /// The local directory, or file for a single `.safetensors` object.
    pub path: PathBuf,
    /// The temporary cache the path lies in, when `DELTAPACK_CACHE=off`.
    pub temporary: Option<tempfile::TempDir>,
}

/// The objects of a checkpoint at a URL, and the cache entry that holds them.
pub(crate) struct Listing {
    /// Each file: its path in the checkpoint, object and size.
    pub files: Vec<CachedFile>,
    /// The checkpoint is one `.safetensors` object (`files` has it alone).
    pub single: bool,
    /// The cache entry's name: the URL's last part and a hash of the objects' keys, sizes
    /// and ETags, so a checkpoint replaced at the same URL has another.
    pub name: String,
}

/// Lists the checkpoint at `o`: a prefix holding a model's files (`s3://BUCKET/models/base/`),
/// or one `.safetensors` object.
pub(crate) fn list_checkpoint(o: &ObjectLocation) -> Result<Listing> {
    let prefix = o.key.as_ref();
    let mut files = Vec::new();
    let mut id = blake3::Hasher::new();
    id.update(o.url.as_bytes());
    for m in list(o)? {
        let full = m.location.as_ref();
        let rel = full.strip_prefix(prefix).unwrap_or(full).trim_start_matches('/');
        if rel.is_empty() || !crate::relpath::is_safe_rel_path(rel) {
            continue;
        }
        id.update(format!("\0{rel}\0{}\0{}", m.size, m.e_tag.as_deref().unwrap_or("")).as_bytes());
        files.push(CachedFile {
            rel: rel.to_string(),
            loc: o.join(rel),
            size: m.size,
            blake3: None,
        });
    }
    let single = files.is_empty();
    if single {
        let meta = super::head(o)?;
        id.update(format!("\0{}\0{}", meta.size, meta.e_tag.as_deref().unwrap_or("")).as_bytes());
        files.push(CachedFile {
            rel: prefix.rsplit('/').next().unwrap_or("model.safetensors").to_string(),
            loc: o.clone(),
            size: meta.size,
            blake3: None,
        });
    }
    let stem = prefix
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("checkpoint");
    let name = format!("checkpoints/{stem}-{}", &hash::hex(id.finalize().as_bytes())[..32]);
    Ok(Listing { files, single, name })
}

impl Cache {
    /// The directory of the cache entry `name` if it is there, complete.
    pub(crate) fn complete(&self, name: &str) -> Option<PathBuf> {
        let dir = self.root.join(name);
        dir.join(".complete").is_file().then_some(dir)
    }
}

/// The checkpoint at `url`, fetched whole into the cache once and read from there (see
/// [`list_checkpoint`] for what a checkpoint URL names and how its cache entry is named).
pub fn fetch_checkpoint(url: &Path) -> Result<FetchedCheckpoint> {
    let Location::Object(o) = Location::of_path(url)? else {
        return Ok(FetchedCheckpoint {
            path: url.to_path_buf(),
            temporary: None,
        });
    };
    let listing = list_checkpoint(&o)?;
    let cache = Cache::new()?;
    let dir = cache.dir(&listing.name, &listing.files)?;
    Ok(FetchedCheckpoint {
        path: match listing.single {
            true => dir.join(&listing.files[0].rel),
            false => dir,
        },
        temporary: cache._temporary,
    })
}
