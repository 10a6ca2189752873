//! Importing deltatensors `.wdelta` files: the fixtures in tests/data/wdelta were made by the
//! real deltatensors 0.2.0 (scripts/make_wdelta_fixtures.py), with what its loader returns.
//! Each import, applied to the base, must rebuild those values bit for bit in the base's
//! dtypes; every bad input must be a clean error that leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};

use common::files;
use deltapack::checkpoint::Checkpoint;
use deltapack::import::{import_wdelta, wdelta, ImportOptions};
use deltapack::progress::NoProgress;
use deltapack::{apply, verify, ApplyOptions, Error, ErrorKind};
use safetensors::Dtype;
use sha2::Digest;

const STRATEGIES: [&str; 3] = ["int4", "sparse", "quantized"];

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/wdelta")
}

fn fixture(strategy: &str) -> PathBuf {
    data().join(format!("{strategy}.wdelta"))
}

/// float32 to bfloat16 bits, rounding to nearest-even, written independently of the library.
fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// deltatensors' float32 value stored in `dtype` as torch/numpy would cast it.
fn cast(v: f32, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => bf16_bits(v).to_le_bytes().to_vec(),
        Dtype::F16 => half::f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
        Dtype::F32 => v.to_le_bytes().to_vec(),
        Dtype::I64 => (v.trunc() as i64).to_le_bytes().to_vec(),
        d => panic!("no fixture tensor has dtype {d}"),
    }
}

fn import(strategy: &str, out: &Path) -> deltapack::Result<deltapack::MakeReport> {
    import_wdelta(
        &fixture(strategy),
        &data().join("base"),
        out,
        &ImportOptions::default(),
        &NoProgress,
    )
}

#[test]
fn imports_rebuild_deltatensors_loader_output_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = data().join("base");
    let base = Checkpoint::open(&base_dir).unwrap();
    for strategy in STRATEGIES {
        let dpk = dir.path().join(format!("{strategy}.dpk"));
        let report = import(strategy, &dpk).unwrap();
        assert_eq!(report.changed, 5, "{strategy}: five float tensors change");
        let out = dir.path().join(strategy);
        apply(&base_dir, &dpk, &out, &ApplyOptions::default(), &NoProgress).unwrap();
        verify(&base_dir, &dpk, Some(&out), &NoProgress).unwrap();
        let rebuilt = Checkpoint::open(&out).unwrap();
        let expected = Checkpoint::open(&data().join(format!("{strategy}.expected.safetensors"))).unwrap();
        assert_eq!(expected.tensors.len(), 6);
        for e in &expected.tensors {
            let r = rebuilt.tensor(&e.name).unwrap();
            let want: Vec<u8> = expected
                .bytes(e)
                .chunks_exact(4)
                .flat_map(|c| cast(f32::from_le_bytes(c.try_into().unwrap()), r.dtype))
                .collect();
            assert_eq!(rebuilt.bytes(r), want.as_slice(), "{strategy}: tensor {}", e.name);
        }
        let extra = base.tensor("extra.buffer").unwrap();
        assert_eq!(
            rebuilt.bytes(rebuilt.tensor("extra.buffer").unwrap()),
            base.bytes(extra)
        );
        let (b, r) = (files(&base_dir), files(&out));
        assert_eq!(b["config.json"], r["config.json"]);
        assert_eq!(b.keys().collect::<Vec<_>>(), r.keys().collect::<Vec<_>>());
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        6,
        "no scratch left behind"
    );
}

#[test]
fn a_negative_zero_base_value_comes_back_positive_as_deltatensors_adds_zero() {
    let dir = tempfile::tempdir().unwrap();
    let dpk = dir.path().join("s.dpk");
    import("sparse", &dpk).unwrap();
    let out = dir.path().join("out");
    apply(&data().join("base"), &dpk, &out, &ApplyOptions::default(), &NoProgress).unwrap();
    let rebuilt = Checkpoint::open(&out).unwrap();
    let embed = rebuilt.bytes(rebuilt.tensor("embed.weight").unwrap());
    assert_eq!(
        embed[..10],
        [0u8; 10],
        "the base holds -0.0 there; the fine-tune kept it"
    );
}

/// The fixture with `edit` applied and its SHA-256 trailer recomputed.
fn resealed(strategy: &str, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = std::fs::read(fixture(strategy)).unwrap();
    f.truncate(f.len() - 32);
    edit(&mut f);
    let digest = sha2::Sha256::digest(&f);
    f.extend_from_slice(&digest);
    f
}

/// The JSON header's byte range in a `.wdelta`.
fn header_range(f: &[u8]) -> std::ops::Range<usize> {
    15..15 + u32::from_le_bytes(f[11..15].try_into().unwrap()) as usize
}

/// Replaces `from` by `to` in the header, fixing its length.
fn edit_header(f: &mut Vec<u8>, from: &str, to: &str) {
    let r = header_range(f);
    let text = String::from_utf8(f[r.clone()].to_vec()).unwrap();
    assert!(text.contains(from), "{from} not in the header");
    let text = text.replacen(from, to, 1);
    f.splice(r, text.bytes());
    f[11..15].copy_from_slice(&(text.len() as u32).to_le_bytes());
}

/// Imports `bytes` as a `.wdelta`: it must fail with `kind`, leaving nothing beside the output.
fn rejects(bytes: &[u8], kind: ErrorKind, why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.wdelta");
    std::fs::write(&path, bytes).unwrap();
    let out = dir.path().join("x.dpk");
    let opts = ImportOptions::default();
    let e = import_wdelta(&path, &data().join("base"), &out, &opts, &NoProgress).unwrap_err();
    assert_eq!(e.kind(), kind, "{e}");
    assert!(e.to_string().contains(why), "expected {why:?} in: {e}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "{e}: output left behind"
    );
}

#[test]
fn corrupt_wdelta_files_are_clean_errors() {
    let good = std::fs::read(fixture("int4")).unwrap();
    let corrupt = ErrorKind::CorruptDelta;
    rejects(&good[..good.len() / 2], corrupt, "checksum");
    rejects(&good[..20], corrupt, "truncated");
    rejects(
        &[b"PK\x03\x04".as_slice(), &good[4..]].concat(),
        corrupt,
        "not a deltatensors .wdelta",
    );
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    rejects(&flipped, corrupt, "checksum");
    rejects(&resealed("int4", |f| f[7] = 2), corrupt, "version 2");
    rejects(
        &resealed("int4", |f| f[11..15].copy_from_slice(&u32::MAX.to_le_bytes())),
        corrupt,
        "runs past the end",
    );
    // The first record's tensor-name length, then its byte length, made huge.
    rejects(
        &resealed("int4", |f| {
            let at = header_range(f).end;
            f[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        }),
        corrupt,
        "past the end",
    );
    rejects(
        &resealed("sparse", |f| {
            let at = header_range(f).end;
            let name = u32::from_le_bytes(f[at..at + 4].try_into().unwrap()) as usize;
            let field = u32::from_le_bytes(f[at + 4 + name..at + 8 + name].try_into().unwrap()) as usize;
            let len_at = at + 8 + name + field + 4 + "int64".len() + 4 + 8;
            f[len_at..len_at + 8].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
        }),
        corrupt,
        "do not hold",
    );
    rejects(
        &resealed("int4", |f| edit_header(f, r#""n_outliers":48"#, r#""n_outliers":47"#)),
        corrupt,
        "values, expected",
    );
    rejects(
        &resealed("quantized", |f| edit_header(f, r#""n_cols":24"#, r#""n_cols":7"#)),
        corrupt,
        "n_cols",
    );
    rejects(
        &resealed("sparse", |f| {
            edit_header(f, r#""dtype":"float32""#, r#""dtype":"bfloat16""#)
        }),
        corrupt,
        "float32",
    );
}

#[test]
fn header_lies_about_the_base_are_wrong_base_errors() {
    let wrong = ErrorKind::WrongBase;
    rejects(
        &resealed("sparse", |f| edit_header(f, r#""shape":[40,24]"#, r#""shape":[24,40]"#)),
        wrong,
        "tensor 'embed.weight' has shape [40, 24]",
    );
    rejects(
        &resealed("sparse", |f| edit_header(f, r#""conv.weight""#, r#""conv.weights""#)),
        ErrorKind::CorruptDelta,
        "record 'indices' of tensor 'conv.weight': the header has no such tensor",
    );
    rejects(
        &resealed("int4", |f| {
            let r = header_range(f);
            let at = r.start + 16;
            f[at] = if f[at] == b'0' { b'1' } else { b'0' };
        }),
        wrong,
        "parent_hash",
    );
}

#[test]
fn a_wrong_base_is_refused_unless_the_check_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    let mut st = std::fs::read(data().join("base/model.safetensors")).unwrap();
    let last = st.len() - 1;
    st[last] ^= 1; // a bit of extra.buffer, a tensor the .wdelta does not cover...
    std::fs::write(base.join("model.safetensors"), &st).unwrap();
    let out = dir.path().join("a.dpk");
    let run = |opts: &ImportOptions| import_wdelta(&fixture("int4"), &base, &out, opts, &NoProgress);
    run(&ImportOptions::default()).unwrap();
    let embed = Checkpoint::open(&base).unwrap().tensor("embed.weight").unwrap().clone();
    let at = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize + embed.data_offsets.0 + 100;
    st[at] ^= 1; // ...but one it covers changes the hash.
    std::fs::write(base.join("model.safetensors"), &st).unwrap();
    let opts = ImportOptions {
        force: true,
        ..Default::default()
    };
    let e = run(&opts).unwrap_err();
    assert!(matches!(e, Error::WrongParentHash { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::WrongBase);
    run(&ImportOptions {
        check_base_hash: false,
        ..opts
    })
    .unwrap();
}

#[test]
fn a_base_without_a_covered_tensor_is_a_wrong_base_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.safetensors");
    common::write_st(&base, &[common::t("other", "F32", &[1], vec![0; 4])]);
    let e = import_wdelta(
        &fixture("int4"),
        &base,
        &dir.path().join("o.dpk"),
        &ImportOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongBase);
    assert!(e.to_string().contains("is missing"), "{e}");
}

#[test]
fn an_existing_output_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.dpk");
    std::fs::write(&out, b"keep me").unwrap();
    let e = import("quantized", &out).unwrap_err();
    assert!(matches!(e, Error::OutputExists { .. }), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let opts = ImportOptions {
        force: true,
        ..Default::default()
    };
    import_wdelta(&fixture("quantized"), &data().join("base"), &out, &opts, &NoProgress).unwrap();
    assert_ne!(std::fs::read(&out).unwrap(), b"keep me");
}

#[test]
fn mutated_fixtures_never_panic_the_parser_or_decoder() {
    for strategy in STRATEGIES {
        let good = std::fs::read(fixture(strategy)).unwrap();
        let content = good.len() - 32;
        for at in 0..content {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut f = good.clone();
                f[at] ^= flip;
                let Ok(layout) = wdelta::parse(&f) else {
                    continue;
                };
                let mut delta = Vec::new();
                for t in &layout.tensors {
                    let _ = wdelta::decode(&f, t, &mut delta);
                }
            }
        }
    }
}
