//! The payload of a delta in an object store: fetched by ranges, held until released.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::index::Index;
use crate::remote::RemoteFile;
use crate::Result;

/// A read-ahead fetches at most this many chunks...
const AHEAD_CHUNKS: usize = 16;
/// ...and at most this many bytes (unless one chunk is larger): with the engine's window of a
/// few chunks per thread this bounds memory as a local file's page cache would.
const AHEAD_BYTES: u64 = 32 << 20;

/// Payload bytes of a remote delta, fetched on demand.
///
/// Without read-ahead every range is its own request, so that reading one tensor fetches that
/// tensor's chunks and nothing else. With it (a whole-model rebuild), a miss fetches the
/// chunks that follow in the file too, coalesced and several requests in flight, and holds
/// them until the engine releases each one.
pub(super) struct Fetched {
    file: RemoteFile,
    /// Every chunk's (offset, len), sorted by offset: what a read-ahead may fetch.
    spans: Vec<(u64, u64)>,
    /// Bytes fetched ahead and not yet released, by offset.
    held: Mutex<BTreeMap<u64, Bytes>>,
    /// Taken while a read-ahead is in flight, so that two workers missing the same chunk do
    /// not both fetch it.
    fetching: Mutex<()>,
    ahead: AtomicBool,
}

impl Fetched {
    pub(super) fn new(file: RemoteFile, index: &Index) -> Fetched {
        let mut spans: Vec<(u64, u64)> = index
            .tensors()
            .flat_map(|t| t.chunks.iter().map(|c| (c.offset, c.len)))
            .filter(|&(_, len)| len > 0)
            .collect();
        spans.sort_unstable();
        spans.dedup();
        Fetched {
            file,
            spans,
            held: Mutex::new(BTreeMap::new()),
            fetching: Mutex::new(()),
            ahead: AtomicBool::new(false),
        }
    }

    pub(super) fn fetched(&self) -> (u64, u64) {
        self.file.fetched()
    }

    pub(super) fn read_ahead(&self, on: bool) {
        self.ahead.store(on, Ordering::Relaxed);
        if !on {
            self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Bytes `offset..offset + len`.
    pub(super) fn range(&self, offset: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Some(b) = self.held(offset, len) {
            return Ok(b);
        }
        if !self.ahead.load(Ordering::Relaxed) {
            return self.file.read(offset..offset + len);
        }
        let _one_fetch = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        // Another worker's read-ahead may have brought it while this one waited.
        if let Some(b) = self.held(offset, len) {
            return Ok(b);
        }
        let batch = self.batch_from(offset, len);
        let got = self.file.read_many(&batch)?;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // A reader that skips around never releases what it skipped: what lies before the
        // range asked for goes once more than two read-aheads are held.
        if held.values().map(|b| b.len() as u64).sum::<u64>() > 2 * AHEAD_BYTES {
            held.retain(|&o, _| o >= offset);
        }
        for (r, b) in batch.iter().zip(got) {
            held.insert(r.start, b);
        }
        drop(held);
        Ok(self
            .held(offset, len)
            .expect("the batch starts with the range asked for"))
    }

    /// The held bytes of `offset..offset + len`, if a read-ahead brought them.
    fn held(&self, offset: u64, len: u64) -> Option<Bytes> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (&start, b) = held.range(..=offset).next_back()?;
        let end = start + b.len() as u64;
        (offset + len <= end).then(|| b.slice((offset - start) as usize..(offset + len - start) as usize))
    }

    /// The range asked for, then the chunks after it in the file, up to the read-ahead bounds.
    fn batch_from(&self, offset: u64, len: u64) -> Vec<std::ops::Range<u64>> {
        let mut batch = Vec::with_capacity(AHEAD_CHUNKS);
        batch.push(offset..offset + len);
        let mut bytes = len;
        let first = self.spans.partition_point(|&(o, _)| o < offset + len);
        let next = self.spans[first..].iter().filter(|&&(o, l)| self.held(o, l).is_none());
        for &(o, l) in next.take(AHEAD_CHUNKS - 1) {
            if bytes + l > AHEAD_BYTES {
                break;
            }
            bytes += l;
            batch.push(o..o + l);
        }
        batch
    }

    /// Forgets held bytes inside `offset..offset + len`.
    pub(super) fn release(&self, offset: u64, len: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let inside: Vec<u64> = held
            .range(offset..offset + len)
            .filter(|(&o, b)| o + b.len() as u64 <= offset + len)
            .map(|(&o, _)| o)
            .collect();
        for o in inside {
            held.remove(&o);
        }
    }
}
