//! The lossy codecs: one chunk of a float tensor coded within an error, against the base.
//!
//! Every codec reconstructs `base + D'` in f64 and rounds it to the tensor's dtype, where
//! `D'` approximates the delta `D = fine-tune - base`:
//! - `quant`: `D' = code * step`, one step per tensor (`step`) or per group of elements
//!   (`bits`: the group's largest change over `2^(bits-1) - 1`), codes entropy-coded under
//!   the base value's exponent; with `bits`, the largest changes (`outliers`) are kept exactly.
//!   In the `ulp` domain the step of each element is rounded to a whole number of the base
//!   value's units in the last place, so `base + D'` lands on the dtype's grid instead of
//!   being rounded to it (see `docs/CODECS.md` for the measurement that made it the default).
//! - `sparse`: the changes with `|D| >= threshold` are kept (exactly, or quantized with
//!   `step`), positions gap-coded; all others are dropped.
//! - `dare`: a pseudo-random fraction `keep` of the changes, chosen by a hash of the seed
//!   and the element index (no positions stored), kept exactly and rescaled by `1 / keep`.
//! - `sign` / `sign-axis`: `D' = sign(D) * scale`, one scale per tensor or `row[i] * col[j]`.
//!
//! Elements whose base or fine-tune value is not finite are always kept exactly.
//!
//! Chunk payload: `exceptions, body`. Exceptions: `count: varint`, then (if any) a gap
//! stream and a stream of exact differences (see [`super::ints`]). Bodies by codec:
//! - quant: (`bits` only) one bf16 step per group; `ctx_lo: u16, ctx_hi: u16`; the codes of
//!   all elements, zigzagged, under context `clamp(exponent(base), lo, hi) - lo`;
//! - sparse: `count: varint`, a gap stream, then exact differences or zigzagged codes;
//! - dare: the exact differences of the kept elements;
//! - sign, sign-axis: one stream of signs (1 = negative).

use serde::{Deserialize, Serialize};

use super::exact::{from_ordered, mask, to_ordered, DecodeError};
use super::float::{simd_dispatch, with_elem, Elem};
use super::ints::{self, unzigzag, zigzag};
use super::rans;

/// A tensor's codec and settings, as recorded in the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TensorCodec {
    /// Quantized deltas.
    Quant {
        /// One step for the whole tensor (absolute, in the weights' units).
        step: Option<f32>,
        /// Bits per code, with a step per group of `group` elements.
        bits: Option<u8>,
        /// Elements per group (a power of two) when `bits` is set.
        group: u32,
        /// Fraction of each chunk's largest changes kept exactly when `bits` is set.
        outliers: f32,
        /// Where the quantization grid lies.
        domain: Domain,
    },
    /// Only the largest changes, positions gap-coded.
    Sparse {
        /// Changes with `|D| >= threshold` are kept.
        threshold: f32,
        /// Quantize kept changes with this step (ULP-snapped) instead of keeping them exactly.
        step: Option<f32>,
    },
    /// Random drop and rescale (DARE): the mask comes from the seed.
    Dare {
        /// Probability that a change is kept.
        keep: f32,
        /// The tensor's mask seed.
        seed: u64,
    },
    /// One bit per change and one scale for the tensor (BitDelta).
    Sign {
        /// The magnitude of every reconstructed change.
        scale: f32,
        /// Unchanged values stay unchanged (a third symbol, coded under the base exponent).
        #[serde(default)]
        zeros: bool,
    },
    /// One bit per change, scaled by `row[i] * col[j]` (vectors in the tensor's parameter blob).
    SignAxis {
        /// Rows (first dimension).
        rows: u64,
        /// Columns (product of the other dimensions).
        cols: u64,
        /// True when the scales were fitted to data: a fit weighted by activation statistics,
        /// or scales learned by calibration (informational).
        calibrated: bool,
        /// Unchanged values stay unchanged (a third symbol, coded under the base exponent).
        #[serde(default)]
        zeros: bool,
    },
}

/// Where quantization steps lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    /// The step as given: `base + code * step` is then rounded to the dtype.
    Value,
    /// The step rounded to a whole number (at least one) of the base value's ULPs.
    Ulp,
}

impl TensorCodec {
    /// Short name (`quant`, `sparse`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            TensorCodec::Quant { .. } => "quant",
            TensorCodec::Sparse { .. } => "sparse",
            TensorCodec::Dare { .. } => "dare",
            TensorCodec::Sign { .. } => "sign",
            TensorCodec::SignAxis { .. } => "sign-axis",
        }
    }

    /// The settings, as `key=value` pairs for reports.
    pub fn setting(&self) -> String {
        match self {
            TensorCodec::Quant {
                step: Some(s), domain, ..
            } => format!("step={s:.3e},domain={}", domain_name(*domain)),
            TensorCodec::Quant {
                bits,
                group,
                outliers,
                domain,
                ..
            } => format!(
                "bits={},group={group},outliers={outliers},domain={}",
                bits.unwrap_or(0),
                domain_name(*domain)
            ),
            TensorCodec::Sparse { threshold, step } => match step {
                Some(s) => format!("threshold={threshold:.3e},step={s:.3e}"),
                None => format!("threshold={threshold:.3e}"),
            },
            TensorCodec::Dare { keep, seed } => format!("keep={keep},seed={seed}"),
            TensorCodec::Sign { scale, zeros } => format!("scale={scale:.3e},zeros={zeros}"),
            TensorCodec::SignAxis { calibrated, zeros, .. } => format!("calibrated={calibrated},zeros={zeros}"),
        }
    }

    /// Checks the settings of an index entry for a tensor of `numel` elements; returns the
    /// required byte length of its parameter blob (0: none).
    pub fn validate(&self, numel: u64) -> Result<u64, String> {
        let pos = |x: f32| x.is_finite() && x > 0.0;
        match *self {
            TensorCodec::Quant {
                step,
                bits,
                group,
                outliers,
                ..
            } => {
                match (step, bits) {
                    (Some(s), None) if pos(s) => {}
                    (None, Some(2..=8)) if group.is_power_of_two() && (16..=1 << 16).contains(&group) => {}
                    _ => return Err("quant needs a positive step, or 2..8 bits and a power-of-two group".into()),
                }
                if !(0.0..=0.5).contains(&outliers) {
                    return Err("quant outlier fraction outside 0..0.5".into());
                }
                Ok(0)
            }
            TensorCodec::Sparse { threshold, step } => {
                if !(threshold.is_finite() && threshold >= 0.0) || step.is_some_and(|s| !pos(s)) {
                    return Err("sparse needs a finite threshold and a positive step".into());
                }
                Ok(0)
            }
            TensorCodec::Dare { keep, .. } if keep > 0.0 && keep <= 1.0 => Ok(0),
            TensorCodec::Dare { .. } => Err("dare keep fraction outside (0, 1]".into()),
            TensorCodec::Sign { scale, .. } if scale.is_finite() && scale >= 0.0 => Ok(0),
            TensorCodec::Sign { .. } => Err("sign scale is not a finite non-negative number".into()),
            TensorCodec::SignAxis { rows, cols, .. } => {
                if rows.checked_mul(cols) != Some(numel) || numel == 0 {
                    return Err("sign-axis rows x cols differs from the element count".into());
                }
                rows.checked_add(cols)
                    .and_then(|n| n.checked_mul(4))
                    .ok_or_else(|| "sign-axis vectors overflow".into())
            }
        }
    }
}

fn domain_name(d: Domain) -> &'static str {
    match d {
        Domain::Value => "value",
        Domain::Ulp => "ulp",
    }
}

/// Per-row and per-column scales of `sign-axis`, for the rows a chunk touches.
#[derive(Debug, Clone, Copy)]
pub struct AxisScales<'a> {
    /// Scales of rows `first_row..`, as many as the chunk touches.
    pub rows: &'a [f32],
    /// Index of `rows[0]`.
    pub first_row: u64,
    /// All column scales.
    pub cols: &'a [f32],
}

/// What a chunk coder needs besides the bytes.
#[derive(Debug, Clone, Copy)]
pub struct ChunkParams<'a> {
    /// The tensor's codec.
    pub codec: &'a TensorCodec,
    /// Index of the chunk's first element within the tensor.
    pub first: u64,
    /// Scales of `sign-axis`.
    pub axis: Option<AxisScales<'a>>,
}

/// Encodes one chunk (`base` and `target` of the same float dtype and length); returns the
/// payload and writes to `recon` exactly what [`decode`] will rebuild from it.
pub fn encode(dtype: safetensors::Dtype, p: &ChunkParams, base: &[u8], target: &[u8], recon: &mut [u8]) -> Vec<u8> {
    assert_eq!(base.len(), target.len(), "base and target lengths differ");
    assert_eq!(base.len(), recon.len(), "base and output lengths differ");
    with_elem!(dtype, encode_wide(p, base, target, recon))
}

/// Decodes a payload made by [`encode`] into `out`, given the same base bytes and params.
///
/// The payload is untrusted: any inconsistency is an error, never a panic.
pub fn decode(
    dtype: safetensors::Dtype,
    p: &ChunkParams,
    base: &[u8],
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), DecodeError> {
    assert_eq!(base.len(), out.len(), "base and output lengths differ");
    with_elem!(dtype, decode_impl(p, base, payload, out))
}

/// The exact difference of two elements as the exact codec defines it (ordered, zigzagged).
#[inline(always)]
fn exact_diff<E: Elem>(b: &[u8], t: &[u8]) -> u64 {
    let bits = 8 * E::WIDTH as u32;
    let d = to_ordered(E::bits(t), bits, true).wrapping_sub(to_ordered(E::bits(b), bits, true));
    super::exact::zigzag(d & mask(bits), bits)
}

#[inline(always)]
fn apply_exact<E: Elem>(b: &[u8], z: u64, out: &mut [u8]) {
    let bits = 8 * E::WIDTH as u32;
    let o = to_ordered(E::bits(b), bits, true).wrapping_add(super::exact::unzigzag(z & mask(bits), bits)) & mask(bits);
    out.copy_from_slice(&from_ordered(o, bits, true).to_le_bytes()[..E::WIDTH]);
}

/// Largest code magnitude a quantizer emits; beyond it the element is kept exactly.
const MAX_CODE: f64 = (1u64 << 40) as f64;

/// Codes a sorted set of positions and one value per position.
fn put_set(positions: &[u32], values: &[u64], out: &mut Vec<u8>) {
    rans::put_varint(out, positions.len() as u64);
    if positions.is_empty() {
        return;
    }
    let mut prev: Option<u32> = None;
    let gaps: Vec<u64> = positions
        .iter()
        .map(|&p| {
            let g = prev.map_or(p, |q| p - q - 1) as u64;
            prev = Some(p);
            g
        })
        .collect();
    ints::encode(&gaps, &[], 1, out);
    ints::encode(values, &[], 1, out);
}

/// Reads a set written by [`put_set`] for a chunk of `n` elements.
fn get_set(input: &mut &[u8], n: usize, max_bits: u32) -> Result<(Vec<u32>, Vec<u64>), DecodeError> {
    let count = rans::get_varint(input).ok_or(DecodeError("bad set size"))?;
    if count > n as u64 {
        return Err(DecodeError("more kept elements than the chunk has"));
    }
    if count == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let positions = ints::decode_positions(input, count as usize, n)?;
    let mut values = vec![0u64; count as usize];
    ints::decode(input, 1, max_bits, &[], &mut values)?;
    Ok((positions, values))
}

/// Exponent contexts of a quantized chunk: the top 16 exponents present in the base.
#[inline(always)]
fn context_range<E: Elem>(base: &[u8]) -> (u16, u16) {
    let mut seen = [false; 2048];
    for b in base.chunks_exact(E::WIDTH) {
        seen[E::exponent(b) as usize & 2047] = true;
    }
    let hi = seen.iter().rposition(|&s| s).unwrap_or(0);
    let lo = seen.iter().position(|&s| s).unwrap_or(0).max(hi.saturating_sub(15));
    (lo as u16, hi as u16)
}

/// Exponent context of each element of a chunk under the range `lo..=hi`.
///
/// A plain loop, not a `map` and `collect`: those run the closure from a function of their
/// own, which the encoder's vector build would not reach.
#[inline(always)]
fn contexts<E: Elem>(base: &[u8], (lo, hi): (u16, u16)) -> Vec<u8> {
    let mut out = vec![0u8; base.len() / E::WIDTH];
    for (o, b) in out.iter_mut().zip(base.chunks_exact(E::WIDTH)) {
        *o = (E::exponent(b).clamp(lo as u32, hi as u32) - lo as u32) as u8;
    }
    out
}

fn read_context_range<E: Elem>(input: &mut &[u8]) -> Result<(u16, u16), DecodeError> {
    let lo = super::exact::read_u16(input)?;
    let hi = super::exact::read_u16(input)?;
    if lo > hi || hi - lo >= 16 || hi as u32 >= 1 << E::EXP {
        return Err(DecodeError("context range out of bounds"));
    }
    Ok((lo, hi))
}

/// Keep-mask of DARE: element `i` of a tensor is kept when a hash of `(seed, i)` falls below `keep`.
pub fn dare_kept(seed: u64, index: u64, keep: f32) -> bool {
    dare_draw(seed, index) < dare_cut(keep)
}

/// The 53-bit draw of element `index`: SplitMix64's finaliser, a stateless, well-mixed
/// hash, so any element's fate is computable alone and identical on every machine.
#[inline(always)]
fn dare_draw(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z >> 11
}

/// The draws below which DARE keeps an element. The rule is `draw as f64 < keep * 2^53`;
/// both sides are exact (the draw has 53 bits, `keep` is an f32 times a power of two), so
/// for an integer draw it is `draw < ceil(keep * 2^53)`: an integer compare.
fn dare_cut(keep: f32) -> u64 {
    (keep as f64 * (1u64 << 53) as f64).ceil() as u64
}

/// The positions of a chunk of `n` elements starting at tensor element `first` that the
/// mask keeps, less the (sorted) exceptions, in order. Encoder and decoder both call it
/// once per chunk, and rebuilding uses the positions instead of drawing again.
fn dare_positions(seed: u64, keep: f32, first: u64, n: usize, exceptions: &[u32]) -> Vec<u32> {
    let cut = dare_cut(keep);
    let mut kept = Vec::with_capacity((n as f64 * keep as f64) as usize + n / 64 + 16);
    let mut exc = exceptions.iter().copied().peekable();
    for i in 0..n as u32 {
        if dare_draw(seed, first + i as u64) < cut {
            while exc.next_if(|&e| e < i).is_some() {}
            if exc.peek() != Some(&i) {
                kept.push(i);
            }
        }
    }
    kept
}

/// `2^52`: from it up, every f64 is an integer.
const TWO52: f64 = (1u64 << 52) as f64;
/// `2^63`, where a conversion to i64 saturates.
const TWO63: f64 = (1u64 << 63) as f64;

/// Rounds half away from zero: `trunc(|x| + 0.5)` with the sign of `x`, saturating at
/// `2^63` (what a conversion to i64 and back gives); NaN gives 0.
///
/// `f64::round` and `trunc` are libm calls on x86-64 without SSE4.1, and a conversion to
/// i64 has no vector form before AVX-512; this uses adds, compares and selects only, so
/// that loops over many values vectorise, with the same result as `as i64 as f64`.
#[inline(always)]
fn round(x: f64) -> f64 {
    let v = x.abs() + 0.5;
    let m = if v < TWO63 {
        floor_large(v)
    } else if v >= TWO63 {
        TWO63
    } else {
        0.0
    };
    m.copysign(x)
}

/// `floor(v)` for `v >= 0` (NaN stays NaN): from 2^52 up `v` is its own floor; below it,
/// adding 2^52 rounds `v` to a neighbouring integer, one too many when it rounded up.
#[inline(always)]
fn floor_large(v: f64) -> f64 {
    let r = (v + TWO52) - TWO52;
    let floor = if r > v { r - 1.0 } else { r };
    if v < TWO52 {
        floor
    } else {
        v
    }
}

/// The step an element gets in `domain`: `step`, or `step` in whole ULPs of the base value.
#[inline(always)]
fn element_step(domain: Domain, step: f64, ulp: Ulp) -> f64 {
    match domain {
        Domain::Value => step,
        Domain::Ulp => round(ulp.over(step)).max(1.0) * ulp.0,
    }
}

/// The spacing of values at one exponent, and its inverse when that is finite.
#[derive(Clone, Copy)]
struct Ulp(f64, f64);

impl Ulp {
    /// `x / ulp`. The spacing is a power of two, so multiplying by its inverse gives the
    /// very same number, without a division per element (only f64 subnormal spacings,
    /// whose inverse overflows, divide).
    #[inline(always)]
    fn over(self, x: f64) -> f64 {
        if self.1.is_finite() {
            x * self.1
        } else {
            x / self.0
        }
    }
}

/// The change a sign symbol stands for: 0 = `+m`, 1 = `-m`, anything else unchanged
/// (adding -0.0 leaves every value as it is, -0.0 included). Selects, not a lookup, so
/// that loops over many symbols vectorise.
#[inline(always)]
fn signed(m: f64, s: u8) -> f64 {
    let d = if s == 1 { -m } else { m };
    if s >= 2 {
        -0.0
    } else {
        d
    }
}

/// A sign codec's magnitude. When unchanged values are coded apart (`zeros`), a coded sign
/// says the value moved: the magnitude becomes a whole number of the base value's ULPs, at
/// least one, so that magnitudes under half a ULP (common in bf16) do not round back to the
/// base value. Otherwise it is used as is.
#[inline(always)]
fn snap<E: Elem>(zeros: bool, m: f64, b: &[u8], ulps: &[Ulp]) -> f64 {
    if m == 0.0 || !zeros {
        return m;
    }
    element_step(Domain::Ulp, m, ulps[E::exponent(b) as usize])
}

fn ulp_table<E: Elem>() -> Vec<Ulp> {
    (0..1u32 << E::EXP).map(|e| Ulp(E::ulp(e), 1.0 / E::ulp(e))).collect()
}

/// A chunk between its streams and its reconstruction: the encoder computes it from the
/// data, the decoder reads it from the payload, and both rebuild from it with the same code.
struct Symbols {
    /// Elements rebuilt exactly, and their exact differences.
    exceptions: Vec<u32>,
    exc_values: Vec<u64>,
    body: Body,
}

enum Body {
    /// Per-group steps (`bits` mode: bf16 bits; empty with one `step`), context range, zigzagged codes.
    Quant {
        group_steps: Vec<u16>,
        range: (u16, u16),
        codes: Vec<u64>,
    },
    /// Kept positions, with exact differences or zigzagged codes.
    Sparse { kept: Vec<u32>, values: Vec<u64> },
    /// The positions the mask keeps (not stored: they follow from the seed), and their
    /// exact differences.
    Dare { kept: Vec<u32>, values: Vec<u64> },
    /// 0 = +, 1 = -, 2 = unchanged; with unchanged values coded apart, the context range.
    Sign { range: Option<(u16, u16)>, signs: Vec<u8> },
}

simd_dispatch!(fn encode_wide => encode_impl(p: &ChunkParams, base: &[u8], target: &[u8], recon: &mut [u8]) -> Vec<u8>);

#[inline(always)]
fn encode_impl<E: Elem>(p: &ChunkParams, base: &[u8], target: &[u8], recon: &mut [u8]) -> Vec<u8> {
    let sym = match *p.codec {
        // The quantizer rebuilds as it codes, from the values it has at hand.
        TensorCodec::Quant {
            step,
            bits,
            group,
            outliers,
            domain,
        } => quantize::<E>(step, bits, group, outliers, domain, base, target, recon),
        _ => {
            let sym = analyse::<E>(p, base, target);
            rebuild::<E>(p, base, &sym, recon).expect("symbols computed from the data rebuild");
            sym
        }
    };
    let mut out = Vec::new();
    write_symbols::<E>(&sym, base, &mut out);
    out
}

fn decode_impl<E: Elem>(p: &ChunkParams, base: &[u8], payload: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let mut input = payload;
    let sym = read_symbols::<E>(p, base, &mut input)?;
    if !input.is_empty() {
        return Err(DecodeError("payload longer than its content"));
    }
    rebuild::<E>(p, base, &sym, out)
}

/// Computes a chunk's symbols from the data.
#[inline(always)]
fn analyse<E: Elem>(p: &ChunkParams, base: &[u8], target: &[u8]) -> Symbols {
    let w = E::WIDTH;
    let n = base.len() / w;
    let el = |i: usize| (&base[i * w..(i + 1) * w], &target[i * w..(i + 1) * w]);
    let delta = |i: usize| {
        let (b, t) = el(i);
        E::load(t) - E::load(b)
    };
    let exceptions = positions_where::<E>(base, target, |b, t| !finite_pair::<E>(b, t));
    let body = match *p.codec {
        TensorCodec::Quant { .. } => unreachable!("quant chunks are coded by `quantize`"),
        TensorCodec::Sparse { threshold, step } => {
            let kept = positions_where::<E>(base, target, |b, t| {
                finite_pair::<E>(b, t) && ((E::load(t) - E::load(b)).abs() as f32) >= threshold
            });
            let ulps = ulp_table::<E>();
            let values = kept
                .iter()
                .map(|&i| {
                    let (b, t) = el(i as usize);
                    match step {
                        None => exact_diff::<E>(b, t),
                        Some(s) => {
                            let s = element_step(Domain::Ulp, s as f64, ulps[E::exponent(b) as usize]);
                            zigzag(round(delta(i as usize) / s).clamp(-MAX_CODE, MAX_CODE) as i64)
                        }
                    }
                })
                .collect();
            Body::Sparse { kept, values }
        }
        TensorCodec::Dare { keep, seed } => {
            let kept = dare_positions(seed, keep, p.first, n, &exceptions);
            let values = kept
                .iter()
                .map(|&i| {
                    let (b, t) = el(i as usize);
                    exact_diff::<E>(b, t)
                })
                .collect();
            Body::Dare { kept, values }
        }
        TensorCodec::Sign { zeros, .. } | TensorCodec::SignAxis { zeros, .. } => {
            // A plain loop into a buffer (not a collect through chunk iterators) vectorises.
            let mut signs = vec![0u8; n];
            for (s, (b, t)) in signs.iter_mut().zip(base.chunks_exact(w).zip(target.chunks_exact(w))) {
                let d = E::load(t) - E::load(b);
                let neg = (d < 0.0) as u8;
                *s = if zeros && d == 0.0 { 2 } else { neg };
            }
            Body::Sign {
                range: zeros.then(|| context_range::<E>(base)),
                signs,
            }
        }
    };
    Symbols {
        exc_values: exact_diffs::<E>(&exceptions, base, target),
        exceptions,
        body,
    }
}

/// The exact differences of the elements at `positions`.
fn exact_diffs<E: Elem>(positions: &[u32], base: &[u8], target: &[u8]) -> Vec<u64> {
    let w = E::WIDTH;
    positions
        .iter()
        .map(|&i| {
            let r = i as usize * w..(i as usize + 1) * w;
            exact_diff::<E>(&base[r.clone()], &target[r])
        })
        .collect()
}

/// Elements per block of the quantizer's passes.
const QBLOCK: usize = 256;

/// What the quantizer's first pass finds in a chunk.
struct Scan {
    /// Elements whose base or fine-tune value is not finite, in order.
    non_finite: Vec<u32>,
    /// The finite changes of at least a threshold, as `(!|D|.to_bits(), index)`: sorted,
    /// larger changes come first, and lower indices first among equal ones.
    candidates: Vec<(u64, u32)>,
    /// Number of finite changes.
    finite: usize,
}

/// The quantizer's first pass over a chunk: non-finite elements, outlier candidates
/// (finite changes `>= threshold`) and the count of finite changes. Flags are computed per
/// block in plain loops, which vectorise; the few flagged blocks are then walked.
#[inline(always)]
fn scan<E: Elem>(base: &[u8], target: &[u8], threshold: f64) -> Scan {
    let w = E::WIDTH;
    let mut s = Scan {
        non_finite: Vec::new(),
        candidates: Vec::new(),
        finite: 0,
    };
    let (mut b, mut t, mut a) = ([0f64; QBLOCK], [0f64; QBLOCK], [0f64; QBLOCK]);
    let (mut bad, mut big) = ([false; QBLOCK], [false; QBLOCK]);
    for (k, (bb, tb)) in base.chunks(QBLOCK * w).zip(target.chunks(QBLOCK * w)).enumerate() {
        let len = bb.len() / w;
        E::load_block(bb, &mut b[..len]);
        E::load_block(tb, &mut t[..len]);
        let mut finite = 0;
        let flags = bad.iter_mut().zip(big.iter_mut()).zip(a.iter_mut());
        for (((bad, big), a), (&b, &t)) in flags.zip(b[..len].iter().zip(&t[..len])) {
            let d = (t - b).abs();
            *bad = !(b.is_finite() & t.is_finite());
            *big = d.is_finite() & (d >= threshold);
            finite += d.is_finite() as usize;
            *a = d;
        }
        s.finite += finite;
        let first = k * QBLOCK;
        if bad[..len].iter().fold(false, |x, &f| x | f) {
            let found = bad[..len].iter().enumerate().filter(|&(_, &f)| f);
            s.non_finite.extend(found.map(|(j, _)| (first + j) as u32));
        }
        if big[..len].iter().fold(false, |x, &f| x | f) {
            let found = big[..len].iter().zip(&a).enumerate().filter(|&(_, (&f, _))| f);
            s.candidates
                .extend(found.map(|(j, (_, &d))| (!d.to_bits(), (first + j) as u32)));
        }
    }
    s
}

/// A change magnitude that about `5/4 m + 256` of a chunk's changes reach, when `m` of
/// them are wanted (0 if unsure): a rank in every 32nd change. Any threshold at or below
/// the `m`-th largest change selects the same top `m`, so it only sets how many
/// candidates the full pass collects.
#[inline(always)]
fn outlier_threshold<E: Elem>(base: &[u8], target: &[u8], m: usize) -> f64 {
    const STRIDE: usize = 32;
    let w = E::WIDTH;
    let mut sample: Vec<f64> = (0..base.len() / w)
        .step_by(STRIDE)
        .map(|i| (E::load(&target[i * w..(i + 1) * w]) - E::load(&base[i * w..(i + 1) * w])).abs())
        .filter(|d| d.is_finite())
        .collect();
    let rank = m.div_ceil(STRIDE) * 5 / 4 + 8;
    if sample.len() <= rank {
        return 0.0;
    }
    *sample.select_nth_unstable_by(rank, |a, b| b.total_cmp(a)).1
}

/// Marks with 1 in `mask[..len]` the exceptions (sorted) among elements `start..start + len`,
/// from `exceptions[*next..]` on; leaves `*next` at the first one past them.
#[inline(always)]
fn mark(exceptions: &[u32], next: &mut usize, start: usize, mask: &mut [u64]) {
    mask.fill(0);
    while let Some(&e) = exceptions.get(*next).filter(|&&e| (e as usize) < start + mask.len()) {
        mask[e as usize - start] = 1;
        *next += 1;
    }
}

/// Codes a chunk with `quant` and writes its reconstruction to `recon`: the same symbols
/// and bits as computing each element's step, code and rebuilt value apart, in two passes.
/// The first finds the non-finite elements and the outliers; the second goes group by
/// group over values loaded once into a block: the group's largest change, its step, and
/// per element the step, code and rebuilt value, in loops without branches that vectorise.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quantize<E: Elem>(
    step: Option<f32>,
    bits: Option<u8>,
    group: u32,
    outliers: f32,
    domain: Domain,
    base: &[u8],
    target: &[u8],
    recon: &mut [u8],
) -> Symbols {
    let w = E::WIDTH;
    let n = base.len() / w;
    // Outliers (with `bits`): the `outliers` fraction of the largest finite changes.
    let want = |finite: usize| (outliers as f64 * finite as f64) as usize;
    let m_most = if bits.is_some() && outliers > 0.0 { want(n) } else { 0 };
    let threshold = if m_most > 0 {
        outlier_threshold::<E>(base, target, m_most)
    } else {
        f64::INFINITY
    };
    let mut found = scan::<E>(base, target, threshold);
    let m = if m_most > 0 { want(found.finite) } else { 0 };
    let mut exceptions = found.non_finite;
    if m > 0 {
        if found.candidates.len() < m {
            // The sample misjudged the chunk: every finite change is a candidate.
            found = scan::<E>(base, target, 0.0);
        }
        let keyed = &mut found.candidates;
        keyed.select_nth_unstable(m - 1);
        let mut top: Vec<u32> = keyed[..m].iter().map(|&(_, i)| i).collect();
        top.sort_unstable();
        exceptions = merge(&exceptions, &top);
    }

    let (group, levels) = match (step, bits) {
        (Some(_), _) => (n.max(1), 0.0),
        (None, b) => {
            let b = b.expect("validated: quant has a step or bits");
            (group as usize, ((1u32 << (b - 1)) - 1) as f64)
        }
    };
    let ulp_domain = domain == Domain::Ulp;
    let mut group_steps = Vec::new();
    // Filled block by block, in order: no zeroing of a chunk-sized buffer first.
    let mut codes = Vec::with_capacity(n);
    let mut block_codes = [0u64; QBLOCK];
    let mut new_exceptions = Vec::new();
    let (mut b, mut t) = ([0f64; QBLOCK], [0f64; QBLOCK]);
    // Flags as 0 or 1 in 64 bits, the width of the values they select: no conversions.
    let (mut exc, mut big) = ([0u64; QBLOCK], [0u64; QBLOCK]);
    // The block in `b`, `t` and `exc`: a group of at most a block is loaded once.
    let mut loaded = usize::MAX;
    let (mut next, mut next_max) = (0, 0);
    for g0 in (0..n).step_by(group) {
        let g1 = (g0 + group).min(n);
        let gstep = match step {
            Some(s) => s as f64,
            None => {
                // The largest change of the group's other elements, in four lanes: the
                // maximum does not depend on the order.
                let mut lanes = [0f64; 4];
                for s0 in (g0..g1).step_by(QBLOCK) {
                    let len = QBLOCK.min(g1 - s0);
                    E::load_block(&base[s0 * w..(s0 + len) * w], &mut b[..len]);
                    E::load_block(&target[s0 * w..(s0 + len) * w], &mut t[..len]);
                    mark(&exceptions, &mut next_max, s0, &mut exc[..len]);
                    loaded = s0;
                    // Arrays of four (the last padded with no change) vectorise.
                    let len4 = len.div_ceil(4) * 4;
                    b[len..len4].fill(0.0);
                    t[len..len4].fill(0.0);
                    let quads = b[..len4].as_chunks::<4>().0.iter().zip(t[..len4].as_chunks::<4>().0);
                    for ((b4, t4), e4) in quads.zip(exc[..len4].as_chunks::<4>().0) {
                        for k in 0..4 {
                            let a = (t4[k] - b4[k]).abs();
                            lanes[k] = if (e4[k] == 0) & (a > lanes[k]) { a } else { lanes[k] };
                        }
                    }
                }
                let gmax = lanes.iter().fold(0f64, |m, &a| if a > m { a } else { m });
                let s = half::bf16::from_f64(gmax / levels);
                group_steps.push(s.to_bits());
                s.to_f64()
            }
        };
        for s0 in (g0..g1).step_by(QBLOCK) {
            let len = QBLOCK.min(g1 - s0);
            if loaded != s0 || g1 - g0 > QBLOCK {
                E::load_block(&base[s0 * w..(s0 + len) * w], &mut b[..len]);
                E::load_block(&target[s0 * w..(s0 + len) * w], &mut t[..len]);
                mark(&exceptions, &mut next, s0, &mut exc[..len]);
            } else {
                next = next_max;
            }
            let values = b[..len].iter().zip(&t[..len]).zip(&exc[..len]).zip(&mut big[..len]);
            let out = block_codes[..len]
                .iter_mut()
                .zip(recon[s0 * w..(s0 + len) * w].chunks_exact_mut(w));
            for ((((&b, &t), &exc), big), (code, o)) in values.zip(out) {
                // `element_step` and `Ulp::over`, with the spacing computed, not looked up.
                let (ulp, inv) = E::spacing(b);
                let x = if E::EXP < 11 || inv.is_finite() {
                    gstep * inv
                } else {
                    gstep / ulp
                };
                // `round(x).max(1.0)` for `x >= 0` (as it is for all but the non-finite).
                let v = x + 0.5;
                let k = if v < TWO63 { floor_large(v) } else { TWO63 };
                let k = if k > 1.0 { k } else { 1.0 };
                let s = if ulp_domain { k * ulp } else { gstep };
                let q = (t - b) / s;
                // `round(q).abs()`, except NaN and from 2^63 up, which `MAX_CODE` excludes.
                let c = floor_large(q.abs() + 0.5);
                // Elements kept exactly get code 0: the non-finite ones, the outliers, and
                // (found here) those whose code is out of range.
                let coded = (exc == 0) & (s != 0.0);
                *big = (coded & (c >= MAX_CODE)) as u64;
                let c = if coded & (c < MAX_CODE) { c } else { 0.0 };
                let neg = (q < 0.0) & (c > 0.0);
                // zigzag(±c) = 2c - neg, in integers: below 2^52 an integer's bits in
                // `2^52 + c` are `c` itself. (A select between two f64 values here became two
                // masked stores, which are slow.)
                let ci = (c + TWO52).to_bits() - TWO52.to_bits();
                *code = (ci << 1) - neg as u64;
                let d = if s == 0.0 { 0.0 } else { (if neg { -c } else { c }) * s };
                E::store(b + d, o);
            }
            codes.extend_from_slice(&block_codes[..len]);
            if big[..len].iter().fold(0, |x, &f| x | f) != 0 {
                let found = big[..len].iter().enumerate().filter(|&(_, &f)| f != 0);
                new_exceptions.extend(found.map(|(j, _)| (s0 + j) as u32));
            }
        }
    }
    if !new_exceptions.is_empty() {
        exceptions.extend(new_exceptions);
        exceptions.sort_unstable();
    }
    let exc_values = exact_diffs::<E>(&exceptions, base, target);
    for (&i, &v) in exceptions.iter().zip(&exc_values) {
        let i = i as usize;
        apply_exact::<E>(&base[i * w..(i + 1) * w], v, &mut recon[i * w..(i + 1) * w]);
    }
    Symbols {
        exceptions,
        exc_values,
        body: Body::Quant {
            group_steps,
            range: context_range::<E>(base),
            codes,
        },
    }
}

/// True when both values are finite (their exponent fields are not all ones): an integer
/// test, no conversion.
#[inline(always)]
fn finite_pair<E: Elem>(b: &[u8], t: &[u8]) -> bool {
    let top = (1u32 << E::EXP) - 1;
    (E::exponent(b) != top) & (E::exponent(t) != top)
}

/// The positions of the elements for which `flag(base, target)` holds, in order.
///
/// Blocks of 64: the flags of a block are computed apart (a loop that vectorises), a block
/// without any is skipped, and the others are compacted without branches, since flags that
/// hold for a tenth of the elements at random would defeat branch prediction.
#[inline(always)]
fn positions_where<E: Elem>(base: &[u8], target: &[u8], flag: impl Fn(&[u8], &[u8]) -> bool) -> Vec<u32> {
    const BLOCK: usize = 64;
    let w = E::WIDTH;
    let mut out = Vec::new();
    let (mut flags, mut found) = ([false; BLOCK], [0u32; BLOCK]);
    let blocks = base.chunks(BLOCK * w).zip(target.chunks(BLOCK * w));
    for (k, (b, t)) in blocks.enumerate() {
        let pairs = b.chunks_exact(w).zip(t.chunks_exact(w));
        for (f, (b, t)) in flags.iter_mut().zip(pairs) {
            *f = flag(b, t);
        }
        let len = b.len() / w;
        if !flags[..len].iter().fold(false, |a, &f| a | f) {
            continue;
        }
        let mut m = 0;
        for (j, &f) in flags[..len].iter().enumerate() {
            found[m & (BLOCK - 1)] = (k * BLOCK + j) as u32;
            m += f as usize;
        }
        out.extend_from_slice(&found[..m]);
    }
    out
}

/// Each element's quantization step. With one step per tensor it depends only on the
/// element's exponent: one table per chunk. With `bits` it is the group's stored bf16 step,
/// rounded to the element's ULPs.
struct StepTable {
    per_exponent: Option<Vec<f64>>,
    groups: Vec<f64>,
    gshift: u32,
    domain: Domain,
    ulps: Vec<Ulp>,
    /// Per exponent, the group whose step was last computed for it, and that step: a group
    /// holds a handful of exponents, so most elements skip the rounding arithmetic.
    cached: Vec<(usize, f64)>,
}

impl StepTable {
    fn new<E: Elem>(step: Option<f32>, group_steps: &[u16], gshift: u32, domain: Domain) -> Self {
        let ulps = ulp_table::<E>();
        let per_exponent = step.map(|s| ulps.iter().map(|&u| element_step(domain, s as f64, u)).collect());
        StepTable {
            per_exponent,
            groups: group_steps.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect(),
            gshift,
            domain,
            cached: vec![(usize::MAX, 0.0); ulps.len()],
            ulps,
        }
    }

    /// The step of element `i` whose base exponent is `e`.
    #[inline(always)]
    fn get(&mut self, i: usize, e: usize) -> f64 {
        if let Some(t) = &self.per_exponent {
            return t[e];
        }
        let g = i >> self.gshift;
        let (cg, cv) = self.cached[e];
        if cg == g {
            return cv;
        }
        let v = element_step(self.domain, self.groups[g], self.ulps[e]);
        self.cached[e] = (g, v);
        v
    }
}

#[inline(always)]
fn write_symbols<E: Elem>(sym: &Symbols, base: &[u8], out: &mut Vec<u8>) {
    put_set(&sym.exceptions, &sym.exc_values, out);
    match &sym.body {
        Body::Quant {
            group_steps,
            range,
            codes,
        } => {
            out.extend(group_steps.iter().flat_map(|s| s.to_le_bytes()));
            out.extend_from_slice(&range.0.to_le_bytes());
            out.extend_from_slice(&range.1.to_le_bytes());
            ints::encode(codes, &contexts::<E>(base, *range), 16, out);
        }
        Body::Sparse { kept, values } => put_set(kept, values, out),
        Body::Dare { values, .. } => ints::encode(values, &[], 1, out),
        Body::Sign { range: None, signs } => ints::encode_small(signs, &[], 1, out),
        Body::Sign {
            range: Some(range),
            signs,
        } => {
            // Stored: 0 = unchanged, 1 = +, 2 = -: the common symbol gets the small token.
            let mut stored = vec![0u8; signs.len()];
            for (o, &s) in stored.iter_mut().zip(signs) {
                *o = (s + 1) % 3;
            }
            out.extend_from_slice(&range.0.to_le_bytes());
            out.extend_from_slice(&range.1.to_le_bytes());
            ints::encode_small(&stored, &contexts::<E>(base, *range), 16, out);
        }
    }
}

fn read_symbols<E: Elem>(p: &ChunkParams, base: &[u8], input: &mut &[u8]) -> Result<Symbols, DecodeError> {
    let w = E::WIDTH;
    let n = base.len() / w;
    let (exceptions, exc_values) = get_set(input, n, 8 * w as u32 + 1)?;
    let body = match *p.codec {
        TensorCodec::Quant { step, group, .. } => {
            let group_steps = match step {
                Some(_) => Vec::new(),
                None => {
                    let need = n.div_ceil(group as usize) * 2;
                    let raw = input.get(..need).ok_or(DecodeError("group steps truncated"))?;
                    *input = &input[need..];
                    raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
                }
            };
            let range = read_context_range::<E>(input)?;
            let ctx = contexts::<E>(base, range);
            let mut codes = vec![0u64; n];
            ints::decode(input, 16, 64, &ctx, &mut codes)?;
            Body::Quant {
                group_steps,
                range,
                codes,
            }
        }
        TensorCodec::Sparse { .. } => {
            let (kept, values) = get_set(input, n, 64)?;
            Body::Sparse { kept, values }
        }
        TensorCodec::Dare { keep, seed } => {
            let kept = dare_positions(seed, keep, p.first, n, &exceptions);
            let mut values = vec![0u64; kept.len()];
            ints::decode(input, 1, 8 * w as u32 + 1, &[], &mut values)?;
            Body::Dare { kept, values }
        }
        TensorCodec::Sign { zeros, .. } | TensorCodec::SignAxis { zeros, .. } => {
            let mut raw = vec![0u64; n];
            // Values over 2 are corrupt; they rebuild as unchanged and fail the fingerprint.
            let small = |v: u64| v.min(3) as u8;
            if zeros {
                let range = read_context_range::<E>(input)?;
                let ctx = contexts::<E>(base, range);
                ints::decode(input, 16, 8, &ctx, &mut raw)?;
                Body::Sign {
                    range: Some(range),
                    signs: raw.iter().map(|&s| (small(s) + 2) % 3).collect(),
                }
            } else {
                ints::decode(input, 1, 8, &[], &mut raw)?;
                Body::Sign {
                    range: None,
                    signs: raw.iter().map(|&s| small(s)).collect(),
                }
            }
        }
    };
    Ok(Symbols {
        exceptions,
        exc_values,
        body,
    })
}

/// Rebuilds a chunk from its symbols. Symbols read from a payload are untrusted: any
/// inconsistency is an error, never a panic.
#[inline(always)]
fn rebuild<E: Elem>(p: &ChunkParams, base: &[u8], sym: &Symbols, out: &mut [u8]) -> Result<(), DecodeError> {
    let w = E::WIDTH;
    let n = base.len() / w;
    let ulps = ulp_table::<E>();
    let b_at = |i: usize| &base[i * w..(i + 1) * w];
    match (&sym.body, p.codec) {
        (
            Body::Quant { group_steps, codes, .. },
            &TensorCodec::Quant {
                step, group, domain, ..
            },
        ) => {
            let group = if step.is_some() { n.max(1) } else { group as usize };
            // Groups are powers of two (validated): a shift, not a division per element.
            let gshift = if step.is_some() { 63 } else { group.trailing_zeros() };
            if step.is_none() && group_steps.len() != n.div_ceil(group) {
                return Err(DecodeError("wrong number of group steps"));
            }
            let mut steps = StepTable::new::<E>(step, group_steps, gshift, domain);
            let elems = codes.iter().zip(base.chunks_exact(w)).zip(out.chunks_exact_mut(w));
            for (i, ((&c, b), o)) in elems.enumerate() {
                let s = steps.get(i, E::exponent(b) as usize);
                let d = if s == 0.0 { 0.0 } else { unzigzag(c) as f64 * s };
                E::store(E::load(b) + d, o);
            }
        }
        (Body::Sparse { kept, values }, &TensorCodec::Sparse { step, .. }) => {
            out.copy_from_slice(base);
            for (&i, &v) in kept.iter().zip(values) {
                let i = i as usize;
                let (b, o) = (b_at(i), &mut out[i * w..(i + 1) * w]);
                match step {
                    None => apply_exact::<E>(b, v, o),
                    Some(s) => {
                        let s = element_step(Domain::Ulp, s as f64, ulps[E::exponent(b) as usize]);
                        E::store(E::load(b) + unzigzag(v) as f64 * s, o);
                    }
                }
            }
        }
        (Body::Dare { kept, values }, &TensorCodec::Dare { keep, .. }) => {
            out.copy_from_slice(base);
            let mut t = [0u8; 8];
            for (&i, &v) in kept.iter().zip(values) {
                let i = i as usize;
                let b = b_at(i);
                apply_exact::<E>(b, v, &mut t[..w]);
                let d = E::load(&t[..w]) - E::load(b);
                E::store(E::load(b) + d / keep as f64, &mut out[i * w..(i + 1) * w]);
            }
        }
        (Body::Sign { signs, .. }, &TensorCodec::Sign { scale, zeros }) if !(zeros && scale > 0.0) => {
            // One magnitude for every value: a select per value, which vectorises.
            let m = scale as f64;
            for ((&s, b), o) in signs.iter().zip(base.chunks_exact(w)).zip(out.chunks_exact_mut(w)) {
                E::store(E::load(b) + signed(m, s), o);
            }
        }
        (Body::Sign { signs, .. }, &TensorCodec::Sign { scale, zeros }) => {
            // One magnitude per exponent, and a lookup instead of a branch per value.
            let moves: Vec<[f64; 3]> = ulps
                .iter()
                .map(|&u| {
                    let m = if zeros && scale > 0.0 {
                        element_step(Domain::Ulp, scale as f64, u)
                    } else {
                        scale as f64
                    };
                    // Adding -0.0 leaves every value as it is, -0.0 included.
                    [m, -m, -0.0]
                })
                .collect();
            for ((&s, b), o) in signs.iter().zip(base.chunks_exact(w)).zip(out.chunks_exact_mut(w)) {
                let d = moves[E::exponent(b) as usize][s.min(2) as usize];
                E::store(E::load(b) + d, o);
            }
        }
        (Body::Sign { signs, .. }, &TensorCodec::SignAxis { cols, zeros, .. }) => {
            let a = p.axis.ok_or(DecodeError("sign-axis without scales"))?;
            // The rows this chunk touches must have scales, and all columns.
            let last = (p.first + n as u64).div_ceil(cols.max(1));
            let rows = (p.first / cols.max(1))
                .checked_sub(a.first_row)
                .and_then(|r0| a.rows.get(r0 as usize..(last - a.first_row) as usize))
                .filter(|_| a.cols.len() as u64 == cols)
                .ok_or(DecodeError("sign-axis scales do not cover the chunk"))?;
            // Row by row: within a row the column scales are a plain slice, and without
            // `zeros` nothing depends on the exponent, so the inner loop vectorises.
            let (mut i, mut c0) = (0usize, (p.first % cols) as usize);
            for &rs in rows {
                let len = (cols as usize - c0).min(n - i);
                let elems = signs[i..i + len]
                    .iter()
                    .zip(&a.cols[c0..c0 + len])
                    .zip(base[i * w..(i + len) * w].chunks_exact(w))
                    .zip(out[i * w..(i + len) * w].chunks_exact_mut(w));
                for (((&s, &cs), b), o) in elems {
                    let m = snap::<E>(zeros, rs as f64 * cs as f64, b, &ulps);
                    E::store(E::load(b) + signed(m, s), o);
                }
                (i, c0) = (i + len, 0);
            }
        }
        _ => return Err(DecodeError("symbols of another codec")),
    }
    for (&i, &v) in sym.exceptions.iter().zip(&sym.exc_values) {
        let i = i as usize;
        apply_exact::<E>(b_at(i), v, &mut out[i * w..(i + 1) * w]);
    }
    Ok(())
}

fn merge(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut m: Vec<u32> = a.iter().chain(b).copied().collect();
    m.sort_unstable();
    m.dedup();
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use safetensors::Dtype;

    /// bf16 weights ~ N(0, 0.02)-ish and a Gaussian-ish delta of scale `sigma`.
    fn pair(seed: u64, n: usize, sigma: f32) -> (Vec<u8>, Vec<u8>) {
        crate::testdata::bf16_pair(1, n, seed, |_, _| sigma)
    }

    fn codecs() -> Vec<TensorCodec> {
        vec![
            TensorCodec::Quant {
                step: Some(2e-4),
                bits: None,
                group: 128,
                outliers: 0.0,
                domain: Domain::Ulp,
            },
            TensorCodec::Quant {
                step: Some(2e-4),
                bits: None,
                group: 128,
                outliers: 0.0,
                domain: Domain::Value,
            },
            TensorCodec::Quant {
                step: None,
                bits: Some(3),
                group: 64,
                outliers: 0.01,
                domain: Domain::Ulp,
            },
            TensorCodec::Sparse {
                threshold: 1e-3,
                step: None,
            },
            TensorCodec::Sparse {
                threshold: 1e-3,
                step: Some(1e-4),
            },
            TensorCodec::Dare { keep: 0.3, seed: 7 },
            TensorCodec::Sign {
                scale: 8e-4,
                zeros: false,
            },
            TensorCodec::Sign {
                scale: 8e-4,
                zeros: true,
            },
        ]
    }

    fn params(codec: &TensorCodec) -> ChunkParams<'_> {
        ChunkParams {
            codec,
            first: 0,
            axis: None,
        }
    }

    fn round_trip(dtype: Dtype, p: &ChunkParams, b: &[u8], t: &[u8]) -> (Vec<u8>, usize) {
        // Not zeros: `encode` must write every byte of its output, not rely on its contents.
        let mut recon = vec![0xA5u8; t.len()];
        let payload = encode(dtype, p, b, t, &mut recon);
        let mut out = vec![0u8; t.len()];
        decode(dtype, p, b, &payload, &mut out).expect("decodes");
        assert_eq!(out, recon, "{:?}: decode rebuilds what encode promised", p.codec);
        (out, payload.len())
    }

    fn rel_error(b: &[u8], t: &[u8], r: &[u8]) -> f64 {
        let v = |x: &[u8], i: usize| half::bf16::from_le_bytes([x[2 * i], x[2 * i + 1]]).to_f64();
        let (mut e, mut d) = (0.0, 0.0);
        for i in 0..b.len() / 2 {
            e += (v(r, i) - v(t, i)).powi(2);
            d += (v(t, i) - v(b, i)).powi(2);
        }
        (e / d).sqrt()
    }

    #[test]
    fn rounding_is_half_away_from_zero() {
        for (x, want) in [
            (0.5, 1.0),
            (-0.5, -1.0),
            (1.49, 1.0),
            (-2.5, -3.0),
            (0.0, 0.0),
            (3.0, 3.0),
        ] {
            assert_eq!(round(x), want, "{x}");
        }
        assert_eq!(round(f64::NAN), 0.0);
    }

    /// A pair with the values that take the quantizer's rare paths: zeros and subnormals in
    /// the base (huge codes: kept exactly), huge changes, non-finite values, unchanged ones.
    fn tricky_pair(seed: u64, n: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut b, mut t) = pair(seed, n, 1e-3);
        let put = |x: &mut Vec<u8>, i: usize, v: half::bf16| x[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
        for i in (0..n).step_by(37) {
            put(&mut b, i, half::bf16::ZERO);
        }
        for i in (5..n).step_by(101) {
            put(&mut b, i, half::bf16::from_bits(0x0003));
            put(&mut t, i + 1, half::bf16::from_f32(3e3));
        }
        for i in (11..n).step_by(211) {
            put(&mut t, i, half::bf16::NAN);
            put(&mut b, i + 2, half::bf16::NEG_INFINITY);
            let v = half::bf16::from_le_bytes([b[2 * i + 6], b[2 * i + 7]]);
            put(&mut t, i + 3, v);
        }
        (b, t)
    }

    #[test]
    fn rounding_matches_a_conversion_to_integer() {
        let reference = |x: f64| ((x.abs() + 0.5) as i64 as f64).copysign(x);
        let edges = [
            0.0,
            -0.0,
            0.49999999999999994,
            2.5,
            TWO52 - 0.5,
            TWO52,
            TWO52 + 1.0,
            TWO63 - 1024.0,
            TWO63,
            1e300,
            f64::INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
        ];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random = (0..200_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f64::from_bits(x)
        });
        for v in edges.into_iter().flat_map(|v| [v, -v]).chain(random) {
            assert_eq!(round(v).to_bits(), reference(v).to_bits(), "{v:e}");
        }
    }

    #[test]
    fn quantizer_rare_paths_round_trip() {
        let (b, t) = tricky_pair(11, 20_000);
        let mut quants: Vec<TensorCodec> = codecs().into_iter().filter(|c| c.name() == "quant").collect();
        quants.push(TensorCodec::Quant {
            step: None,
            bits: Some(5),
            group: 16,
            outliers: 0.5,
            domain: Domain::Value,
        });
        for c in &quants {
            round_trip(Dtype::BF16, &params(c), &b, &t);
        }
    }

    #[test]
    fn vector_and_baseline_builds_code_alike() {
        let (b, t) = tricky_pair(12, 30_000);
        for c in codecs() {
            let p = params(&c);
            let (mut wide, mut base) = (vec![0u8; t.len()], vec![0u8; t.len()]);
            let payload = encode(Dtype::BF16, &p, &b, &t, &mut wide);
            // `encode_impl` itself is the baseline build; `encode` dispatches to AVX-512 or
            // AVX2 where the CPU has it.
            assert_eq!(
                payload,
                encode_impl::<crate::float::Bf16>(&p, &b, &t, &mut base),
                "{c:?}"
            );
            assert_eq!(wide, base, "{c:?}");
        }
    }

    #[test]
    fn every_codec_round_trips_and_rebuilds_what_it_promised() {
        let (b, t) = pair(1, 5000, 1e-3);
        for c in codecs() {
            round_trip(Dtype::BF16, &params(&c), &b, &t);
        }
    }

    #[test]
    fn quantization_error_follows_the_step() {
        let (b, t) = pair(2, 50_000, 1e-3);
        for domain in [Domain::Value, Domain::Ulp] {
            let c = TensorCodec::Quant {
                step: Some(3.5e-4),
                bits: None,
                group: 128,
                outliers: 0.0,
                domain,
            };
            let (r, _) = round_trip(Dtype::BF16, &params(&c), &b, &t);
            let e = rel_error(&b, &t, &r);
            // A uniform quantizer's error is step / sqrt(12) = 0.10 of this delta, plus the
            // grid's rounding in the value domain.
            assert!(e < 0.13, "{domain:?}: {e}");
            assert!(e > 0.05, "{domain:?}: {e}");
        }
    }

    #[test]
    fn more_bits_cost_more_and_err_less() {
        let (b, t) = pair(3, 50_000, 1e-3);
        let mut last = (0usize, f64::MAX);
        for bits in [2, 4, 6] {
            let c = TensorCodec::Quant {
                step: None,
                bits: Some(bits),
                group: 128,
                outliers: 0.001,
                domain: Domain::Ulp,
            };
            let (r, len) = round_trip(Dtype::BF16, &params(&c), &b, &t);
            let e = rel_error(&b, &t, &r);
            assert!(len > last.0 && e < last.1, "{bits} bits: {len} B, error {e}");
            last = (len, e);
        }
    }

    #[test]
    fn sparse_keeps_exactly_the_large_changes() {
        let (b, t) = pair(4, 20_000, 1e-3);
        let c = TensorCodec::Sparse {
            threshold: 1.5e-3,
            step: None,
        };
        let (r, _) = round_trip(Dtype::BF16, &params(&c), &b, &t);
        for i in 0..b.len() / 2 {
            let v = |x: &[u8]| half::bf16::from_le_bytes([x[2 * i], x[2 * i + 1]]).to_f64();
            let big = ((v(&t) - v(&b)).abs() as f32) >= 1.5e-3;
            assert_eq!(v(&r), if big { v(&t) } else { v(&b) }, "element {i}");
        }
    }

    #[test]
    fn dare_masks_come_from_the_seed() {
        let kept = |seed| {
            (0..100_000u64)
                .filter(|&i| dare_kept(seed, i, 0.25))
                .collect::<Vec<_>>()
        };
        assert_eq!(kept(5), kept(5), "the same seed gives the same mask");
        assert_ne!(kept(5), kept(6));
        let frac = kept(5).len() as f64 / 100_000.0;
        assert!((frac - 0.25).abs() < 0.01, "{frac}");
        // Decoding needs only the seed: the payload holds no positions, and a chunk's mask
        // depends on its place in the tensor.
        let (b, t) = pair(5, 4000, 1e-3);
        let c = TensorCodec::Dare { keep: 0.25, seed: 9 };
        let p = ChunkParams {
            codec: &c,
            first: 4000,
            axis: None,
        };
        let (r, _) = round_trip(Dtype::BF16, &p, &b, &t);
        let changed = (0..4000)
            .filter(|&i| r[2 * i..2 * i + 2] != b[2 * i..2 * i + 2])
            .count();
        let moved = (0..4000u64)
            .filter(|&i| {
                dare_kept(9, 4000 + i, 0.25)
                    && t[2 * i as usize..2 * i as usize + 2] != b[2 * i as usize..2 * i as usize + 2]
            })
            .count();
        assert_eq!(changed, moved);
    }

    #[test]
    fn sign_axis_scales_each_row_and_column() {
        let (b, t) = pair(6, 64 * 32, 1e-3);
        let c = TensorCodec::SignAxis {
            rows: 64,
            cols: 32,
            calibrated: false,
            zeros: false,
        };
        let rows: Vec<f32> = (0..64).map(|i| 1e-3 * (1.0 + i as f32 / 64.0)).collect();
        let cols: Vec<f32> = (0..32).map(|j| 0.5 + j as f32 / 32.0).collect();
        let p = ChunkParams {
            codec: &c,
            first: 0,
            axis: Some(AxisScales {
                rows: &rows,
                first_row: 0,
                cols: &cols,
            }),
        };
        let (r, _) = round_trip(Dtype::BF16, &p, &b, &t);
        let v = |x: &[u8], i: usize| half::bf16::from_le_bytes([x[2 * i], x[2 * i + 1]]).to_f64();
        let i = 5 * 32 + 7;
        let m = rows[5] as f64 * cols[7] as f64;
        let want = v(&b, i) + if v(&t, i) < v(&b, i) { -m } else { m };
        assert_eq!(half::bf16::from_f64(want).to_f64(), v(&r, i));
        let short = ChunkParams {
            axis: Some(AxisScales {
                rows: &rows[..10],
                first_row: 0,
                cols: &cols,
            }),
            ..p
        };
        let mut recon = vec![0u8; t.len()];
        let payload = encode(Dtype::BF16, &p, &b, &t, &mut recon);
        assert!(
            decode(Dtype::BF16, &short, &b, &payload, &mut recon).is_err(),
            "scales must cover the chunk"
        );
    }

    #[test]
    fn non_finite_values_are_kept_exactly() {
        let (mut b, mut t) = pair(7, 1000, 1e-3);
        t[20..22].copy_from_slice(&half::bf16::NAN.to_bits().to_le_bytes());
        b[40..42].copy_from_slice(&half::bf16::INFINITY.to_bits().to_le_bytes());
        for c in codecs() {
            let (r, _) = round_trip(Dtype::BF16, &params(&c), &b, &t);
            assert_eq!(r[20..22], t[20..22], "{c:?}");
            assert_eq!(r[40..42], t[40..42], "{c:?}");
        }
    }

    proptest! {
        #[test]
        fn f32_and_f16_round_trip(seed in 0u64..1000, n in 1usize..600) {
            let (b16, t16) = pair(seed, n, 1e-3);
            let widen = |x: &[u8]| x.chunks_exact(2).flat_map(|e| half::bf16::from_le_bytes([e[0], e[1]]).to_f32().to_le_bytes()).collect::<Vec<u8>>();
            let narrow = |x: &[u8]| x.chunks_exact(2).flat_map(|e| half::f16::from_f32(half::bf16::from_le_bytes([e[0], e[1]]).to_f32()).to_bits().to_le_bytes()).collect::<Vec<u8>>();
            for c in codecs() {
                round_trip(Dtype::F32, &params(&c), &widen(&b16), &widen(&t16));
                round_trip(Dtype::F16, &params(&c), &narrow(&b16), &narrow(&t16));
            }
        }

        #[test]
        fn hostile_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), which in 0usize..8) {
            let (b, _) = pair(8, 100, 1e-3);
            let c = &codecs()[which];
            let mut out = vec![0u8; b.len()];
            let _ = decode(Dtype::BF16, &params(c), &b, &bytes, &mut out);
        }
    }
}
