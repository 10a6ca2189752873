//! Bad input: corrupted and truncated deltas, wrong bases, broken checkpoints, unsafe paths.
//! Every case must be a clear error of the right kind, never a panic, a wrong output or a
//! partial output.

mod common;

use std::path::PathBuf;

use common::{files, small_pair, t, with_index, write_st};
use deltapack::container::Delta;
use deltapack::progress::NoProgress;
use deltapack::{apply, make, verify, ApplyOptions, ErrorKind, MakeOptions};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    ft: PathBuf,
    delta: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (base, ft) = small_pair(&root);
    let delta = root.join("d.dpk");
    let opts = MakeOptions {
        chunk_bytes: 4096,
        base_id: Some("org/base@rev".into()),
        ..Default::default()
    };
    make(&base, &ft, &delta, &opts, &NoProgress).unwrap();
    Fixture {
        _dir: dir,
        root,
        base,
        ft,
        delta,
    }
}

fn kind(r: deltapack::Result<impl Sized>) -> ErrorKind {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind(),
    }
}

/// Applies `bytes` as a delta: the result must be an error that leaves no output, or a
/// directory identical to the fine-tune.
fn check_mutant(f: &Fixture, bytes: &[u8], what: &str) {
    let path = f.root.join("mutant.dpk");
    std::fs::write(&path, bytes).unwrap();
    let out = f.root.join("mutant-out");
    match apply(&f.base, &path, &out, &ApplyOptions::default(), &NoProgress) {
        Ok(_) => {
            assert_eq!(files(&out), files(&f.ft), "{what}: wrong output accepted");
            std::fs::remove_dir_all(&out).unwrap();
        }
        Err(e) => {
            assert!(!out.exists(), "{what}: partial output left behind ({e})");
            assert!(
                matches!(e.kind(), ErrorKind::CorruptDelta | ErrorKind::WrongBase),
                "{what}: unexpected error kind: {e}"
            );
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(&f.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{what}: temporary files left: {leftovers:?}");
}

#[test]
fn every_truncation_and_every_flipped_byte_is_caught() {
    let f = fixture();
    let good = std::fs::read(&f.delta).unwrap();
    assert!(good.len() < 16_000, "fixture should stay small: {} bytes", good.len());
    for cut in 0..good.len() {
        check_mutant(&f, &good[..cut], &format!("truncated at {cut}"));
    }
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0xFF;
        check_mutant(&f, &bad, &format!("byte {i} flipped"));
    }
}

#[test]
fn wrong_base_is_named() {
    let f = fixture();
    let err = verify(&f.ft, &f.delta, None, &NoProgress).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongBase);
    let msg = err.to_string();
    assert!(msg.contains("tensor 'w'") && msg.contains("org/base@rev"), "{msg}");
    let out = f.root.join("out");
    assert_eq!(
        kind(apply(&f.ft, &f.delta, &out, &ApplyOptions::default(), &NoProgress)),
        ErrorKind::WrongBase
    );
    assert!(!out.exists());
}

/// A base one mantissa bit away decodes without a decoding error, to wrong values: `verify`
/// names the base (not the delta, whose rebuilt hashes it checks first), as `apply` does.
#[test]
fn a_base_that_decodes_to_wrong_values_is_a_wrong_base() {
    let f = fixture();
    let other = f.root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(f.base.join(name), other.join(name)).unwrap();
    }
    let mut st = std::fs::read(f.base.join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    // The low byte of the first element of `w`, the first tensor.
    st[8 + header] ^= 1;
    std::fs::write(other.join("model.safetensors"), st).unwrap();
    let err = verify(&other, &f.delta, None, &NoProgress).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongBase, "{err}");
    assert!(err.to_string().contains("tensor 'w'"), "{err}");
    let out = f.root.join("out");
    let applied = apply(&other, &f.delta, &out, &ApplyOptions::default(), &NoProgress);
    assert_eq!(kind(applied), ErrorKind::WrongBase);
}

#[test]
fn base_with_a_missing_or_reshaped_tensor_is_a_wrong_base() {
    let f = fixture();
    let other = f.root.join("other");
    write_st(
        &other.join("model.safetensors"),
        &[t("w", "BF16", &[30, 100], vec![0; 6000])],
    );
    std::fs::copy(f.base.join("config.json"), other.join("config.json")).unwrap();
    let err = verify(&other, &f.delta, None, &NoProgress).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongBase, "{err}");
}

#[test]
fn missing_shard_and_broken_checkpoints_are_bad_input() {
    let f = fixture();
    let sharded = f.root.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        r#"{"weight_map": {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    write_st(
        &sharded.join("model-00001-of-00002.safetensors"),
        &[t("w", "BF16", &[2], vec![0; 4])],
    );
    let err = make(
        &f.base,
        &sharded,
        &f.root.join("x.dpk"),
        &MakeOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput);
    assert!(
        err.to_string()
            .contains("missing shard model-00002-of-00002.safetensors"),
        "{err}"
    );
    assert!(!f.root.join("x.dpk").exists());

    let truncated = f.root.join("truncated");
    std::fs::create_dir_all(&truncated).unwrap();
    let bytes = std::fs::read(f.ft.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    let err = make(
        &f.base,
        &truncated,
        &f.root.join("x.dpk"),
        &MakeOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput);
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    let err = make(
        &f.base,
        &f.root.join("nope"),
        &f.root.join("x.dpk"),
        &MakeOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    let err = Delta::open(&f.root.join("nope.dpk")).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Io);
}

#[test]
fn outputs_are_never_overwritten_without_force() {
    let f = fixture();
    let err = make(&f.base, &f.ft, &f.delta, &MakeOptions::default(), &NoProgress).unwrap_err();
    assert!(matches!(err, deltapack::Error::OutputExists { .. }));
    let out = f.root.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"mine").unwrap();
    assert_eq!(
        kind(apply(&f.base, &f.delta, &out, &ApplyOptions::default(), &NoProgress)),
        ErrorKind::BadInput
    );
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"mine");
    let forced = ApplyOptions {
        force: true,
        sync: true,
        ..Default::default()
    };
    // Forcing replaces only what apply writes: a directory holding other files stays.
    assert_eq!(
        kind(apply(&f.base, &f.delta, &out, &forced, &NoProgress)),
        ErrorKind::BadInput
    );
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"mine");
    std::fs::remove_file(out.join("keep")).unwrap();
    std::fs::write(out.join("config.json"), b"an older output").unwrap();
    apply(&f.base, &f.delta, &out, &forced, &NoProgress).unwrap();
    assert_eq!(files(&out), files(&f.ft));
}

#[test]
fn unsafe_file_paths_in_a_delta_are_rejected() {
    let f = fixture();
    // The unchanged index passes, so a rejection below is due to the edit alone.
    let same = f.root.join("same.dpk");
    with_index(&f.delta, &same, |_| {});
    Delta::open(&same).unwrap();
    for bad in [
        "../evil.json",
        "/tmp/evil.json",
        "a/../../evil.json",
        "a//b",
        "C:evil",
        "..",
        "x\\..\\y",
    ] {
        let mutant = f.root.join("mutant.dpk");
        with_index(&f.delta, &mutant, |v| v["aux"][0]["path"] = bad.into());
        let err = Delta::open(&mutant).err().unwrap_or_else(|| panic!("{bad} accepted"));
        assert_eq!(err.kind(), ErrorKind::CorruptDelta, "{bad}: {err}");
        with_index(&f.delta, &mutant, |v| v["files"][0]["path"] = bad.into());
        assert!(Delta::open(&mutant).is_err(), "{bad} accepted as a weight file");
    }
    assert!(!f.root.parent().unwrap().join("evil.json").exists());
}

/// A change to a delta's index.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

/// The first chunk of codec `codec` in the index's first weight file.
fn first_chunk<'v>(v: &'v mut serde_json::Value, codec: &str) -> &'v mut serde_json::Value {
    let tensors = v["files"][0]["tensors"].as_array_mut().unwrap();
    (tensors.iter_mut())
        .flat_map(|t| t["chunks"].as_array_mut().unwrap())
        .find(|c| c["c"] == codec)
        .unwrap_or_else(|| panic!("the fixture has a '{codec}' chunk"))
}

#[test]
fn verify_checks_the_rebuilt_hashes_hot_swap_relies_on() {
    let f = fixture();
    verify(&f.base, &f.delta, None, &NoProgress).unwrap();
    let mutant = f.root.join("mutant.dpk");
    with_index(&f.delta, &mutant, |v| {
        let c = first_chunk(v, "exact");
        let q = u64::from_str_radix(c["q"].as_str().unwrap(), 16).unwrap();
        c["q"] = format!("{:016x}", q.wrapping_add(1)).into();
    });
    let err = verify(&f.base, &mutant, None, &NoProgress).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CorruptDelta, "{err}");
    assert!(err.to_string().contains("does not match its hash"), "{err}");
}

#[test]
fn inconsistent_indexes_are_rejected() {
    let f = fixture();
    let mutant = f.root.join("mutant.dpk");
    let edits: Vec<(&str, Edit)> = vec![
        (
            "overlapping chunks",
            Box::new(|v| {
                v["files"][0]["tensors"][0]["chunks"][1]["o"] = v["files"][0]["tensors"][0]["chunks"][0]["o"].clone()
            }),
        ),
        (
            "chunk past the payload",
            Box::new(|v| v["files"][0]["tensors"][0]["chunks"][0]["o"] = (1u64 << 40).into()),
        ),
        (
            "wrong shape",
            Box::new(|v| v["files"][0]["tensors"][0]["shape"] = serde_json::json!([7, 7])),
        ),
        (
            "huge shape",
            Box::new(|v| v["files"][0]["tensors"][0]["shape"] = serde_json::json!([u64::MAX, u64::MAX])),
        ),
        (
            "unknown dtype",
            Box::new(|v| v["files"][0]["tensors"][0]["dtype"] = "Q3".into()),
        ),
        (
            "duplicate path",
            Box::new(|v| v["aux"][1]["path"] = v["aux"][0]["path"].clone()),
        ),
        ("bad chunk size", Box::new(|v| v["chunk_bytes"] = 12345.into())),
        ("unknown field", Box::new(|v| v["surprise"] = 1.into())),
        ("future version", Box::new(|v| v["version"] = 2.into())),
        (
            "bad rebuilt hash",
            Box::new(|v| first_chunk(v, "exact")["q"] = "12345".into()),
        ),
        (
            "source of the wrong shape",
            Box::new(|v| v["files"][0]["tensors"][0]["source"]["shape"] = serde_json::json!([3])),
        ),
    ];
    for (what, edit) in edits {
        with_index(&f.delta, &mutant, edit);
        let err = Delta::open(&mutant).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(err.kind(), ErrorKind::CorruptDelta, "{what}: {err}");
    }
}
