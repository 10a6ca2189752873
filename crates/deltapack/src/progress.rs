//! Progress reporting: the library calls an observer; front ends draw bars or stay silent.

/// Receives progress events from long operations. Methods may be called from any thread.
pub trait Progress: Sync {
    /// A phase starts ("make", "apply", "verify") that will process `total` bytes.
    fn begin(&self, _phase: &str, _total: u64) {}
    /// `bytes` more bytes were processed.
    fn advance(&self, _bytes: u64) {}
    /// The current phase ended.
    fn finish(&self) {}
    /// True when the caller wants the operation stopped (a Python front end's Ctrl-C). Long
    /// operations ask between chunks, from the thread that called them, and then fail with
    /// [`crate::Error::Interrupted`], leaving no output behind.
    fn cancelled(&self) -> bool {
        false
    }
}

/// An observer that ignores everything.
pub struct NoProgress;

impl Progress for NoProgress {}
