//! Every kernel path against the portable one: the same bytes out of the encoders, the same
//! bytes and the same verdict out of the decoders, on random inputs and on hostile payloads
//! (bits flipped, truncated, random bytes). A kernel the CPU lacks is skipped, with a message.

use proptest::prelude::*;
use safetensors::Dtype;

use super::Kernel;
use crate::exact::{self, Scratch};
use crate::layout::layout;
use crate::{changes, ints};

/// The vector kernels this CPU runs; the others are reported as skipped.
fn vector_kernels() -> Vec<Kernel> {
    Kernel::ALL[1..]
        .iter()
        .copied()
        .filter(|&k| {
            let ok = k.available();
            if !ok {
                eprintln!("skipping the {k:?} kernel: this CPU lacks it");
            }
            ok
        })
        .collect()
}

/// Dtypes whose elements the kernels treat differently: the 16-bit floats the vector paths
/// take, and the others, which every kernel leaves to the portable loops.
const DTYPES: [Dtype; 6] = [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::I16, Dtype::U8, Dtype::F64];

/// A prediction and a target of `n` elements of `dt` from a xorshift stream: nearby 16-bit
/// floats (small differences, the vector paths' common case) or any bits for other dtypes;
/// with `sparse`, about one element in eight changed (the `changes` codec's case).
fn pair(dt: Dtype, n: usize, seed: u64, sparse: bool) -> (Vec<u8>, Vec<u8>) {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let w = layout(dt).width;
    let (mut pred, mut target) = (Vec::with_capacity(n * w), Vec::with_capacity(n * w));
    for _ in 0..n {
        if w == 2 && matches!(dt, Dtype::BF16 | Dtype::F16) {
            let b = half::bf16::from_f32((next() % 2001) as f32 / 1000.0 - 1.0).to_bits() >> (next() % 3);
            let change = if sparse && next() % 8 != 0 {
                0
            } else {
                [0u16, 1, 0xFFFF, 7, 300, 0x8000][(next() % 6) as usize]
            };
            pred.extend_from_slice(&b.to_le_bytes());
            target.extend_from_slice(&b.wrapping_add(change).to_le_bytes());
        } else {
            let b = next().to_le_bytes();
            let mut t = b;
            if !sparse || next() % 8 == 0 {
                t[0] = t[0].wrapping_add(next() as u8);
            }
            pred.extend_from_slice(&b[..w]);
            target.extend_from_slice(&t[..w]);
        }
    }
    (pred, target)
}

/// A payload made hostile as `how` says: 0 intact, 1 a bit flipped, 2 truncated, 3 random
/// bytes, 4 a random byte appended.
fn damage(mut payload: Vec<u8>, how: u8, at: usize, junk: &[u8]) -> Vec<u8> {
    match how {
        1 if !payload.is_empty() => {
            let i = at % payload.len();
            payload[i] ^= 1 << (at % 8);
        }
        2 => payload.truncate(at % (payload.len() + 1)),
        3 => payload = junk.to_vec(),
        4 => payload.push(at as u8),
        _ => {}
    }
    payload
}

proptest! {
    #[test]
    fn exact_kernels_give_the_portable_bytes(
        dt in proptest::sample::select(DTYPES.to_vec()),
        n in 0usize..2500,
        seed in any::<u64>(),
        how in 0u8..5,
        at in any::<usize>(),
        junk in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let l = layout(dt);
        let (pred, target) = pair(dt, n, seed, false);
        let portable = exact::encode_with(Kernel::Portable, l, &pred, &target, &mut Scratch::default());
        for k in vector_kernels() {
            let vector = exact::encode_with(k, l, &pred, &target, &mut Scratch::default());
            prop_assert_eq!(&vector, &portable, "{:?} encoder", k);
        }
        let payload = damage(portable, how, at, &junk);
        let mut want = vec![0u8; pred.len()];
        let verdict = exact::decode_with(Kernel::Portable, l, &pred, &payload, &mut want);
        if how == 0 {
            prop_assert!(verdict.is_ok());
            prop_assert_eq!(&want, &target);
        }
        for k in vector_kernels() {
            let mut got = vec![0u8; pred.len()];
            let r = exact::decode_with(k, l, &pred, &payload, &mut got);
            prop_assert_eq!(&r, &verdict, "{:?} decoder", k);
            if r.is_ok() {
                prop_assert_eq!(&got, &want, "{:?} decoder", k);
            }
        }
        // In place: the widest kernel (AVX-512 over the prediction where the CPU has it).
        let mut buf = pred.clone();
        let r = exact::decode_in_place(l, &payload, &mut buf);
        prop_assert_eq!(&r, &verdict, "in place");
        if r.is_ok() {
            prop_assert_eq!(&buf, &want, "in place");
        }
    }

    #[test]
    fn changes_kernels_give_the_portable_bytes(
        dt in proptest::sample::select(DTYPES.to_vec()),
        n in 1usize..3000,
        seed in any::<u64>(),
        how in 0u8..5,
        at in any::<usize>(),
        junk in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let l = layout(dt);
        let (pred, target) = pair(dt, n, seed, true);
        let payload = damage(changes::encode(l, &pred, &target), how, at, &junk);
        let mut want = vec![0u8; pred.len()];
        let verdict = changes::decode_with(Kernel::Portable, l, &pred, &payload, &mut want);
        if how == 0 {
            prop_assert!(verdict.is_ok());
            prop_assert_eq!(&want, &target);
        }
        for k in vector_kernels() {
            let mut got = vec![0u8; pred.len()];
            let r = changes::decode_with(k, l, &pred, &payload, &mut got);
            prop_assert_eq!(&r, &verdict, "{:?} decoder", k);
            if r.is_ok() {
                prop_assert_eq!(&got, &want, "{:?} decoder", k);
            }
        }
    }

    #[test]
    fn ints_kernels_give_the_portable_values(
        vals in proptest::collection::vec((any::<u64>(), 0u32..64, 0u8..6), 0..2000),
        narrow in any::<bool>(),
        how in 0u8..5,
        at in any::<usize>(),
        junk in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        // Values of up to 16 bits are the vector decoder's case; wider ones its refusal.
        let values: Vec<u64> = vals.iter().map(|&(v, b, _)| if narrow { (v as u16 >> (b % 16)) as u64 } else { v >> b }).collect();
        let contexts: Vec<u8> = vals.iter().map(|&(_, _, c)| c).collect();
        let mut stream = Vec::new();
        ints::encode(&values, &contexts, 6, &mut stream);
        let stream = damage(stream, how, at, &junk);
        for ctx in [&contexts[..], &[]] {
            let mut want = vec![0u64; values.len()];
            let mut rest = &stream[..];
            let verdict = ints::decode_with(Kernel::Portable, &mut rest, 6, 64, ctx, &mut want);
            if how == 0 && !ctx.is_empty() {
                prop_assert!(verdict.is_ok());
                prop_assert_eq!(&want, &values);
            }
            for k in vector_kernels() {
                let mut got = vec![0u64; values.len()];
                let mut input = &stream[..];
                let r = ints::decode_with(k, &mut input, 6, 64, ctx, &mut got);
                prop_assert_eq!(&r, &verdict, "{:?} decoder", k);
                prop_assert_eq!(input.len(), rest.len(), "{:?} decoder", k);
                if r.is_ok() {
                    prop_assert_eq!(&got, &want, "{:?} decoder", k);
                }
            }
        }
    }
}
