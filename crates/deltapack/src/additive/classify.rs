//! Is a directory an additive delta (fine-tune minus base) or a model? [`classify`] decides
//! from evidence, so that a fine-tune given where a difference is expected is not added to
//! the base: base + fine-tune is a wrong model that would still come with plausible error
//! figures.
//!
//! The evidence, strongest first:
//!
//! - The marker [`export_additive`](super::export_additive) writes into the `__metadata__` of
//!   every safetensors header: `"deltapack_delta": "additive"` ([`MARKER_KEY`],
//!   [`MARKER_VALUE`]). It travels with the weights, unlike a side file, and tools that only
//!   read tensors (FastChat's `apply_delta`, through transformers) ignore it.
//! - Without it, the magnitudes of the tensors against the base's. A fine-tune `X` of the base
//!   `B` is close to it, `||X - B|| / ||B||` small, and as large, `||X|| / ||B||` about 1; a
//!   difference is small against the base, `||X|| / ||B||` small (and then, by the triangle
//!   inequality, `||X - B|| / ||B|| >= 1 - ||X|| / ||B||` is not). The norms are measured on
//!   a bounded sample of the largest float tensors both sides share, so that judging a
//!   multi-GB model reads a few MB.

use serde::Serialize;

use super::fp16;
use crate::checkpoint::{Checkpoint, TensorRef};
use crate::Result;

/// The `__metadata__` key of the marker that [`export_additive`](super::export_additive)
/// writes in every safetensors header of an additive delta.
pub const MARKER_KEY: &str = "deltapack_delta";
/// The marker's value: the directory holds fine-tune minus base.
pub const MARKER_VALUE: &str = "additive";

/// A directory whose sampled tensors have `||X|| / ||B||` at most this is a difference.
///
/// Real fine-tunes move their weights by 0.1 % to 10 % of their norm (the shared MiniLM
/// fine-tunes: 0.4 % and 1.1 %; a full instruction tune of a 7B model: a few percent), so
/// their differences sit 3x to 300x below this. A
/// model has `||X|| / ||B|| >= 1 - ||X - B|| / ||B||`, at least 0.7 for any fine-tune that
/// [`FINE_TUNE_MAX_DISTANCE`] recognises: more than 2x above.
pub const DIFFERENCE_MAX_NORM: f64 = 0.3;
/// A directory whose sampled tensors have `||X - B|| / ||B||` at most this is a model: a
/// fine-tune of the base (or the base itself). The same margins as [`DIFFERENCE_MAX_NORM`],
/// seen from the other side: a difference has `||X - B|| / ||B|| >= 1 - ||X|| / ||B||`.
pub const FINE_TUNE_MAX_DISTANCE: f64 = 0.3;
/// `||X|| / ||B||` within this range (and not close to the base) is a model of the base's
/// scale that is not a fine-tune of it: another model of the same architecture. Outside it,
/// and between the two thresholds above, nothing is settled.
pub const OTHER_MODEL_NORM: (f64, f64) = (0.5, 2.0);

/// Largest tensors measured: the median of their figures is robust to one odd tensor (a
/// re-initialised head, say) out of four.
const SAMPLED_TENSORS: usize = 4;
/// Contiguous blocks read per tensor, spread evenly over it.
const BLOCKS: usize = 16;
/// Elements per block: 16 x 4096 = 65536 values per tensor. Contiguous blocks, rather than a
/// stride over the whole tensor, keep the pages read (and the kernel's readahead around
/// them) to a few MB per tensor however large it is.
const BLOCK_ELEMS: usize = 4096;

/// What a directory given as an additive delta looks like, as [`classify`] judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every safetensors file carries the marker `export_additive` writes: a difference.
    Marked,
    /// Its tensors are small against the base's: a difference.
    Difference,
    /// Its tensors are close to the base's: a model, a fine-tune of the base (or the base).
    FineTune,
    /// Its tensors are of the base's size but far from them: a model, not of this base.
    OtherModel,
    /// The evidence settles nothing: no float tensor to measure, or figures between the
    /// thresholds.
    Unknown,
}

impl Verdict {
    /// True when the directory is taken for a difference: marked, or measured small.
    pub fn is_additive(self) -> bool {
        matches!(self, Verdict::Marked | Verdict::Difference)
    }
}

/// The figures of one sampled tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorEvidence {
    /// Tensor name.
    pub name: String,
    /// Element pairs measured (finite on both sides).
    pub sampled: u64,
    /// `||X|| / ||B||` over the sample.
    pub relative_norm: f64,
    /// `||X - B|| / ||B||` over the sample.
    pub relative_distance: f64,
}

/// The verdict of [`classify`] and the figures behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Classification {
    /// What the directory looks like.
    pub verdict: Verdict,
    /// Median over the sampled tensors of `||X|| / ||B||`; `None` when nothing was measured
    /// (a marked directory is not measured).
    pub relative_norm: Option<f64>,
    /// Median over the sampled tensors of `||X - B|| / ||B||`; `None` when nothing was measured.
    pub relative_distance: Option<f64>,
    /// The tensors measured, largest first.
    pub tensors: Vec<TensorEvidence>,
}

impl Classification {
    /// What the directory looks like, in words, for a message: "looks like a model (...)".
    ///
    /// It names no command or flag: front ends add how to go on.
    pub fn describe(&self) -> String {
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let (r, d) = (self.relative_norm.unwrap_or(0.0), self.relative_distance.unwrap_or(0.0));
        let measured = self.tensors.len();
        match self.verdict {
            Verdict::Marked => "carries the marker of an additive delta (fine-tune minus base)".into(),
            Verdict::Difference => format!(
                "looks like an additive delta (fine-tune minus base): its tensors are {} of the base's in norm \
                 ({measured} largest tensors sampled)",
                pct(r)
            ),
            Verdict::FineTune if d == 0.0 => format!(
                "looks like a model, not a difference: it is the base itself (its tensors equal the base's in \
                 every value sampled from the {measured} largest)"
            ),
            Verdict::FineTune => format!(
                "looks like a model (a fine-tune of the base: its tensors are within {} of the base's), not a \
                 difference",
                pct(d)
            ),
            Verdict::OtherModel => format!(
                "looks like a model, not a difference, and not a fine-tune of this base either: its tensors are \
                 {} of the base's in norm but {} away from them",
                pct(r),
                pct(d)
            ),
            Verdict::Unknown if measured == 0 => {
                "cannot be told apart from a model: it shares no floating-point tensor with the base to measure".into()
            }
            Verdict::Unknown => format!(
                "cannot be told apart from a model: its tensors are {} of the base's in norm and {} away from them, \
                 neither small (a difference) nor close to the base (a fine-tune)",
                pct(r),
                pct(d)
            ),
        }
    }
}

/// Judges whether `dir` (a model directory or a `.safetensors` file) holds an additive delta
/// against `base`, or a model.
///
/// A directory whose every safetensors header carries the marker is [`Verdict::Marked`]
/// without measuring anything. Otherwise the four largest float tensors that both sides hold in shapes FastChat adds (the same, or more rows in `dir`) are sampled:
/// 65536 values of each, in blocks spread over the tensor (all of a smaller one), and the
/// median of their figures is judged by [`judge`]. Reading a file fails as opening it does;
/// what the directory holds is never an error here, only a verdict.
pub fn classify(base: &std::path::Path, dir: &std::path::Path) -> Result<Classification> {
    let base = Checkpoint::open(base)?;
    let dir = Checkpoint::open(dir)?;
    Ok(classify_opened(&base, &dir))
}

/// [`classify`] on opened checkpoints.
pub(crate) fn classify_opened(base: &Checkpoint, dir: &Checkpoint) -> Classification {
    if is_marked(dir) {
        return Classification {
            verdict: Verdict::Marked,
            relative_norm: None,
            relative_distance: None,
            tensors: Vec::new(),
        };
    }
    let mut pairs: Vec<(&TensorRef, &TensorRef, usize)> = dir
        .tensors
        .iter()
        .filter_map(|x| {
            let b = base.tensor(&x.name)?;
            let common = comparable(b, x)?;
            Some((x, b, common))
        })
        .collect();
    // Largest first; the name breaks ties so that the verdict does not depend on file order.
    pairs.sort_by(|p, q| q.2.cmp(&p.2).then_with(|| p.0.name.cmp(&q.0.name)));
    let tensors: Vec<TensorEvidence> = pairs
        .iter()
        .filter_map(|&(x, b, common)| measure(base, b, dir, x, common))
        .take(SAMPLED_TENSORS)
        .collect();
    let norm = median(tensors.iter().map(|t| t.relative_norm).collect());
    let distance = median(tensors.iter().map(|t| t.relative_distance).collect());
    Classification {
        verdict: judge(norm, distance),
        relative_norm: norm,
        relative_distance: distance,
        tensors,
    }
}

/// The verdict on the median figures `||X|| / ||B||` and `||X - B|| / ||B||` (`None`: nothing
/// measured). Difference is tested first: its region and the fine-tune's cannot overlap
/// (each bounds the other figure by the triangle inequality), and between them, with a
/// margin on both sides, lies an unsettled band.
pub fn judge(relative_norm: Option<f64>, relative_distance: Option<f64>) -> Verdict {
    let (Some(r), Some(d)) = (relative_norm, relative_distance) else {
        return Verdict::Unknown;
    };
    if !(r.is_finite() && d.is_finite()) {
        Verdict::Unknown
    } else if r <= DIFFERENCE_MAX_NORM {
        Verdict::Difference
    } else if d <= FINE_TUNE_MAX_DISTANCE {
        Verdict::FineTune
    } else if (OTHER_MODEL_NORM.0..=OTHER_MODEL_NORM.1).contains(&r) {
        Verdict::OtherModel
    } else {
        Verdict::Unknown
    }
}

/// True when every safetensors header of `ck` carries the marker. All of them, so that a
/// directory assembled from a marked delta and other files is measured instead.
fn is_marked(ck: &Checkpoint) -> bool {
    !ck.shards.is_empty()
        && ck.shards.iter().all(|s| {
            super::metadata_of(s.header_bytes())
                .and_then(|m| m.get(MARKER_KEY).and_then(|v| v.as_str().map(|v| v == MARKER_VALUE)))
                .unwrap_or(false)
        })
}

/// Elements that `x` and its base tensor `b` share, in the pairing FastChat adds: both float
/// and of one shape, or `x` with more rows (the base's rows come first). `None` otherwise.
fn comparable(b: &TensorRef, x: &TensorRef) -> Option<usize> {
    if !(fp16::is_float(b.dtype) && fp16::is_float(x.dtype)) || b.shape.is_empty() {
        return None;
    }
    let same = b.shape == x.shape;
    let grown = b.shape.len() == x.shape.len() && b.shape[1..] == x.shape[1..] && x.shape[0] > b.shape[0];
    let n: usize = b.shape.iter().product();
    (same || grown).then_some(n).filter(|&n| n > 0)
}

/// Samples the first `common` elements of `x` and `b`; `None` when the base's sample is all
/// zero (nothing to measure against) or holds no finite pair.
fn measure(base: &Checkpoint, b: &TensorRef, dir: &Checkpoint, x: &TensorRef, common: usize) -> Option<TensorEvidence> {
    let (wb, wx) = (b.dtype.bitsize() / 8, x.dtype.bitsize() / 8);
    let (bb, xb) = (base.bytes(b), dir.bytes(x));
    let (mut n, mut bsq, mut xsq, mut dsq) = (0u64, 0f64, 0f64, 0f64);
    for range in blocks(common) {
        for i in range {
            let bv = fp16::load(b.dtype, &bb[i * wb..(i + 1) * wb]);
            let xv = fp16::load(x.dtype, &xb[i * wx..(i + 1) * wx]);
            if !(bv.is_finite() && xv.is_finite()) {
                continue;
            }
            n += 1;
            bsq += bv * bv;
            xsq += xv * xv;
            dsq += (xv - bv) * (xv - bv);
        }
    }
    (n > 0 && bsq > 0.0).then(|| TensorEvidence {
        name: x.name.clone(),
        sampled: n,
        relative_norm: (xsq / bsq).sqrt(),
        relative_distance: (dsq / bsq).sqrt(),
    })
}

/// The element ranges sampled from a tensor of `n` elements: all of them when there are at
/// most `BLOCKS * BLOCK_ELEMS`, else `BLOCKS` blocks from the first element to the last.
fn blocks(n: usize) -> Vec<std::ops::Range<usize>> {
    if n <= BLOCKS * BLOCK_ELEMS {
        return std::iter::once(0..n).collect();
    }
    let span = (n - BLOCK_ELEMS) as u128;
    (0..BLOCKS)
        .map(|k| {
            let start = (span * k as u128 / (BLOCKS - 1) as u128) as usize;
            start..start + BLOCK_ELEMS
        })
        .collect()
}

/// The median (the mean of the middle two for an even count); `None` for no values.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_leave_margins_around_real_figures() {
        use Verdict::*;
        let j = |r: f64, d: f64| judge(Some(r), Some(d));
        // Differences of real fine-tunes: 0.1 % to 10 % of the base (then d is about 1).
        for r in [0.0, 1e-3, 0.03, 0.1, DIFFERENCE_MAX_NORM] {
            assert_eq!(j(r, (1.0 + r * r).sqrt()), Difference, "r = {r}");
        }
        // Fine-tunes: within 0.1 % to 10 % of the base, as large as it; the base itself.
        for d in [0.0, 1e-3, 0.03, 0.1, FINE_TUNE_MAX_DISTANCE] {
            assert_eq!(j((1.0 + d * d).sqrt(), d), FineTune, "d = {d}");
            assert_eq!(j(1.0 - d, d), FineTune, "d = {d}, shrunk by weight decay");
        }
        // Another model of the same scale: independent weights, d about sqrt(2).
        assert_eq!(j(1.0, 2f64.sqrt()), OtherModel);
        assert_eq!(j(OTHER_MODEL_NORM.1, 2.0), OtherModel);
        // Between the thresholds, or far out of scale: unsettled.
        assert_eq!(j(0.4, 0.9), Unknown);
        assert_eq!(j(DIFFERENCE_MAX_NORM + 1e-9, 1.0), Unknown);
        assert_eq!(j(5.0, 5.0), Unknown);
        assert_eq!(judge(None, None), Unknown);
        assert_eq!(j(f64::NAN, 0.0), Unknown);
        assert!(Marked.is_additive() && Difference.is_additive());
        assert!(![FineTune, OtherModel, Unknown].iter().any(|v| v.is_additive()));
    }

    #[test]
    fn samples_are_bounded_and_reach_both_ends() {
        for n in [10, BLOCKS * BLOCK_ELEMS] {
            let all = blocks(n);
            assert_eq!((all.len(), all[0].clone()), (1, 0..n), "all of a small tensor");
        }
        let n = 3_000_000_017;
        let b = blocks(n);
        assert_eq!(b.len(), BLOCKS);
        assert_eq!((b[0].start, b[BLOCKS - 1].end), (0, n));
        assert!(b.windows(2).all(|w| w[0].end <= w[1].start));
        assert!(b.iter().all(|r| r.len() == BLOCK_ELEMS));
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 100.0]), Some(3.0));
    }
}
