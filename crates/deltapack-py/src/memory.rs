//! Models in memory: `load` (a whole fine-tune as numpy byte arrays), `Reader` (one tensor
//! at a time, for `safe_open`) and `save` (a delta made from tensors Python holds).
//!
//! Tensors cross the boundary as 1-D `uint8` numpy arrays of their safetensors bytes: the
//! Python layer views them as torch tensors of the right dtype and shape without a copy
//! (numpy has no bfloat16, so bytes are the one form every dtype shares).

use std::path::PathBuf;
use std::time::Instant;

use deltapack::checkpoint::{Checkpoint, MemoryTensor};
use deltapack::progress::Progress;
use deltapack::Chain;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::PyResultExt;
use crate::{make_json, paths, resolve, run, MakeArgs};

/// A tensor as Python receives it: name, safetensors dtype name, shape, bytes.
pub(crate) type PyTensor<'py> = (String, String, Vec<usize>, Bound<'py, PyArray1<u8>>);

/// A model rebuilt in memory as Python receives it: tensors, other files, the weight files'
/// metadata (JSON) and the report (JSON).
pub(crate) type PyModel<'py> = (Vec<PyTensor<'py>>, Bound<'py, PyDict>, String, String);

fn dtype_name(d: deltapack::Dtype) -> String {
    format!("{d:?}")
}

fn to_py_tensor(py: Python<'_>, t: deltapack::LoadedTensor) -> PyTensor<'_> {
    // from_vec hands the buffer to numpy without copying it.
    (t.name, dtype_name(t.dtype), t.shape, PyArray1::from_vec(py, t.bytes))
}

/// Opens a chain, with the content-addressed files of a store where given.
fn open_chain(base: &str, deltas: Vec<String>, aux_store: Option<PathBuf>) -> deltapack::Result<Chain> {
    let (base, _) = resolve(base)?;
    let mut chain = Chain::open(&base, &paths(deltas))?;
    chain.aux_store = aux_store;
    Ok(chain)
}

/// `load`: the whole fine-tune in memory, every check of `apply` made. Returns the tensors,
/// the other files, the weight files' metadata (JSON) and the report (JSON).
#[pyfunction]
#[pyo3(signature = (base, deltas, aux_store=None, threads=None))]
fn load<'py>(
    py: Python<'py>,
    base: String,
    deltas: Vec<String>,
    aux_store: Option<PathBuf>,
    threads: Option<usize>,
) -> PyResult<PyModel<'py>> {
    let model = run(py, threads, |s| {
        let chain = open_chain(&base, deltas, aux_store)?;
        deltapack::load_chain(&chain, s)
    })?;
    to_py_model(py, model)
}

/// A model rebuilt by `load_chain`, handed to Python without copying its tensors.
pub(crate) fn to_py_model(py: Python<'_>, model: deltapack::LoadedModel) -> PyResult<PyModel<'_>> {
    let files = PyDict::new(py);
    for f in model.files {
        files.set_item(f.path, PyBytes::new(py, &f.bytes))?;
    }
    let metadata = serde_json::Value::Object(model.metadata).to_string();
    let report = crate::rebuild_json(&model.report, None, std::time::Duration::ZERO);
    let tensors = model.tensors.into_iter().map(|t| to_py_tensor(py, t)).collect();
    Ok((tensors, files, metadata, report))
}

/// Random access to the tensors and files of the model a delta or chain rebuilds: the
/// engine of `deltapack.safe_open`. Each tensor read is rebuilt from its own chunks and
/// checked against its fingerprint and its base tensor's.
#[pyclass(module = "deltapack._native", frozen)]
struct Reader {
    chain: Chain,
}

#[pymethods]
impl Reader {
    #[new]
    #[pyo3(signature = (base, deltas, aux_store=None))]
    fn new(py: Python<'_>, base: String, deltas: Vec<String>, aux_store: Option<PathBuf>) -> PyResult<Self> {
        let chain = run(py, None, |_| {
            let chain = open_chain(&base, deltas, aux_store)?;
            deltapack::ChainReader::new(&chain)?;
            Ok(chain)
        })?;
        Ok(Reader { chain })
    }

    /// The tensors' names, dtypes and shapes, in file order.
    fn tensors(&self) -> PyResult<Vec<(String, String, Vec<u64>)>> {
        let r = deltapack::ChainReader::new(&self.chain).to_py()?;
        Ok(r.tensors()
            .map(|t| (t.name.clone(), t.dtype.clone(), t.shape.clone()))
            .collect())
    }

    /// One tensor's bytes, rebuilt and checked.
    fn tensor<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let bytes = run(py, None, |_| deltapack::ChainReader::new(&self.chain)?.tensor(&name))?;
        Ok(PyArray1::from_vec(py, bytes))
    }

    /// The weight files' `__metadata__`, merged, as JSON.
    fn metadata(&self, py: Python<'_>) -> PyResult<String> {
        run(py, None, |_| {
            let m = deltapack::ChainReader::new(&self.chain)?.metadata()?;
            Ok(serde_json::Value::Object(m).to_string())
        })
    }

    /// The paths of the other files the model has (config, tokenizer, ...).
    fn files(&self) -> PyResult<Vec<String>> {
        let r = deltapack::ChainReader::new(&self.chain).to_py()?;
        Ok(r.files().map(str::to_string).collect())
    }

    /// The contents of one of those files, checked against its hash.
    fn file<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = run(py, None, |_| deltapack::ChainReader::new(&self.chain)?.file(&path))?;
        Ok(PyBytes::new(py, &bytes))
    }
}

/// The bytes of a numpy array that Python keeps alive (and read-only borrowed) while the
/// checkpoint built on them is in use.
struct Borrowed {
    ptr: *const u8,
    len: usize,
}

// SAFETY: `Borrowed` is a read-only view of a numpy buffer; `save` holds a read-only borrow
// of every array (numpy's borrow flags then refuse writers from Rust, and the arrays are
// owned by Python objects that outlive the call) until the checkpoint made of these views
// is dropped, which happens before `save` returns. Reading plain bytes from several threads
// is sound.
unsafe impl Send for Borrowed {}
// SAFETY: as for Send: shared read-only access to bytes that do not move or change.
unsafe impl Sync for Borrowed {}

impl AsRef<[u8]> for Borrowed {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` and `len` come from a live, contiguous numpy array that stays
        // borrowed while this view exists (see the Send impl).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A tensor as Python hands it over: name, safetensors dtype name, shape, bytes.
pub(crate) type GivenTensor<'py> = (String, String, Vec<usize>, PyReadonlyArray1<'py, u8>);

/// Views of the given tensors' bytes, for [`Checkpoint::from_memory`]; the arrays must stay
/// borrowed until the checkpoint is dropped (see [`Borrowed`]).
pub(crate) fn memory_tensors(label: &std::path::Path, tensors: &[GivenTensor<'_>]) -> PyResult<Vec<MemoryTensor>> {
    let mut given = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, array) in tensors {
        let Some(dtype) = deltapack::checkpoint::header::parse_dtype(dtype) else {
            return Err(crate::errors::to_py_err(deltapack::Error::bad_tensor(
                label,
                name,
                format!("dtype '{dtype}' is not a safetensors dtype"),
            )));
        };
        let bytes = array.as_slice().map_err(|_| {
            crate::errors::to_py_err(deltapack::Error::bad_tensor(
                label,
                name,
                "its bytes are not contiguous",
            ))
        })?;
        given.push(MemoryTensor {
            name: name.clone(),
            dtype,
            shape: shape.clone(),
            bytes: Box::new(Borrowed {
                ptr: bytes.as_ptr(),
                len: bytes.len(),
            }),
        });
    }
    Ok(given)
}

fn parse_metadata(metadata: Option<String>) -> PyResult<Option<serde_json::Value>> {
    metadata
        .map(|m| serde_json::from_str::<serde_json::Value>(&m))
        .transpose()
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("metadata: {e}")))
}

/// `save`: a delta of tensors held in memory against `base`, as `make` would make it of the
/// same tensors written to `model.safetensors` with `metadata`; `files` is a directory whose
/// other files (config, tokenizer) travel with the delta.
#[pyfunction]
#[pyo3(signature = (base, tensors, out, parents, args, files=None, metadata=None, label=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn save(
    py: Python<'_>,
    base: String,
    tensors: Vec<GivenTensor<'_>>,
    out: PathBuf,
    parents: Vec<String>,
    args: MakeArgs,
    files: Option<PathBuf>,
    metadata: Option<String>,
    label: Option<String>,
    threads: Option<usize>,
) -> PyResult<String> {
    let (base, hub_id) = resolve(&base).to_py()?;
    let opts = args.options(hub_id).to_py()?;
    let label = PathBuf::from(label.unwrap_or_else(|| "<state dict>".into()));
    let metadata = parse_metadata(metadata)?;
    let given = memory_tensors(&label, &tensors)?;
    let parents = paths(parents);
    run(py, threads, move |s| {
        let t = Instant::now();
        let ck = Checkpoint::from_memory(&label, given, metadata, files.as_deref())?;
        let r = deltapack::make_child_from(&base, &parents, &ck, &out, &opts, None, s)?;
        Ok(make_json(&r, &out, t.elapsed()))
    })
}

/// `save` with the base in memory too (for arrays handed over by a script, as deltatensors'
/// API takes them): both sides are single-file checkpoints with the given metadata.
#[pyfunction]
#[pyo3(signature = (base_tensors, tensors, out, args, metadata=None, threads=None))]
fn save_pair(
    py: Python<'_>,
    base_tensors: Vec<GivenTensor<'_>>,
    tensors: Vec<GivenTensor<'_>>,
    out: PathBuf,
    args: MakeArgs,
    metadata: Option<String>,
    threads: Option<usize>,
) -> PyResult<String> {
    let opts = args.options(None).to_py()?;
    let metadata = parse_metadata(metadata)?;
    let (base_label, ft_label) = (PathBuf::from("<base tensors>"), PathBuf::from("<tensors>"));
    let base_given = memory_tensors(&base_label, &base_tensors)?;
    let given = memory_tensors(&ft_label, &tensors)?;
    run(py, threads, move |s| {
        let t = Instant::now();
        let base = Checkpoint::from_memory(&base_label, base_given, metadata.clone(), None)?;
        let ck = Checkpoint::from_memory(&ft_label, given, metadata, None)?;
        let r = deltapack::make_from(&base, &ck, &out, &opts, s)?;
        Ok(make_json(&r, &out, t.elapsed()))
    })
}

/// `load` on a base held in memory: the fine-tune's tensors and the report (JSON). The
/// delta's files stored against the base's cannot be rebuilt (the base has none here), so
/// only tensors are returned.
#[pyfunction]
#[pyo3(signature = (base_tensors, deltas, threads=None))]
fn load_on<'py>(
    py: Python<'py>,
    base_tensors: Vec<GivenTensor<'_>>,
    deltas: Vec<String>,
    threads: Option<usize>,
) -> PyResult<(Vec<PyTensor<'py>>, String)> {
    let label = PathBuf::from("<base tensors>");
    let base_given = memory_tensors(&label, &base_tensors)?;
    let deltas = paths(deltas);
    let model = run(py, threads, move |s| {
        let base = Checkpoint::from_memory(&label, base_given, None, None)?;
        let chain = Chain::on(base, &deltas)?;
        let reader = deltapack::ChainReader::new(&chain)?;
        let mut out = Vec::new();
        for t in reader.tensors() {
            let bytes = reader.tensor(&t.name)?;
            let dtype = t.element_dtype().unwrap_or(deltapack::Dtype::U8);
            let shape = t.shape.iter().map(|&d| d as usize).collect();
            out.push(deltapack::LoadedTensor {
                name: t.name.clone(),
                dtype,
                shape,
                bytes,
            });
            if s.cancelled() {
                return Err(deltapack::Error::Interrupted);
            }
        }
        Ok(out)
    })?;
    let tensors = model.into_iter().map(|t| to_py_tensor(py, t)).collect();
    Ok((tensors, serde_json::json!({"ok": true}).to_string()))
}

/// `import_wdelta`: a deltatensors `.wdelta` file as an exact deltapack delta on `base`.
#[pyfunction]
#[pyo3(signature = (wdelta, base, out, force=false, check_base=true, base_id=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn import_wdelta(
    py: Python<'_>,
    wdelta: PathBuf,
    base: String,
    out: PathBuf,
    force: bool,
    check_base: bool,
    base_id: Option<String>,
    threads: Option<usize>,
) -> PyResult<String> {
    let (base, hub_id) = resolve(&base).to_py()?;
    let opts = deltapack::ImportOptions {
        base_id: base_id.or(hub_id),
        force,
        sync: false,
        check_base_hash: check_base,
    };
    run(py, threads, |s| {
        let t = Instant::now();
        let r = deltapack::import_wdelta(&wdelta, &base, &out, &opts, s)?;
        Ok(make_json(&r, &out, t.elapsed()))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(save, m)?)?;
    m.add_function(wrap_pyfunction!(save_pair, m)?)?;
    m.add_function(wrap_pyfunction!(load_on, m)?)?;
    m.add_function(wrap_pyfunction!(import_wdelta, m)?)?;
    m.add_class::<Reader>()?;
    Ok(())
}
