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
    /// The caller stopped the operation (see [`crate::progress::Progress::cancelled`]).
    Interrupted,
}

/// Everything that can go wrong in deltapack.
///
/// Messages name the files and tensors involved and say what to do in the library's terms;
/// they name no command-line flag or keyword argument: front ends add those hints (the CLI
/// through the variant, see `deltapack-cli`). New variants may be added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    #[error(
        "wrong base {path}: {part} {reason}; this is not the base the delta was made from{}{}",
        expects(&.expected.id, &.expected.fingerprint),
        swap_hint(.expected.swapped)
    )]
    WrongBase {
        /// The base checkpoint given.
        path: PathBuf,
        /// The first tensor or file found to differ.
        part: BasePart,
        /// How it differs.
        reason: String,
        /// Which base the delta expects (boxed: errors travel in every `Result`).
        expected: Box<ExpectedBase>,
    },
    /// The base lacks files the delta was made against (configs, tokenizers, or, for deltas
    /// of older writers, shard headers): the base's tensors may well be right, but it is given
    /// as a single file or a directory in another form.
    #[error("{}", missing_files(.path, .files, *.single_file))]
    MissingBaseFiles {
        /// The base checkpoint given.
        path: PathBuf,
        /// Every missing file, by its path relative to the base directory, with what it is
        /// needed for.
        files: Vec<MissingFile>,
        /// The base was given as a single safetensors file.
        single_file: bool,
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
    #[error("wrong base {path}: it does not hash to the parent_hash {expected} that {} records, in any of the forms deltatensors hashes a base; this is not the base the delta was made from (skip this check only for a base known to be right)", .wdelta.display())]
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
    #[error("{path} already exists")]
    OutputExists {
        /// The output path.
        path: PathBuf,
    },
    /// A request to an object store failed (after its retries), or its answer made no sense.
    #[error("{op} {url}: {reason}")]
    Remote {
        /// What was being done ("reading", "uploading to", ...).
        op: &'static str,
        /// The object's URL.
        url: String,
        /// What the store said, and what to do.
        reason: String,
    },
    /// An argument or option value is not acceptable.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller stopped the operation; nothing was written.
    #[error("interrupted; nothing was written")]
    Interrupted,
}

fn tensor_suffix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!(", tensor '{t}'"),
        None => String::new(),
    }
}

/// A part of a base checkpoint that a delta reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BasePart {
    /// A tensor, by name.
    Tensor(String),
    /// A file other than a safetensors file (config, tokenizer), by relative path.
    File(String),
    /// The header of a safetensors file, by the file's relative path.
    ShardHeader(String),
}

impl std::fmt::Display for BasePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BasePart::Tensor(t) => write!(f, "tensor '{t}'"),
            BasePart::File(p) => write!(f, "file '{p}'"),
            BasePart::ShardHeader(p) => write!(f, "the header of '{p}'"),
        }
    }
}

/// What a delta records of the base it expects, for [`Error::WrongBase`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpectedBase {
    /// Where the right base comes from, if the delta records it.
    pub id: Option<String>,
    /// The base fingerprint the delta records (see [`crate::base_fingerprint`]), where
    /// the delta has one; shown shortened, to compare with `inspect` of the delta.
    pub fingerprint: Option<String>,
    /// The base given has, where the delta expects the base's tensor, the tensor the delta
    /// rebuilds: the base and the fine-tune were likely swapped.
    pub swapped: bool,
}

impl ExpectedBase {
    /// The same, with [`ExpectedBase::swapped`] set to `swapped`.
    pub fn swapped(mut self: Box<Self>, swapped: bool) -> Box<ExpectedBase> {
        self.swapped = swapped;
        self
    }
}

/// A base file a delta needs but the base given lacks ([`Error::MissingBaseFiles`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFile {
    /// Path relative to the base directory.
    pub path: String,
    /// Only the file's safetensors header is needed (deltas of older writers coded shard
    /// headers against the base's): the base was in another shard layout.
    pub header: bool,
}

/// Characters of a fingerprint shown in messages: enough to tell bases apart at a glance.
const SHORT_FINGERPRINT: usize = 16;

fn expects(base_id: &Option<String>, fingerprint: &Option<String>) -> String {
    let short = fingerprint.as_deref().map(|f| &f[..f.len().min(SHORT_FINGERPRINT)]);
    match (base_id, short) {
        (Some(id), Some(fp)) => format!(" (it was made from {id}, base fingerprint {fp})"),
        (Some(id), None) => format!(" (it was made from {id})"),
        (None, Some(fp)) => format!(" (it was made from a base of fingerprint {fp})"),
        (None, None) => String::new(),
    }
}

fn swap_hint(swapped: bool) -> &'static str {
    match swapped {
        true => {
            "; the base given looks like the fine-tune this delta rebuilds: were the base and the fine-tune swapped?"
        }
        false => "",
    }
}

fn missing_files(path: &std::path::Path, files: &[MissingFile], single_file: bool) -> String {
    let list = files
        .iter()
        .map(|f| match f.header {
            true => format!("{} (its safetensors header)", f.path),
            false => f.path.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let headers = match files.iter().any(|f| f.header) {
        true => " (a delta of an older deltapack refers to the base's shard headers, so it needs the base in the shard layout it was made against; one made again does not)",
        false => "",
    };
    let give = match single_file {
        true => "the base is given as a single safetensors file: give its directory, which has them",
        false => "give a base directory that has them",
    };
    format!(
        "base {} lacks files the delta needs from it: {list}{headers}; {give}, or use a delta made self-contained, which needs only the base's tensors",
        path.display()
    )
}

impl Error {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::Remote { .. } => ErrorKind::Io,
            Error::BadCheckpoint { .. }
            | Error::MissingBaseFiles { .. }
            | Error::OutputExists { .. }
            | Error::InvalidArgument(_) => ErrorKind::BadInput,
            Error::CorruptDelta { .. } => ErrorKind::CorruptDelta,
            Error::WrongBase { .. } | Error::WrongParent { .. } | Error::WrongParentHash { .. } => ErrorKind::WrongBase,
            Error::Mismatch { .. } => ErrorKind::Mismatch,
            Error::Interrupted => ErrorKind::Interrupted,
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
