//! Deltas and the base's file layout: shard headers never depend on the base's, auxiliary
//! files only where it pays, and a base that lacks or changes a file is named as such.

mod common;

use std::path::{Path, PathBuf};

use common::{bf16_pair, files, small_pair, t, with_index, write_st};
use deltapack::container::index::Blob;
use deltapack::container::Delta;
use deltapack::make_child;
use deltapack::progress::NoProgress;
use deltapack::{apply, make, verify, ApplyOptions, BasePart, Error, ErrorKind, MakeOptions, MissingFile};

fn opts() -> MakeOptions {
    MakeOptions {
        chunk_bytes: 4096,
        base_id: Some("org/base@rev".into()),
        ..Default::default()
    }
}

fn apply_to(base: &Path, delta: &Path, out: &Path) -> deltapack::Result<deltapack::RebuildReport> {
    apply(base, delta, out, &ApplyOptions::default(), &NoProgress)
}

/// The small pair's base as two shards and an index: the same tensors, config and tokenizer.
fn resharded(root: &Path, base: &Path) -> PathBuf {
    let dir = root.join("base-sharded");
    let (b1, _) = bf16_pair(1, 3000);
    let (b2, _) = bf16_pair(2, 64);
    write_st(
        &dir.join("model-00001-of-00002.safetensors"),
        &[t("w", "BF16", &[100, 30], b1)],
    );
    write_st(
        &dir.join("model-00002-of-00002.safetensors"),
        &[t("b", "BF16", &[64], b2)],
    );
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(base.join(name), dir.join(name)).unwrap();
    }
    dir
}

/// A tokenizer of `n` made-up tokens: large enough that coding against the base's pays.
fn tokenizer(n: usize) -> String {
    let vocab: Vec<String> = (0..n)
        .map(|i| format!("\"tok{:x}{i}\": {i}", i * 2_654_435_761))
        .collect();
    format!("{{\"model\": {{\"vocab\": {{{}}}}}}}", vocab.join(", "))
}

#[test]
fn shard_headers_never_refer_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let delta = dir.path().join("d.dpk");
    // The pair's headers are identical: the header is stored all the same.
    make(&base, &ft, &delta, &opts(), &NoProgress).unwrap();
    let d = Delta::open(&delta).unwrap();
    assert!(
        matches!(d.index.files[0].header, Blob::Zstd { dict: None, .. }),
        "{:?}",
        d.index.files[0].header
    );
    let sharded = resharded(dir.path(), &base);
    let out = dir.path().join("out");
    apply_to(&sharded, &delta, &out).unwrap();
    assert_eq!(files(&out), files(&ft));
    // And made against the sharded base, it applies to the single file's directory.
    make(
        &sharded,
        &ft,
        &delta,
        &MakeOptions { force: true, ..opts() },
        &NoProgress,
    )
    .unwrap();
    let out = dir.path().join("out2");
    apply_to(&base, &delta, &out).unwrap();
    assert_eq!(files(&out), files(&ft));
}

/// Deltas of earlier writers stored a header identical to a base shard's as a reference to it:
/// they still apply byte for byte to that base, and to the base in another layout they name
/// the shard as missing (bad input), not the base as wrong.
#[test]
fn older_deltas_with_headers_of_the_base_still_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let made = dir.path().join("made.dpk");
    make(&base, &ft, &made, &opts(), &NoProgress).unwrap();
    let old = dir.path().join("old.dpk");
    with_index(&made, &old, |v| {
        v["files"][0]["header"] = serde_json::json!({"storage": "same_as_base", "path": "model.safetensors"});
    });
    let out = dir.path().join("out");
    apply_to(&base, &old, &out).unwrap();
    assert_eq!(files(&out), files(&ft));
    verify(&base, &old, Some(&ft), &NoProgress).unwrap();

    let sharded = resharded(dir.path(), &base);
    let err = apply_to(&sharded, &old, &dir.path().join("x")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
    let Error::MissingBaseFiles { files, single_file, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        files,
        &[MissingFile {
            path: "model.safetensors".into(),
            header: true
        }]
    );
    assert!(!single_file);
    assert!(err.to_string().contains("shard layout"), "{err}");
}

/// The base's config and tokenizer, identical or coded against, are needed from the base's
/// directory: a base without them is told all of them at once, as bad input.
#[test]
fn a_base_without_the_files_a_delta_needs_is_told_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    std::fs::write(base.join("tokenizer.json"), tokenizer(3000)).unwrap();
    std::fs::write(ft.join("tokenizer.json"), tokenizer(3008)).unwrap();
    let delta = dir.path().join("d.dpk");
    make(&base, &ft, &delta, &opts(), &NoProgress).unwrap();
    let d = Delta::open(&delta).unwrap();
    let blob = |p: &str| d.index.aux.iter().find(|a| a.path == p).unwrap().blob.clone();
    assert!(matches!(blob("config.json"), Blob::SameAsBase { .. }));
    assert!(matches!(blob("tokenizer.json"), Blob::Zstd { dict: Some(_), len, .. } if len < 200));

    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(base.join("model.safetensors"), bare.join("model.safetensors")).unwrap();
    let expected = ["config.json", "tokenizer.json"].map(|p| MissingFile {
        path: p.into(),
        header: false,
    });
    for (given, single) in [(bare.clone(), false), (bare.join("model.safetensors"), true)] {
        let out = dir.path().join("out");
        let err = apply_to(&given, &delta, &out).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
        match &err {
            Error::MissingBaseFiles { files, single_file, .. } => {
                assert_eq!(files, &expected);
                assert_eq!(*single_file, single);
            }
            _ => panic!("{err}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("made self-contained") && !msg.contains("tensor '") && !msg.contains("wrong"),
            "{msg}"
        );
        assert!(!out.exists());
        let err = verify(&given, &delta, None, &NoProgress).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
    }
}

/// A base file that is there but not the one the delta was made against makes a wrong base,
/// named as a file.
#[test]
fn a_base_file_that_differs_is_a_wrong_base_named_as_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let delta = dir.path().join("d.dpk");
    make(&base, &ft, &delta, &opts(), &NoProgress).unwrap();
    std::fs::write(base.join("config.json"), br#"{"hidden_size": 31}"#).unwrap();
    let err = apply_to(&base, &delta, &dir.path().join("out")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongBase, "{err}");
    assert!(
        matches!(&err, Error::WrongBase { part: BasePart::File(p), .. } if p == "config.json"),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("file 'config.json'") && !msg.contains("tensor"), "{msg}");
}

/// Coding an auxiliary file against the base's ties the delta to it: done where it saves a
/// kilobyte or more (a grown tokenizer), not for a few bytes of a small config.
#[test]
fn aux_files_are_coded_against_the_base_only_where_it_pays() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    std::fs::write(base.join("tokenizer.json"), tokenizer(3000)).unwrap();
    std::fs::write(ft.join("tokenizer.json"), tokenizer(3008)).unwrap();
    std::fs::write(ft.join("config.json"), br#"{"hidden_size": 30, "vocab_size": 3008}"#).unwrap();
    let delta = dir.path().join("d.dpk");
    make(&base, &ft, &delta, &opts(), &NoProgress).unwrap();
    let d = Delta::open(&delta).unwrap();
    let blob = |p: &str| d.index.aux.iter().find(|a| a.path == p).unwrap().blob.clone();
    assert!(matches!(blob("config.json"), Blob::Zstd { dict: None, .. }));
    assert!(matches!(blob("tokenizer.json"), Blob::Zstd { dict: Some(_), .. }));
    let out = dir.path().join("out");
    apply_to(&base, &delta, &out).unwrap();
    assert_eq!(files(&out), files(&ft));
}

/// The fine-tune given as the base is named as such; another wrong base is not, and both
/// say which base the delta expects.
#[test]
fn a_swapped_base_is_asked_about() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let delta = dir.path().join("d.dpk");
    make(&base, &ft, &delta, &opts(), &NoProgress).unwrap();
    let recorded = Delta::open(&delta).unwrap().index.base.fingerprint.clone();
    let err = apply_to(&ft, &delta, &dir.path().join("out")).unwrap_err();
    match &err {
        Error::WrongBase { expected, part, .. } => {
            assert!(expected.swapped, "{err}");
            assert_eq!(expected.fingerprint.as_deref(), Some(recorded.as_str()));
            assert_eq!(part, &BasePart::Tensor("w".into()));
        }
        _ => panic!("{err}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("were the base and the fine-tune swapped?"), "{msg}");
    assert!(msg.contains("org/base@rev") && msg.contains(&recorded[..16]), "{msg}");
    assert!(!msg.contains("--"), "the library names no CLI flag: {msg}");

    let (other, _) = bf16_pair(9, 3000);
    let (b2, _) = bf16_pair(2, 64);
    let wrong = dir.path().join("wrong");
    write_st(
        &wrong.join("model.safetensors"),
        &[t("w", "BF16", &[100, 30], other), t("b", "BF16", &[64], b2)],
    );
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(base.join(name), wrong.join(name)).unwrap();
    }
    let err = verify(&wrong, &delta, None, &NoProgress).unwrap_err();
    assert!(
        matches!(&err, Error::WrongBase { expected, .. } if !expected.swapped),
        "{err}"
    );
    assert!(!err.to_string().contains("swapped") && err.to_string().contains(&recorded[..16]));
}

/// A link of a chain is made against its parent's model, whose layout the parent fixes: its
/// headers still cost nothing where they equal the parent's.
#[test]
fn a_chain_link_refers_to_its_parents_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let first = dir.path().join("1.dpk");
    make(&base, &ft, &first, &opts(), &NoProgress).unwrap();
    let second = dir.path().join("2.dpk");
    make_child(
        &base,
        std::slice::from_ref(&first),
        &ft,
        &second,
        &opts(),
        None,
        &NoProgress,
    )
    .unwrap();
    let d = Delta::open(&second).unwrap();
    assert!(matches!(d.index.files[0].header, Blob::SameAsBase { .. }));
    let sharded = resharded(dir.path(), &base);
    let out = dir.path().join("out");
    deltapack::apply_chain(&sharded, &[first, second], &out, &ApplyOptions::default(), &NoProgress).unwrap();
    assert_eq!(files(&out), files(&ft));
}
