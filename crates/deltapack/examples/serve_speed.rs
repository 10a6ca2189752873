//! The packed-delta products at 4096 x 4096 without Python in the way: medians of
//! `deltapack::serve::matmul` over 32 distinct random forms rotated through the loop (64 MiB
//! of binary planes, more than the last-level cache), for 1, 8 and 64 activation rows, on one
//! thread and on all. `scripts/bench_serve.py` measures the same through `deltapack.torch`,
//! beside torch's dense product and the memory floor.
//!
//! `cargo run --release -p deltapack --example serve_speed`

use std::time::Instant;

use deltapack_codec::packed::{Form, GroupScales, Packed, Planes, PlanesKind};

const N: usize = 4096;
const FORMS: usize = 32;

fn forms(kind: PlanesKind, seed: u64) -> Vec<Packed> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..FORMS)
        .map(|_| {
            let codes: Vec<i8> = (0..N * N)
                .map(|_| match kind {
                    PlanesKind::Binary => [-1, 1][(next() & 1) as usize],
                    PlanesKind::Ternary => (next() % 3) as i8 - 1,
                    PlanesKind::Quant { .. } => (next() % 15) as i8 - 7,
                })
                .collect();
            let (group, scales) = match kind {
                PlanesKind::Quant { .. } => (128, GroupScales::Bf16(vec![0x3c00; N * N / 128])),
                _ => (0, GroupScales::F32(vec![1.0; N])),
            };
            let planes = Planes::new(N, N, kind, &codes, group, scales, Some(vec![1.0; N])).expect("valid form");
            Packed {
                form: Form::Planes(planes),
                residual: None,
            }
        })
        .collect()
}

fn main() {
    for (name, kind) in [
        ("binary", PlanesKind::Binary),
        ("ternary", PlanesKind::Ternary),
        ("quant4", PlanesKind::Quant { bits: 4 }),
    ] {
        let forms = forms(kind, 7);
        for threads in [1, rayon::current_num_threads()] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            for rows in [1usize, 8, 64] {
                let x: Vec<f32> = (0..rows * N).map(|i| (i % 7) as f32 - 3.0).collect();
                let tenants = vec![Some(0); rows];
                let mut out = vec![0f32; rows * N];
                let mut times: Vec<f64> = (0..96)
                    .map(|i| {
                        let t = Instant::now();
                        pool.install(|| deltapack::serve::matmul(&[&forms[i % FORMS]], &tenants, &x, N, &mut out))
                            .expect("shapes match");
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                println!(
                    "{name:8} rows {rows:3} threads {threads}: {:.3} ms",
                    times[times.len() / 2]
                );
            }
        }
    }
}
