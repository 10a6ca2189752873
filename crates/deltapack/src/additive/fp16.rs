//! FastChat's arithmetic, element by element: every value rounded to fp16 (to nearest, ties to
//! even, as PyTorch's `.to(torch.float16)` does), then one fp16 subtraction (making a delta) or
//! addition (applying it), and how far the result can be from the fine-tune.
//!
//! An fp16 addition is emulated as an f32 addition rounded to fp16. That is the correctly
//! rounded fp16 sum: f32 carries 24 significant bits, at least `2 * 11 + 2`, so rounding twice
//! never differs from rounding once, and f32's range holds every fp16 sum. The unit tests hold
//! it to an independent reference.

use half::{bf16, f16};
use safetensors::Dtype;

/// Relative slack for the f64 evaluation of a bound, far below any fp16 rounding.
const SLACK: f64 = 1.0 / (1u64 << 50) as f64;

/// True for the float dtypes FastChat converts to fp16 when it loads a model.
pub(crate) fn is_float(dt: Dtype) -> bool {
    matches!(dt, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// The value of one little-endian element of a float dtype (exact in f64).
#[inline]
pub(crate) fn load(dt: Dtype, b: &[u8]) -> f64 {
    match dt {
        Dtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
        Dtype::BF16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        _ => f64::from_le_bytes(b[..8].try_into().expect("8-byte element")),
    }
}

/// One element converted to fp16 like PyTorch's cast; an f64 goes through f32 first, as
/// PyTorch's CPU cast does.
#[inline]
pub(crate) fn to_f16(dt: Dtype, b: &[u8]) -> u16 {
    match dt {
        Dtype::F16 => u16::from_le_bytes([b[0], b[1]]),
        _ => f16::from_f32(load(dt, b) as f32).to_bits(),
    }
}

/// The fp16 sum `a + b`, correctly rounded.
#[inline]
pub(crate) fn add(a: u16, b: u16) -> u16 {
    f16::from_f32(f16::from_bits(a).to_f32() + f16::from_bits(b).to_f32()).to_bits()
}

/// The fp16 difference `a - b`, correctly rounded.
#[inline]
pub(crate) fn sub(a: u16, b: u16) -> u16 {
    f16::from_f32(f16::from_bits(a).to_f32() - f16::from_bits(b).to_f32()).to_bits()
}

/// Writes an fp16 value as `dt` (F16, BF16 or F32), rounding to nearest even.
#[inline]
pub(crate) fn store(dt: Dtype, v: u16, out: &mut [u8]) {
    let x = f16::from_bits(v).to_f32();
    match dt {
        Dtype::F16 => out.copy_from_slice(&v.to_le_bytes()),
        Dtype::BF16 => out.copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes()),
        _ => out.copy_from_slice(&x.to_le_bytes()),
    }
}

fn value(v: u16) -> f64 {
    f16::from_bits(v).to_f64()
}

fn is_finite(v: u16) -> bool {
    v & 0x7C00 != 0x7C00
}

/// A nonzero fp16 below the normal range (2^-14), where fewer than 11 bits are significant.
fn is_subnormal(v: u16) -> bool {
    v & 0x7C00 == 0 && v & 0x03FF != 0
}

/// `2^e` for any exponent, 0 below the smallest f64.
fn pow2(e: i32) -> f64 {
    match e {
        ..-1074 => 0.0,
        -1074..-1022 => f64::from_bits(1u64 << (e + 1074)),
        _ => f64::from_bits(((e.min(1023) + 1023) as u64) << 52),
    }
}

/// Half the spacing of the values of `dt` around `|v|`: the largest rounding error of a
/// value of that magnitude.
pub(crate) fn half_ulp(dt: Dtype, v: f64) -> f64 {
    let (mantissa, min_exp) = match dt {
        Dtype::F16 => (10, -14),
        Dtype::BF16 => (7, -126),
        Dtype::F32 => (23, -126),
        _ => (52, -1022),
    };
    let e = ((v.abs().to_bits() >> 52) & 0x7FF) as i32 - 1023;
    pow2(e.max(min_exp) - mantissa - 1)
}

/// The largest error of converting a value of dtype `dt` to fp16, for a value whose fp16
/// rounding lies in `[lo, hi]` in magnitude.
fn conversion_bound(dt: Dtype, lo: f64, hi: f64) -> f64 {
    match dt {
        Dtype::F16 => 0.0,
        // fp16 holds bf16's 8 significant bits exactly down to 2^-17 (its spacing is 2^-24
        // there); a bf16 that does not fit overflows, which is counted apart.
        Dtype::BF16 if lo <= pow2(-17) => pow2(-25),
        Dtype::BF16 => 0.0,
        Dtype::F32 => half_ulp(Dtype::F16, hi),
        _ => half_ulp(Dtype::F16, hi) + half_ulp(Dtype::F32, hi),
    }
}

/// What became of one element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A finite result.
    Finite,
    /// A finite result with an fp16 subnormal delta or sum: fewer significant bits.
    Subnormal,
    /// Finite inputs, but fp16 overflowed to infinity.
    Overflow,
    /// An input was already infinite or NaN: no error is counted.
    NonFinite,
}

/// One element's result: its error (a bound or a measurement), the delta it carries and its class.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    /// Absolute error against the fine-tune: a worst-case bound (apply) or measured (export).
    pub err: f64,
    /// The delta value, fine-tune minus base (as stored, when applying).
    pub delta: f64,
    /// What became of it.
    pub class: Class,
}

/// Applies one delta element `d` (dtype `dd`) to its base element `b` (dtype `bd`; `None` for
/// a row the base lacks) in fp16, writes the result as `od` into `out`, and bounds its
/// distance from the fine-tune.
///
/// The bound assumes the delta was made as FastChat makes it, `round_dd(f16(ft) - f16(b))`
/// (the fine-tune's own value in rows the base lacks), from a fine-tune of the base's dtype.
/// It is the worst case over every such fine-tune that yields this delta: the distance of the
/// result from `f16(b) + d` (known here), plus the farthest `f16(ft)` that rounds to `d`
/// (half an ULP of `d` at most, and 0 when the subtraction must have been exact), plus the
/// error of converting the fine-tune to fp16.
#[inline]
pub(crate) fn apply_one(bd: Dtype, b: Option<&[u8]>, dd: Dtype, d: &[u8], od: Dtype, out: &mut [u8]) -> Outcome {
    let ds = load(dd, d);
    let d16 = to_f16(dd, d);
    let (b16, r16, base_finite) = match b {
        Some(b) => {
            let b16 = to_f16(bd, b);
            (value(b16), add(b16, d16), load(bd, b).is_finite())
        }
        None => (0.0, d16, true),
    };
    store(od, r16, out);
    let outv = load(od, out);
    let class = classify(base_finite, ds.is_finite(), outv.is_finite(), [d16, r16]);
    if matches!(class, Class::Overflow | Class::NonFinite) {
        return Outcome {
            err: f64::INFINITY,
            delta: ds,
            class,
        };
    }
    // What FastChat's sum would be without rounding; the fine-tune's fp16 copy is near it.
    let c = b16 + ds;
    let spread = match b {
        // The delta is the fine-tune's fp16 value itself.
        None if dd == Dtype::F16 => 0.0,
        _ => farthest_f16(c, half_ulp(dd, ds) * (1.0 + SLACK) + SLACK * c.abs()),
    };
    let conv = conversion_bound(
        bd,
        (c.abs() - spread) * (1.0 - SLACK),
        (c.abs() + spread) * (1.0 + SLACK),
    );
    Outcome {
        err: (outv - c).abs() + spread + conv + SLACK * (b16.abs() + ds.abs() + outv.abs()),
        delta: ds,
        class,
    }
}

/// The farthest an fp16 value within `h` of `c` lies from `c`: how far the fine-tune's fp16
/// copy can be from `c` when it must be an fp16 value that rounds to the delta. `h` itself
/// when no fp16 value is that close (the delta was not made from fp16 values).
fn farthest_f16(c: f64, h: f64) -> f64 {
    let (lo, hi) = (f16_grid(c - h, f64::ceil), f16_grid(c + h, f64::floor));
    if lo > hi {
        return h;
    }
    (c - lo).max(hi - c)
}

/// `x` rounded to the fp16 grid by `round` (`ceil` or `floor`), ignoring overflow: the grid
/// around `x` is a multiple of its spacing there, so scaling by it is exact.
fn f16_grid(x: f64, round: fn(f64) -> f64) -> f64 {
    let spacing = 2.0 * half_ulp(Dtype::F16, x);
    round(x / spacing) * spacing
}

/// Makes one FastChat delta element, `f16(ft) - f16(b)` in fp16 (`f16(ft)` for a row the base
/// lacks), writes it as fp16 into `out`, and measures how far FastChat's apply,
/// `f16(b) + delta` in fp16, lands from the fine-tune's value.
#[inline]
pub(crate) fn export_one(td: Dtype, ft: &[u8], bd: Dtype, b: Option<&[u8]>, out: &mut [u8]) -> Outcome {
    let fv = load(td, ft);
    let f16v = to_f16(td, ft);
    let (d16, r16, delta, base_finite) = match b {
        Some(b) => {
            let b16 = to_f16(bd, b);
            let d16 = sub(f16v, b16);
            let bv = load(bd, b);
            (d16, add(b16, d16), fv - bv, bv.is_finite())
        }
        None => (f16v, f16v, fv, true),
    };
    out.copy_from_slice(&d16.to_le_bytes());
    let class = classify(
        base_finite,
        fv.is_finite(),
        is_finite(d16) && is_finite(r16),
        [d16, r16],
    );
    let err = match class {
        Class::Finite | Class::Subnormal => (value(r16) - fv).abs(),
        Class::Overflow | Class::NonFinite => f64::INFINITY,
    };
    Outcome { err, delta, class }
}

fn classify(base_finite: bool, input_finite: bool, result_finite: bool, values: [u16; 2]) -> Class {
    if !base_finite || !input_finite {
        Class::NonFinite
    } else if !result_finite {
        Class::Overflow
    } else if values.iter().any(|&v| is_subnormal(v)) {
        Class::Subnormal
    } else {
        Class::Finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x` rounded to fp16, to nearest with ties to even, computed independently of `half`:
    /// scale to the fp16 spacing at `x` (a power of two, so exact), round, scale back.
    fn reference(x: f64) -> f64 {
        let e = ((x.abs().to_bits() >> 52) & 0x7FF) as i32 - 1023;
        let ulp = pow2(e.max(-14) - 10);
        let r = (x / ulp).round_ties_even() * ulp;
        if r.abs() > 65504.0 {
            f64::INFINITY.copysign(x)
        } else {
            r
        }
    }

    /// The sign an exact zero sum takes under round-to-nearest: + unless both terms are -0.
    fn zero_sign(a: u16, b: u16) -> u16 {
        a & b & 0x8000
    }

    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Second operands: zeros, the extremes of each range, ties, and random patterns.
    fn operands() -> Vec<u16> {
        let mut v = vec![
            0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0x3C01, 0x1400, 0x7800,
        ];
        let mut r = xorshift(7);
        v.extend((0..250).map(|_| r() as u16).filter(|&x| is_finite(x)));
        v
    }

    fn check_op(a: u16, b: u16, got: u16, exact: f64, what: &str) {
        let want = reference(exact);
        assert_eq!(value(got), want, "{a:#06x} {what} {b:#06x}");
        if want == 0.0 {
            assert_eq!(got & 0x8000, zero_sign(a, if what == "-" { b ^ 0x8000 } else { b }));
        }
    }

    #[test]
    fn f32_sums_round_to_the_correctly_rounded_fp16_sum() {
        // Every finite fp16 against a few hundred operands; an fp16 sum is exact in f64.
        let ops = operands();
        for a in (0..=u16::MAX).filter(|&x| is_finite(x)) {
            for &b in &ops {
                check_op(a, b, add(a, b), value(a) + value(b), "+");
                check_op(a, b, sub(a, b), value(a) - value(b), "-");
                assert_eq!(add(a, b), (f16::from_bits(a) + f16::from_bits(b)).to_bits());
                assert_eq!(sub(a, b), (f16::from_bits(a) - f16::from_bits(b)).to_bits());
            }
        }
        assert_eq!(add(0x7BFF, 0x7BFF), 0x7C00, "overflow to +inf");
        assert_eq!(add(0x7C00, 0x3C00), 0x7C00);
        assert!(!is_finite(add(0x7C00, 0xFC00)), "inf - inf is NaN");
    }

    #[test]
    fn conversions_round_to_nearest_even() {
        for bits in 0..=u16::MAX {
            let x = bf16::from_bits(bits).to_f64();
            if x.is_finite() {
                assert_eq!(
                    value(to_f16(Dtype::BF16, &bits.to_le_bytes())),
                    reference(x),
                    "bf16 {bits:#06x}"
                );
            }
        }
        let mut r = xorshift(11);
        // Random f32 patterns with exponents from 2^-27 to 2^17, around fp16's range.
        for _ in 0..1_000_000 {
            let raw = r();
            let exp = 100 + (raw >> 40) as u32 % 45;
            let bits = (raw as u32 & 0x807F_FFFF) | exp << 23;
            let x = f32::from_bits(bits);
            let got = value(to_f16(Dtype::F32, &bits.to_le_bytes()));
            assert_eq!(got, reference(x as f64), "f32 {bits:#010x}");
        }
        // Ties: halfway between two fp16 values goes to the even one.
        assert_eq!(value(to_f16(Dtype::F32, &(1.0f32 + 1.0 / 2048.0).to_le_bytes())), 1.0);
        assert_eq!(
            value(to_f16(Dtype::F32, &(1.0f32 + 3.0 / 2048.0).to_le_bytes())),
            1.0 + 2.0 / 1024.0
        );
        assert_eq!(value(to_f16(Dtype::F32, &65520.0f32.to_le_bytes())), f64::INFINITY);
    }

    #[test]
    fn half_ulps() {
        assert_eq!(half_ulp(Dtype::F16, 1.0), 1.0 / 2048.0);
        assert_eq!(half_ulp(Dtype::F16, 1.9), 1.0 / 2048.0);
        assert_eq!(half_ulp(Dtype::F16, 0.0), pow2(-25));
        assert_eq!(half_ulp(Dtype::F16, 1e-7), pow2(-25));
        assert_eq!(half_ulp(Dtype::BF16, 1.0), 1.0 / 256.0);
        assert_eq!(half_ulp(Dtype::F32, -2.0), pow2(-23));
        assert_eq!(half_ulp(Dtype::F64, 1.0), pow2(-53));
    }

    /// `x` rounded to dtype `dt`, as bytes.
    fn sample(dt: Dtype, x: f64) -> Vec<u8> {
        match dt {
            Dtype::F16 => f16::from_f64(x).to_bits().to_le_bytes().to_vec(),
            Dtype::BF16 => bf16::from_f32(x as f32).to_bits().to_le_bytes().to_vec(),
            _ => (x as f32).to_le_bytes().to_vec(),
        }
    }

    #[test]
    fn the_bound_holds_for_every_dtype_and_magnitude() {
        let float = [Dtype::F16, Dtype::BF16, Dtype::F32];
        for (dt, dd, od) in float
            .iter()
            .flat_map(|&a| float.iter().flat_map(move |&b| float.map(|c| (a, b, c))))
        {
            let mut r = xorshift(3);
            let mut unit = move || (r() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            let mut tightest = 0.0f64;
            for i in 0..40_000 {
                // Weights from 2^-20 to 2^12, deltas from 4 to 2^-26 times as large: large
                // ones change the sign or the binade, where fp16 really rounds.
                let w = unit() * pow2(-20 + (i % 33));
                let delta = w * unit() * pow2(2 - (i % 29));
                let (b, ft) = (sample(dt, w), sample(dt, w + delta));
                let base = (i % 7 != 0).then_some(b.as_slice());
                // FastChat's delta, stored as `dd`.
                let mut d16 = [0u8; 2];
                let made = export_one(dt, &ft, dt, base, &mut d16);
                let exact = value(to_f16(dt, &ft)) - base.map_or(0.0, |b| value(to_f16(dt, b)));
                let d = if dd == Dtype::F16 {
                    d16.to_vec()
                } else {
                    sample(dd, exact)
                };
                let mut out = vec![0u8; od.bitsize() / 8];
                let applied = apply_one(dt, base, dd, &d, od, &mut out);
                let err = (load(od, &out) - load(dt, &ft)).abs();
                assert!(
                    err <= applied.err,
                    "{dt:?} delta {dd:?} -> {od:?}, w {w:e} delta {delta:e}: error {err:e} > bound {:e}",
                    applied.err
                );
                if (dd, od) == (Dtype::F16, Dtype::F16) {
                    assert_eq!(err, made.err, "export measures what apply does");
                }
                if applied.err > 0.0 {
                    tightest = tightest.max(err / applied.err);
                }
            }
            // A worst case that is never reached would be of little use.
            assert!(
                tightest > 0.5,
                "{dt:?} {dd:?} {od:?}: errors reach only {tightest} of the bound"
            );
        }
    }

    #[test]
    fn overflow_and_subnormals_are_classified() {
        let big = bf16::from_f32(60000.0).to_bits().to_le_bytes();
        let huge = bf16::from_f32(70000.0).to_bits().to_le_bytes();
        let mut d = [0u8; 2];
        assert_eq!(
            export_one(Dtype::BF16, &huge, Dtype::BF16, Some(&big), &mut d).class,
            Class::Overflow
        );
        let tiny = f16::from_f32(1e-6).to_bits().to_le_bytes();
        let one = f16::ONE.to_bits().to_le_bytes();
        let mut out = [0u8; 2];
        let o = apply_one(Dtype::F16, Some(&one), Dtype::F16, &tiny, Dtype::F16, &mut out);
        assert_eq!(o.class, Class::Subnormal);
        let inf = f16::INFINITY.to_bits().to_le_bytes();
        assert_eq!(
            apply_one(Dtype::F16, Some(&inf), Dtype::F16, &tiny, Dtype::F16, &mut out).class,
            Class::NonFinite
        );
        let max = f16::MAX.to_bits().to_le_bytes();
        assert_eq!(
            apply_one(Dtype::F16, Some(&max), Dtype::F16, &max, Dtype::F16, &mut out).class,
            Class::Overflow
        );
    }
}
