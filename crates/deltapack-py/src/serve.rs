//! `Server`: fine-tunes of one base held as packed deltas (the engine's `serve`), for
//! `deltapack.torch.attach`. Loading goes through `run` (Ctrl-C, panics as exceptions);
//! products, called once per layer and step, release the GIL and run on the server's own
//! thread pool, sized like torch's so the two take turns on the same cores.

use std::path::PathBuf;
use std::sync::RwLock;

use deltapack::checkpoint::Checkpoint;
use deltapack::serve::{matmul, matmul_serial, Packed, Served, Tenant};
use deltapack::{Chain, Error};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{to_py_err, PyResultExt};
use crate::memory::{memory_tensors, GivenTensor};
use crate::{paths, resolve, run};

/// Fine-tunes of one base, packed for serving.
#[pyclass(module = "deltapack._native", frozen)]
struct Server {
    tenants: RwLock<Vec<Tenant>>,
    pool: rayon::ThreadPool,
    threads: usize,
}

fn read(s: &Server) -> std::sync::RwLockReadGuard<'_, Vec<Tenant>> {
    s.tenants.read().unwrap_or_else(|p| p.into_inner())
}

fn invalid(msg: String) -> PyErr {
    to_py_err(Error::InvalidArgument(msg))
}

#[pymethods]
impl Server {
    /// A server whose products run on `threads` threads.
    #[new]
    fn new(threads: usize) -> PyResult<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| invalid(format!("cannot start {threads} threads: {e}")))?;
        Ok(Server {
            tenants: RwLock::new(Vec::new()),
            pool,
            threads: threads.max(1),
        })
    }

    /// Loads the fine-tune of `deltas` (a chain, base first) on a base given as a path or hub
    /// id (`base`) or as tensors held in memory (`base_tensors`); returns its index and a
    /// JSON report of what is held per tensor. Nothing is added when it fails.
    #[pyo3(signature = (deltas, base=None, base_tensors=None))]
    fn add(
        &self,
        py: Python<'_>,
        deltas: Vec<String>,
        base: Option<String>,
        base_tensors: Option<Vec<GivenTensor<'_>>>,
    ) -> PyResult<(usize, String)> {
        let deltas = paths(deltas);
        let label = PathBuf::from("<model parameters>");
        let given = base_tensors.as_deref().map(|t| memory_tensors(&label, t)).transpose()?;
        let base = base.map(|b| resolve(&b)).transpose().to_py()?;
        let tenant = run(py, Some(self.threads), move |s| {
            let chain = match (given, base) {
                (Some(given), _) => Chain::on(Checkpoint::from_memory(&label, given, None, None)?, &deltas)?,
                (None, Some((base, _))) => Chain::open(&base, &deltas)?,
                (None, None) => return Err(Error::InvalidArgument("no base given".into())),
            };
            Tenant::load(&chain, s)
        })?;
        let report = report(&tenant);
        let mut all = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        all.push(tenant);
        Ok((all.len() - 1, report))
    }

    /// `x · Δᵀ` of tensor `tensor` for each row of `x` (`n x cols`, f32) and its fine-tune
    /// (`tenants[b]`, an index from `add`, or -1 for the base: a zero row), as `n x rows`.
    /// Fine-tunes that leave the tensor unchanged add nothing.
    fn matmul<'py>(
        &self,
        py: Python<'py>,
        tensor: &str,
        x: PyReadonlyArray2<'py, f32>,
        tenants: PyReadonlyArray1<'py, i64>,
        rows: usize,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let all = read(self);
        let (n, cols) = (x.shape()[0], x.shape()[1]);
        let tenants = tenants
            .as_slice()
            .map_err(|_| invalid("fine-tune indices must be contiguous".into()))?;
        if tenants.len() != n {
            return Err(invalid(format!("{} fine-tune indices for {n} rows", tenants.len())));
        }
        // Fine-tunes by index, each looked up once, in order of first use, with their forms;
        // `None`: the base, or a fine-tune that leaves this tensor as the base has it.
        let mut used: Vec<(i64, Option<&Packed>)> = Vec::new();
        let mut forms: Vec<&Packed> = Vec::new();
        let mut rows_of = Vec::with_capacity(n);
        for &t in tenants {
            let k = match used.iter().position(|u| u.0 == t) {
                Some(k) => k,
                None => {
                    used.push((t, packed_of(&all, t, tensor)?));
                    used.len() - 1
                }
            };
            rows_of.push(used[k].1.map(|p| match forms.iter().position(|f| std::ptr::eq(*f, p)) {
                Some(f) => f,
                None => {
                    forms.push(p);
                    forms.len() - 1
                }
            }));
        }
        let x = x
            .as_slice()
            .map_err(|_| invalid("activations must be C-contiguous".into()))?;
        let mut out = vec![0f32; n * rows];
        py.detach(|| match self.threads {
            1 => matmul_serial(&forms, &rows_of, x, cols, &mut out),
            _ => self.pool.install(|| matmul(&forms, &rows_of, x, cols, &mut out)),
        })
        .to_py()?;
        PyArray1::from_vec(py, out).reshape([n, rows])
    }

    /// Rows `ids` of tensor `tensor`'s `Δ` for fine-tune `tenant`, dense (`len(ids) x cols`
    /// f32): an embedding's changes for the tokens of a batch, or the whole `Δ` for a
    /// prefill that is faster as a dense product.
    fn rows<'py>(
        &self,
        py: Python<'py>,
        tenant: usize,
        tensor: &str,
        ids: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let all = read(self);
        let Some(Served::Packed(p)) = all.get(tenant).and_then(|t| t.tensor(tensor)).map(|s| &s.served) else {
            return Err(invalid(format!(
                "fine-tune {tenant} holds no packed delta of '{tensor}'"
            )));
        };
        let ids = ids.as_slice().map_err(|_| invalid("ids must be contiguous".into()))?;
        let (rows, cols) = (p.rows(), p.cols());
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= rows) {
            return Err(invalid(format!("row {bad} outside the {rows} rows of '{tensor}'")));
        }
        let mut out = vec![0f32; ids.len() * cols];
        py.detach(|| {
            self.pool.install(|| {
                use rayon::prelude::*;
                out.par_chunks_mut(cols.max(1))
                    .zip(ids)
                    .for_each(|(o, &i)| p.row_into(i as usize, o));
            })
        });
        PyArray1::from_vec(py, out).reshape([ids.len(), cols])
    }

    /// The bytes of tensor `tensor` of fine-tune `tenant` when it is held densely.
    fn dense<'py>(&self, py: Python<'py>, tenant: usize, tensor: &str) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let all = read(self);
        match all.get(tenant).and_then(|t| t.tensor(tensor)).map(|s| &s.served) {
            Some(Served::Dense(b)) => Ok(PyArray1::from_slice(py, b)),
            _ => Err(invalid(format!("fine-tune {tenant} holds no dense '{tensor}'"))),
        }
    }

    /// Frees the dense tensors of fine-tune `tenant` (once Python holds its own copies).
    fn drop_dense(&self, tenant: usize) -> PyResult<()> {
        let mut all = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        let t = all
            .get_mut(tenant)
            .ok_or_else(|| invalid(format!("no fine-tune {tenant} in this server")))?;
        t.drop_dense();
        Ok(())
    }

    /// Bytes held for fine-tune `tenant`.
    fn bytes(&self, tenant: usize) -> PyResult<usize> {
        read(self)
            .get(tenant)
            .map(Tenant::bytes)
            .ok_or_else(|| invalid(format!("no fine-tune {tenant} in this server")))
    }
}

/// Fine-tune `t`'s packed delta of `tensor`: `None` for the base (`t < 0`) and for a fine-tune
/// that leaves the tensor unchanged; an error for an unknown fine-tune or a tensor it holds
/// densely.
fn packed_of<'a>(all: &'a [Tenant], t: i64, tensor: &str) -> PyResult<Option<&'a Packed>> {
    if t < 0 {
        return Ok(None);
    }
    match all.get(t as usize).map(|tn| tn.tensor(tensor)) {
        None => Err(invalid(format!("no fine-tune {t} in this server"))),
        Some(None) => Ok(None),
        Some(Some(s)) => match &s.served {
            Served::Packed(p) => Ok(Some(&**p)),
            Served::Dense(_) => Err(invalid(format!(
                "tensor '{tensor}' of fine-tune {t} is held densely, not as a packed delta"
            ))),
        },
    }
}

/// What a fine-tune holds, per tensor, as JSON.
fn report(t: &Tenant) -> String {
    let tensors: Vec<serde_json::Value> = t
        .tensors
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "dtype": s.dtype.to_string(),
                "shape": s.shape,
                "codec": s.codec,
                "form": s.form(),
                "bytes": s.bytes(),
                "error": s.conversion.error,
                "delta_norm": s.conversion.delta_norm,
            })
        })
        .collect();
    serde_json::json!({ "bytes": t.bytes(), "tensors": tensors }).to_string()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Server>()
}
