//! The one door to CPU-specific code: every `cfg(target_arch)`, every `std::arch` intrinsic
//! and every CPU-feature check of the workspace lives under this module.
//!
//! The codecs call the functions here with the widest [`Kernel`] they allow (production:
//! [`Kernel::WIDEST`]; the property tests: each kernel in turn). Each function runs a vector
//! path where the CPU has the features it needs and reports when it ran none, and the caller
//! then runs its portable loop: on other targets every function here reports "none". The
//! vector paths give the bytes and verdicts of the portable ones, hostile payloads included.
//!
//! - `avx2`: the exact codec's 16-bit float decoder, encoder front end and rANS group
//!   encoder for AVX2;
//! - `avx512`: the same for AVX-512F and VBMI, the `ints` decoder and the helpers of
//!   `changes` and hot swap's exponent fixes;
//! - `planes`: the packed-delta product (`crate::packed`) for AVX-512F and for AVX2 with FMA;
//! - `tables`: the plain-Rust decode tables and parameter types both vector files share;
//! - [`simd_dispatch!`](crate::float::simd_dispatch): the lossy codecs' loops compiled for
//!   AVX-512 or AVX2 where the CPU has them.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod planes;
mod tables;

pub(crate) use tables::{Contexts, Parts};

use crate::bits::BitWriter;
use crate::error::DecodeError;
use crate::rans::{EncoderTables, Model, INTERLEAVE as STATES};

/// The widest family of vector code a call may run; every family gives the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Scalar loops only, on any CPU: the reference the vector paths are held to.
    Portable,
    /// AVX2 paths where the CPU has AVX2, else portable.
    Avx2,
    /// AVX-512 paths where the CPU has the subsets each needs, else AVX2, else portable.
    Avx512,
}

impl Kernel {
    /// The widest kernels, what production code runs.
    pub const WIDEST: Kernel = Kernel::Avx512;

    /// Every kernel, narrowest first.
    pub const ALL: [Kernel; 3] = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512];

    /// Whether this CPU runs this kernel's own paths (the portable one always does); where it
    /// does not, a call allowing it runs the next narrower one.
    pub fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => avx512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// The product of a packed delta's planes with prepared activations, for the view's `nr`
/// rows, with the widest vector path `kernel` allows (`y[b][i] +=`, `y` is `n x nr`); false
/// when none ran and the caller runs the portable loop.
#[inline]
pub(crate) fn planes_matmul(
    kernel: Kernel,
    view: &crate::packed::PlanesView,
    a: &crate::packed::Activations,
    nr: usize,
    y: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if kernel >= Kernel::Avx512 && !a.xb.is_empty() && planes::available_bf16() {
            planes::matmul_bf16(view, a, nr, y);
            return true;
        }
        if kernel >= Kernel::Avx512 && planes::available512() {
            planes::matmul512(view, a, nr, y);
            return true;
        }
        if kernel >= Kernel::Avx2 && planes::available256() {
            planes::matmul256(view, a, nr, y);
            return true;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, view, a, nr, y);
    false
}

/// Whether [`planes_matmul`] takes the sign forms' activations as bf16 dot products on this
/// CPU (with [`Kernel::Avx512`]): their sums then run in another order than the portable loop's.
pub fn planes_bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return planes::available_bf16();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The exact encoder's per-element work for a chunk of 16-bit floats (tokens into `tok`,
/// contexts into `ctx`, raw bits into `bits`, counts into the four sub-histograms `sub` of
/// `nctx * stride` each) over a prefix of the chunk; returns the prefix's length in elements
/// (0: no vector path ran, the caller does it all). `bins` is scratch.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn exact_front16(
    kernel: Kernel,
    contexts: &Contexts,
    pred: &[u8],
    target: &[u8],
    tok: &mut [u8],
    ctx: &mut [u8],
    bins: &mut Vec<u16>,
    sub: &mut [u32],
    nctx: usize,
    stride: usize,
    bits: &mut BitWriter,
) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let n = tok.len();
        if kernel >= Kernel::Avx512 && avx512::available() {
            let done = n / STATES * STATES;
            bins.resize(done, 0);
            let bins = &mut bins[..];
            avx512::front16(contexts, pred, target, tok, ctx, bins, stride, bits);
            let rows = nctx * stride;
            for b4 in bins.chunks_exact(4) {
                for (j, &b) in b4.iter().enumerate() {
                    sub[j * rows + b as usize] += 1;
                }
            }
            return done;
        }
        if kernel >= Kernel::Avx2 && avx2::available() {
            return avx2::front16(contexts, pred, target, tok, ctx, sub, nctx, stride, bits);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, contexts, pred, target, tok, ctx, bins, sub, nctx, stride, bits);
    0
}

/// Whether [`exact_decode16`] runs a vector decoder for `kernel` on this CPU.
#[inline]
pub(crate) fn exact_decode16_available(kernel: Kernel) -> bool {
    // AVX2 gates both decoders, as it always has: a CPU with AVX-512 has AVX2.
    kernel >= Kernel::Avx2 && Kernel::Avx2.available()
}

/// Decodes a chunk of 16-bit floats with the widest vector decoder `kernel` allows; only
/// where [`exact_decode16_available`].
#[inline]
pub(crate) fn exact_decode16(kernel: Kernel, parts: &Parts, pred: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    #[cfg(target_arch = "x86_64")]
    {
        if kernel >= Kernel::Avx512 && avx512::available() {
            return avx512::decode16(parts, pred, out);
        }
        avx2::decode16(parts, pred, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, parts, pred, out);
        unreachable!("no vector decoder on this target")
    }
}

/// Whether [`exact_decode16_in_place`] runs on this CPU.
#[inline]
pub(crate) fn exact_decode16_in_place_available() -> bool {
    Kernel::Avx512.available()
}

/// Decodes a chunk of 16-bit floats over its prediction in `buf`; only where
/// [`exact_decode16_in_place_available`].
#[inline]
pub(crate) fn exact_decode16_in_place(parts: &Parts, buf: &mut [u8]) -> Result<(), DecodeError> {
    #[cfg(target_arch = "x86_64")]
    {
        avx512::decode16_in_place(parts, buf)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (parts, buf);
        unreachable!("no vector decoder on this target")
    }
}

/// Encodes whole groups of sixteen symbols into the rANS states as `rans::encode`'s scalar
/// loop would; false if no vector path ran (nothing was touched).
#[inline]
pub(crate) fn rans_encode_groups(
    kernel: Kernel,
    tables: &EncoderTables,
    symbols: &[u8],
    contexts: &[u8],
    words: &mut [u16],
    len: &mut usize,
    st: &mut [u32; STATES],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if kernel >= Kernel::Avx512 && avx512::available() {
            avx512::encode_groups(tables, symbols, contexts, words, len, st);
            return true;
        }
        if kernel >= Kernel::Avx2 && avx2::available() {
            avx2::encode_groups(tables, symbols, contexts, words, len, st);
            return true;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, tables, symbols, contexts, words, len, st);
    false
}

/// The group encoder [`rans::encode`](crate::rans::encode) takes, for `kernel`:
/// [`rans_encode_groups`].
// The closure's type is spelled out where `rans::encode` takes it; an alias would hide it.
#[allow(clippy::type_complexity)]
#[inline]
pub(crate) fn rans_groups(
    kernel: Kernel,
) -> impl FnOnce(&EncoderTables, &[u8], &[u8], &mut [u16], &mut usize, &mut [u32; STATES]) -> bool {
    move |tables, symbols, contexts, words, len, st| {
        rans_encode_groups(kernel, tables, symbols, contexts, words, len, st)
    }
}

/// Decodes an `ints` stream's values with the vector decoder where `kernel`, the CPU and the
/// model allow it; `None` if it did not run.
#[inline]
pub(crate) fn ints_decode_values(
    kernel: Kernel,
    model: &Model,
    contexts: &[u8],
    words: &[u8],
    raw: &[u8],
    out: &mut [u64],
) -> Option<Result<(), DecodeError>> {
    #[cfg(target_arch = "x86_64")]
    if kernel >= Kernel::Avx512 && avx512::available() && avx512::model_fits(model) {
        return Some(avx512::decode_values(model, contexts, words, raw, out));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, model, contexts, words, raw, out);
    None
}

/// Adds (or, if `back`, subtracts) the zigzagged differences `diffs` to the 16-bit floats of
/// `buf` at `positions` as `changes` does, calling `seen` for each element whose bits in
/// `field` changed; returns how many changes it applied (0 where no vector path ran), the
/// rest being the caller's.
#[inline]
pub(crate) fn changes_shift16(
    kernel: Kernel,
    positions: &[u32],
    diffs: &[u64],
    buf: &mut [u8],
    back: bool,
    field: u16,
    seen: &mut impl FnMut(usize, u64, u64),
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if kernel >= Kernel::Avx512 && avx512::f_available() {
        return avx512::shift16(positions, diffs, buf, back, field, seen);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, positions, diffs, buf, back, field, seen);
    0
}

/// The contexts of the 16-bit floats of `pred` at `positions`, into `out` (cleared); false
/// if no vector path ran.
#[inline]
pub(crate) fn changes_contexts16(
    kernel: Kernel,
    contexts: &Contexts,
    pred: &[u8],
    positions: &[u32],
    out: &mut Vec<u8>,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel >= Kernel::Avx512 && avx512::available() {
        avx512::contexts16(contexts, pred, positions, out);
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, contexts, pred, positions, out);
    false
}

/// Whether [`differing16`] runs on this CPU.
#[inline]
pub(crate) fn differing16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512::bw_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which of 64 16-bit elements differ between `a` and `b` in the bits of `field`: bit `j`
/// of the result for element `j`. Both hold 128 bytes; only where [`differing16_available`].
#[inline]
pub(crate) fn differing16(a: &[u8], b: &[u8], field: u16) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        avx512::differing16(a, b, field)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, field);
        unreachable!("differing16 needs AVX-512BW")
    }
}

/// Defines `$name::<E>(args)`, which runs `$body::<E>(args)` compiled for AVX-512 (F, BW, VL,
/// DQ) or else AVX2 when the CPU has it, else as is. The builds target baseline x86-64 (SSE2),
/// where the f64 loops of the lossy codecs vectorise two values wide at best; `$body` and what
/// it inlines get wider registers and conversions (AVX-512 made a `quant` make 10 % faster than
/// AVX2). The arithmetic is the same IEEE operations in every build (no fused multiply-add),
/// so results are identical bit for bit.
#[doc(hidden)]
#[macro_export]
macro_rules! __simd_dispatch {
    ($(#[$m:meta])* fn $name:ident => $body:ident($($arg:ident: $t:ty),*) -> $ret:ty) => {
        $(#[$m])*
        fn $name<E: $crate::float::Elem>($($arg: $t),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
                fn wider<E: $crate::float::Elem>($($arg: $t),*) -> $ret {
                    $body::<E>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has these AVX-512 subsets, checked just above.
                    return unsafe { wider::<E>($($arg),*) };
                }
                #[target_feature(enable = "avx2")]
                fn wide<E: $crate::float::Elem>($($arg: $t),*) -> $ret {
                    $body::<E>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { wide::<E>($($arg),*) };
                }
            }
            $body::<E>($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests;
