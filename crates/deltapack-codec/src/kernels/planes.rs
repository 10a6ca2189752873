//! The packed-delta product (`crate::packed`) in vectors:
//! - AVX-512 BF16, for the sign forms and quant codes of up to 5 bits: per 32 weights the
//!   planes' 32-bit masks select ±1 or 0 (sign forms) or add up offset-binary codes that a
//!   32-entry table turns into bf16 (quant), and one `vdpbf16ps` per activation row takes
//!   them: 32 weights an instruction, the selection shared by every row of the batch;
//! - AVX-512F, for the others (and CPUs without BF16): one masked add per 16 weights and
//!   plane, the plane's bits being the mask;
//! - AVX2 with FMA: a mask built from each byte of bits, then an `and` and an add per 8
//!   weights.
//!
//! The AVX-512F and AVX2 paths keep the portable loop's sixteen lanes (AVX2 as two halves of
//! eight) and its order of operations (masked sums per lane, the planes' weights and the
//! constant by fused multiply-add, the scale, then the lanes added by halves), so they compute
//! the very same values as `packed::planes_portable`; the BF16 path sums the same terms (the
//! activations are rounded to bf16 on every path for those kinds) in pairs of columns.
//!
//! Tiles of `R` weight rows by `B` activation rows keep `R x B` independent sums in flight,
//! so a batch of one still hides the adds' latency; each plane word is read once per tile
//! and each activation vector once per tile row.

#![cfg(target_arch = "x86_64")]
// The tiles index arrays of registers by row and batch position: index loops say it best;
// `walk!`'s tile heights may be 1, where its bound checks read `i0 + 1 <= nr`.
#![allow(clippy::needless_range_loop, clippy::int_plus_one)]

use std::arch::x86_64::*;

use crate::packed::{Activations, PlanesKind, PlanesView, LANES};

/// True if this CPU runs [`matmul512`].
pub fn available512() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// True if this CPU runs [`matmul256`].
pub fn available256() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Checks what the tiles' unchecked loads rely on.
fn check(v: &PlanesView, a: &Activations, nr: usize, y: &[f32]) {
    assert!(v.bits.len() >= nr * v.planes * v.words && v.scales.len() >= nr * v.groups());
    assert!(a.width == 64 * v.words && a.x.len() >= a.n * a.width && a.sums.len() >= a.n * v.groups() * LANES);
    assert!(v.group_words > 0 && v.words.is_multiple_of(v.group_words) && y.len() >= a.n * nr);
}

/// `y[b][i] += row i's product with activation row b` for the view's `nr` rows (AVX-512F).
pub fn matmul512(v: &PlanesView, a: &Activations, nr: usize, y: &mut [f32]) {
    assert!(available512());
    check(v, a, nr, y);
    // SAFETY: AVX-512F is available (checked above); the tiles read within the bounds
    // `check` asserted (see `tile512`).
    unsafe { run512(v, a, nr, y) }
}

/// `y[b][i] += row i's product with activation row b` for the view's `nr` rows (AVX2, FMA).
pub fn matmul256(v: &PlanesView, a: &Activations, nr: usize, y: &mut [f32]) {
    assert!(available256());
    check(v, a, nr, y);
    // SAFETY: AVX2 and FMA are available (checked above); the tiles read within the bounds
    // `check` asserted (see `tile256`).
    unsafe { run256(v, a, nr, y) }
}

/// Walks the batch in tiles of 4 (where `$r4 > 0`), 2 or 1 rows of activations, the weight
/// rows in tiles of `$r4`, `$r2` or `$r1` rows respectively (as many as the registers hold),
/// then single rows.
macro_rules! walk {
    ($tile:ident, $v:expr, $a:expr, $nr:expr, $y:expr, $r4:literal, $r2:literal, $r1:literal) => {{
        let (v, a, nr, y) = ($v, $a, $nr, $y);
        let mut b0 = 0;
        while b0 < a.n {
            let bt = match a.n - b0 {
                left if left >= 4 && $r4 > 0 => 4,
                left if left >= 2 => 2,
                _ => 1,
            };
            let mut i0 = 0;
            match bt {
                4 => {
                    while $r4 > 0 && i0 + $r4 <= nr {
                        $tile::<$r4, 4>(v, a, nr, y, i0, b0);
                        i0 += $r4;
                    }
                }
                2 => {
                    while i0 + $r2 <= nr {
                        $tile::<$r2, 2>(v, a, nr, y, i0, b0);
                        i0 += $r2;
                    }
                }
                _ => {
                    while i0 + $r1 <= nr {
                        $tile::<$r1, 1>(v, a, nr, y, i0, b0);
                        i0 += $r1;
                    }
                }
            }
            while i0 < nr {
                match bt {
                    4 => $tile::<1, 4>(v, a, nr, y, i0, b0),
                    2 => $tile::<1, 2>(v, a, nr, y, i0, b0),
                    _ => $tile::<1, 1>(v, a, nr, y, i0, b0),
                }
                i0 += 1;
            }
            b0 += bt;
        }
    }};
}

#[target_feature(enable = "avx512f")]
unsafe fn run512(v: &PlanesView, a: &Activations, nr: usize, y: &mut [f32]) {
    walk!(tile512, v, a, nr, y, 2, 4, 8)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn run256(v: &PlanesView, a: &Activations, nr: usize, y: &mut [f32]) {
    walk!(tile256, v, a, nr, y, 0, 1, 2)
}

/// Rows `i0..i0 + R` by activation rows `b0..b0 + B`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile512<const R: usize, const B: usize>(
    v: &PlanesView,
    a: &Activations,
    nr: usize,
    y: &mut [f32],
    i0: usize,
    b0: usize,
) {
    let (groups, gw) = (v.groups(), v.group_words);
    prefetch_next(v, i0 + R, R);
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; B]; R];
    for g in 0..groups {
        let mut t = [[zero; B]; R];
        for p in 0..v.planes {
            let mut m = [[zero; B]; R];
            // Each row's plane as 16-bit masks: on x86 (little-endian) mask `4w + q` is
            // bits `16q..16q + 16` of word `w`, columns `64w + 16q..`.
            let masks: [*const __mmask16; R] = std::array::from_fn(|r| v.plane(i0 + r, p).as_ptr().cast());
            for w in g * gw..(g + 1) * gw {
                for q in 0..4 {
                    // SAFETY: `w < words` and `q < 4`, so the 16 floats at `64w + 16q` lie
                    // within the row of `width = 64 * words` floats, and rows `b0 + bb < n`
                    // lie within `x` (asserted by `check`).
                    let xs: [__m512; B] = std::array::from_fn(|bb| unsafe {
                        _mm512_loadu_ps(a.x.as_ptr().add((b0 + bb) * a.width + 64 * w + 16 * q))
                    });
                    for r in 0..R {
                        // SAFETY: mask `4w + q < 4 * words` lies within the plane's words.
                        let k = unsafe { _load_mask16(masks[r].add(4 * w + q)) };
                        for bb in 0..B {
                            m[r][bb] = _mm512_mask_add_ps(m[r][bb], k, m[r][bb], xs[bb]);
                        }
                    }
                }
            }
            let wp = _mm512_set1_ps(v.weights[p]);
            for r in 0..R {
                for bb in 0..B {
                    t[r][bb] = _mm512_fmadd_ps(wp, m[r][bb], t[r][bb]);
                }
            }
        }
        if v.constant != 0.0 {
            let c = _mm512_set1_ps(v.constant);
            for bb in 0..B {
                let s = &a.sums[((b0 + bb) * groups + g) * LANES..][..LANES];
                // SAFETY: `s` holds 16 floats.
                let s = unsafe { _mm512_loadu_ps(s.as_ptr()) };
                for r in 0..R {
                    t[r][bb] = _mm512_fmadd_ps(c, s, t[r][bb]);
                }
            }
        }
        add_scaled(&mut acc, &t, v, i0, g);
    }
    add_sums(&acc, y, nr, i0, b0);
}

/// `acc[r][b] += scale(row i0 + r, group g) * t[r][b]`: a group's sums, scaled into the
/// tile's accumulators.
#[target_feature(enable = "avx512f")]
#[inline]
fn add_scaled<const R: usize, const B: usize>(
    acc: &mut [[__m512; B]; R],
    t: &[[__m512; B]; R],
    v: &PlanesView,
    i0: usize,
    g: usize,
) {
    for r in 0..R {
        let s = _mm512_set1_ps(v.scales[(i0 + r) * v.groups() + g]);
        for bb in 0..B {
            acc[r][bb] = _mm512_fmadd_ps(s, t[r][bb], acc[r][bb]);
        }
    }
}

/// Adds each accumulator's lanes to its output, `y[b0 + b][i0 + r]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn add_sums<const R: usize, const B: usize>(acc: &[[__m512; B]; R], y: &mut [f32], nr: usize, i0: usize, b0: usize) {
    for r in 0..R {
        for bb in 0..B {
            y[(b0 + bb) * nr + i0 + r] += sum512(acc[r][bb]);
        }
    }
}

/// The bf16 activations of rows `b0..b0 + B`, columns `32m..32m + 32`; the callers keep
/// `m < 2 * words` and `b0 + B <= n`, which `matmul_bf16` checked `xb` against.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
fn load_bf16<const B: usize>(a: &Activations, b0: usize, m: usize) -> [__m512bh; B] {
    debug_assert!(32 * (m + 1) <= a.width && (b0 + B) * a.width <= a.xb.len());
    std::array::from_fn(|bb| {
        // SAFETY: the 32 values at row `b0 + bb`, column `32m` lie within `xb` (see above);
        // `__m512i` and `__m512bh` are both 512 bits.
        unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                a.xb.as_ptr().add((b0 + bb) * a.width + 32 * m).cast(),
            ))
        }
    })
}

/// Asks for the planes of rows `first..first + count` ahead of their tile: a tile's rows
/// span a 4 KiB page or more, and the hardware prefetchers stop at page boundaries, so
/// without this every tile would start with a wait on memory.
#[inline(always)]
fn prefetch_next(v: &PlanesView, first: usize, count: usize) {
    let start = (first * v.planes * v.words).min(v.bits.len());
    let end = ((first + count) * v.planes * v.words).min(v.bits.len());
    for word in v.bits[start..end].iter().step_by(8) {
        // SAFETY: a prefetch reads nothing the program sees and cannot fault; the address is
        // within `bits` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((word as *const u64).cast()) };
    }
}

/// The lanes' sum, halves added pairwise (the order of `packed::lane_sum`).
#[target_feature(enable = "avx512f")]
#[inline]
fn sum512(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    sum256(_mm256_add_ps(lo, hi))
}

/// Eight lanes' sum, halves added pairwise.
#[target_feature(enable = "avx")]
#[inline]
fn sum256(v: __m256) -> f32 {
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)))
}

/// Rows `i0..i0 + R` by activation rows `b0..b0 + B`, sixteen lanes as two halves of eight.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile256<const R: usize, const B: usize>(
    v: &PlanesView,
    a: &Activations,
    nr: usize,
    y: &mut [f32],
    i0: usize,
    b0: usize,
) {
    let (groups, gw) = (v.groups(), v.group_words);
    prefetch_next(v, i0 + R, R);
    let zero = _mm256_setzero_ps();
    let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let mut acc = [[[zero; 2]; B]; R];
    for g in 0..groups {
        let mut t = [[[zero; 2]; B]; R];
        for p in 0..v.planes {
            let mut m = [[[zero; 2]; B]; R];
            for w in g * gw..(g + 1) * gw {
                let words: [u64; R] = std::array::from_fn(|r| v.plane(i0 + r, p)[w]);
                for e in 0..8 {
                    // SAFETY: `w < words` and `e < 8`, so the 8 floats at `64w + 8e` lie
                    // within the row, and rows `b0 + bb < n` within `x` (see `check`).
                    let xs: [__m256; B] = std::array::from_fn(|bb| unsafe {
                        _mm256_loadu_ps(a.x.as_ptr().add((b0 + bb) * a.width + 64 * w + 8 * e))
                    });
                    for r in 0..R {
                        let byte = _mm256_set1_epi32(((words[r] >> (8 * e)) & 0xff) as i32);
                        let mask = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), bit));
                        for bb in 0..B {
                            let h = &mut m[r][bb][e & 1];
                            *h = _mm256_add_ps(*h, _mm256_and_ps(mask, xs[bb]));
                        }
                    }
                }
            }
            let wp = _mm256_set1_ps(v.weights[p]);
            for r in 0..R {
                for bb in 0..B {
                    for h in 0..2 {
                        t[r][bb][h] = _mm256_fmadd_ps(wp, m[r][bb][h], t[r][bb][h]);
                    }
                }
            }
        }
        if v.constant != 0.0 {
            let c = _mm256_set1_ps(v.constant);
            for bb in 0..B {
                let s = &a.sums[((b0 + bb) * groups + g) * LANES..][..LANES];
                for h in 0..2 {
                    // SAFETY: `s` holds 16 floats.
                    let sh = unsafe { _mm256_loadu_ps(s.as_ptr().add(8 * h)) };
                    for r in 0..R {
                        t[r][bb][h] = _mm256_fmadd_ps(c, sh, t[r][bb][h]);
                    }
                }
            }
        }
        for r in 0..R {
            let s = _mm256_set1_ps(v.scales[(i0 + r) * groups + g]);
            for bb in 0..B {
                for h in 0..2 {
                    acc[r][bb][h] = _mm256_fmadd_ps(s, t[r][bb][h], acc[r][bb][h]);
                }
            }
        }
    }
    for r in 0..R {
        for bb in 0..B {
            let [lo, hi] = acc[r][bb];
            y[(b0 + bb) * nr + i0 + r] += sum256(_mm256_add_ps(lo, hi));
        }
    }
}

/// True if this CPU runs [`matmul_bf16`].
pub fn available_bf16() -> bool {
    available512() && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512bf16")
}

/// `y[b][i] +=` row i's product with activation row b, for the sign forms (binary, ternary)
/// with their activations as bf16: each plane's 32-bit mask selects ±1 (or 0) as bf16, and one
/// dot-product instruction takes 32 weights of a row against one activation row. The same
/// values as the other paths up to the order of the sums.
pub fn matmul_bf16(v: &PlanesView, a: &Activations, nr: usize, y: &mut [f32]) {
    assert!(available_bf16());
    check(v, a, nr, y);
    assert!(a.xb.len() >= a.n * a.width);
    match v.kind {
        PlanesKind::Binary | PlanesKind::Ternary => {
            assert_eq!(v.group_words, v.words);
            // SAFETY: AVX-512F, BW and BF16 are available (checked above); the tiles read
            // within the bounds asserted here and by `check` (see `tile_bf16`).
            unsafe { run_bf16(v, a, nr, y) }
        }
        PlanesKind::Quant { bits } => {
            assert!(bits <= MAX_TABLE_BITS && v.planes == bits as usize);
            // SAFETY: as above (see `tile_quant_bf16`).
            unsafe { run_quant_bf16(v, a, nr, y) }
        }
    }
}

/// The widest quant codes the bf16 path takes: their offset-binary values index a table of
/// 32 bf16 values, one vector.
pub const MAX_TABLE_BITS: u8 = 5;

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn run_bf16(v: &PlanesView, a: &Activations, nr: usize, y: &mut [f32]) {
    walk!(tile_bf16, v, a, nr, y, 4, 8, 8)
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn run_quant_bf16(v: &PlanesView, a: &Activations, nr: usize, y: &mut [f32]) {
    walk!(tile_quant_bf16, v, a, nr, y, 2, 4, 8)
}

/// Quant rows `i0..i0 + R` by activation rows `b0..b0 + B`: per 32 columns, the planes'
/// masks add up each code's offset-binary value (one masked add per plane), a table lookup
/// turns those into the codes as bf16, and one dot product per activation row takes them;
/// each group's sum is then scaled by its step.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile_quant_bf16<const R: usize, const B: usize>(
    v: &PlanesView,
    a: &Activations,
    nr: usize,
    y: &mut [f32],
    i0: usize,
    b0: usize,
) {
    prefetch_next(v, i0 + R, R);
    let offset = -v.constant;
    let values: [u16; 32] = std::array::from_fn(|k| half::bf16::from_f32(k as f32 - offset).to_bits());
    // SAFETY: `values` holds 32 u16, one vector.
    let table = unsafe { _mm512_loadu_si512(values.as_ptr().cast()) };
    let steps: [__m512i; MAX_TABLE_BITS as usize] = std::array::from_fn(|p| _mm512_set1_epi16(1 << p));
    let (groups, gw) = (v.groups(), v.group_words);
    let masks: [[*const __mmask32; MAX_TABLE_BITS as usize]; R] =
        std::array::from_fn(|r| std::array::from_fn(|p| v.plane(i0 + r, p.min(v.planes - 1)).as_ptr().cast()));
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    for g in 0..groups {
        let mut t = [[_mm512_setzero_ps(); B]; R];
        for m in 2 * g * gw..2 * (g + 1) * gw {
            let xs = load_bf16::<B>(a, b0, m);
            for r in 0..R {
                let mut index = _mm512_setzero_si512();
                for (p, step) in steps.iter().enumerate().take(v.planes) {
                    // SAFETY: mask `m < 2 * words` lies within plane `p`'s words.
                    let k = unsafe { _load_mask32(masks[r][p].add(m)) };
                    index = _mm512_mask_add_epi16(index, k, index, *step);
                }
                let w = std::mem::transmute::<__m512i, __m512bh>(_mm512_permutexvar_epi16(index, table));
                for bb in 0..B {
                    t[r][bb] = _mm512_dpbf16_ps(t[r][bb], w, xs[bb]);
                }
            }
        }
        add_scaled(&mut acc, &t, v, i0, g);
    }
    add_sums(&acc, y, nr, i0, b0);
}

/// Rows `i0..i0 + R` by activation rows `b0..b0 + B`, 32 columns a step.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile_bf16<const R: usize, const B: usize>(
    v: &PlanesView,
    a: &Activations,
    nr: usize,
    y: &mut [f32],
    i0: usize,
    b0: usize,
) {
    prefetch_next(v, i0 + R, R);
    let (plus, minus, zero) = (
        _mm512_set1_epi16(0x3f80),
        _mm512_set1_epi16(0xbf80u16 as i16),
        _mm512_setzero_si512(),
    );
    let ternary = v.kind == PlanesKind::Ternary;
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    // A plane's 32-bit masks: on x86 (little-endian) mask `2w + h` is bits `32h..32h + 32` of
    // word `w`, columns `64w + 32h..`.
    let pos: [*const __mmask32; R] = std::array::from_fn(|r| v.plane(i0 + r, 0).as_ptr().cast());
    let neg: [*const __mmask32; R] = std::array::from_fn(|r| v.plane(i0 + r, ternary as usize).as_ptr().cast());
    for m in 0..2 * v.words {
        let xs = load_bf16::<B>(a, b0, m);
        for r in 0..R {
            // SAFETY: mask `m < 2 * words` lies within the plane's words.
            let kp = unsafe { _load_mask32(pos[r].add(m)) };
            let w = if ternary {
                // SAFETY: as above, for the negative plane.
                let kn = unsafe { _load_mask32(neg[r].add(m)) };
                _mm512_mask_mov_epi16(_mm512_mask_mov_epi16(zero, kp, plus), kn, minus)
            } else {
                _mm512_mask_blend_epi16(kp, minus, plus)
            };
            let w = std::mem::transmute::<__m512i, __m512bh>(w);
            for bb in 0..B {
                acc[r][bb] = _mm512_dpbf16_ps(acc[r][bb], w, xs[bb]);
            }
        }
    }
    for r in 0..R {
        let s = v.scales[i0 + r];
        for bb in 0..B {
            y[(b0 + bb) * nr + i0 + r] += s * sum512(acc[r][bb]);
        }
    }
}
