//! The delta file (`.dpk`): a versioned container of coded chunks, stored files and an index.
//!
//! Layout (all integers little-endian; see `docs/FORMAT.md` for the full specification):
//!
//! ```text
//! magic "\x89DPK\r\n\x1a\n" | major u16 | minor u16 | flags u32 (0)   -- 16 bytes
//! payload: chunk payloads, stored headers and files, in any order, never overlapping
//! index: zstd-compressed JSON (see [`index::Index`])
//! trailer: index_offset u64 | index_len u64 | index_raw_len u64 | blake3(index) [32] | "DPKINDEX"  -- 64 bytes
//! ```
//!
//! The index sits at the end so that the payload can be streamed out in one pass; readers
//! seek to the trailer, so `inspect` reads only the trailer and index.

mod fetched;
pub mod index;
mod read;
mod write;

pub use read::{Delta, DeltaBytes};
pub use write::ContainerWriter;

/// First bytes of every delta file.
pub const MAGIC: [u8; 8] = *b"\x89DPK\r\n\x1a\n";
/// Last bytes of every delta file.
pub const END_MAGIC: [u8; 8] = *b"DPKINDEX";
/// Major format version written and accepted by this build.
pub const VERSION_MAJOR: u16 = 1;
/// Minor format version written by this build (readers accept any minor of their major).
pub const VERSION_MINOR: u16 = 4;
/// Size of the fixed file header.
pub const HEADER_LEN: u64 = 16;
/// Size of the fixed trailer.
pub const TRAILER_LEN: u64 = 64;
/// Largest accepted uncompressed index.
pub const MAX_INDEX_RAW_LEN: u64 = 1 << 30;
