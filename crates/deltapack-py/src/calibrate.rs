//! The 1-bit scales of a delta, read and replaced: the engine side of `deltapack.calibrate`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use deltapack::rescale::{self, Scales};
use pyo3::prelude::*;

use crate::errors::PyResultExt;
use crate::{make_json, resolve, run};

/// Scales as Python gives them: a float (`sign`) or a pair of row and column lists.
#[derive(FromPyObject)]
enum PyScales {
    Tensor(f32),
    Axis(Vec<f32>, Vec<f32>),
}

/// A 1-bit tensor as Python reads it: `(name, shape, zeros, scales)`, the scales a float
/// or a `(rows, cols)` pair of lists.
type SignTensor = (String, Vec<u64>, bool, Py<PyAny>);

/// The `sign` and `sign-axis` tensors of a delta with their scales, in index order.
#[pyfunction]
fn delta_scales(py: Python<'_>, delta: PathBuf) -> PyResult<Vec<SignTensor>> {
    let tensors = run(py, None, |_| rescale::read_scales(&delta))?;
    tensors
        .into_iter()
        .map(|t| {
            let s = match t.scales {
                Scales::Tensor(x) => x.into_pyobject(py)?.into_any().unbind(),
                Scales::Axis { rows, cols } => (rows, cols).into_pyobject(py)?.into_any().unbind(),
            };
            Ok((t.name, t.shape, t.zeros, s))
        })
        .collect()
}

/// Makes `delta` again with new 1-bit scales (the signs kept byte for byte); returns the
/// report as `make` does.
#[pyfunction]
#[pyo3(signature = (base, finetuned, delta, out, scales, force=false, threads=None))]
#[allow(clippy::too_many_arguments)]
fn remake_with_scales(
    py: Python<'_>,
    base: String,
    finetuned: String,
    delta: PathBuf,
    out: PathBuf,
    scales: HashMap<String, PyScales>,
    force: bool,
    threads: Option<usize>,
) -> PyResult<String> {
    let (base, _) = resolve(&base).to_py()?;
    let (finetuned, _) = resolve(&finetuned).to_py()?;
    let scales = scales
        .into_iter()
        .map(|(k, v)| {
            let s = match v {
                PyScales::Tensor(x) => Scales::Tensor(x),
                PyScales::Axis(rows, cols) => Scales::Axis { rows, cols },
            };
            (k, s)
        })
        .collect();
    run(py, threads, |s| {
        let t = Instant::now();
        let r = rescale::remake_with_scales(&base, &finetuned, &delta, &out, &scales, force, s)?;
        Ok(make_json(&r, &out, t.elapsed()))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(delta_scales, m)?)?;
    m.add_function(wrap_pyfunction!(remake_with_scales, m)?)
}
