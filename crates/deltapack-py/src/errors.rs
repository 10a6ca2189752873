//! The library's errors as Python exceptions: the classes live in `deltapack/errors.py`
//! (a hierarchy under `DeltapackError`, the I/O one also an `OSError`); this file picks the
//! class by the error's kind and adds hints in Python terms (keyword arguments, not flags).

use deltapack::{Error, ErrorKind};
use pyo3::prelude::*;

/// `Result` of the library into `PyResult`.
pub(crate) trait PyResultExt<T> {
    /// The library's error as the matching `deltapack` exception.
    fn to_py(self) -> PyResult<T>;
}

impl<T> PyResultExt<T> for deltapack::Result<T> {
    fn to_py(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}

/// The exception class for an error kind, by its name in `deltapack.errors`.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::BadInput => "BadInputError",
        ErrorKind::WrongBase => "WrongBaseError",
        ErrorKind::CorruptDelta => "CorruptDeltaError",
        ErrorKind::Io => "DeltapackIOError",
        ErrorKind::Mismatch => "MismatchError",
        ErrorKind::Interrupted => "DeltapackError",
    }
}

/// What to pass next, for the errors a keyword argument answers.
fn hint(e: &Error) -> Option<&'static str> {
    match e {
        Error::OutputExists { .. } => Some("pass force=True to replace it"),
        Error::MissingBaseFiles { .. } => {
            Some("make(..., self_contained=True) makes a delta that needs only the base's tensors")
        }
        Error::WrongBase { expected, .. } if expected.swapped => {
            Some("check the order: the base comes first, then the fine-tune or the deltas")
        }
        Error::WrongParentHash { .. } => Some("pass check_base=False only if you are sure this is the right base"),
        Error::InvalidArgument(m) if m.contains("reparenting them") => {
            Some("remove(name, reparent=True) re-codes them against its parent")
        }
        _ => None,
    }
}

/// The exception for `e`: its message (with a hint on a second line), and for I/O errors
/// the OS error number as `OSError` carries it.
pub(crate) fn to_py_err(e: Error) -> PyErr {
    Python::attach(|py| {
        let mut msg = e.to_string();
        if let Some(h) = hint(&e) {
            msg.push_str("\nhint: ");
            msg.push_str(h);
        }
        let class = match py
            .import("deltapack.errors")
            .and_then(|m| m.getattr(class_name(e.kind())))
        {
            Ok(c) => c,
            Err(import_failed) => return import_failed,
        };
        let made = match &e {
            // OSError(errno, strerror, filename): `errno` and `filename` as Python code expects.
            Error::Io { source, path, .. } => {
                class.call1((source.raw_os_error(), msg, path.to_string_lossy().into_owned()))
            }
            _ => class.call1((msg,)),
        };
        match made {
            Ok(exc) => PyErr::from_value(exc),
            Err(failed) => failed,
        }
    })
}

/// A `DeltapackError` with `msg` (for failures that are no library error: a panic).
pub(crate) fn internal(msg: String) -> PyErr {
    Python::attach(|py| {
        match py
            .import("deltapack.errors")
            .and_then(|m| m.getattr("DeltapackError"))
            .and_then(|c| c.call1((msg,)))
        {
            Ok(exc) => PyErr::from_value(exc),
            Err(failed) => failed,
        }
    })
}
