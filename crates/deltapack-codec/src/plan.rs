//! Decode-side plans and parameters: how a tensor's lossy chunks decode ([`TensorPlan`]), and
//! the quality of a reconstruction as the index records it ([`Quality`], summed chunk by chunk
//! in [`QualitySums`]). The tuner in the engine decides plans; the container stores them; the
//! rebuild engines read them back. All three meet here.

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::float::{simd_dispatch, with_elem, Elem, BLOCK};
use crate::lossy::{AxisScales, ChunkParams, TensorCodec};

/// Row and column scales of `sign-axis`.
pub type AxisVectors = (Vec<f32>, Vec<f32>);

/// How a tensor's lossy chunks decode: what the tuner decided for it when the delta was
/// made, rebuilt from the index when it is read.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// The lossy codec, or `None` for exact.
    pub codec: Option<TensorCodec>,
    /// The `sign-axis` scales.
    pub axis: Option<AxisVectors>,
}

impl TensorPlan {
    /// The exact codec: nothing lossy, no parameters.
    pub const EXACT: TensorPlan = TensorPlan {
        codec: None,
        axis: None,
    };

    /// The tensor-wide parameter blob: row then column scales, f32 little-endian.
    pub fn params(&self) -> Option<Vec<u8>> {
        let (r, c) = self.axis.as_ref()?;
        Some(r.iter().chain(c).flat_map(|x| x.to_le_bytes()).collect())
    }

    /// The per-chunk parameters for the chunk starting at element `first`.
    #[inline]
    pub fn chunk_params(&self, first: u64) -> Option<ChunkParams<'_>> {
        Some(ChunkParams {
            codec: self.codec.as_ref()?,
            first,
            axis: self.axis.as_ref().map(|(r, c)| AxisScales {
                rows: r,
                first_row: 0,
                cols: c,
            }),
        })
    }
}

/// Splits a sign-axis parameter blob into row and column scales.
pub fn axis_scales(codec: &TensorCodec, blob: &[u8]) -> Option<AxisVectors> {
    let TensorCodec::SignAxis { rows, .. } = codec else {
        return None;
    };
    let all: Vec<f32> = blob
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (r, c) = all.split_at((*rows as usize).min(all.len()));
    Some((r.to_vec(), c.to_vec()))
}

/// Quality of one reconstructed tensor, as recorded in the index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quality {
    /// 8 x stored bytes / elements.
    pub bits_per_param: f64,
    /// ||D' - D|| / ||D|| (0 when the delta is zero or the tensor exact).
    pub error: f64,
    /// Largest |reconstruction - fine-tune|.
    pub max_abs_error: f64,
    /// ||D||, to combine tensors' errors into the model's.
    pub delta_norm: f64,
}

/// Accumulates a tensor's quality chunk by chunk (in order, so sums are deterministic).
#[derive(Debug, Clone, Default)]
pub struct QualitySums {
    /// Sum of squared errors `(recon - target)^2`.
    pub err_sq: f64,
    /// Sum of squared changes `(target - base)^2`.
    pub delta_sq: f64,
    /// Largest `|recon - target|`.
    pub max_abs: f64,
}

impl QualitySums {
    /// Adds one chunk: `recon` against `target`, changes measured from `base`.
    pub fn chunk(dtype: Dtype, base: &[u8], target: &[u8], recon: &[u8]) -> QualitySums {
        with_elem!(dtype, chunk_sums_wide(base, target, recon))
    }

    /// Adds the sums of a later chunk.
    pub fn add(&mut self, o: &QualitySums) {
        self.err_sq += o.err_sq;
        self.delta_sq += o.delta_sq;
        self.max_abs = self.max_abs.max(o.max_abs);
    }

    /// The tensor's [`Quality`], given the bytes stored for it and its element count.
    pub fn quality(&self, stored_bytes: u64, numel: u64) -> Quality {
        Quality {
            bits_per_param: 8.0 * stored_bytes as f64 / numel.max(1) as f64,
            error: if self.delta_sq > 0.0 {
                (self.err_sq / self.delta_sq).sqrt()
            } else {
                0.0
            },
            max_abs_error: self.max_abs,
            delta_norm: self.delta_sq.sqrt(),
        }
    }
}

simd_dispatch!(fn chunk_sums_wide => chunk_sums(base: &[u8], target: &[u8], recon: &[u8]) -> QualitySums);

#[inline(always)]
fn chunk_sums<E: Elem>(base: &[u8], target: &[u8], recon: &[u8]) -> QualitySums {
    // Four lanes per sum, lane `k & 3` for element `k`, so that consecutive adds do not wait
    // on each other and a group of four elements is one vector operation. Locals in a plain
    // loop, not a closure's captures, so that they live in registers.
    let (mut err, mut dsq, mut max) = ([0f64; 4], [0f64; 4], [0f64; 4]);
    let w = E::WIDTH;
    let mut buf = [[0f64; BLOCK]; 3];
    for first in (0..base.len() / w).step_by(BLOCK) {
        let len = BLOCK.min(base.len() / w - first);
        for (a, b) in [base, target, recon].iter().zip(buf.iter_mut()) {
            E::load_block(&a[first * w..(first + len) * w], &mut b[..len]);
        }
        // The last block's odd elements, padded with zeros in all three: no change and no
        // error, which add +0.0 to the sums, the same as nothing.
        let len4 = len.div_ceil(4) * 4;
        buf.iter_mut().for_each(|b| b[len..len4].fill(0.0));
        let [b, t, r] = &buf;
        // Per element first, in a loop that vectorises; then the four lanes, over arrays of
        // four. Non-finite changes add nothing: adding +0.0 to these non-negative sums is
        // the same as skipping, and selecting beats branching.
        let (mut e2, mut d2, mut e1) = ([0f64; BLOCK], [0f64; BLOCK], [0f64; BLOCK]);
        let per = e2[..len4].iter_mut().zip(&mut d2[..len4]).zip(&mut e1[..len4]);
        for (((e2, d2), e1), ((b, t), r)) in per.zip(b[..len4].iter().zip(&t[..len4]).zip(&r[..len4])) {
            let d = t - b;
            let finite = d.is_finite();
            let e = (r - t).abs();
            *e2 = if finite { e * e } else { 0.0 };
            *d2 = if finite { d * d } else { 0.0 };
            *e1 = if finite { e } else { 0.0 };
        }
        let quads = e2[..len4].as_chunks::<4>().0.iter().zip(d2[..len4].as_chunks::<4>().0);
        for ((e2, d2), e1) in quads.zip(e1[..len4].as_chunks::<4>().0) {
            for k in 0..4 {
                err[k] += e2[k];
                dsq[k] += d2[k];
                // A plain compare: `f64::max`'s NaN handling costs more, and `e` is never
                // NaN here.
                max[k] = if e1[k] > max[k] { e1[k] } else { max[k] };
            }
        }
    }
    // The largest of the lanes' maxima is the largest of all: order does not matter to it.
    let max = max.iter().fold(0f64, |m, &x| if x > m { x } else { m });
    QualitySums {
        err_sq: (err[0] + err[1]) + (err[2] + err[3]),
        delta_sq: (dsq[0] + dsq[1]) + (dsq[2] + dsq[3]),
        max_abs: max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::Bf16;

    #[test]
    fn vector_and_baseline_builds_measure_alike() {
        let (b, t) = crate::testdata::bf16_pair(48, 67, 3, |_, _| 1e-3);
        let recon: Vec<u8> = t.iter().zip(&b).map(|(&t, &b)| t ^ (b & 1)).collect();
        let (x, y) = (
            chunk_sums_wide::<Bf16>(&b, &t, &recon),
            chunk_sums::<Bf16>(&b, &t, &recon),
        );
        assert_eq!((x.err_sq, x.delta_sq, x.max_abs), (y.err_sq, y.delta_sq, y.max_abs));
    }
}
