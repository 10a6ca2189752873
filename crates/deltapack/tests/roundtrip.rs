//! Round trips of real-shaped checkpoints: every dtype, sharding, resizes, ties, conversions.

mod common;

use std::path::Path;

use common::{bf16_pair, files, noise, small_pair, t, write_st};
use deltapack::container::index::Relation;
use deltapack::container::Delta;
use deltapack::progress::NoProgress;
use deltapack::{apply, make, verify, ApplyOptions, MakeOptions};

fn opts(chunk_bytes: usize) -> MakeOptions {
    MakeOptions {
        chunk_bytes,
        ..Default::default()
    }
}

/// make -> apply -> compare every file, and verify against the fine-tune.
fn round_trip(base: &Path, ft: &Path, chunk_bytes: usize) -> Delta {
    let work = tempfile::tempdir().unwrap();
    let delta = work.path().join("d.dpk");
    make(base, ft, &delta, &opts(chunk_bytes), &NoProgress).unwrap();
    let out = work.path().join("out");
    apply(base, &delta, &out, &ApplyOptions::default(), &NoProgress).unwrap();
    let mut expected = if ft.is_dir() {
        files(ft)
    } else {
        let name = ft.file_name().unwrap().to_string_lossy().into_owned();
        [(name, std::fs::read(ft).unwrap())].into()
    };
    // Pickles are never read, so never rebuilt.
    expected.retain(|k, _| !k.ends_with(".bin"));
    assert_eq!(files(&out), expected, "rebuilt files differ");
    let r = verify(base, &delta, Some(ft), &NoProgress).unwrap();
    assert!(r.compared_with_finetuned);
    // The map stays valid after the temporary directory is removed.
    Delta::open(&delta).unwrap()
}

fn relation_of(d: &Delta, name: &str) -> Relation {
    d.index.tensors().find(|t| t.name == name).unwrap().relation
}

#[test]
fn every_dtype_round_trips_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let dtypes: [(&str, usize); 15] = [
        ("BF16", 2),
        ("F16", 2),
        ("F32", 4),
        ("F64", 8),
        ("I64", 8),
        ("I32", 4),
        ("I16", 2),
        ("U8", 1),
        ("I8", 1),
        ("BOOL", 1),
        ("F8_E4M3", 1),
        ("F8_E5M2", 1),
        ("U32", 4),
        ("U64", 8),
        ("C64", 8),
    ];
    let mut base = Vec::new();
    let mut ft = Vec::new();
    for (i, (dt, w)) in dtypes.iter().enumerate() {
        let n = 700 + i * 13;
        let b = noise(i as u64, n * w);
        let mut f = b.clone();
        // Change a third of the bytes; include float specials in the 2-byte types.
        for (k, x) in f.iter_mut().enumerate() {
            if k % 3 == 0 {
                *x = x.wrapping_add(k as u8);
            }
        }
        if *w == 2 {
            f[..8].copy_from_slice(&[0xC1, 0x7F, 0x80, 0x7F, 0x00, 0x80, 0x01, 0x00]);
            // NaN payload, Inf, -0, subnormal
        }
        base.push(t(&format!("t.{dt}"), dt, &[n], b));
        ft.push(t(&format!("t.{dt}"), dt, &[n], f));
    }
    base.push(t("scalar", "F32", &[], 1.5f32.to_le_bytes().to_vec()));
    ft.push(t("scalar", "F32", &[], 2.5f32.to_le_bytes().to_vec()));
    base.push(t("empty", "BF16", &[0, 4], vec![]));
    ft.push(t("empty", "BF16", &[0, 4], vec![]));
    base.push(t("packed", "F4", &[64], noise(99, 32)));
    ft.push(t("packed", "F4", &[64], noise(98, 32)));
    write_st(&dir.path().join("base/model.safetensors"), &base);
    write_st(&dir.path().join("ft/model.safetensors"), &ft);
    round_trip(&dir.path().join("base"), &dir.path().join("ft"), 4096);
}

#[test]
fn sharded_and_single_file_layouts_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (b1, f1) = bf16_pair(3, 5000);
    let (b2, f2) = bf16_pair(4, 3000);
    let (b3, f3) = bf16_pair(5, 10);
    let base = dir.path().join("base");
    write_st(
        &base.join("model.safetensors"),
        &[
            t("a", "BF16", &[5000], b1),
            t("b", "BF16", &[3000], b2),
            t("c", "BF16", &[10], b3),
        ],
    );
    let ft = dir.path().join("ft");
    write_st(
        &ft.join("model-00001-of-00002.safetensors"),
        &[t("a", "BF16", &[5000], f1.clone())],
    );
    write_st(
        &ft.join("model-00002-of-00002.safetensors"),
        &[t("b", "BF16", &[3000], f2.clone()), t("c", "BF16", &[10], f3.clone())],
    );
    let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(ft.join("model.safetensors.index.json"), index).unwrap();
    std::fs::create_dir_all(ft.join("1_Pooling")).unwrap();
    std::fs::write(ft.join("1_Pooling/config.json"), b"{}").unwrap();
    round_trip(&base, &ft, 4096);
    // The other way round: a sharded base, a single-file fine-tune given as a file.
    let single = dir.path().join("single.safetensors");
    write_st(
        &single,
        &[
            t("a", "BF16", &[5000], f1),
            t("b", "BF16", &[3000], f2),
            t("c", "BF16", &[10], f3),
        ],
    );
    round_trip(&ft, &single, 4096);
}

#[test]
fn vocabulary_resize_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = bf16_pair(6, 120 * 16);
    let small = dir.path().join("small");
    let large = dir.path().join("large");
    write_st(
        &small.join("model.safetensors"),
        &[t("embed_tokens.weight", "BF16", &[100, 16], b[..100 * 32].to_vec())],
    );
    write_st(
        &large.join("model.safetensors"),
        &[t("embed_tokens.weight", "BF16", &[120, 16], f)],
    );
    let grown = round_trip(&small, &large, 4096);
    assert_eq!(relation_of(&grown, "embed_tokens.weight"), Relation::Resized);
    let shrunk = round_trip(&large, &small, 4096);
    assert_eq!(relation_of(&shrunk, "embed_tokens.weight"), Relation::Resized);
    // Common rows are coded as a delta: far smaller than the tensor.
    let stored = grown.index.tensors().next().unwrap().stored_bytes();
    assert!(stored < 120 * 32 / 2, "{stored} bytes stored");
}

#[test]
fn dtype_change_new_removed_and_untied_head() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = bf16_pair(7, 2048);
    let f32_base: Vec<u8> = b
        .chunks_exact(2)
        .flat_map(|c| {
            half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))
                .to_f32()
                .to_le_bytes()
        })
        .collect();
    let base = dir.path().join("base");
    write_st(
        &base.join("model.safetensors"),
        &[
            t("model.embed_tokens.weight", "BF16", &[128, 16], b.clone()),
            t("w", "F32", &[2048], f32_base),
            t("position_ids", "I64", &[1, 4], noise(8, 32)),
        ],
    );
    let ft = dir.path().join("ft");
    write_st(
        &ft.join("model.safetensors"),
        &[
            t("model.embed_tokens.weight", "BF16", &[128, 16], f.clone()),
            t("w", "BF16", &[2048], f.clone()),
            t("lm_head.weight", "BF16", &[128, 16], f),
            t("extra", "F32", &[7], noise(9, 28)),
        ],
    );
    std::fs::write(ft.join("pytorch_model.bin"), b"pickle!").unwrap();
    let d = round_trip(&base, &ft, 4096);
    assert_eq!(relation_of(&d, "w"), Relation::Converted);
    assert_eq!(relation_of(&d, "lm_head.weight"), Relation::Tied);
    assert_eq!(relation_of(&d, "extra"), Relation::New);
    assert_eq!(
        d.index.removed.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["position_ids"]
    );
    assert_eq!(d.index.skipped.len(), 1, "the pickle is skipped, not read");
    let head = d.index.tensors().find(|t| t.name == "lm_head.weight").unwrap();
    assert_eq!(head.source.as_ref().unwrap().name, "model.embed_tokens.weight");
    assert!(
        head.stored_bytes() < 2048,
        "coded against the embedding, not stored whole"
    );
}

#[test]
fn output_does_not_depend_on_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let run = |threads: usize| {
        let out = dir.path().join(format!("d{threads}.dpk"));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| make(&base, &ft, &out, &opts(4096), &NoProgress))
            .unwrap();
        std::fs::read(out).unwrap()
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn identical_files_and_tensors_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = small_pair(dir.path());
    let d = round_trip(&base, &base, 4096);
    assert!(d.index.tensors().all(|t| t.unchanged() && t.stored_bytes() == 0));
    assert!(
        d.size < 2048,
        "a delta of a model against itself is tiny: {} bytes",
        d.size
    );
}

#[test]
fn self_contained_deltas_need_only_the_base_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let base_file = base.join("model.safetensors");
    let delta = dir.path().join("d.dpk");
    // Against the base's files: applying with only the base's weights file names what is
    // missing (the config, identical to the base's), as bad input: the tensors are right.
    make(&base, &ft, &delta, &opts(4096), &NoProgress).unwrap();
    let err = apply(
        &base_file,
        &delta,
        &dir.path().join("x"),
        &ApplyOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(err.kind(), deltapack::ErrorKind::BadInput, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("config.json") && msg.contains("self-contained"), "{msg}");
    let self_contained = MakeOptions {
        self_contained: true,
        force: true,
        ..opts(4096)
    };
    make(&base, &ft, &delta, &self_contained, &NoProgress).unwrap();
    let d = Delta::open(&delta).unwrap();
    assert!(d
        .index
        .aux
        .iter()
        .all(|a| matches!(a.blob, deltapack::container::index::Blob::Zstd { dict: None, .. })));
    let out = dir.path().join("out");
    apply(&base_file, &delta, &out, &ApplyOptions::default(), &NoProgress).unwrap();
    assert_eq!(files(&out), files(&ft));
}

/// The real checkpoints in ../shared/models, when present (CI has them beside the clone).
#[test]
fn shared_real_checkpoints_round_trip() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models");
    let base = models.join("minilm-base-bf16");
    if !base.is_dir() {
        eprintln!("skipping: {} not found", models.display());
        return;
    }
    for ft in ["ft-a-bf16", "ft-b-bf16-sharded"] {
        let d = round_trip(&base, &models.join(ft), 1 << 21);
        let ratio = d.index.finetuned_bytes() as f64 / d.size as f64;
        eprintln!("{ft}: ratio {ratio:.2}x");
        assert!(ratio > 5.0, "{ft}: ratio {ratio:.2}x");
    }
}
