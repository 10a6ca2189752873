//! Cutting tensors into chunk jobs and grouping jobs into bounded windows.
//!
//! Jobs of one window run in parallel; windows run one after another and their results are
//! consumed in order. That bounds memory to one window of chunks, whatever the tensor or
//! model size, and keeps the output identical for any number of threads.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use crate::hash::{self, Digest};

/// One unit of parallel work: a chunk of a target tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    /// Index of the tensor in the caller's list.
    pub tensor: usize,
    /// Index of the chunk within the tensor (equal to the number of chunks for the job of an empty tensor).
    pub chunk: usize,
    /// Byte range of the target tensor.
    pub range: Range<usize>,
    /// Chunks of the source tensor whose fingerprints this job computes.
    pub source_chunks: Range<usize>,
    /// True for the tensor's last job.
    pub last: bool,
}

impl Job {
    /// Fingerprints of the source chunks this job hashes, from the source's bytes.
    pub(crate) fn hash_source(&self, src: &[u8], chunk_bytes: usize) -> Vec<Digest> {
        self.source_chunks
            .clone()
            .map(|c| hash::chunk(&src[c * chunk_bytes..((c + 1) * chunk_bytes).min(src.len())]))
            .collect()
    }

    /// The source bytes this job touches: those it hashes and `read` (what its prediction
    /// read), as one span to release.
    pub(crate) fn source_span(&self, chunk_bytes: usize, src_len: usize, read: Range<usize>) -> Range<usize> {
        let hashed = self.source_chunks.start * chunk_bytes..(self.source_chunks.end * chunk_bytes).min(src_len);
        match (hashed.is_empty(), read.is_empty()) {
            (true, _) => read,
            (_, true) => hashed,
            _ => hashed.start.min(read.start)..hashed.end.max(read.end),
        }
    }
}

/// The jobs of tensor `tensor`, `len` bytes long, predicted from a source of `source_len` bytes.
///
/// Every tensor gets at least one job (an empty one still has its fingerprints to finish);
/// source chunks beyond the target's length are hashed by the last job.
pub(crate) fn jobs(tensor: usize, len: usize, source_len: usize, chunk_bytes: usize) -> Vec<Job> {
    let n = len.div_ceil(chunk_bytes);
    let src = source_len.div_ceil(chunk_bytes);
    (0..n.max(1))
        .map(|i| {
            let last = i + 1 == n.max(1);
            let start = i.min(src);
            let end = if last { src } else { (i + 1).min(src) };
            Job {
                tensor,
                chunk: i,
                range: (i * chunk_bytes).min(len)..((i + 1) * chunk_bytes).min(len),
                source_chunks: start..end,
                last,
            }
        })
        .collect()
}

/// Runs `work` on every job on `threads` worker threads and hands each result to `consume`
/// in job order, on the calling thread.
///
/// At most `ahead` jobs may be finished or in progress beyond the next one to consume, which
/// bounds memory to a few chunks per thread whatever the model size; workers never wait on
/// each other, only on that bound. The first error from `consume` stops the workers and is
/// returned.
pub(crate) fn ordered_with<R: Send, E>(
    jobs: &[Job],
    threads: usize,
    ahead: usize,
    work: impl Fn(&Job) -> R + Sync,
    mut consume: impl FnMut(&Job, R) -> Result<(), E>,
) -> Result<(), E> {
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    // Index of the next job to consume; workers wait while they would run too far ahead.
    let consumed = (Mutex::new(0usize), Condvar::new());
    let (tx, rx) = mpsc::channel::<(usize, R)>();
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            let tx = tx.clone();
            let (next, abort, consumed, work) = (&next, &abort, &consumed, &work);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs.len() {
                    return;
                }
                let mut done = consumed.0.lock().unwrap_or_else(|e| e.into_inner());
                while i >= *done + ahead && !abort.load(Ordering::Relaxed) {
                    done = consumed.1.wait(done).unwrap_or_else(|e| e.into_inner());
                }
                drop(done);
                if abort.load(Ordering::Relaxed) || tx.send((i, work(&jobs[i]))).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        let mut pending = BTreeMap::new();
        let mut expected = 0;
        let result = (|| {
            while expected < jobs.len() {
                let Ok((i, r)) = rx.recv() else { break };
                pending.insert(i, r);
                while let Some(r) = pending.remove(&expected) {
                    consume(&jobs[expected], r)?;
                    expected += 1;
                    *consumed.0.lock().unwrap_or_else(|e| e.into_inner()) = expected;
                    consumed.1.notify_all();
                }
            }
            Ok(())
        })();
        if result.is_err() {
            abort.store(true, Ordering::Relaxed);
            consumed.1.notify_all();
        }
        result
    })
}

/// [`ordered_with`] on as many workers as the rayon pool in effect has (set by `--threads`),
/// each allowed to run a few chunks ahead of the consumer.
pub(crate) fn ordered<R: Send, E>(
    jobs: &[Job],
    work: impl Fn(&Job) -> R + Sync,
    consume: impl FnMut(&Job, R) -> Result<(), E>,
) -> Result<(), E> {
    let threads = rayon::current_num_threads().max(1);
    ordered_with(jobs, threads, 4 * threads, work, consume)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_chunk_is_hashed_once() {
        for (len, src) in [(0, 0), (0, 10), (10, 0), (10, 10), (10, 25), (25, 10), (8, 8), (9, 8)] {
            let js = jobs(0, len, src, 4);
            let hashed: Vec<usize> = js.iter().flat_map(|j| j.source_chunks.clone()).collect();
            assert_eq!(hashed, (0..src.div_ceil(4)).collect::<Vec<_>>(), "len {len} src {src}");
            let covered: usize = js.iter().map(|j| j.range.len()).sum();
            assert_eq!(covered, len);
            assert!(js.last().unwrap().last && js.iter().filter(|j| j.last).count() == 1);
        }
    }

    #[test]
    fn results_arrive_in_order_and_errors_stop_early() {
        let js: Vec<Job> = (0..50).flat_map(|t| jobs(t, 10 * t, 0, 4)).collect();
        for threads in [1, 2, 5] {
            let mut seen = Vec::new();
            let r: Result<(), ()> = ordered_with(
                &js,
                threads,
                3,
                |j| (j.tensor, j.chunk),
                |j, r| {
                    assert_eq!((j.tensor, j.chunk), r);
                    seen.push(r);
                    Ok(())
                },
            );
            assert!(r.is_ok());
            assert_eq!(seen, js.iter().map(|j| (j.tensor, j.chunk)).collect::<Vec<_>>());
        }
        let mut n = 0;
        let r = ordered_with(
            &js,
            2,
            3,
            |_| (),
            |_, _| {
                n += 1;
                if n == 10 {
                    Err("stop")
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!((r, n), (Err("stop"), 10));
    }
}
