//! Float elements as the lossy codecs see them: values in f64, rounding back to the
//! tensor's dtype, the exponent field (a coding context) and the unit in the last place.
//!
//! All arithmetic is plain IEEE f64 without fused operations, so a reconstruction is the
//! same on every machine and for every thread count.

use safetensors::Dtype;

/// A float dtype the lossy codecs can code.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Bytes per element.
    const WIDTH: usize;
    /// Mantissa bits.
    const MANT: u32;
    /// Exponent bits.
    const EXP: u32;
    /// The element's bit pattern.
    fn bits(b: &[u8]) -> u64;
    /// The element's value.
    fn load(b: &[u8]) -> f64;
    /// Writes `v` rounded to nearest (ties to even).
    fn store(v: f64, out: &mut [u8]);

    /// The values of the first `out.len()` elements of `bytes`: a plain loop over a block,
    /// which vectorises where element-by-element loads inside bigger loops do not.
    #[inline(always)]
    fn load_block(bytes: &[u8], out: &mut [f64]) {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(Self::WIDTH)) {
            *o = Self::load(b);
        }
    }

    /// The biased exponent field of an element.
    #[inline(always)]
    fn exponent(b: &[u8]) -> u32 {
        ((Self::bits(b) >> Self::MANT) & ((1 << Self::EXP) - 1)) as u32
    }

    /// The spacing of representable values at biased exponent `e` (subnormals included).
    fn ulp(e: u32) -> f64 {
        let bias = (1i32 << (Self::EXP - 1)) - 1;
        pow2(e.max(1) as i32 - bias - Self::MANT as i32)
    }

    /// `(ulp(exponent), 1 / ulp(exponent))` of a finite element given as its value `v`
    /// (what [`Elem::load`] returned), from `v`'s f64 bits: masks, a max and products by
    /// powers of two, which vectorise where a table lookup per element does not. The inverse
    /// is infinite where it overflows (only f64 subnormal spacings); the pair is meaningless
    /// for values that are not finite.
    #[inline(always)]
    fn spacing(v: f64) -> (f64, f64) {
        let bias = (1i32 << (Self::EXP - 1)) - 1;
        // `2^floor(log2 |v|)`, or the smallest normal for subnormals and zero, whose spacing
        // is the smallest normal's: the power of two of the element's exponent.
        let pow = f64::from_bits(v.to_bits() & 0x7FF0_0000_0000_0000).max(pow2(1 - bias));
        let m = Self::MANT as i32;
        let ulp = pow * pow2(-m);
        if Self::EXP >= 11 {
            // f64's extreme exponents have no mirror image in range: divide (f64 tensors are rare).
            return (ulp, 1.0 / ulp);
        }
        // `1 / pow`, exact: its exponent field mirrors `pow`'s around 1.0.
        let inv = f64::from_bits((2046u64 << 52).wrapping_sub(pow.to_bits()));
        (ulp, inv * pow2(m))
    }
}

/// bfloat16.
#[derive(Clone, Copy)]
pub struct Bf16;
impl Elem for Bf16 {
    const WIDTH: usize = 2;
    const MANT: u32 = 7;
    const EXP: u32 = 8;
    #[inline(always)]
    fn bits(b: &[u8]) -> u64 {
        u16::from_le_bytes([b[0], b[1]]) as u64
    }
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        // A bf16 is the top half of an f32: exact, and far cheaper than a generic conversion.
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        // Through f32: bf16 keeps 8 of its 24 bits, so rounding twice changes only exact
        // ties of the f64, and it is deterministic either way.
        out.copy_from_slice(&f32_to_bf16(v as f32).to_le_bytes());
    }
}

/// `half::bf16::from_f32` without branches: the same bits (round to nearest even, NaNs
/// quieted), but its rounding branch is taken at random on real data and mispredicted half
/// the time, and a select lets loops over many values vectorise.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let x = x.to_bits();
    // Adding 0x7FFF plus the kept part's lowest bit carries into it exactly when the dropped
    // half is above one half, or equal to it with an odd kept part. Finite and infinite
    // values cannot overflow (at most 0xFF80_0000 + 0x8000); NaNs can, and are replaced.
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x0040;
    (if x & 0x7FFF_FFFF > 0x7F80_0000 { nan } else { rounded }) as u16
}

/// IEEE half precision.
#[derive(Clone, Copy)]
pub struct F16;
impl Elem for F16 {
    const WIDTH: usize = 2;
    const MANT: u32 = 10;
    const EXP: u32 = 5;
    #[inline(always)]
    fn bits(b: &[u8]) -> u64 {
        u16::from_le_bytes([b[0], b[1]]) as u64
    }
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32() as f64
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out.copy_from_slice(&half::f16::from_f32(v as f32).to_bits().to_le_bytes());
    }
}

/// IEEE single precision.
#[derive(Clone, Copy)]
pub struct F32;
impl Elem for F32 {
    const WIDTH: usize = 4;
    const MANT: u32 = 23;
    const EXP: u32 = 8;
    #[inline(always)]
    fn bits(b: &[u8]) -> u64 {
        u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64
    }
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out.copy_from_slice(&(v as f32).to_le_bytes());
    }
}

/// IEEE double precision.
#[derive(Clone, Copy)]
pub struct F64;
impl Elem for F64 {
    const WIDTH: usize = 8;
    const MANT: u32 = 52;
    const EXP: u32 = 11;
    #[inline(always)]
    fn bits(b: &[u8]) -> u64 {
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out.copy_from_slice(&v.to_le_bytes());
    }
}

/// Elements per block of [`blocks`].
pub const BLOCK: usize = 256;

/// Calls `f(first, values)` for consecutive blocks of up to [`BLOCK`] elements of `K`
/// arrays of the same length, `values[a]` holding array `a`'s values in f64. `BLOCK` is a
/// multiple of four, so an element's position in its block has the same remainder mod 4
/// as its index: sums in four lanes by index can run over blocks.
#[inline(always)]
pub fn blocks<E: Elem, const K: usize>(arrays: [&[u8]; K], mut f: impl FnMut(usize, [&[f64]; K])) {
    let w = E::WIDTH;
    let n = arrays[0].len() / w;
    let mut buf = [[0f64; BLOCK]; K];
    for first in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - first);
        for (a, b) in arrays.iter().zip(buf.iter_mut()) {
            E::load_block(&a[first * w..(first + len) * w], &mut b[..len]);
        }
        f(first, std::array::from_fn(|a| &buf[a][..len]));
    }
}

/// `2^k` exactly, subnormals included (`powi` would round `2^-1074` to zero).
fn pow2(k: i32) -> f64 {
    if k >= -1022 {
        f64::from_bits(((k + 1023) as u64) << 52)
    } else {
        f64::from_bits(1u64 << (k + 1074).max(0))
    }
}

/// Number of [`magnitude_bin`] bins.
pub const MAGNITUDE_BINS: usize = 1 << 15;

/// Histogram bin of a change's magnitude: the top 16 bits of `|d|` as an f32, sign dropped
/// (so 2^15 bins, 128 per octave). Thresholds on bin edges are exact: `|d| as f32 >=
/// f32::from_bits(b << 16)` holds exactly for the bins from `b` up.
#[inline(always)]
pub fn magnitude_bin(d: f64) -> usize {
    ((d.abs() as f32).to_bits() >> 16) as usize & (MAGNITUDE_BINS - 1)
}

/// Whether the lossy codecs can code tensors of `dtype` (the IEEE-style floats).
pub fn lossy_capable(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64)
}

/// Defines `$name::<E>(args)`: `$body::<E>(args)` compiled for the widest vector
/// instructions the CPU has (the macro lives with the kernels, see `kernels`).
#[doc(inline)]
pub use crate::__simd_dispatch as simd_dispatch;

/// Calls `$f::<Elem>(args)` for a lossy-capable dtype; other dtypes are a caller bug.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_elem {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            safetensors::Dtype::BF16 => $f::<$crate::float::Bf16>($($arg),*),
            safetensors::Dtype::F16 => $f::<$crate::float::F16>($($arg),*),
            safetensors::Dtype::F32 => $f::<$crate::float::F32>($($arg),*),
            safetensors::Dtype::F64 => $f::<$crate::float::F64>($($arg),*),
            d => unreachable!("lossy codec on {d:?}"),
        }
    };
}
#[doc(inline)]
pub use crate::__with_elem as with_elem;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulps_match_the_formats() {
        assert_eq!(Bf16::ulp(127), 2f64.powi(-7));
        assert_eq!(F16::ulp(15), 2f64.powi(-10));
        assert_eq!(F32::ulp(127), 2f64.powi(-23));
        assert_eq!(F32::ulp(0), F32::ulp(1), "subnormals share the smallest normal spacing");
        assert_eq!(F64::ulp(0), f64::from_bits(1), "the smallest f64 spacing is not zero");
        assert_eq!(F64::ulp(2046), 2f64.powi(1023 - 52));
        let one = half::bf16::from_f32(1.0).to_bits().to_le_bytes();
        assert_eq!(Bf16::exponent(&one), 127);
    }

    fn spacing_matches_ulp<E: Elem>(bits: impl Iterator<Item = u64>) {
        for x in bits {
            let b = &x.to_le_bytes()[..E::WIDTH];
            if E::exponent(b) == (1 << E::EXP) - 1 {
                continue;
            }
            let u = E::ulp(E::exponent(b));
            assert_eq!(E::spacing(E::load(b)), (u, 1.0 / u), "{x:#x}");
        }
    }

    #[test]
    fn spacing_matches_the_exponent_table() {
        spacing_matches_ulp::<Bf16>(0..1 << 16);
        spacing_matches_ulp::<F16>(0..1 << 16);
        let wide = |shift: u32| (0..1u64 << 16).map(move |x| x << shift | x & 0xFF);
        spacing_matches_ulp::<F32>(wide(16));
        spacing_matches_ulp::<F64>(wide(48));
    }

    #[test]
    fn bf16_rounding_matches_half() {
        // Every f32 whose low bits sit at or around the rounding point, for many exponents and
        // both signs, NaNs and infinities included.
        let lows = [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF];
        for hi in (0..=0xFFFFu32)
            .step_by(3)
            .chain([0x7F7F, 0x7F80, 0x7FC0, 0xFF7F, 0xFF80, 0xFFFF])
        {
            for lo in lows {
                let x = f32::from_bits(hi << 16 | lo);
                assert_eq!(f32_to_bf16(x), half::bf16::from_f32(x).to_bits(), "{:#x}", x.to_bits());
            }
        }
    }

    #[test]
    fn store_rounds_to_nearest_even() {
        let mut b = [0u8; 2];
        Bf16::store(1.0 + 2f64.powi(-8), &mut b);
        assert_eq!(Bf16::load(&b), 1.0, "a tie rounds to the even neighbour");
        Bf16::store(1.0 + 3.0 * 2f64.powi(-8), &mut b);
        assert_eq!(Bf16::load(&b), 1.0 + 2f64.powi(-6));
    }
}
