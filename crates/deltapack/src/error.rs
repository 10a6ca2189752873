//! The library's one error type.
//!
//! Every variant names the file (and the tensor, where one is involved) and says what went
//! wrong; the CLI maps each variant to a documented exit code through [`Error::kind`].

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Broad class of an error, used by front ends to choose an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input checkpoint, argument or output location is not acceptable.
    BadInput,
    /// The base given is not the one the delta was made from.
    WrongBase,
    /// The delta file is truncated, corrupted or not a deltapack container.
    CorruptDelta,
    /// Reading or writing a file failed (missing file, permission, disk full).
    Io,
    /// A reconstruction does not match the fine-tune it was compared to.
    Mismatch,
}

/// Everything that can go wrong in deltapack.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O call failed on `path`.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint (safetensors file or model directory) is malformed or unsupported.
    #[error("bad checkpoint {path}{}: {reason}", tensor_suffix(.tensor))]
    BadCheckpoint {
        /// The file or directory.
        path: PathBuf,
        /// The tensor concerned, if any.
        tensor: Option<String>,
        /// What is wrong and, where possible, what to do.
        reason: String,
    },
    /// The delta file is not a valid deltapack container.
    #[error("corrupt delta {path}{}: {reason}", tensor_suffix(.tensor))]
    CorruptDelta {
        /// The delta file.
        path: PathBuf,
        /// The tensor concerned, if any.
        tensor: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// The base checkpoint does not match the fingerprint recorded in the delta.
    #[error("wrong base {path}: tensor '{tensor}' {reason}; this is not the base the delta was made from{}", hint(.base_id))]
    WrongBase {
        /// The base checkpoint given.
        path: PathBuf,
        /// The first tensor found to differ.
        tensor: String,
        /// How it differs.
        reason: String,
        /// Where the right base comes from, if the delta records it.
        base_id: Option<String>,
    },
    /// A delta of a chain does not continue the delta before it (or the first one is not
    /// made against the base).
    #[error("broken chain at {path}: {reason}")]
    WrongParent {
        /// The delta whose link does not hold.
        path: PathBuf,
        /// What does not match, and what to do.
        reason: String,
    },
    /// The base does not hash to the `parent_hash` a deltatensors `.wdelta` records.
    #[error("wrong base {path}: it does not hash to the parent_hash {expected} that {} records, in any of the forms deltatensors hashes a base; this is not the base the delta was made from (pass --no-base-check only if you are sure it is)", .wdelta.display())]
    WrongParentHash {
        /// The base checkpoint given.
        path: PathBuf,
        /// The `.wdelta` file.
        wdelta: PathBuf,
        /// The hash it records.
        expected: String,
    },
    /// A reconstructed file or tensor differs from the fine-tune it was compared with.
    #[error("mismatch in {path}{}: {reason}", tensor_suffix(.tensor))]
    Mismatch {
        /// The file compared.
        path: PathBuf,
        /// The tensor concerned, if any.
        tensor: Option<String>,
        /// How it differs.
        reason: String,
    },
    /// The output exists and overwriting was not allowed.
    #[error("{path} already exists; pass --force to overwrite it")]
    OutputExists {
        /// The output path.
        path: PathBuf,
    },
    /// An argument or option value is not acceptable.
    #[error("{0}")]
    InvalidArgument(String),
}

fn tensor_suffix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!(", tensor '{t}'"),
        None => String::new(),
    }
}

fn hint(base_id: &Option<String>) -> String {
    match base_id {
        Some(id) => format!(" (it was made from {id})"),
        None => String::new(),
    }
}

impl Error {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::BadCheckpoint { .. } | Error::OutputExists { .. } | Error::InvalidArgument(_) => ErrorKind::BadInput,
            Error::CorruptDelta { .. } => ErrorKind::CorruptDelta,
            Error::WrongBase { .. } | Error::WrongParent { .. } | Error::WrongParentHash { .. } => ErrorKind::WrongBase,
            Error::Mismatch { .. } => ErrorKind::Mismatch,
        }
    }

    /// Builds an [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::BadCheckpoint`] without a tensor.
    pub fn bad_checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadCheckpoint {
            path: path.into(),
            tensor: None,
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::BadCheckpoint`] about one tensor.
    pub fn bad_tensor(path: impl Into<PathBuf>, tensor: &str, reason: impl Into<String>) -> Self {
        Error::BadCheckpoint {
            path: path.into(),
            tensor: Some(tensor.to_string()),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::CorruptDelta`] without a tensor.
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::CorruptDelta {
            path: path.into(),
            tensor: None,
            reason: reason.into(),
        }
    }
}
