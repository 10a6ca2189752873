//! Cutting tensors into chunk jobs and grouping jobs into bounded windows.
//!
//! Jobs of one window run in parallel; windows run one after another and their results are
//! consumed in order. That bounds memory to one window of chunks, whatever the tensor or
//! model size, and keeps the output identical for any number of threads.

use std::ops::Range;

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

/// Groups jobs into windows of about `budget` bytes of work (at least one job each).
pub(crate) fn windows(jobs: &[Job], budget: usize, chunk_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut acc = 0;
    for (i, j) in jobs.iter().enumerate() {
        acc += j.range.len() + j.source_chunks.len() * chunk_bytes / 2 + 4096;
        if acc >= budget {
            out.push(start..i + 1);
            start = i + 1;
            acc = 0;
        }
    }
    if start < jobs.len() {
        out.push(start..jobs.len());
    }
    out
}

/// Bytes of work per window: a few chunks per thread.
pub(crate) fn window_budget(chunk_bytes: usize) -> usize {
    chunk_bytes * 8 * rayon::current_num_threads().max(1)
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
    fn windows_cover_all_jobs_in_order() {
        let js: Vec<Job> = (0..5).flat_map(|t| jobs(t, 10 * t, 10 * t, 4)).collect();
        let ws = windows(&js, 12, 4);
        let flat: Vec<usize> = ws.iter().flat_map(|w| w.clone()).collect();
        assert_eq!(flat, (0..js.len()).collect::<Vec<_>>());
    }
}
