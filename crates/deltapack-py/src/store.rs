//! `Store`: a directory of bases and named deltas, as the CLI's `store` commands use it.

use std::path::PathBuf;
use std::time::Instant;

use pyo3::prelude::*;

use crate::errors::PyResultExt;
use crate::memory::{to_py_model, PyModel};
use crate::{make_json, rebuild_json, resolve, run, MakeArgs};

/// An opened store (the engine of `deltapack.Store`).
#[pyclass(module = "deltapack._native", frozen)]
struct Store {
    inner: deltapack::Store,
    root: PathBuf,
}

#[pymethods]
impl Store {
    /// Opens the store at `root`.
    #[new]
    fn new(py: Python<'_>, root: PathBuf) -> PyResult<Self> {
        let inner = run(py, None, |_| deltapack::Store::open(&root))?;
        Ok(Store { inner, root })
    }

    /// Creates a store at `root` (if needed) with `base` in it.
    #[staticmethod]
    #[pyo3(signature = (root, base, name=None))]
    fn init(py: Python<'_>, root: PathBuf, base: String, name: Option<String>) -> PyResult<Self> {
        let (base, _) = resolve(&base).to_py()?;
        let inner = run(py, None, |_| deltapack::Store::init(&root, &base, name.as_deref()))?;
        Ok(Store { inner, root })
    }

    /// The store's directory.
    #[getter]
    fn root(&self) -> PathBuf {
        self.root.clone()
    }

    /// Adds the fine-tune at `finetuned` as entry `name`; returns the CLI's JSON.
    #[pyo3(signature = (name, finetuned, parent, args, threads=None))]
    fn add(
        &self,
        py: Python<'_>,
        name: String,
        finetuned: String,
        parent: Option<String>,
        args: MakeArgs,
        threads: Option<usize>,
    ) -> PyResult<String> {
        let (finetuned, _) = resolve(&finetuned).to_py()?;
        let opts = args.options(None).to_py()?;
        run(py, threads, |s| {
            let t = Instant::now();
            let (entry, report) = self.inner.add(&name, &finetuned, parent.as_deref(), &opts, s)?;
            let report: serde_json::Value =
                serde_json::from_str(&make_json(&report, std::path::Path::new(&entry.file), t.elapsed()))
                    .unwrap_or_default();
            Ok(serde_json::json!({"entry": entry, "report": report, "seconds": t.elapsed().as_secs_f64()}).to_string())
        })
    }

    /// Rebuilds entry `name` into the directory `out`; returns the CLI's JSON.
    #[pyo3(signature = (name, out, force=false, threads=None))]
    fn get(&self, py: Python<'_>, name: String, out: PathBuf, force: bool, threads: Option<usize>) -> PyResult<String> {
        run(py, threads, |s| {
            let t = Instant::now();
            let r = self.inner.get(&name, &out, force, s)?;
            Ok(rebuild_json(&r, Some(&out), t.elapsed()))
        })
    }

    /// Rebuilds entry `name` in memory: tensors, files, metadata (JSON), report (JSON), as
    /// `load` returns them.
    #[pyo3(signature = (name, threads=None))]
    fn load<'py>(&self, py: Python<'py>, name: String, threads: Option<usize>) -> PyResult<PyModel<'py>> {
        let model = run(py, threads, |s| {
            let chain = self.inner.open_chain(&name)?;
            deltapack::load_chain(&chain, s)
        })?;
        to_py_model(py, model)
    }

    /// The base directory and delta files of entry `name`, in order from the base.
    fn chain(&self, py: Python<'_>, name: String) -> PyResult<(PathBuf, Vec<PathBuf>)> {
        run(py, None, |_| self.inner.chain(&name))
    }

    /// Rebuilds entry `name` in memory and checks it (against the checkpoint `finetuned`,
    /// byte for byte, where given); returns the verify report as JSON.
    #[pyo3(signature = (name, finetuned=None, threads=None))]
    fn verify(
        &self,
        py: Python<'_>,
        name: String,
        finetuned: Option<String>,
        threads: Option<usize>,
    ) -> PyResult<String> {
        let finetuned = finetuned.map(|f| resolve(&f).map(|r| r.0)).transpose().to_py()?;
        run(py, threads, |s| {
            let t = Instant::now();
            let chain = self.inner.open_chain(&name)?;
            let r = deltapack::verify_chain(&chain, finetuned.as_deref(), s)?;
            Ok(rebuild_json(&r, None, t.elapsed()))
        })
    }

    /// The manifest and totals, as the CLI's `store list --json`.
    fn list(&self, py: Python<'_>) -> PyResult<String> {
        run(py, None, |_| {
            let m = self.inner.manifest()?;
            let naive: u64 = m.entries.iter().map(|e| e.finetuned_bytes).sum();
            let stored: u64 = m.entries.iter().map(|e| e.delta_bytes).sum();
            Ok(serde_json::json!({"manifest": m, "naive_bytes": naive, "delta_bytes": stored}).to_string())
        })
    }

    /// Removes entry `name` (re-coding its children against its parent with `reparent`);
    /// returns the names of the entries re-coded.
    #[pyo3(signature = (name, reparent=false))]
    fn remove(&self, py: Python<'_>, name: String, reparent: bool) -> PyResult<Vec<String>> {
        run(py, None, |s| self.inner.remove(&name, reparent, s))
    }

    /// Rebuilds and checks every entry; returns the report as JSON.
    #[pyo3(signature = (grace=None))]
    fn fsck(&self, py: Python<'_>, grace: Option<f64>) -> PyResult<String> {
        let grace = grace.map_or(deltapack::store::DEFAULT_GRACE, |g| {
            std::time::Duration::from_secs_f64(g.max(0.0))
        });
        run(py, None, |s| {
            let r = self.inner.fsck_with_grace(grace, s)?;
            Ok(serde_json::to_string(&r).unwrap_or_default())
        })
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Store>()
}
