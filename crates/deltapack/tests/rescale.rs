//! Re-making a 1-bit delta with new scales: every sign payload kept, the scales stored,
//! and another fine-tune refused with nothing written.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{bf16_pair, small_pair, t, write_st};
use deltapack::container::Delta;
use deltapack::progress::NoProgress;
use deltapack::rescale::{read_scales, remake_with_scales, Scales};
use deltapack::tune::CodecPolicy;
use deltapack::{make, MakeOptions};
use deltapack_codec::lossy::TensorCodec;

fn one_bit_delta(base: &Path, ft: &Path, out: &Path, codec: &str) {
    let opts = MakeOptions {
        chunk_bytes: 4096,
        force: true,
        codecs: CodecPolicy {
            default: codec.parse().unwrap(),
            ..Default::default()
        },
        ..Default::default()
    };
    make(base, ft, out, &opts, &NoProgress).unwrap();
}

fn payload_sums(delta: &Path) -> Vec<(String, Vec<String>)> {
    let d = Delta::open(delta).unwrap();
    let sums = d
        .index
        .tensors()
        .map(|t| (t.name.clone(), t.chunks.iter().map(|c| c.checksum.clone()).collect()));
    sums.collect()
}

/// Every scale doubled (rows) or set to 1.5 (columns).
fn changed(delta: &Path) -> HashMap<String, Scales> {
    let scaled = read_scales(delta).unwrap().into_iter().map(|t| {
        let s = match t.scales {
            Scales::Tensor(x) => Scales::Tensor(x * 2.0),
            Scales::Axis { rows, cols } => Scales::Axis {
                rows: rows.iter().map(|x| x * 2.0).collect(),
                cols: vec![1.5; cols.len()],
            },
        };
        (t.name, s)
    });
    scaled.collect()
}

#[test]
fn new_scales_are_stored_and_every_sign_payload_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    for codec in ["sign-axis", "sign", "sign-axis:zeros=sign"] {
        let (delta, out) = (dir.path().join("in.dpk"), dir.path().join("out.dpk"));
        one_bit_delta(&base, &ft, &delta, codec);
        let new = changed(&delta);
        assert!(!new.is_empty(), "{codec}");
        remake_with_scales(&base, &ft, &delta, &out, &new, true, &NoProgress).unwrap();
        let stored: HashMap<String, Scales> = read_scales(&out)
            .unwrap()
            .into_iter()
            .map(|t| (t.name, t.scales))
            .collect();
        assert_eq!(stored, new, "{codec}");
        assert_eq!(payload_sums(&delta), payload_sums(&out), "{codec}");
        // Learned axis scales say so in the index.
        for t in Delta::open(&out).unwrap().index.tensors() {
            if let Some(TensorCodec::SignAxis { calibrated, .. }) = &t.codec {
                assert!(calibrated, "{}", t.name);
            }
        }
        // The reconstruction moved: its fingerprint is recorded anew, and the delta verifies.
        let rebuilt = dir.path().join("rebuilt");
        deltapack::apply(
            &base,
            &out,
            &rebuilt,
            &deltapack::ApplyOptions {
                force: true,
                ..Default::default()
            },
            &NoProgress,
        )
        .unwrap();
    }
}

#[test]
fn another_finetune_is_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let other: PathBuf = dir.path().join("other");
    let (_, f1) = bf16_pair(7, 3000);
    let (b2, _) = bf16_pair(2, 64);
    write_st(
        &other.join("model.safetensors"),
        &[t("w", "BF16", &[100, 30], f1), t("b", "BF16", &[64], b2)],
    );
    let (delta, out) = (dir.path().join("in.dpk"), dir.path().join("out.dpk"));
    one_bit_delta(&base, &ft, &delta, "sign-axis");
    let e = remake_with_scales(&base, &other, &delta, &out, &HashMap::new(), false, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("not the one that delta was made from"), "{e}");
    assert!(!out.exists());
    // A fine-tune with one more tensor is another fine-tune too.
    let (_, f1) = bf16_pair(1, 3000);
    let (b2, _) = bf16_pair(2, 64);
    let more = [
        t("w", "BF16", &[100, 30], f1),
        t("b", "BF16", &[64], b2.clone()),
        t("x", "BF16", &[64], b2),
    ];
    write_st(&other.join("model.safetensors"), &more);
    let e = remake_with_scales(&base, &other, &delta, &out, &HashMap::new(), false, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("holds other tensors than the fine-tune"), "{e}");
    assert!(!out.exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("deltapack-tmp")));
}

#[test]
fn scales_that_do_not_fit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let (delta, out) = (dir.path().join("in.dpk"), dir.path().join("out.dpk"));
    one_bit_delta(&base, &ft, &delta, "sign-axis");
    let refused = |scales: HashMap<String, Scales>, says: &str| {
        let e = remake_with_scales(&base, &ft, &delta, &out, &scales, false, &NoProgress).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
        assert!(!out.exists());
    };
    refused(
        HashMap::from([("w".to_string(), Scales::Tensor(1e-3))]),
        "coded sign-axis",
    );
    refused(
        HashMap::from([("nope".to_string(), Scales::Tensor(1e-3))]),
        "has no tensor 'nope'",
    );
    let axis = |rows: Vec<f32>, cols: Vec<f32>| HashMap::from([("w".to_string(), Scales::Axis { rows, cols })]);
    refused(axis(vec![1.0; 3], vec![1.0; 30]), "one per row and one per column");
    refused(axis(vec![-1.0; 100], vec![1.0; 30]), "non-negative");
    refused(axis(vec![f32::NAN; 100], vec![1.0; 30]), "finite");
}
