//! The packed forms against a dense f64 reference, and every kernel path against the portable
//! one (the same values, bit for bit), on odd shapes and batch sizes of 1 to 300 rows.

use proptest::prelude::*;

use super::*;

/// A xorshift stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn codes(kind: PlanesKind, n: usize, rng: &mut Rng) -> Vec<i8> {
    (0..n)
        .map(|_| match kind {
            PlanesKind::Binary => [-1i8, 1][(rng.next() & 1) as usize],
            PlanesKind::Ternary => (rng.next() % 3) as i8 - 1,
            PlanesKind::Quant { bits } => {
                let q = (1i64 << (bits - 1)) - 1;
                ((rng.next() % (2 * q as u64 + 1)) as i64 - q) as i8
            }
        })
        .collect()
}

/// A random form of `kind` for `rows x cols`, with column scales for the sign forms and
/// groups of 64 columns for quant where they divide the padded row.
fn form(kind: PlanesKind, rows: usize, cols: usize, seed: u64) -> Planes {
    let mut rng = Rng(seed | 1);
    let c = codes(kind, rows * cols, &mut rng);
    let words = cols.div_ceil(64).max(1);
    match kind {
        PlanesKind::Quant { .. } => {
            let group = if words.is_multiple_of(2) { 128 } else { 64 };
            let scales = (0..rows * words * 64 / group)
                .map(|_| (half::bf16::from_f32(rng.unit().abs() * 0.01 + 1e-4)).to_bits())
                .collect();
            Planes::new(rows, cols, kind, &c, group, GroupScales::Bf16(scales), None).unwrap()
        }
        _ => {
            let r = (0..rows).map(|_| rng.unit().abs() + 0.1).collect();
            let cs = (0..cols).map(|_| rng.unit().abs() * 0.01 + 1e-3).collect();
            Planes::new(rows, cols, kind, &c, 0, GroupScales::F32(r), Some(cs)).unwrap()
        }
    }
}

fn activations(n: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9) | 1);
    (0..n * cols).map(|_| rng.unit()).collect()
}

/// `x · Δᵀ` in f64 from the form's dense values.
fn reference(p: &Packed, x: &[f32], n: usize) -> Vec<f64> {
    let (rows, cols) = (p.rows(), p.cols());
    let mut dense = vec![0f32; cols];
    let mut y = vec![0f64; n * rows];
    for i in 0..rows {
        p.row_into(i, &mut dense);
        for b in 0..n {
            y[b * rows + i] = (0..cols).map(|j| dense[j] as f64 * x[b * cols + j] as f64).sum();
        }
    }
    y
}

fn product(p: &Packed, kernel: Kernel, x: &[f32], n: usize, rows: Range<usize>) -> Vec<f32> {
    let a = p.prepare(x, n);
    let mut y = vec![0f32; n * rows.len()];
    p.matmul_add(kernel, x, a.as_ref(), n, rows, &mut y);
    y
}

/// Every kernel gives the portable values bit for bit, and all are within float rounding of
/// the f64 reference (relative to the sum of magnitudes, the scale of rounding errors).
fn check(p: &Packed, n: usize, seed: u64) {
    let x = activations(n, p.cols(), seed);
    let rows = 0..p.rows();
    let want = reference(p, &x, n);
    let portable = product(p, Kernel::Portable, &x, n, rows.clone());
    let mut dense = vec![0f32; p.cols()];
    let mut mags = vec![0f64; n * p.rows()];
    for i in 0..p.rows() {
        p.row_into(i, &mut dense);
        for b in 0..n {
            mags[b * p.rows() + i] = (0..p.cols())
                .map(|j| (dense[j] as f64 * x[b * p.cols() + j] as f64).abs())
                .sum();
        }
    }
    // Sign forms and narrow quant round their activations to bf16 (2^-9 of each term at most).
    let sign = matches!(&p.form, Form::Planes(pl) if pl.kind().bf16_activations());
    let tolerance = if sign { 2f64.powi(-8) } else { 1e-5 };
    for ((&got, &want), &mag) in portable.iter().zip(&want).zip(&mags) {
        assert!(
            (got as f64 - want).abs() <= tolerance * mag + 1e-30,
            "{got} against {want} (sum of magnitudes {mag})"
        );
    }
    for k in [Kernel::Avx2, Kernel::Avx512] {
        if !k.available() {
            eprintln!("skipping the {k:?} kernel: this CPU lacks it");
            continue;
        }
        let got = product(p, k, &x, n, rows.clone());
        if sign && k == Kernel::Avx512 && crate::kernels::planes_bf16_available() {
            // bf16 dot products: the same terms, summed in pairs of columns.
            for ((&g, &w), &mag) in got.iter().zip(&portable).zip(&mags) {
                assert!(
                    (g as f64 - w as f64).abs() <= 1e-4 * mag + 1e-30,
                    "{k:?}: {g} against {w}"
                );
            }
            continue;
        }
        assert!(
            got.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{k:?} differs from the portable loop"
        );
    }
}

const KINDS: [PlanesKind; 5] = [
    PlanesKind::Binary,
    PlanesKind::Ternary,
    PlanesKind::Quant { bits: 2 },
    PlanesKind::Quant { bits: 4 },
    PlanesKind::Quant { bits: 8 },
];

#[test]
fn every_form_and_kernel_matches_the_dense_product_on_odd_shapes() {
    for (k, kind) in KINDS.into_iter().enumerate() {
        for (rows, cols) in [(1, 1), (7, 63), (9, 65), (33, 130), (17, 256)] {
            for n in [1, 2, 3, 5, 64] {
                let p = Packed {
                    form: Form::Planes(form(kind, rows, cols, (k * 1000 + rows * 10 + cols) as u64)),
                    residual: None,
                };
                check(&p, n, (rows * cols + n) as u64);
            }
        }
    }
}

#[test]
fn prefill_batches_of_300_rows() {
    for kind in [PlanesKind::Binary, PlanesKind::Quant { bits: 4 }] {
        let p = Packed {
            form: Form::Planes(form(kind, 24, 200, 7)),
            residual: None,
        };
        check(&p, 300, 3);
    }
}

#[test]
fn sparse_forms_and_residuals_add_their_entries() {
    let mut rng = Rng(99);
    let (rows, cols) = (13, 70);
    let entries: Vec<(u32, u32, f32)> = (0..rows as u32)
        .flat_map(|i| (0..cols as u32).map(move |j| (i, j)))
        .filter(|_| rng.next().is_multiple_of(7))
        .map(|(i, j)| (i, j, (i as f32 - j as f32) * 1e-3))
        .collect();
    let sparse = Sparse::new(rows, cols, &entries).unwrap();
    assert_eq!(sparse.len(), entries.len());
    check(
        &Packed {
            form: Form::Sparse(sparse.clone()),
            residual: None,
        },
        4,
        1,
    );
    let p = Packed {
        form: Form::Planes(form(PlanesKind::Ternary, rows, cols, 5)),
        residual: Some(sparse),
    };
    check(&p, 3, 2);
    // The residual's entries are in the dense rows.
    let (mut with, mut without) = (vec![0f32; cols], vec![0f32; cols]);
    p.row_into(4, &mut with);
    Packed {
        residual: None,
        ..p.clone()
    }
    .row_into(4, &mut without);
    let (i, j, v) = *entries.iter().find(|e| e.0 == 4).unwrap();
    assert_eq!(i, 4);
    assert_eq!(with[j as usize], without[j as usize] + v);
}

#[test]
fn row_ranges_compute_what_the_whole_computes() {
    let p = Packed {
        form: Form::Planes(form(PlanesKind::Binary, 150, 100, 11)),
        residual: None,
    };
    let x = activations(3, 100, 4);
    let whole = product(&p, Kernel::WIDEST, &x, 3, 0..150);
    let part = product(&p, Kernel::WIDEST, &x, 3, 70..150);
    for b in 0..3 {
        assert_eq!(&whole[b * 150 + 70..(b + 1) * 150], &part[b * 80..(b + 1) * 80]);
    }
}

#[test]
fn sizes_are_a_bit_per_weight_and_plane() {
    let p = form(PlanesKind::Binary, 4096, 4096, 1);
    let bits = 8.0 * p.bytes() as f64 / (4096.0 * 4096.0);
    assert!(bits < 1.02, "{bits} bits per weight");
    let q = form(PlanesKind::Quant { bits: 4 }, 256, 4096, 1);
    let bits = 8.0 * q.bytes() as f64 / (256.0 * 4096.0);
    assert!((4.0..4.2).contains(&bits), "{bits} bits per weight");
}

#[test]
fn inconsistent_parts_are_refused() {
    let c = vec![1i8; 10];
    let s = || GroupScales::F32(vec![1.0; 2]);
    assert!(Planes::new(2, 5, PlanesKind::Binary, &c, 0, s(), None).is_ok());
    assert!(Planes::new(2, 5, PlanesKind::Binary, &c[..9], 0, s(), None).is_err());
    assert!(Planes::new(2, 5, PlanesKind::Binary, &c, 32, s(), None).is_err());
    assert!(Planes::new(2, 5, PlanesKind::Binary, &c, 0, GroupScales::F32(vec![1.0]), None).is_err());
    assert!(Planes::new(2, 5, PlanesKind::Binary, &c, 0, s(), Some(vec![1.0; 4])).is_err());
    assert!(Planes::new(2, 5, PlanesKind::Binary, &[0; 10], 0, s(), None).is_err());
    assert!(Planes::new(2, 5, PlanesKind::Quant { bits: 2 }, &[2; 10], 0, s(), None).is_err());
    assert!(Sparse::new(2, 5, &[(1, 0, 1.0), (0, 1, 1.0)]).is_err());
    assert!(Sparse::new(2, 5, &[(0, 5, 1.0)]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn kernels_agree_on_random_shapes(kind in 0usize..5, rows in 1usize..40, cols in 1usize..300, n in 1usize..12, seed in 0u64..1000) {
        let p = Packed { form: Form::Planes(form(KINDS[kind], rows, cols, seed)), residual: None };
        check(&p, n, seed);
    }
}
