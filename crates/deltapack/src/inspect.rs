//! `inspect`: what a delta holds, read from its index alone.

use std::path::Path;

use serde_json::{json, Value};

use crate::container::index::{Blob, Index};
use crate::container::Delta;
use crate::Result;

/// A delta's index and file size, as [`inspect`] read them.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The delta's index.
    pub index: Index,
    /// The delta file's size in bytes.
    pub size: u64,
}

/// Reads a delta's index (only its trailer and index, never its payload) and checks it.
pub fn inspect(delta: &Path) -> Result<Inspection> {
    let (index, size) = Delta::read_index(delta)?;
    Ok(Inspection { index, size })
}

impl Inspection {
    /// Bits of delta file per parameter of the fine-tune.
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.size as f64 / self.index.tensors().map(|t| t.numel()).sum::<u64>().max(1) as f64
    }

    /// Elements that differ from the base (their prediction), over all tensors, and the
    /// elements there are; `None` for a delta older than format 1.4, which does not record it.
    pub fn changed(&self) -> Option<(u64, u64)> {
        let mut changed = 0;
        for t in self.index.tensors() {
            changed += t.changed?;
        }
        Some((changed, self.index.tensors().map(|t| t.numel()).sum()))
    }

    /// The summary the CLI's `inspect --json` prints and Python's `inspect` returns, with
    /// `path` as the delta's name.
    pub fn to_json(&self, path: &Path) -> Value {
        let index = &self.index;
        let ft = index.finetuned_bytes();
        let tensors: Vec<Value> = index
            .tensors()
            .map(|t| {
                json!({"name": t.name, "dtype": t.dtype, "shape": t.shape, "relation": t.relation,
                       "unchanged": t.unchanged(), "bytes": t.len(), "stored_bytes": t.stored_bytes(),
                       "source": t.source.as_ref().map(|s| &s.name),
                       "codec": t.codec.as_ref().map_or("exact", |c| c.name()),
                       "setting": t.codec.as_ref().map(|c| c.setting()),
                       "quality": t.quality, "changed": t.changed,
                       "density": t.changed.map(|c| c as f64 / t.numel().max(1) as f64)})
            })
            .collect();
        let aux: Vec<Value> = index
            .aux
            .iter()
            .map(|a| json!({"path": a.path, "size": a.size, "same_as_base": matches!(a.blob, Blob::SameAsBase{..})}))
            .collect();
        let files: Vec<Value> = index
            .files
            .iter()
            .map(|f| json!({"path": f.path, "size": f.size, "tensors": f.tensors.len()}))
            .collect();
        json!({
            "path": path, "size": self.size, "format_version": index.version, "created_by": index.created_by,
            "base": index.base, "parent": index.parent, "finetuned_bytes": ft, "ratio": ft as f64 / self.size as f64,
            "chunk_bytes": index.chunk_bytes,
            "changed": self.changed().map(|c| c.0),
            "density": self.changed().map(|(c, n)| c as f64 / n.max(1) as f64),
            "bits_per_param": self.bits_per_param(), "error": index.model_error(),
            "files": files, "tensors": tensors, "aux": aux, "removed": index.removed, "skipped": index.skipped,
        })
    }
}
