//! Opening a delta file: the trailer, the index and, on demand, payloads, all validated.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};

use super::fetched::Fetched;
use super::index::{Chunk, Index};
use super::{END_MAGIC, HEADER_LEN, MAGIC, MAX_INDEX_RAW_LEN, TRAILER_LEN, VERSION_MAJOR};
use crate::remote::{Location, RemoteFile};
use crate::{hash, Error, Result};

/// An opened delta: its validated index and its payload, memory-mapped from a local file or
/// fetched by ranges from an object store.
pub struct Delta {
    /// The file's path, or its URL (`s3://...`, `file://...`) for a delta in an object store.
    pub path: PathBuf,
    /// The validated index.
    pub index: Index,
    /// Size of the file in bytes.
    pub size: u64,
    source: Source,
}

/// Where a delta's payload bytes come from.
enum Source {
    Mapped(Mmap),
    Fetched(Fetched),
}

/// Bytes of a delta's payload: borrowed from the memory map, or fetched and held.
pub enum DeltaBytes<'a> {
    /// A slice of the mapped file.
    Mapped(&'a [u8]),
    /// Bytes fetched from an object store.
    Fetched(bytes::Bytes),
}

impl std::ops::Deref for DeltaBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            DeltaBytes::Mapped(b) => b,
            DeltaBytes::Fetched(b) => b,
        }
    }
}

/// A directory opens on Unix and fails only at the first read ("Is a directory"): say what
/// a delta is instead.
fn refuse_directory(path: &Path) -> Result<()> {
    if !path.is_dir() {
        return Ok(());
    }
    let looks_like_model = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
    let hint = if looks_like_model {
        "; it holds .safetensors files: a model directory is what make takes to make a delta"
    } else {
        ""
    };
    Err(Error::InvalidArgument(format!(
        "{} is a directory, not a deltapack delta (a .dpk file){hint}",
        path.display()
    )))
}

impl Delta {
    /// Opens and validates a delta (header, trailer, index; payloads are checked when read).
    ///
    /// `path` may be a URL (`s3://BUCKET/KEY`, `file:///PATH`): the delta is then read by
    /// ranges, its index first (one or two requests), each payload when asked for.
    pub fn open(path: &Path) -> Result<Delta> {
        if let Location::Object(o) = Location::of_path(path)? {
            return Self::open_remote(path, &o);
        }
        refuse_directory(path)?;
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        // SAFETY: read-only map; truncation by another process while we read would raise
        // SIGBUS, the documented limit of memory-mapped input.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping", path, e))?;
        let size = map.len() as u64;
        let (head, trailer) = split_ends(path, &map)?;
        let (offset, len) = parse_trailer(path, head, trailer, size)?;
        let index = parse_index(path, &map[offset as usize..(offset + len) as usize], trailer, offset)?;
        Ok(Delta {
            path: path.to_path_buf(),
            index,
            size,
            source: Source::Mapped(map),
        })
    }

    fn open_remote(path: &Path, o: &crate::remote::ObjectLocation) -> Result<Delta> {
        let (file, index) = read_remote_index(path, o)?;
        let size = file.size();
        Ok(Delta {
            path: path.to_path_buf(),
            source: Source::Fetched(Fetched::new(file, &index)),
            index,
            size,
        })
    }

    /// Requests made and bytes received from the object store so far (`None`: a local file).
    pub fn fetched(&self) -> Option<(u64, u64)> {
        match &self.source {
            Source::Mapped(_) => None,
            Source::Fetched(f) => Some(f.fetched()),
        }
    }

    /// Whether payloads are about to be read in file order, as `apply` reads them: a remote
    /// delta then fetches the next chunks with each request (several in flight) instead of
    /// one chunk a request. Off by default, so that random access fetches nothing it does not
    /// use.
    pub fn read_ahead(&self, on: bool) {
        if let Source::Fetched(f) = &self.source {
            f.read_ahead(on);
        }
    }

    /// Reads and validates only the header, trailer and index (what `inspect` needs).
    pub fn read_index(path: &Path) -> Result<(Index, u64)> {
        if let Location::Object(o) = Location::of_path(path)? {
            let (file, index) = read_remote_index(path, &o)?;
            return Ok((index, file.size()));
        }
        refuse_directory(path)?;
        let mut f = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let io = |e| Error::io("reading", path, e);
        let size = f.metadata().map_err(io)?.len();
        if size < HEADER_LEN + TRAILER_LEN {
            return Err(Error::corrupt(path, "file too short to be a deltapack delta"));
        }
        let mut head = [0u8; HEADER_LEN as usize];
        f.read_exact(&mut head).map_err(io)?;
        let mut trailer = [0u8; TRAILER_LEN as usize];
        f.seek(SeekFrom::Start(size - TRAILER_LEN)).map_err(io)?;
        f.read_exact(&mut trailer).map_err(io)?;
        let (offset, len) = parse_trailer(path, &head, &trailer, size)?;
        let mut packed = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(offset)).map_err(io)?;
        f.read_exact(&mut packed).map_err(io)?;
        Ok((parse_index(path, &packed, &trailer, offset)?, size))
    }

    /// The payload of a chunk, after checking its checksum.
    pub fn chunk_payload(&self, tensor: &str, c: &Chunk) -> Result<DeltaBytes<'_>> {
        let data = self.range(c.offset, c.len)?;
        if super::index::checksum(&data) != c.checksum {
            return Err(Error::CorruptDelta {
                path: self.path.clone(),
                tensor: Some(tensor.to_string()),
                reason: format!("checksum mismatch in the chunk at offset {}", c.offset),
            });
        }
        Ok(data)
    }

    /// Bytes of the payload region at `offset` (ranges were validated with the index);
    /// fetched (unless read ahead) from a remote delta.
    pub fn range(&self, offset: u64, len: u64) -> Result<DeltaBytes<'_>> {
        match &self.source {
            Source::Mapped(map) => Ok(DeltaBytes::Mapped(&map[offset as usize..(offset + len) as usize])),
            Source::Fetched(f) => f.range(offset, len).map(DeltaBytes::Fetched),
        }
    }

    /// Drops a payload range from this process's memory: the pages of a mapped file, the
    /// bytes held of a remote one.
    pub fn release(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        match &self.source {
            // SAFETY: read-only private file map, never written: dropped pages fault back in
            // with identical contents, so no reference can observe a change.
            Source::Mapped(map) => {
                let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset as usize, len as usize) };
            }
            Source::Fetched(f) => f.release(offset, len),
        }
    }
}

/// Opens a remote delta and reads its validated index: the trailer in one request, then the
/// header and the index (two ranges, fetched together). Three requests, and not a byte of
/// payload: random access to one tensor fetches the index and that tensor's chunks only.
fn read_remote_index(path: &Path, o: &crate::remote::ObjectLocation) -> Result<(RemoteFile, Index)> {
    let (file, trailer) = RemoteFile::open_tail(o, TRAILER_LEN)?;
    let size = file.size();
    if size < HEADER_LEN + TRAILER_LEN {
        return Err(Error::corrupt(path, "file too short to be a deltapack delta"));
    }
    let word = |i: usize| u64::from_le_bytes(trailer[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    // Where the trailer says the index is, checked by parse_trailer before it is trusted;
    // a hostile trailer must not make us download the whole object as its index.
    let (offset, len) = (word(0), word(1));
    let plausible =
        offset >= HEADER_LEN && len <= MAX_INDEX_RAW_LEN && offset.checked_add(len) == Some(size - TRAILER_LEN);
    let mut wanted = Vec::with_capacity(2);
    wanted.push(0..HEADER_LEN);
    if plausible {
        wanted.push(offset..offset + len);
    }
    let got = file.read_apart(&wanted)?;
    let (offset, _) = parse_trailer(path, &got[0], &trailer, size)?;
    let Some(packed) = got.get(1) else {
        return Err(Error::corrupt(path, "index too large"));
    };
    Ok((file, parse_index(path, packed, &trailer, offset)?))
}

fn split_ends<'a>(path: &Path, map: &'a [u8]) -> Result<(&'a [u8], &'a [u8])> {
    let size = map.len() as u64;
    if size < HEADER_LEN + TRAILER_LEN {
        return Err(Error::corrupt(path, "file too short to be a deltapack delta"));
    }
    Ok((&map[..HEADER_LEN as usize], &map[(size - TRAILER_LEN) as usize..]))
}

fn parse_trailer(path: &Path, head: &[u8], trailer: &[u8], size: u64) -> Result<(u64, u64)> {
    if head[..8] != MAGIC {
        return Err(Error::corrupt(path, "not a deltapack delta (bad magic)"));
    }
    let major = u16::from_le_bytes([head[8], head[9]]);
    if major != VERSION_MAJOR {
        return Err(Error::corrupt(
            path,
            format!("format version {major} is not supported by this build (it reads version {VERSION_MAJOR}); upgrade deltapack"),
        ));
    }
    if head[12..16] != [0; 4] {
        return Err(Error::corrupt(path, "unknown header flags"));
    }
    if trailer[56..] != END_MAGIC {
        return Err(Error::corrupt(
            path,
            "bad trailer: the file is truncated or was not fully written",
        ));
    }
    let word = |i: usize| u64::from_le_bytes(trailer[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (offset, len) = (word(0), word(1));
    let end = offset.checked_add(len);
    if offset < HEADER_LEN || end != Some(size - TRAILER_LEN) {
        return Err(Error::corrupt(path, "index location in the trailer is out of range"));
    }
    Ok((offset, len))
}

fn parse_index(path: &Path, packed: &[u8], trailer: &[u8], offset: u64) -> Result<Index> {
    if hash::bytes(packed)[..] != trailer[24..56] {
        return Err(Error::corrupt(path, "index checksum mismatch"));
    }
    let raw_len = u64::from_le_bytes(trailer[16..24].try_into().expect("8 bytes"));
    if raw_len > MAX_INDEX_RAW_LEN {
        return Err(Error::corrupt(path, "index too large"));
    }
    let json = zstd::bulk::decompress(packed, raw_len as usize)
        .map_err(|e| Error::corrupt(path, format!("index does not decompress: {e}")))?;
    if json.len() as u64 != raw_len {
        return Err(Error::corrupt(path, "index length mismatch"));
    }
    let index: Index =
        serde_json::from_slice(&json).map_err(|e| Error::corrupt(path, format!("index is not valid: {e}")))?;
    index
        .validate(HEADER_LEN..offset)
        .map_err(|r| Error::corrupt(path, r))?;
    Ok(index)
}
