//! 1-bit deltas with scales learned elsewhere: the scales of a delta's `sign` and
//! `sign-axis` tensors, and the same delta made again with new ones. `deltapack.calibrate`
//! learns the scales (by distillation, in PyTorch); this module reads and writes them.
//!
//! A 1-bit codec's signs are a function of the pair alone (`sign(fine-tune - base)`, with
//! unchanged values kept apart when the codec says so), and its chunk payloads hold nothing
//! else. So making the delta again from the same base and fine-tune, with every tensor's
//! codec as the delta has it and only the scales replaced, reproduces every chunk payload
//! byte for byte; what changes is the scales (in the index or the parameter blob), the
//! fingerprints of the reconstruction and the recorded quality. [`remake_with_scales`]
//! checks it chunk by chunk: a payload that differs means another fine-tune, and nothing is
//! written.

use std::collections::HashMap;
use std::path::Path;

use crate::codec::lossy::TensorCodec;
use crate::container::Delta;
use crate::progress::Progress;
use crate::tune::{CodecPolicy, FixedPlan};
use crate::{Error, MakeOptions, MakeReport, Result};

/// The scales of one 1-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// `sign`: one magnitude for the whole tensor.
    Tensor(f32),
    /// `sign-axis`: the magnitude of element `(i, j)` is `rows[i] * cols[j]` (columns: the
    /// product of the dimensions after the first). One axis alone is the other set to 1.
    Axis {
        /// One per row (first dimension).
        rows: Vec<f32>,
        /// One per column.
        cols: Vec<f32>,
    },
}

/// A 1-bit tensor of a delta, with its scales.
#[derive(Debug, Clone)]
pub struct SignTensor {
    /// The tensor's name in the checkpoint.
    pub name: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// True when unchanged values are kept apart (ternary: `-1, 0, +1`).
    pub zeros: bool,
    /// Its scales as stored.
    pub scales: Scales,
}

/// The `sign` and `sign-axis` tensors of a delta, in index order, with their scales.
pub fn read_scales(delta: &Path) -> Result<Vec<SignTensor>> {
    let d = Delta::open(delta)?;
    let mut out = Vec::new();
    for t in d.index.tensors() {
        let plan = crate::apply::plan_of(&d, t)?;
        let (zeros, scales) = match (&plan.codec, plan.axis) {
            (Some(TensorCodec::Sign { scale, zeros }), _) => (*zeros, Scales::Tensor(*scale)),
            (Some(TensorCodec::SignAxis { zeros, .. }), Some((rows, cols))) => (*zeros, Scales::Axis { rows, cols }),
            (Some(TensorCodec::SignAxis { .. }), None) => {
                return Err(Error::CorruptDelta {
                    path: delta.to_path_buf(),
                    tensor: Some(t.name.clone()),
                    reason: "a sign-axis tensor without its scales".into(),
                })
            }
            _ => continue,
        };
        out.push(SignTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            zeros,
            scales,
        });
    }
    Ok(out)
}

/// Makes `delta` again from `base` and `finetuned` into `out`, every tensor coded as in
/// `delta`, with the 1-bit tensors named in `scales` given those scales (the others keep
/// theirs). The fine-tune must be the one `delta` was made from: every chunk payload must
/// come out the same, or nothing is written. `delta` must be made against the base, not
/// be a link of a chain (squash the chain first).
pub fn remake_with_scales(
    base: &Path,
    finetuned: &Path,
    delta: &Path,
    out: &Path,
    scales: &HashMap<String, Scales>,
    force: bool,
    progress: &dyn Progress,
) -> Result<MakeReport> {
    let d = Delta::open(delta)?;
    let bad = |m: String| Error::InvalidArgument(format!("{}: {m}", delta.display()));
    if d.index.parent.is_some() {
        return Err(bad(
            "is a link of a chain; squash the chain into one delta against the base first (deltapack squash)".into(),
        ));
    }
    let mut fixed = HashMap::new();
    for t in d.index.tensors() {
        let mut plan = crate::apply::plan_of(&d, t)?;
        if let Some(s) = scales.get(&t.name) {
            match (&mut plan.codec, &mut plan.axis, s) {
                (Some(TensorCodec::Sign { scale, .. }), _, Scales::Tensor(x)) => *scale = *x,
                (Some(TensorCodec::SignAxis { calibrated, .. }), Some(axis), Scales::Axis { rows, cols }) => {
                    *axis = (rows.clone(), cols.clone());
                    *calibrated = true;
                }
                (codec, _, _) => {
                    let has = codec.as_ref().map_or("exact", |c| c.name());
                    return Err(bad(format!(
                        "tensor '{}' is coded {has}; the scales given fit a {} tensor",
                        t.name,
                        if matches!(s, Scales::Tensor(_)) {
                            "sign"
                        } else {
                            "sign-axis"
                        }
                    )));
                }
            }
        }
        // The signs are what must not change: the lossy chunks' payloads. Exact tensors are
        // coded again as this build codes them.
        let payloads = match plan.codec {
            Some(_) => t.chunks.iter().map(|c| c.checksum.clone()).collect(),
            None => Vec::new(),
        };
        fixed.insert(t.name.clone(), FixedPlan { plan, payloads });
    }
    if let Some(name) = scales.keys().find(|n| !fixed.contains_key(*n)) {
        return Err(bad(format!("has no tensor '{name}' to give scales to")));
    }
    let ft = crate::checkpoint::Checkpoint::open(finetuned)?;
    let same_names = ft.tensors.len() == fixed.len() && ft.tensors.iter().all(|t| fixed.contains_key(&t.name));
    if !same_names {
        return Err(bad(format!(
            "holds other tensors than the fine-tune {}: give the fine-tune the delta was made from",
            finetuned.display()
        )));
    }
    let opts = MakeOptions {
        base_id: d.index.base.id.clone(),
        chunk_bytes: d.index.chunk_bytes as usize,
        force,
        codecs: CodecPolicy {
            fixed,
            ..Default::default()
        },
        ..Default::default()
    };
    drop(d);
    crate::make_from(&crate::checkpoint::Checkpoint::open(base)?, &ft, out, &opts, progress)
}
