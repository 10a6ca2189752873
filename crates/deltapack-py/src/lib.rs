//! `deltapack._native`: the thin PyO3 layer under the `deltapack` Python package.
//!
//! Every function here takes plain values (paths as strings, tensors as numpy byte arrays)
//! and returns plain values (reports as JSON text, tensors as numpy byte arrays); the
//! Python modules beside it turn them into torch tensors, dicts and exceptions. The work
//! runs with the GIL released, on rayon's threads, and stops at Ctrl-C (see [`Signals`]).

mod calibrate;
mod errors;
mod memory;
mod resident;
mod serve;
mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deltapack::checkpoint::hub;
use deltapack::progress::Progress;
use deltapack::tune::{CodecPolicy, CodecSpec, TensorRule};
use deltapack::{Error, MakeOptions};
use pyo3::prelude::*;

use errors::PyResultExt;

/// Watches for Ctrl-C while a call runs without the GIL. The work runs on a thread of its
/// own while the calling thread (Python's main thread, the only one that runs signal
/// handlers) waits for it, taking the GIL every 50 ms to run Python's signal handlers; the
/// engine asks [`Progress::cancelled`] between chunks, on any thread. The
/// `KeyboardInterrupt` (or whatever a handler raised) is raised once the engine has stopped
/// and cleaned up.
pub(crate) struct Signals {
    raised: Mutex<Option<PyErr>>,
    stop: AtomicBool,
}

impl Signals {
    fn new() -> Self {
        Signals {
            raised: Mutex::new(None),
            stop: AtomicBool::new(false),
        }
    }

    /// Runs Python's signal handlers; a handler's exception stops the work.
    fn poll(&self) {
        if let Err(e) = Python::attach(|py| py.check_signals()) {
            if let Ok(mut raised) = self.raised.lock() {
                raised.get_or_insert(e);
            }
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Turns the engine's result into Python's. A signal handler's exception (Ctrl-C's
    /// `KeyboardInterrupt`) is raised whenever one was caught, also when the work finished
    /// before it could stop: the handler already ran, and dropping its exception would
    /// swallow the Ctrl-C. The output is then complete, never partial.
    fn finish<T>(&self, r: deltapack::Result<T>) -> PyResult<T> {
        let raised = self.raised.lock().ok().and_then(|mut r| r.take());
        match (r, raised) {
            (_, Some(e)) => Err(e),
            (r, None) => r.to_py(),
        }
    }
}

impl Progress for Signals {
    fn cancelled(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Runs `f` without the GIL, on a pool of `threads` workers when given (the global pool of
/// all cores otherwise), stopping it at Ctrl-C. A panic in the engine (a bug) becomes a
/// `DeltapackError` instead of crossing into Python.
pub(crate) fn run<T: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    f: impl FnOnce(&Signals) -> deltapack::Result<T> + Send,
) -> PyResult<T> {
    let signals = Signals::new();
    let pool = match threads {
        None => None,
        Some(n) => match rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build() {
            Ok(pool) => Some(pool),
            Err(e) => {
                return Err(errors::to_py_err(Error::InvalidArgument(format!(
                    "cannot start {n} threads: {e}"
                ))))
            }
        },
    };
    let outcome = py.detach(|| {
        std::thread::scope(|scope| {
            let (done, finished) = std::sync::mpsc::channel();
            let signals = &signals;
            let worker = scope.spawn(move || {
                let r = match &pool {
                    None => f(signals),
                    Some(pool) => pool.install(|| f(signals)),
                };
                let _ = done.send(());
                r
            });
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(Duration::from_millis(50))
            {
                signals.poll();
            }
            worker.join()
        })
    });
    match outcome {
        Ok(r) => signals.finish(r),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(errors::internal(format!(
                "internal error (a bug in deltapack; please report it): {what}"
            )))
        }
    }
}

/// A base or fine-tune argument: a local path, or ORG/NAME[@REVISION] in the local Hugging
/// Face cache (then also returned as the id to record).
pub(crate) fn resolve(arg: &str) -> deltapack::Result<(PathBuf, Option<String>)> {
    hub::resolve(Path::new(arg))
}

pub(crate) fn paths(v: Vec<String>) -> Vec<PathBuf> {
    v.into_iter().map(PathBuf::from).collect()
}

/// The codec policy of `make`'s keyword arguments; messages name the arguments.
pub(crate) fn policy(
    codec: &str,
    max_error: Option<f64>,
    tensor_codecs: Vec<String>,
    calibration: Option<String>,
) -> deltapack::Result<CodecPolicy> {
    let bad = |m: String| Error::InvalidArgument(m);
    let default: CodecSpec = codec.parse().map_err(|e| bad(format!("codec: {e}")))?;
    if let Some(e) = max_error {
        if !(e.is_finite() && e > 0.0) {
            return Err(bad("max_error must be a positive number".into()));
        }
        if !default.takes_budget() {
            return Err(bad(
                "max_error does not apply to dare: it preserves the delta only in expectation".into(),
            ));
        }
    }
    if max_error.is_none() && default == CodecSpec::Auto {
        return Err(bad("codec=\"auto\" needs max_error".into()));
    }
    let rules = tensor_codecs
        .iter()
        .map(|r| r.parse().map_err(|e| bad(format!("tensor_codecs: {e}"))))
        .collect::<deltapack::Result<Vec<TensorRule>>>()?;
    let any_lossy = default != CodecSpec::Exact || rules.iter().any(|r| r.spec != CodecSpec::Exact);
    if max_error.is_some() && !any_lossy {
        return Err(bad(
            "max_error bounds the error of lossy codecs, but every tensor is stored exactly with codec=\"exact\"; choose a lossy one, e.g. codec=\"auto\"".into(),
        ));
    }
    let calibration = calibration
        .as_deref()
        .map(|p| deltapack::tune::Calibration::open(Path::new(p)))
        .transpose()?;
    Ok(CodecPolicy {
        default,
        rules,
        max_error,
        calibration,
        ..Default::default()
    })
}

/// Options of `make` and `save`: a dict of the Python keyword arguments.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub(crate) struct MakeArgs {
    codec: String,
    max_error: Option<f64>,
    tensor_codecs: Vec<String>,
    calibration: Option<String>,
    base_id: Option<String>,
    chunk_bytes: usize,
    force: bool,
    sync: bool,
    self_contained: bool,
}

impl MakeArgs {
    pub(crate) fn options(self, hub_id: Option<String>) -> deltapack::Result<MakeOptions> {
        Ok(MakeOptions {
            base_id: self.base_id.or(hub_id),
            chunk_bytes: self.chunk_bytes,
            force: self.force,
            sync: self.sync,
            self_contained: self.self_contained,
            codecs: policy(&self.codec, self.max_error, self.tensor_codecs, self.calibration)?,
            ..Default::default()
        })
    }
}

/// The report of `make` as the CLI's `--json` gives it.
pub(crate) fn make_json(r: &deltapack::MakeReport, out: &Path, took: Duration) -> String {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["output"] = serde_json::json!(out);
    v["seconds"] = serde_json::json!(took.as_secs_f64());
    v.to_string()
}

/// The report of `apply` or `verify` as the CLI's `--json` gives it.
pub(crate) fn rebuild_json(r: &deltapack::RebuildReport, out: Option<&Path>, took: Duration) -> String {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(o) = out {
        v["output"] = serde_json::json!(o);
    }
    v["seconds"] = serde_json::json!(took.as_secs_f64());
    v["ok"] = serde_json::json!(true);
    v.to_string()
}

/// `deltapack.make`: a delta of `finetuned` against `base` (or continuing `parents`).
#[pyfunction]
#[pyo3(signature = (base, finetuned, out, parents, args, threads=None))]
fn make(
    py: Python<'_>,
    base: String,
    finetuned: String,
    out: PathBuf,
    parents: Vec<String>,
    args: MakeArgs,
    threads: Option<usize>,
) -> PyResult<String> {
    let (base, hub_id) = resolve(&base).to_py()?;
    let (finetuned, _) = resolve(&finetuned).to_py()?;
    let opts = args.options(hub_id).to_py()?;
    let parents = paths(parents);
    run(py, threads, |s| {
        let t = Instant::now();
        let r = deltapack::make_child(&base, &parents, &finetuned, &out, &opts, None, s)?;
        Ok(make_json(&r, &out, t.elapsed()))
    })
}

/// `deltapack.apply`: rebuilds the fine-tune of a delta or chain into a directory.
#[pyfunction]
#[pyo3(signature = (base, deltas, out, force=false, sync=false, threads=None))]
fn apply(
    py: Python<'_>,
    base: String,
    deltas: Vec<String>,
    out: PathBuf,
    force: bool,
    sync: bool,
    threads: Option<usize>,
) -> PyResult<String> {
    let (base, _) = resolve(&base).to_py()?;
    let deltas = paths(deltas);
    let opts = deltapack::ApplyOptions {
        force,
        sync,
        aux_store: None,
    };
    run(py, threads, |s| {
        let t = Instant::now();
        let r = deltapack::apply_chain(&base, &deltas, &out, &opts, s)?;
        Ok(rebuild_json(&r, Some(&out), t.elapsed()))
    })
}

/// `deltapack.verify`: rebuilds in memory and checks, optionally against a fine-tune.
#[pyfunction]
#[pyo3(signature = (base, deltas, finetuned=None, threads=None))]
fn verify(
    py: Python<'_>,
    base: String,
    deltas: Vec<String>,
    finetuned: Option<String>,
    threads: Option<usize>,
) -> PyResult<String> {
    let (base, _) = resolve(&base).to_py()?;
    let finetuned = finetuned.map(|f| resolve(&f).map(|r| r.0)).transpose().to_py()?;
    let deltas = paths(deltas);
    run(py, threads, |s| {
        let t = Instant::now();
        let chain = deltapack::Chain::open(&base, &deltas)?;
        let r = deltapack::verify_chain(&chain, finetuned.as_deref(), s)?;
        Ok(rebuild_json(&r, None, t.elapsed()))
    })
}

/// `deltapack.inspect`: the summary of a delta's index, as JSON.
#[pyfunction]
fn inspect(py: Python<'_>, delta: PathBuf) -> PyResult<String> {
    run(py, None, |_| {
        Ok(deltapack::inspect(&delta)?.to_json(&delta).to_string())
    })
}

/// The `deltapack` command line, for the wheel's console script: runs it on `argv` (the
/// program name first) and returns its exit status.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> u8 {
    let args = argv.into_iter().map(Into::into).collect();
    py.detach(|| deltapack_cli::main(args))
}

/// The tensor names of a checkpoint (a model directory, a `.safetensors` file or a hub ID).
#[pyfunction]
fn checkpoint_tensors(py: Python<'_>, checkpoint: String) -> PyResult<Vec<String>> {
    run(py, None, |_| {
        let (path, _) = resolve(&checkpoint)?;
        let ck = deltapack::checkpoint::Checkpoint::open(&path)?;
        Ok(ck.tensors.iter().map(|t| t.name.clone()).collect())
    })
}

/// The (name, safetensors dtype) of every tensor of a checkpoint (a model directory, a
/// `.safetensors` file or a hub ID).
#[pyfunction]
fn checkpoint_dtypes(py: Python<'_>, checkpoint: String) -> PyResult<Vec<(String, String)>> {
    run(py, None, |_| {
        let (path, _) = resolve(&checkpoint)?;
        let ck = deltapack::checkpoint::Checkpoint::open(&path)?;
        Ok(ck
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype.to_string()))
            .collect())
    })
}

/// The module `deltapack._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(make, m)?)?;
    m.add_function(wrap_pyfunction!(apply, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_dtypes, m)?)?;
    calibrate::register(m)?;
    memory::register(m)?;
    store::register(m)?;
    resident::register(m)?;
    serve::register(m)?;
    Ok(())
}
