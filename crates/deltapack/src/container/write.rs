//! Writing a delta file in one forward pass.

use std::io::Write;
use std::path::Path;

use super::index::Index;
use super::{END_MAGIC, HEADER_LEN, MAGIC, VERSION_MAJOR, VERSION_MINOR};
use crate::checkpoint::OutputFile;
use crate::remote::{Location, Upload};
use crate::{hash, Error, Result};

/// zstd level for stored files and the index: they are small, so spend time on ratio.
const ZSTD_LEVEL: i32 = 19;
/// zstd level for the index: mostly fingerprints, which no level compresses. On the reference
/// pair's 157 KB index, 15 gives the same size as 19 (36.4 KB) in under half the time (30 vs
/// 70 ms, spent after every chunk is written, so on the wall clock).
const INDEX_ZSTD_LEVEL: i32 = 15;

/// Appends payloads to a new delta file and finishes it with the index and trailer.
pub struct ContainerWriter {
    out: Output,
    pos: u64,
    hasher: blake3::Hasher,
}

/// Where a delta being written goes: both appear whole at their name only when finished.
enum Output {
    File(OutputFile),
    Object(Upload),
}

impl Output {
    fn create(path: &Path, force: bool) -> Result<Output> {
        match Location::of_path(path)? {
            Location::Local(p) => OutputFile::create(&p, force).map(Output::File),
            Location::Object(o) => Upload::create(&o, force).map(Output::Object),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Output::File(f) => f.write_all(bytes),
            Output::Object(u) => u.write_all(bytes),
        }
    }

    fn target(&self) -> &Path {
        match self {
            Output::File(f) => f.target(),
            Output::Object(u) => Path::new(u.url()),
        }
    }

    fn commit(self, sync: bool) -> Result<()> {
        match self {
            Output::File(f) => f.commit(sync),
            // An object is durable once the store acknowledges it.
            Output::Object(u) => u.commit(),
        }
    }
}

impl ContainerWriter {
    /// Creates the file under a temporary name (or starts an upload, for a URL) and writes
    /// the fixed header.
    pub fn create(path: &Path, force: bool) -> Result<ContainerWriter> {
        let mut out = Output::create(path, force)?;
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
        head.extend_from_slice(&VERSION_MINOR.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        debug_assert_eq!(head.len() as u64, HEADER_LEN);
        out.write_all(&head)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        Ok(ContainerWriter {
            out,
            pos: HEADER_LEN,
            hasher,
        })
    }

    /// Appends a payload and returns its offset.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.pos;
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(at)
    }

    /// Appends `data` zstd-compressed (with `dict` as a raw-content dictionary); returns (offset, len).
    pub fn append_zstd(&mut self, data: &[u8], dict: Option<&[u8]>) -> Result<(u64, u64)> {
        let compressed = compress(data, dict).map_err(|e| Error::io("compressing for", self.out.target(), e))?;
        let at = self.append(&compressed)?;
        Ok((at, compressed.len() as u64))
    }

    /// `data` zstd-compressed as [`ContainerWriter::append_zstd_file`] would store it (with
    /// `dict` as a raw-content dictionary), for a writer that compares codings first.
    pub fn compress(data: &[u8], dict: Option<&[u8]>) -> std::io::Result<Vec<u8>> {
        compress_level(data, dict, file_level(data.len() as u64))
    }

    /// Streams a file into the container zstd-compressed; returns (offset, len, size, digest).
    pub fn append_zstd_file(&mut self, path: &Path, dict: Option<&[u8]>) -> Result<(u64, u64, u64, hash::Digest)> {
        let at = self.pos;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let size = f.metadata().map_err(|e| Error::io("reading", path, e))?.len();
        let level = file_level(size);
        let mut counter = Counter {
            inner: self,
            written: 0,
        };
        let mut enc = match dict {
            Some(d) => zstd::stream::Encoder::with_dictionary(&mut counter, level, d),
            None => zstd::stream::Encoder::new(&mut counter, level),
        }
        .map_err(|e| Error::io("compressing", path, e))?;
        // Telling zstd the size lets it shrink its window (and memory) to fit small files.
        enc.set_pledged_src_size(Some(size))
            .map_err(|e| Error::io("compressing", path, e))?;
        let mut hasher = blake3::Hasher::new();
        let size = copy_hashing(&mut f, &mut enc, &mut hasher).map_err(|e| Error::io("storing", path, e))?;
        enc.finish().map_err(|e| Error::io("storing", path, e))?;
        let len = counter.written;
        Ok((at, len, size, *hasher.finalize().as_bytes()))
    }

    /// Writes the index and trailer and renames the file into place; returns its size and
    /// BLAKE3.
    pub fn finish(mut self, index: &Index, sync: bool) -> Result<(u64, hash::Digest)> {
        let json = serde_json::to_vec(index).expect("index serialises");
        let packed = compress_level(&json, None, INDEX_ZSTD_LEVEL)
            .map_err(|e| Error::io("compressing index of", self.out.target(), e))?;
        let at = self.append(&packed)?;
        let mut trailer = Vec::with_capacity(64);
        trailer.extend_from_slice(&at.to_le_bytes());
        trailer.extend_from_slice(&(packed.len() as u64).to_le_bytes());
        trailer.extend_from_slice(&(json.len() as u64).to_le_bytes());
        trailer.extend_from_slice(&hash::bytes(&packed));
        trailer.extend_from_slice(&END_MAGIC);
        self.append(&trailer)?;
        let (size, digest) = (self.pos, *self.hasher.finalize().as_bytes());
        self.out.commit(sync)?;
        Ok((size, digest))
    }
}

/// zstd level for a stored file of `size` bytes: level 19 runs at a few MB/s, worth it for
/// configs and tokenizers, not for big blobs.
fn file_level(size: u64) -> i32 {
    if size <= 32 << 20 {
        ZSTD_LEVEL
    } else {
        6
    }
}

fn compress(data: &[u8], dict: Option<&[u8]>) -> std::io::Result<Vec<u8>> {
    compress_level(data, dict, ZSTD_LEVEL)
}

fn compress_level(data: &[u8], dict: Option<&[u8]>, level: i32) -> std::io::Result<Vec<u8>> {
    let mut c = match dict {
        Some(d) => zstd::bulk::Compressor::with_dictionary(level, d)?,
        None => zstd::bulk::Compressor::new(level)?,
    };
    c.compress(data)
}

fn copy_hashing(src: &mut impl std::io::Read, dst: &mut impl Write, h: &mut blake3::Hasher) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        h.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
        total += n as u64;
    }
}

struct Counter<'a> {
    inner: &'a mut ContainerWriter,
    written: u64,
}

impl Write for Counter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.append(buf).map_err(std::io::Error::other)?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
