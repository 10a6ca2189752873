//! Hugging Face safetensors checkpoints: reading model directories (sharded or not) and
//! writing reconstructed ones atomically.

pub mod header;
pub mod hub;
mod lazy;
mod read;
mod write;

pub use crate::relpath::is_safe_rel_path;
pub use read::{AuxFile, Checkpoint, MemoryTensor, Shard, Skipped, TensorBytes, TensorRef};
pub use write::{check_output_disjoint, remove_temporaries, OutputDir, OutputFile};
pub(crate) use write::{check_overwrite, ScratchDir};
