//! `Resident`: a base held in memory, switched between fine-tunes in place, whose tensors
//! Python sees as numpy arrays (and torch tensors) sharing the model's memory.
//!
//! A view must never outlive the memory it points to. The model keeps every buffer a switch
//! would free or move ([`deltapack::Resident::keep_replaced_buffers`]); after each switch,
//! a kept buffer still viewed from Python moves into the [`Owner`] that its views hold as
//! their numpy base, and is freed with the last view; the others are freed at once. Owners
//! also hold the model itself, so views keep it alive.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use numpy::ndarray::ArrayView1;
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyWeakrefReference;

use crate::errors::PyResultExt;
use crate::{resolve, run};

/// The numpy base object of views of one buffer of a model.
#[pyclass(module = "deltapack._native", frozen, weakref)]
struct Owner {
    /// The model, kept alive while views of its buffers exist.
    _model: Py<Resident>,
    /// The buffer, once the model has let go of it.
    kept: Mutex<Option<Vec<u8>>>,
}

/// A base in memory, switchable in place (the engine of `deltapack.Resident`).
#[pyclass(module = "deltapack._native", frozen)]
struct Resident {
    model: Mutex<deltapack::Resident>,
    /// Owners of the buffers viewed from Python, by buffer address (weak references).
    owners: Mutex<HashMap<usize, Py<PyWeakrefReference>>>,
}

type View<'py> = (String, String, Vec<usize>, Bound<'py, PyArray1<u8>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock was turned into an exception; the data is still whole
    // (every switch leaves the model consistent or restores it).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[pymethods]
impl Resident {
    /// Reads the base checkpoint at `base` into memory.
    #[new]
    fn new(py: Python<'_>, base: String) -> PyResult<Self> {
        let (base, _) = resolve(&base).to_py()?;
        let mut model = run(py, None, |_| deltapack::Resident::load(&base))?;
        model.keep_replaced_buffers();
        Ok(Resident {
            model: Mutex::new(model),
            owners: Mutex::new(HashMap::new()),
        })
    }

    /// Switches to the model of `chain` (a list of deltas from the base; empty: the base).
    /// Returns the switch report as JSON.
    fn switch_to_chain(slf: Bound<'_, Self>, chain: Vec<PathBuf>) -> PyResult<String> {
        let py = slf.py();
        let this = slf.get();
        let report = {
            let mut guard = lock(&this.model);
            let model: &mut deltapack::Resident = &mut guard;
            let r = run(py, None, |_| {
                if chain.is_empty() {
                    model.switch_to(None)
                } else {
                    model.switch_to_chain(&chain)
                }
            });
            this.settle(py, model.take_replaced_buffers());
            r?
        };
        Ok(serde_json::to_string(&report).unwrap_or_default())
    }

    /// The delta files of the chain held, from the base (empty at the base).
    fn active_chain(&self) -> Vec<PathBuf> {
        lock(&self.model)
            .active_chain()
            .into_iter()
            .map(PathBuf::from)
            .collect()
    }

    /// Memory held to switch back, in bytes.
    fn undo_bytes(&self) -> u64 {
        lock(&self.model).undo_bytes()
    }

    /// Every tensor of the model held now, as views of its memory.
    fn tensors<'py>(slf: Bound<'py, Self>) -> PyResult<Vec<View<'py>>> {
        let this = slf.get();
        let model = lock(&this.model);
        let mut owners = lock(&this.owners);
        let mut out = Vec::new();
        for t in model.tensors() {
            let owner = owner_of(&slf, &mut owners, t.bytes.as_ptr() as usize)?;
            let view = ArrayView1::from(t.bytes);
            // SAFETY: the bytes belong to a buffer of the model, which keeps every buffer a
            // switch frees or moves (`keep_replaced_buffers`) until `settle` hands it to this
            // buffer's owner, the array's base; the owner holds the model too. So the memory
            // stays valid, and is not reallocated, for as long as the array exists.
            let array = unsafe { PyArray1::borrow_from_array(&view, owner.into_any()) };
            out.push((t.name.to_string(), format!("{:?}", t.dtype), t.shape.to_vec(), array));
        }
        Ok(out)
    }
}

impl Resident {
    /// After a switch: hands each buffer the model let go of to the owner of its views, if
    /// any is alive; frees the others.
    fn settle(&self, py: Python<'_>, released: Vec<Vec<u8>>) {
        let mut owners = lock(&self.owners);
        owners.retain(|_, weak| weak.bind(py).upgrade().is_some());
        for buf in released {
            let key = buf.as_ptr() as usize;
            let Some(weak) = owners.remove(&key) else {
                continue; // no view of it is left: dropped here
            };
            if let Some(owner) = weak.bind(py).upgrade() {
                if let Ok(owner) = owner.cast_into::<Owner>() {
                    *lock(&owner.get().kept) = Some(buf);
                }
            }
        }
    }
}

/// The living owner of the buffer at `addr`, or a new one (registered by a weak reference).
fn owner_of<'py>(
    slf: &Bound<'py, Resident>,
    owners: &mut HashMap<usize, Py<PyWeakrefReference>>,
    addr: usize,
) -> PyResult<Bound<'py, Owner>> {
    let py = slf.py();
    if let Some(weak) = owners.get(&addr) {
        if let Some(owner) = weak.bind(py).upgrade() {
            if let Ok(owner) = owner.cast_into::<Owner>() {
                return Ok(owner);
            }
        }
    }
    let owner = Bound::new(
        py,
        Owner {
            _model: slf.clone().unbind(),
            kept: Mutex::new(None),
        },
    )?;
    owners.insert(addr, PyWeakrefReference::new(&owner)?.unbind());
    Ok(owner)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Resident>()?;
    m.add_class::<Owner>()
}
