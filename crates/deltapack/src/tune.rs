//! Choosing each tensor's codec and settings: what the user asked for, the statistics and
//! fits the lossy codecs need, and the search for the cheapest setting within an error budget.
//!
//! Every pass here streams the tensor in fixed blocks of rows, runs the blocks of a window
//! in parallel and adds their results up in block order, so every choice and every stored
//! number is the same for any thread count.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::codec::float::magnitude_bin as mag_bin;
use crate::codec::float::{with_elem, Elem};
use crate::codec::lossy::{self, Domain, TensorCodec};
use crate::codec::{exact, float};
use crate::{dtype, Error, Result};

use crate::codec::plan::QualitySums;
pub use crate::codec::plan::TensorPlan;
pub use crate::codec::plan::{axis_scales, AxisVectors, Quality};

/// A codec as the user names it, settings optional (`quant:bits=4`, `sparse:keep=0.1`, `auto`).
#[derive(Debug, Clone, PartialEq)]
pub enum CodecSpec {
    /// Bit-exact.
    Exact,
    /// Quantized deltas: `bits` with groups, or one `step`; neither: the budget decides, else 4 bits.
    Quant {
        /// Bits per code (2..8), with a step per group.
        bits: Option<u8>,
        /// One absolute step for the tensor.
        step: Option<f64>,
        /// Elements per group with `bits` (power of two).
        group: u32,
        /// Fraction of each chunk's largest changes kept exactly with `bits`.
        outliers: f32,
        /// Where the quantization grid lies.
        domain: Domain,
    },
    /// The largest changes: a fraction `keep`, or all with `|D| >= threshold`.
    Sparse {
        /// Fraction of changes kept.
        keep: Option<f64>,
        /// Keep changes at least this large.
        threshold: Option<f64>,
        /// Quantize kept changes with this step instead of keeping them exactly.
        step: Option<f64>,
    },
    /// DARE: keep a random fraction and rescale.
    Dare {
        /// Fraction kept.
        keep: f64,
        /// Seed; each tensor's mask seed derives from it and the tensor's name.
        seed: u64,
    },
    /// 1-bit signs, one scale per tensor.
    Sign {
        /// Keep unchanged values unchanged (a third symbol); `None`: when at least a fifth are.
        zeros: Option<bool>,
    },
    /// 1-bit signs, per-row times per-column scales (rank-1 fit of |D|).
    SignAxis {
        /// As for `Sign`.
        zeros: Option<bool>,
    },
    /// Per tensor, the cheapest of all codecs within the error budget.
    Auto,
}

impl CodecSpec {
    /// The codec's name.
    pub fn name(&self) -> &'static str {
        match self {
            CodecSpec::Exact => "exact",
            CodecSpec::Quant { .. } => "quant",
            CodecSpec::Sparse { .. } => "sparse",
            CodecSpec::Dare { .. } => "dare",
            CodecSpec::Sign { .. } => "sign",
            CodecSpec::SignAxis { .. } => "sign-axis",
            CodecSpec::Auto => "auto",
        }
    }

    /// The spec named `name` with default settings.
    pub fn named(name: &str) -> std::result::Result<CodecSpec, String> {
        Ok(match name {
            "exact" => CodecSpec::Exact,
            "quant" => CodecSpec::Quant {
                bits: None,
                step: None,
                group: 128,
                outliers: 0.001,
                domain: Domain::Ulp,
            },
            "sparse" => CodecSpec::Sparse {
                keep: None,
                threshold: None,
                step: None,
            },
            "dare" => CodecSpec::Dare { keep: 0.1, seed: 0 },
            "sign" => CodecSpec::Sign { zeros: None },
            "sign-axis" => CodecSpec::SignAxis { zeros: None },
            "auto" => CodecSpec::Auto,
            _ => {
                return Err(format!(
                    "unknown codec '{name}' (expected exact, quant, sparse, dare, sign, sign-axis or auto)"
                ))
            }
        })
    }

    /// Sets one `key=value` setting.
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let codec = self.name();
        let bad = |valid: &str| format!("bad value '{value}' for {key} of codec {codec}: give {valid}");
        let num = |valid: &str, ok: &dyn Fn(f64) -> bool| {
            value
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && ok(*x))
                .ok_or_else(|| bad(valid))
        };
        let positive = || num("a positive number", &|x| x > 0.0);
        let frac = || num("a fraction above 0 and at most 1", &|x| x > 0.0 && x <= 1.0);
        match (self, key) {
            (CodecSpec::Quant { bits, step, .. }, "bits") => {
                let b = value.parse().ok().filter(|b| (2..=8).contains(b));
                *bits = Some(b.ok_or_else(|| bad("a whole number of bits from 2 to 8"))?);
                *step = None;
            }
            (CodecSpec::Quant { bits, step, .. }, "step") => {
                *step = Some(positive()?);
                *bits = None;
            }
            (CodecSpec::Quant { group, .. }, "group") => {
                *group = value
                    .parse()
                    .ok()
                    .filter(|g: &u32| g.is_power_of_two() && (16..=1 << 16).contains(g))
                    .ok_or_else(|| bad("a power of two from 16 to 65536"))?;
            }
            (CodecSpec::Quant { outliers, .. }, "outliers") => {
                *outliers = num("a fraction from 0 to 0.5", &|x| (0.0..=0.5).contains(&x))? as f32;
            }
            (CodecSpec::Quant { domain, .. }, "domain") => {
                *domain = match value {
                    "value" => Domain::Value,
                    "ulp" => Domain::Ulp,
                    _ => return Err(bad("'value' or 'ulp'")),
                }
            }
            (CodecSpec::Sparse { keep, threshold, .. }, "keep") => {
                *keep = Some(frac()?);
                *threshold = None;
            }
            (CodecSpec::Sparse { keep, threshold, .. }, "threshold") => {
                *threshold = Some(num("a number of at least 0", &|x| x >= 0.0)?);
                *keep = None;
            }
            (CodecSpec::Sparse { step, .. }, "step") => *step = Some(positive()?),
            (CodecSpec::Dare { keep, .. }, "keep") => *keep = frac()?,
            (CodecSpec::Dare { seed, .. }, "seed") => {
                *seed = value.parse().map_err(|_| bad("a whole number from 0 to 2^64-1"))?
            }
            (CodecSpec::Sign { zeros } | CodecSpec::SignAxis { zeros }, "zeros") => {
                *zeros = match value {
                    "keep" => Some(true),
                    "sign" => Some(false),
                    "auto" => None,
                    _ => return Err(bad("'keep', 'sign' or 'auto'")),
                }
            }
            (_, k) => return Err(format!("codec {codec} has no setting '{k}'")),
        }
        Ok(())
    }

    /// True when a budget (`--max-error`) can steer this codec.
    pub fn takes_budget(&self) -> bool {
        !matches!(self, CodecSpec::Dare { .. })
    }
}

impl FromStr for CodecSpec {
    type Err = String;

    /// Parses `NAME[:key=value,...]`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, settings) = s.split_once(':').unwrap_or((s, ""));
        let mut spec = CodecSpec::named(name)?;
        for kv in settings.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("setting '{kv}' is not key=value"))?;
            spec.set(k, v)?;
        }
        Ok(spec)
    }
}

/// A codec for the tensors whose names match a glob (`--tensor-codec GLOB=SPEC`).
#[derive(Debug, Clone)]
pub struct TensorRule {
    /// The pattern as given.
    pub pattern: String,
    matcher: globset::GlobMatcher,
    /// The codec for matching tensors.
    pub spec: CodecSpec,
}

impl FromStr for TensorRule {
    type Err = String;

    /// Parses `GLOB=NAME[:key=value,...]`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (pattern, spec) = split_rule(s).ok_or_else(|| format!("'{s}' is not GLOB=CODEC[:key=value,...]"))?;
        let glob = globset::Glob::new(pattern).map_err(|e| format!("bad pattern '{pattern}': {e}"))?;
        Ok(TensorRule {
            pattern: pattern.to_string(),
            matcher: glob.compile_matcher(),
            spec: spec.parse()?,
        })
    }
}

/// Splits `GLOB=NAME[:settings]` at the `=` that precedes a codec name.
fn split_rule(s: &str) -> Option<(&str, &str)> {
    s.match_indices('=').find_map(|(i, _)| {
        let rest = &s[i + 1..];
        let name = rest.split(':').next()?;
        CodecSpec::named(name).is_ok().then(|| (&s[..i], rest))
    })
}

/// How a run chooses codecs.
#[derive(Debug, Clone)]
pub struct CodecPolicy {
    /// The codec for tensors no rule matches.
    pub default: CodecSpec,
    /// Per-tensor rules; the first match wins.
    pub rules: Vec<TensorRule>,
    /// Largest relative RMS error of the delta per tensor, if any.
    pub max_error: Option<f64>,
    /// Mean squared input activations per linear layer, for a weighted `sign-axis` fit.
    pub calibration: Option<Calibration>,
    /// Plans decided elsewhere, by tensor name, used as they are before any rule: a
    /// delta's own plans with scales learned by calibration (see [`crate::rescale`]).
    pub fixed: HashMap<String, FixedPlan>,
}

/// A tensor's plan decided outside the tuner, and what its chunks must come out as.
#[derive(Debug, Clone)]
pub struct FixedPlan {
    /// The codec and its parameters.
    pub plan: TensorPlan,
    /// The checksums its chunk payloads must have, in order (empty: not checked): a
    /// re-made 1-bit delta must reproduce the signs of the delta it came from.
    pub payloads: Vec<String>,
}

impl Default for CodecPolicy {
    fn default() -> Self {
        CodecPolicy {
            default: CodecSpec::Exact,
            rules: Vec::new(),
            max_error: None,
            calibration: None,
            fixed: HashMap::new(),
        }
    }
}

impl CodecPolicy {
    /// True when every tensor is coded exactly.
    pub fn is_exact(&self) -> bool {
        self.default == CodecSpec::Exact
            && self.rules.iter().all(|r| r.spec == CodecSpec::Exact)
            && self.fixed.values().all(|f| f.plan.codec.is_none())
    }

    /// The spec for a tensor and whether a rule named it. 1-D tensors (norms, biases) stay
    /// exact unless a rule says otherwise: they are tiny and sensitive.
    fn spec_for(&self, name: &str, ndim: usize) -> &CodecSpec {
        if let Some(r) = self.rules.iter().find(|r| r.matcher.is_match(name)) {
            return &r.spec;
        }
        if ndim < 2 {
            return &CodecSpec::Exact;
        }
        &self.default
    }
}

/// Per-input-channel activation statistics: a safetensors file mapping a linear layer's
/// weight name to a 1-D F32/F16/BF16 vector of mean squared activations (one per column).
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    vectors: std::collections::HashMap<String, Vec<f32>>,
}

impl Calibration {
    /// Reads a calibration file.
    pub fn open(path: &Path) -> Result<Calibration> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bad_checkpoint(path, format!("not a safetensors file: {e}")))?;
        let mut vectors = std::collections::HashMap::new();
        for (name, view) in st.tensors() {
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                d => {
                    return Err(Error::bad_checkpoint(
                        path,
                        format!("calibration vector '{name}' is {d:?}; use F32, F16 or BF16"),
                    ))
                }
            };
            if view.shape().len() != 1 || values.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(Error::bad_checkpoint(
                    path,
                    format!("calibration vector '{name}' must be 1-D, finite and non-negative"),
                ));
            }
            vectors.insert(name, values);
        }
        Ok(Calibration { vectors })
    }

    /// Builds calibration data from vectors (tests and bindings).
    pub fn from_vectors(vectors: impl IntoIterator<Item = (String, Vec<f32>)>) -> Calibration {
        Calibration {
            vectors: vectors.into_iter().collect(),
        }
    }

    fn weights(&self, name: &str, cols: u64) -> Option<&[f32]> {
        self.vectors
            .get(name)
            .filter(|v| v.len() as u64 == cols)
            .map(|v| &v[..])
    }
}

/// One tensor as the tuner sees it: same dtype and shape on both sides.
pub(crate) struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub base: &'a [u8],
    pub target: &'a [u8],
    pub chunk_bytes: usize,
    /// Drops the pages of a byte range of both tensors once a pass is done with it, so that
    /// passes over a big tensor keep only a few blocks resident.
    pub release: &'a (dyn Fn(std::ops::Range<usize>) + Sync),
}

impl TensorView<'_> {
    fn numel(&self) -> u64 {
        (self.target.len() / (self.dtype.bitsize() / 8)) as u64
    }

    fn rows_cols(&self) -> (u64, u64) {
        let cols = self.shape[1..].iter().product::<usize>().max(1) as u64;
        (self.numel() / cols, cols)
    }
}

/// Decides a tensor's codec and settings.
pub(crate) fn plan(policy: &CodecPolicy, t: &TensorView, seed_salt: &str) -> Result<TensorPlan> {
    if let Some(f) = policy.fixed.get(t.name) {
        check_fixed(&f.plan, t)?;
        return Ok(f.plan.clone());
    }
    let spec = policy.spec_for(t.name, t.shape.len());
    if *spec == CodecSpec::Exact || !float::lossy_capable(t.dtype) || t.target.is_empty() {
        return Ok(TensorPlan::EXACT);
    }
    let budget = policy.max_error;
    let calib = policy
        .calibration
        .as_ref()
        .and_then(|c| c.weights(t.name, t.rows_cols().1));
    // Fixed `quant` and `dare` settings need to know only whether anything changed.
    if let (Some(codec), None) = (plain_codec(spec, seed_salt), budget) {
        return Ok(match with_elem!(t.dtype, changed(t)) {
            true => TensorPlan {
                codec: Some(codec),
                axis: None,
            },
            false => TensorPlan::EXACT,
        });
    }
    let stats = with_elem!(
        t.dtype,
        stats(t, matches!(spec, CodecSpec::Sparse { .. } | CodecSpec::Auto))
    );
    if stats.delta_sq == 0.0 {
        return Ok(TensorPlan::EXACT);
    }
    match (spec, budget) {
        (CodecSpec::Auto, None) => Err(Error::InvalidArgument(
            "codec 'auto' needs an error budget (the largest error of each tensor) to choose within".into(),
        )),
        (CodecSpec::Auto, Some(e)) => auto(t, &stats, e, calib),
        (s, None) => Ok(fixed(s, t, &stats, calib, seed_salt)),
        (s, Some(e)) => Ok(budgeted(s, t, &stats, e, calib)?.map_or(TensorPlan::EXACT, |c| c.plan)),
    }
}

/// Checks a plan decided elsewhere against the tensor it is for, as a reader would check it.
fn check_fixed(p: &TensorPlan, t: &TensorView) -> Result<()> {
    let bad = |m: String| Error::InvalidArgument(format!("tensor '{}': {m}", t.name));
    let Some(codec) = &p.codec else {
        return Ok(());
    };
    if !float::lossy_capable(t.dtype) {
        return Err(bad(format!("a lossy codec cannot code a {:?} tensor", t.dtype)));
    }
    let need = codec.validate(t.numel()).map_err(bad)?;
    if let Some((r, c)) = &p.axis {
        if (r.len() as u64, c.len() as u64) != t.rows_cols() || r.iter().chain(c).any(|x| !x.is_finite() || *x < 0.0) {
            return Err(bad(
                "the scales must be finite, non-negative, one per row and one per column".into(),
            ));
        }
    }
    let blob = p.params().map_or(0, |b| b.len() as u64);
    if blob != need {
        return Err(bad(format!(
            "the {} codec needs {need} bytes of parameters, got {blob}",
            codec.name()
        )));
    }
    Ok(())
}

/// Whole-tensor statistics of the delta.
struct Stats {
    delta_sq: f64,
    abs_sum: f64,
    finite: u64,
    /// Finite changes that are exactly zero.
    zeros: u64,
    /// Count and sum of squares of the changes per magnitude bin (see [`mag_bin`]), if asked.
    hist: Option<(Vec<u64>, Vec<f64>)>,
}

const BINS: usize = float::MAGNITUDE_BINS;

impl Stats {
    /// No elements yet; with an empty histogram if `hist`.
    fn empty(hist: bool) -> Stats {
        Stats {
            delta_sq: 0.0,
            abs_sum: 0.0,
            finite: 0,
            zeros: 0,
            hist: hist.then(|| (vec![0u64; BINS], vec![0f64; BINS])),
        }
    }
}

/// Element ranges of the analysis blocks: whole rows, about one chunk each.
fn blocks(t: &TensorView) -> Vec<std::ops::Range<usize>> {
    let (rows, cols) = t.rows_cols();
    let per_chunk = (t.chunk_bytes / (t.dtype.bitsize() / 8)) as u64;
    let rows_per = (per_chunk / cols).max(1);
    (0..rows.div_ceil(rows_per))
        .map(|b| {
            let r0 = b * rows_per;
            let r1 = ((b + 1) * rows_per).min(rows);
            (r0 * cols) as usize..(r1 * cols) as usize
        })
        .collect()
}

/// Maps blocks (element ranges) in parallel, windows of a few per thread, and folds
/// results in block order; each block's pages are released after use.
fn fold_blocks<R: Send, A>(
    t: &TensorView,
    blocks: &[std::ops::Range<usize>],
    map: impl Fn(std::ops::Range<usize>) -> R + Sync,
    init: A,
    mut fold: impl FnMut(A, R) -> A,
) -> A {
    let window = 2 * rayon::current_num_threads();
    let width = t.dtype.bitsize() / 8;
    let mut acc = init;
    for w in blocks.chunks(window) {
        let parts: Vec<R> = w
            .par_iter()
            .map(|r| {
                let out = map(r.clone());
                (t.release)(r.start * width..r.end * width);
                out
            })
            .collect();
        for p in parts {
            acc = fold(acc, p);
        }
    }
    acc
}

fn stats<E: Elem>(t: &TensorView, hist: bool) -> Stats {
    let init = Stats::empty(hist);
    let w = E::WIDTH;
    fold_blocks(
        t,
        &blocks(t),
        // Rayon calls this closure from its own code, built for the baseline: the block's
        // work is a dispatched function of its own, to run with AVX-512 or AVX2.
        |r| block_stats_wide::<E>(&t.base[r.start * w..r.end * w], &t.target[r.start * w..r.end * w], hist),
        init,
        |mut a, s| {
            a.delta_sq += s.delta_sq;
            a.abs_sum += s.abs_sum;
            a.finite += s.finite;
            a.zeros += s.zeros;
            if let (Some((ac, aq)), Some((c, q))) = (a.hist.as_mut(), s.hist) {
                ac.iter_mut().zip(c).for_each(|(x, y)| *x += y);
                aq.iter_mut().zip(q).for_each(|(x, y)| *x += y);
            }
            a
        },
    )
}

float::simd_dispatch!(fn block_stats_wide => block_stats(b: &[u8], tg: &[u8], hist: bool) -> Stats);

/// [`Stats`] of one block of a tensor.
#[inline(always)]
fn block_stats<E: Elem>(b: &[u8], tg: &[u8], hist: bool) -> Stats {
    let mut s = Stats::empty(hist);
    let w = E::WIDTH;
    // Four lanes of sums, lane `k & 3` for element `k`: the adds of one lane do not
    // wait on the others, and four elements are one vector operation.
    let (mut sq, mut ab) = ([0f64; 4], [0f64; 4]);
    let (mut finite, mut zeros) = ([0u64; 4], [0u64; 4]);
    let mut lane = |k: usize, b: f64, tg: f64| {
        let d = tg - b;
        // Non-finite changes add +0.0 to these non-negative sums: the same as
        // skipping them, without a branch.
        let f = d.is_finite();
        sq[k] += if f { d * d } else { 0.0 };
        ab[k] += if f { d.abs() } else { 0.0 };
        finite[k] += f as u64;
        zeros[k] += (d == 0.0) as u64;
    };
    // Inlined, so that it is built for AVX-512 or AVX2 with its caller (a closure apart would not be).
    float::blocks::<E, 2>(
        [b, tg],
        #[inline(always)]
        |_, [b, tg]| {
            for (b4, t4) in b.as_chunks::<4>().0.iter().zip(tg.as_chunks::<4>().0) {
                for k in 0..4 {
                    lane(k, b4[k], t4[k]);
                }
            }
            let tail = b.len() / 4 * 4;
            for k in 0..b.len() - tail {
                lane(k, b[tail + k], tg[tail + k]);
            }
        },
    );
    s.finite = finite.iter().sum();
    s.zeros = zeros.iter().sum();
    if let Some((c, q)) = s.hist.as_mut() {
        for (b, tg) in b.chunks_exact(w).zip(tg.chunks_exact(w)) {
            let d = E::load(tg) - E::load(b);
            if d.is_finite() {
                let bin = mag_bin(d);
                c[bin] += 1;
                q[bin] += d * d;
            }
        }
    }
    s.delta_sq = (sq[0] + sq[1]) + (sq[2] + sq[3]);
    s.abs_sum = (ab[0] + ab[1]) + (ab[2] + ab[3]);
    s
}

/// Alternating least-squares rounds of the rank-1 fit. Without weights or a mask each
/// round is a power iteration; the first round (row means) is already close, since |D| is
/// non-negative and its top singular pair dominates.
const FIT_ROUNDS: usize = 1;

/// The best row and column scales for `sign-axis`: `r, c` minimising
/// `sum_ij a_j m_ij (|D_ij| - r_i c_j)^2`, where `a` are the calibration weights (or 1) and
/// `m_ij` is 0 for unchanged values when `zeros` keeps them (they are rebuilt exactly), else 1.
/// Without weights or mask this is the top singular pair of |D|.
fn fit_axis<E: Elem>(t: &TensorView, weights: Option<&[f32]>, zeros: bool) -> AxisVectors {
    let (rows, cols) = t.rows_cols();
    let cols = cols as usize;
    let a: Vec<f64> = match weights {
        Some(w) => w.iter().map(|&x| (x as f64).max(1e-12)).collect(),
        None => vec![1.0; cols],
    };
    let blocks = blocks(t);
    let rows_of = |r: &std::ops::Range<usize>| r.start / cols..r.end / cols;
    let add = |mut acc: (Vec<f64>, Vec<f64>), p: (Vec<f64>, Vec<f64>)| {
        acc.0.iter_mut().zip(p.0).for_each(|(x, y)| *x += y);
        acc.1.iter_mut().zip(p.1).for_each(|(x, y)| *x += y);
        acc
    };
    // First guess: equal columns, so the first rows are weighted row means.
    let mut c = vec![1f64; cols];
    // Each round: rows given columns, and in the same pass the columns' normal equations
    // given those rows. Rayon calls the closures from its own code, built for the baseline:
    // the blocks' work are dispatched functions of their own, to run with AVX-512 or AVX2.
    for _ in 0..FIT_ROUNDS {
        let (num, den) = fold_blocks(
            t,
            &blocks,
            |r| axis_columns_wide::<E>(t, rows_of(&r), &a, zeros, &c),
            (vec![0f64; cols], vec![0f64; cols]),
            add,
        );
        c = num
            .iter()
            .zip(&den)
            .map(|(n, d)| if *d > 0.0 { n / d } else { 0.0 })
            .collect();
    }
    let row_scales = fold_blocks(
        t,
        &blocks,
        |r| axis_rows_wide::<E>(t, rows_of(&r), &a, zeros, &c),
        Vec::with_capacity(rows as usize),
        |mut acc, p| {
            acc.extend(p);
            acc
        },
    );
    (row_scales, c.iter().map(|&x| x as f32).collect())
}

/// Row `row` of |D| into `d` and of the weights `a_j m_ij` into `wt` (see [`fit_axis`]),
/// and the row's least-squares scale given the columns `c`, in one loop over them.
///
/// The sums run in four fixed lanes (lane `j & 3` for column `j`, the columns past the last
/// four in lane 0): fast, and the same sums on every machine.
#[inline(always)]
fn axis_row<E: Elem>(
    t: &TensorView,
    row: usize,
    a: &[f64],
    zeros: bool,
    c: &[f64],
    d: &mut Vec<f64>,
    wt: &mut Vec<f64>,
) -> f64 {
    let (cols, w) = (a.len(), E::WIDTH);
    let (b, tg) = (&t.base[row * cols * w..], &t.target[row * cols * w..]);
    d.resize(cols, 0.0);
    wt.resize(cols, 0.0);
    // The base values into `d` and the fine-tune's into `wt`, then both replaced in place.
    E::load_block(&b[..cols * w], d);
    E::load_block(&tg[..cols * w], wt);
    #[inline(always)]
    fn weigh(dj: &mut f64, wj: &mut f64, aj: f64, zeros: bool) {
        let x = *wj - *dj;
        // Not finite, or unchanged and kept apart: no weight in the fit.
        let used = x.is_finite() && !(zeros && x == 0.0);
        *dj = if used { x.abs() } else { 0.0 };
        *wj = if used { aj } else { 0.0 };
    }
    let (mut num, mut den) = ([0f64; 4], [0f64; 4]);
    let (d4, d_tail) = d.as_chunks_mut::<4>();
    let (w4, w_tail) = wt.as_chunks_mut::<4>();
    let (a4, a_tail) = a.as_chunks::<4>();
    let (c4, c_tail) = c.as_chunks::<4>();
    for (((d4, w4), a4), c4) in d4.iter_mut().zip(w4).zip(a4).zip(c4) {
        for k in 0..4 {
            weigh(&mut d4[k], &mut w4[k], a4[k], zeros);
            num[k] += w4[k] * d4[k] * c4[k];
            den[k] += w4[k] * c4[k] * c4[k];
        }
    }
    let tail = d_tail.iter_mut().zip(w_tail).zip(a_tail).zip(c_tail);
    for (((dj, wj), &aj), &cj) in tail {
        weigh(dj, wj, aj, zeros);
        num[0] += *wj * *dj * cj;
        den[0] += *wj * cj * cj;
    }
    let (num, den) = (
        (num[0] + num[1]) + (num[2] + num[3]),
        (den[0] + den[1]) + (den[2] + den[3]),
    );
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

float::simd_dispatch!(fn axis_columns_wide => axis_columns(t: &TensorView, rows: std::ops::Range<usize>, a: &[f64], zeros: bool, c: &[f64]) -> (Vec<f64>, Vec<f64>));

/// One fit round over some rows: each row's scale given the columns `c`, and the sums of
/// the columns' normal equations given those rows.
#[inline(always)]
fn axis_columns<E: Elem>(
    t: &TensorView,
    rows: std::ops::Range<usize>,
    a: &[f64],
    zeros: bool,
    c: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let cols = a.len();
    let (mut num, mut den) = (vec![0f64; cols], vec![0f64; cols]);
    let (mut d, mut wt) = (Vec::with_capacity(cols), Vec::with_capacity(cols));
    for row in rows {
        let ri = axis_row::<E>(t, row, a, zeros, c, &mut d, &mut wt);
        for (((n, m), &dj), &wj) in num.iter_mut().zip(den.iter_mut()).zip(&d).zip(&wt) {
            *n += wj * dj * ri;
            *m += wj * ri * ri;
        }
    }
    (num, den)
}

float::simd_dispatch!(fn axis_rows_wide => axis_rows(t: &TensorView, rows: std::ops::Range<usize>, a: &[f64], zeros: bool, c: &[f64]) -> Vec<f32>);

/// The final row scales of some rows, given the columns `c`.
#[inline(always)]
fn axis_rows<E: Elem>(t: &TensorView, rows: std::ops::Range<usize>, a: &[f64], zeros: bool, c: &[f64]) -> Vec<f32> {
    let (mut d, mut wt) = (Vec::with_capacity(a.len()), Vec::with_capacity(a.len()));
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(axis_row::<E>(t, row, a, zeros, c, &mut d, &mut wt) as f32);
    }
    out
}

/// A candidate setting with what a trial measured.
struct Candidate {
    plan: TensorPlan,
    /// Estimated payload bytes for the whole tensor.
    bytes: f64,
    /// Relative RMS error over the sampled chunks.
    error: f64,
}

/// The codec settings for a spec without budget.
fn fixed(spec: &CodecSpec, t: &TensorView, stats: &Stats, calib: Option<&[f32]>, salt: &str) -> TensorPlan {
    if let Some(codec) = plain_codec(spec, salt) {
        return TensorPlan {
            codec: Some(codec),
            axis: None,
        };
    }
    let codec = match *spec {
        CodecSpec::Sparse { keep, threshold, step } => TensorCodec::Sparse {
            threshold: threshold.map_or_else(|| keep_threshold(stats, keep.unwrap_or(0.1)), |x| x as f32),
            step: step.map(|s| s as f32),
        },
        CodecSpec::Sign { zeros } => {
            let zeros = keep_zeros(zeros, stats);
            let n = if zeros {
                stats.finite - stats.zeros
            } else {
                stats.finite
            };
            TensorCodec::Sign {
                scale: (stats.abs_sum / n.max(1) as f64) as f32,
                zeros,
            }
        }
        CodecSpec::SignAxis { zeros } => return sign_axis(t, stats, calib, keep_zeros(zeros, stats)),
        // `quant` and `dare` returned above.
        CodecSpec::Exact | CodecSpec::Auto | CodecSpec::Quant { .. } | CodecSpec::Dare { .. } => {
            return TensorPlan::EXACT
        }
    };
    TensorPlan {
        codec: Some(codec),
        axis: None,
    }
}

/// The settings of `quant` and `dare` without budget, which need no statistics.
fn plain_codec(spec: &CodecSpec, salt: &str) -> Option<TensorCodec> {
    match *spec {
        CodecSpec::Quant {
            bits,
            step,
            group,
            outliers,
            domain,
        } => Some(TensorCodec::Quant {
            step: step.map(|s| s as f32),
            bits: if step.is_some() { None } else { Some(bits.unwrap_or(4)) },
            group,
            outliers,
            domain,
        }),
        CodecSpec::Dare { keep, seed } => Some(TensorCodec::Dare {
            keep: keep as f32,
            seed: mask_seed(seed, salt),
        }),
        _ => None,
    }
}

/// Whether some finite change has a non-zero square: exactly when [`Stats::delta_sq`] is
/// not zero (a sum of non-negative terms is zero only if all are), known at the first one
/// instead of after a pass over the whole tensor. Blocks without one are released.
fn changed<E: Elem>(t: &TensorView) -> bool {
    let w = E::WIDTH;
    blocks(t).into_iter().any(|r| {
        let bytes = r.start * w..r.end * w;
        let pairs = t.base[bytes.clone()]
            .chunks_exact(w)
            .zip(t.target[bytes.clone()].chunks_exact(w));
        let found = pairs.into_iter().any(|(b, tg)| {
            let d = E::load(tg) - E::load(b);
            d.is_finite() && d * d != 0.0
        });
        if !found {
            (t.release)(bytes);
        }
        found
    })
}

/// Whether sign codecs keep unchanged values: as asked, else when at least a fifth of the
/// values did not change (typical of bf16 fine-tunes, where small updates round away).
fn keep_zeros(asked: Option<bool>, stats: &Stats) -> bool {
    asked.unwrap_or(stats.zeros * 5 >= stats.finite)
}

fn sign_axis(t: &TensorView, stats: &Stats, calib: Option<&[f32]>, zeros: bool) -> TensorPlan {
    let (rows, cols) = t.rows_cols();
    // One row (or a huge one) has no axis structure to fit: a per-tensor scale is the same fit.
    if rows < 2 || cols > 1 << 22 {
        return fixed(&CodecSpec::Sign { zeros: Some(zeros) }, t, stats, None, "");
    }
    let (r, c) = with_elem!(t.dtype, fit_axis(t, calib, zeros));
    TensorPlan {
        codec: Some(TensorCodec::SignAxis {
            rows,
            cols,
            calibrated: calib.is_some(),
            zeros,
        }),
        axis: Some((r, c)),
    }
}

/// Each tensor's DARE seed: the user's seed mixed with the tensor's name, so that tensors
/// of one shape get different masks.
fn mask_seed(seed: u64, salt: &str) -> u64 {
    let h = blake3::hash(format!("{seed}\0{salt}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The threshold keeping about `keep` of the finite changes (never more).
fn keep_threshold(stats: &Stats, keep: f64) -> f32 {
    let (counts, _) = stats.hist.as_ref().expect("histogram computed for sparse");
    let want = (keep * stats.finite as f64).floor() as u64;
    let mut above = 0u64;
    for b in (0..BINS).rev() {
        if above + counts[b] > want {
            return f32::from_bits(((b + 1) as u32) << 16);
        }
        above += counts[b];
    }
    0.0
}

/// The largest threshold whose dropped changes stay within the relative error `e`.
fn budget_threshold(stats: &Stats, e: f64) -> f32 {
    let (_, sq) = stats.hist.as_ref().expect("histogram computed for sparse");
    let allowed = e * e * stats.delta_sq;
    let mut dropped = 0.0;
    for (b, &s) in sq.iter().enumerate() {
        if dropped + s > allowed {
            return f32::from_bits((b as u32) << 16);
        }
        dropped += s;
    }
    f32::INFINITY
}

/// Chunks measured by a trial: all of a small tensor, an evenly spread sample of a big one.
const TRIAL_CHUNKS: usize = 8;

/// Encodes and decodes (a sample of) the tensor with `plan`: estimated bytes and error.
fn trial(t: &TensorView, plan: TensorPlan, all: bool) -> Candidate {
    let w = t.dtype.bitsize() / 8;
    let n = t.target.len().div_ceil(t.chunk_bytes);
    let step = if all { 1 } else { n.div_ceil(TRIAL_CHUNKS).max(1) };
    let chosen: Vec<usize> = (0..n).step_by(step).collect();
    let layout = dtype::layout(t.dtype);
    let parts: Vec<(usize, f64, f64, usize)> = chosen
        .par_iter()
        .map(|&c| {
            let r = c * t.chunk_bytes..((c + 1) * t.chunk_bytes).min(t.target.len());
            let (b, tg) = (&t.base[r.clone()], &t.target[r.clone()]);
            let (bytes, recon) = match plan.chunk_params((r.start / w) as u64) {
                Some(p) => {
                    let mut out = vec![0u8; tg.len()];
                    let payload = lossy::encode(t.dtype, &p, b, tg, &mut out);
                    (payload.len(), Some(out))
                }
                None => (exact::encode(layout, b, tg, &mut Default::default()).len(), None),
            };
            let q = recon.map_or_else(QualitySums::default, |out| QualitySums::chunk(t.dtype, b, tg, &out));
            (t.release)(r.clone());
            (bytes, q.err_sq, q.delta_sq, r.len())
        })
        .collect();
    let (mut bytes, mut err, mut dsq, mut len) = (0usize, 0f64, 0f64, 0usize);
    for (b, e, d, l) in parts {
        bytes += b;
        err += e;
        dsq += d;
        len += l;
    }
    let params = plan.axis.as_ref().map_or(0, |(r, c)| 4 * (r.len() + c.len())) as f64;
    Candidate {
        bytes: bytes as f64 * t.target.len() as f64 / len.max(1) as f64 + params,
        error: if dsq > 0.0 { (err / dsq).sqrt() } else { 0.0 },
        plan,
    }
}

/// Whether sampling could let a budgeted setting miss: small tensors are measured whole.
fn sampled(t: &TensorView) -> bool {
    t.target.len().div_ceil(t.chunk_bytes) > TRIAL_CHUNKS
}

/// The cheapest setting of `spec` whose error is at most `e`, or `None` if even its finest
/// setting misses (the caller then codes the tensor exactly).
fn budgeted(
    spec: &CodecSpec,
    t: &TensorView,
    stats: &Stats,
    e: f64,
    calib: Option<&[f32]>,
) -> Result<Option<Candidate>> {
    let rms = (stats.delta_sq / stats.finite.max(1) as f64).sqrt();
    let found = match *spec {
        CodecSpec::Quant {
            bits: Some(_),
            group,
            outliers,
            domain,
            ..
        } => {
            // The budget picks the bit count: the fewest that meet it.
            let mut found = None;
            for b in 2..=8u8 {
                let plan = TensorPlan {
                    codec: Some(TensorCodec::Quant {
                        step: None,
                        bits: Some(b),
                        group,
                        outliers,
                        domain,
                    }),
                    axis: None,
                };
                let c = confirm(t, trial(t, plan, false), e);
                if c.error <= e {
                    found = Some(c);
                    break;
                }
            }
            found
        }
        CodecSpec::Quant { domain, .. } => search_step(t, e, rms, domain),
        CodecSpec::Sparse { step, .. } => {
            let threshold = budget_threshold(stats, e);
            let plan = TensorPlan {
                codec: Some(TensorCodec::Sparse {
                    threshold,
                    step: step.map(|s| s as f32),
                }),
                axis: None,
            };
            Some(confirm(t, trial(t, plan, false), e)).filter(|c| c.error <= e)
        }
        CodecSpec::Sign { .. } | CodecSpec::SignAxis { .. } => {
            let plan = fixed(spec, t, stats, calib, "");
            Some(confirm(t, trial(t, plan, false), e)).filter(|c| c.error <= e)
        }
        CodecSpec::Dare { .. } => {
            return Err(Error::InvalidArgument(
                "codec 'dare' keeps the delta only in expectation; it takes no error budget".into(),
            ))
        }
        CodecSpec::Exact | CodecSpec::Auto => None,
    };
    Ok(found)
}

/// Re-measures a sampled candidate on the whole tensor.
fn confirm(t: &TensorView, c: Candidate, e: f64) -> Candidate {
    if c.error <= e && sampled(t) {
        trial(t, c.plan, true)
    } else {
        c
    }
}

/// The largest quantization step whose error is within `e`: start from the uniform
/// quantizer's `step = e * rms * sqrt(12)`, then rescale by the measured error (error is
/// close to proportional to the step) a few times, keeping the cheapest that fits.
fn search_step(t: &TensorView, e: f64, rms: f64, domain: Domain) -> Option<Candidate> {
    let target = 0.995 * e;
    let mut step = e * rms * 12f64.sqrt();
    let mut best: Option<Candidate> = None;
    for _ in 0..8 {
        let plan = TensorPlan {
            codec: Some(TensorCodec::Quant {
                step: Some(step as f32),
                bits: None,
                group: 128,
                outliers: 0.0,
                domain,
            }),
            axis: None,
        };
        let c = trial(t, plan, false);
        let ratio = if c.error > 0.0 { target / c.error } else { 2.0 };
        if c.error <= e && best.as_ref().is_none_or(|b| c.bytes < b.bytes) {
            best = Some(c);
        }
        if (ratio - 1.0).abs() < 0.01 {
            break;
        }
        step *= ratio.clamp(0.25, 4.0);
    }
    // A sample can flatter: confirm on the whole tensor, shrinking the step until it fits.
    let mut c = best?;
    for _ in 0..6 {
        c = confirm(t, c, e);
        if c.error <= e {
            return Some(c);
        }
        let Some(TensorCodec::Quant { step: Some(s), .. }) = c.plan.codec else {
            break;
        };
        let shrunk = s * (0.98 * e / c.error) as f32;
        c.plan.codec = Some(TensorCodec::Quant {
            step: Some(shrunk),
            bits: None,
            group: 128,
            outliers: 0.0,
            domain,
        });
        c.error = 0.0;
    }
    None
}

/// Per tensor, the cheapest of exact, quant, sparse, sign and sign-axis within `e`.
fn auto(t: &TensorView, stats: &Stats, e: f64, calib: Option<&[f32]>) -> Result<TensorPlan> {
    let exact = trial(t, TensorPlan::EXACT, false);
    let mut best = exact;
    let quant = CodecSpec::named("quant").expect("known codec");
    let sparse = CodecSpec::named("sparse").expect("known codec");
    for spec in [
        CodecSpec::SignAxis { zeros: None },
        CodecSpec::Sign { zeros: None },
        sparse,
        quant,
    ] {
        if let Some(c) = budgeted(&spec, t, stats, e, calib)? {
            if c.bytes < best.bytes {
                best = c;
            }
        }
    }
    Ok(best.plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::codec::float::Bf16;
    use crate::testdata::bf16_pair as tensor;

    fn view<'a>(shape: &'a [usize], b: &'a [u8], t: &'a [u8]) -> TensorView<'a> {
        TensorView {
            name: "w",
            dtype: Dtype::BF16,
            shape,
            base: b,
            target: t,
            // Small chunks: several blocks and sampled trials even in a small test tensor.
            chunk_bytes: 1 << 14,
            release: &|_| {},
        }
    }

    fn policy(spec: &str, e: Option<f64>) -> CodecPolicy {
        CodecPolicy {
            default: spec.parse().unwrap(),
            max_error: e,
            ..Default::default()
        }
    }

    /// The error and bytes of a plan, measured on the whole tensor.
    fn measure(v: &TensorView, spec: &str, e: Option<f64>) -> (f64, f64, Option<TensorCodec>) {
        let p = plan(&policy(spec, e), v, "w").unwrap();
        let codec = p.codec.clone();
        let c = trial(v, p, true);
        (c.error, c.bytes, codec)
    }

    #[test]
    fn budgets_are_met_and_looser_ones_cost_less() {
        let shape = [256, 512];
        // Rows with different delta scales: structure a per-tensor setting must cover.
        let (b, t) = tensor(256, 512, 1, |i, _| 1e-3 * (0.5 + (i % 7) as f32 / 4.0));
        let v = view(&shape, &b, &t);
        for spec in ["quant", "quant:bits=4", "quant:domain=value", "sparse", "auto"] {
            let mut last = f64::MAX;
            for e in [0.03, 0.1, 0.3] {
                let (err, bytes, codec) = measure(&v, spec, Some(e));
                assert!(err <= e, "{spec} within {e}: error {err} ({codec:?})");
                assert!(
                    bytes < last,
                    "{spec}: a looser budget {e} costs less ({bytes} vs {last})"
                );
                last = bytes;
            }
        }
    }

    #[test]
    fn sign_within_a_budget_or_exact() {
        let shape = [128, 256];
        let (b, t) = tensor(128, 256, 2, |_, _| 1e-3);
        let v = view(&shape, &b, &t);
        let (err, _, codec) = measure(&v, "sign", Some(0.7));
        assert!(
            err <= 0.7 && matches!(codec, Some(TensorCodec::Sign { .. })),
            "{err} {codec:?}"
        );
        let (err, _, codec) = measure(&v, "sign", Some(0.2));
        assert_eq!((err, codec), (0.0, None), "no sign setting fits 0.2: stored exactly");
    }

    #[test]
    fn per_axis_scales_beat_one_scale_on_structured_deltas() {
        let shape = [256, 384];
        let (b, t) = tensor(256, 384, 3, |i, j| {
            2e-4 * (1.0 + (i % 16) as f32) * (1.0 + (j % 5) as f32)
        });
        let v = view(&shape, &b, &t);
        let (tensor_err, _, _) = measure(&v, "sign:zeros=sign", None);
        let (axis_err, _, codec) = measure(&v, "sign-axis:zeros=sign", None);
        assert!(matches!(codec, Some(TensorCodec::SignAxis { .. })));
        assert!(axis_err < 0.9 * tensor_err, "axis {axis_err} vs tensor {tensor_err}");
        // And never worse on an unstructured delta.
        let (b, t) = tensor(256, 384, 4, |_, _| 1e-3);
        let v = view(&shape, &b, &t);
        let (tensor_err, _, _) = measure(&v, "sign:zeros=sign", None);
        let (axis_err, _, _) = measure(&v, "sign-axis:zeros=sign", None);
        assert!(axis_err <= tensor_err * 1.001, "axis {axis_err} vs tensor {tensor_err}");
    }

    #[test]
    fn calibration_weights_the_fit_towards_busy_inputs() {
        let shape = [128, 64];
        let (b, t) = tensor(128, 64, 5, |i, j| 1e-4 * (1.0 + (i * j % 13) as f32));
        let v = view(&shape, &b, &t);
        // Columns 0..8 carry large activations: their error should shrink with the weighting.
        let weights: Vec<f32> = (0..64).map(|j| if j < 8 { 100.0 } else { 1.0 }).collect();
        let col_err = |p: &TensorPlan| {
            let cp = p.chunk_params(0).unwrap();
            let mut r = vec![0u8; t.len()];
            lossy::encode(Dtype::BF16, &cp, &b, &t, &mut r);
            let v = |x: &[u8], k: usize| half::bf16::from_le_bytes([x[2 * k], x[2 * k + 1]]).to_f64();
            (0..128 * 64)
                .filter(|k| k % 64 < 8)
                .map(|k| (v(&r, k) - v(&t, k)).powi(2))
                .sum::<f64>()
        };
        let mut pol = policy("sign-axis:zeros=sign", None);
        let plain = plan(&pol, &v, "w").unwrap();
        pol.calibration = Some(Calibration::from_vectors([("w".to_string(), weights)]));
        let weighted = plan(&pol, &v, "w").unwrap();
        assert!(matches!(
            weighted.codec,
            Some(TensorCodec::SignAxis { calibrated: true, .. })
        ));
        assert!(
            col_err(&weighted) < col_err(&plain),
            "{} vs {}",
            col_err(&weighted),
            col_err(&plain)
        );
    }

    #[test]
    fn specs_and_rules_parse() {
        assert_eq!(
            "quant:bits=3,group=64".parse::<CodecSpec>().unwrap(),
            CodecSpec::Quant {
                bits: Some(3),
                step: None,
                group: 64,
                outliers: 0.001,
                domain: Domain::Ulp
            }
        );
        assert!("quant:bits=9".parse::<CodecSpec>().is_err());
        assert!("sparse:keep=0".parse::<CodecSpec>().is_err());
        assert!("nope".parse::<CodecSpec>().is_err());
        let r: TensorRule = "*.attention.*=sign-axis:zeros=keep".parse().unwrap();
        assert_eq!(r.pattern, "*.attention.*");
        assert!(r.matcher.is_match("encoder.layer.0.attention.self.query.weight"));
        assert_eq!(r.spec, CodecSpec::SignAxis { zeros: Some(true) });
        let p = CodecPolicy {
            rules: vec![r, "*embeddings*=exact".parse().unwrap()],
            default: CodecSpec::Sign { zeros: None },
            ..Default::default()
        };
        assert_eq!(
            p.spec_for("x.attention.y", 2),
            &CodecSpec::SignAxis { zeros: Some(true) }
        );
        assert_eq!(p.spec_for("word_embeddings", 2), &CodecSpec::Exact);
        assert_eq!(
            p.spec_for("x.LayerNorm.weight", 1),
            &CodecSpec::Exact,
            "1-D stays exact"
        );
        assert_eq!(p.spec_for("x.dense.weight", 2), &CodecSpec::Sign { zeros: None });
    }

    #[test]
    fn unchanged_tensors_stay_exact_without_statistics() {
        let (b, t) = tensor(8, 16, 4, |_, _| 1e-3);
        let shape = [8, 16];
        for spec in ["quant:bits=4", "dare:keep=0.5"] {
            let codec_for = |t: &[u8]| plan(&policy(spec, None), &view(&shape, &b, t), "w").unwrap().codec;
            assert!(codec_for(&t).is_some(), "{spec}");
            assert!(codec_for(&b).is_none(), "{spec}: no change");
            // -0.0 against +0.0 and a NaN: no finite change with a square.
            let mut same = b.clone();
            same[..2].copy_from_slice(&half::bf16::NEG_ZERO.to_le_bytes());
            same[2..4].copy_from_slice(&half::bf16::NAN.to_le_bytes());
            let mut base0 = b.clone();
            base0[..2].copy_from_slice(&half::bf16::ZERO.to_le_bytes());
            let v = view(&shape, &base0, &same);
            assert!(
                plan(&policy(spec, None), &v, "w").unwrap().codec.is_none(),
                "{spec}: signed zero"
            );
        }
    }

    #[test]
    fn vector_and_baseline_builds_measure_alike() {
        let (b, t) = tensor(48, 67, 3, |_, _| 1e-3);
        // The quality sums' builds are compared in the codec crate (`plan`).
        let (x, y) = (
            block_stats_wide::<Bf16>(&b, &t, true),
            block_stats::<Bf16>(&b, &t, true),
        );
        assert_eq!(
            (x.delta_sq, x.abs_sum, x.finite, x.zeros, x.hist),
            (y.delta_sq, y.abs_sum, y.finite, y.zeros, y.hist)
        );
        let shape = [48, 67];
        let v = view(&shape, &b, &t);
        let (a, c) = (
            vec![1.0; 67],
            (0..67).map(|j| 1.0 + j as f64 / 67.0).collect::<Vec<_>>(),
        );
        for zeros in [false, true] {
            assert_eq!(
                axis_columns_wide::<Bf16>(&v, 3..40, &a, zeros, &c),
                axis_columns::<Bf16>(&v, 3..40, &a, zeros, &c)
            );
            assert_eq!(
                axis_rows_wide::<Bf16>(&v, 3..40, &a, zeros, &c),
                axis_rows::<Bf16>(&v, 3..40, &a, zeros, &c)
            );
        }
    }

    #[test]
    fn choices_do_not_depend_on_thread_count() {
        let shape = [256, 512];
        let (b, t) = tensor(256, 512, 6, |i, _| 1e-3 * (1.0 + (i % 3) as f32));
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let v = view(&shape, &b, &t);
                let p = plan(&policy("auto", Some(0.1)), &v, "w").unwrap();
                let q = plan(&policy("sign-axis", None), &v, "w").unwrap();
                (p.codec, q.params())
            })
        };
        assert_eq!(run(1), run(3));
    }
}
