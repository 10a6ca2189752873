//! Lossy deltas end to end: make -> apply -> verify, recorded quality, determinism, hostile indexes.

mod common;

use std::path::{Path, PathBuf};

use common::{bf16_pair, t, write_st};
use deltapack::container::Delta;
use deltapack::progress::NoProgress;
use deltapack::tune::{CodecPolicy, CodecSpec};
use deltapack::{apply, make, verify, ApplyOptions, MakeOptions};

/// A pair with a 2-D weight of several chunks (with some non-finite values), a 1-D bias and an int tensor.
fn pair(root: &Path) -> (PathBuf, PathBuf) {
    let (base, ft) = (root.join("base"), root.join("ft"));
    let (b1, mut f1) = bf16_pair(11, 64 * 512);
    f1[100..102].copy_from_slice(&half::bf16::NAN.to_bits().to_le_bytes());
    let (b2, f2) = bf16_pair(12, 64);
    let ids: Vec<u8> = (0..64u64).flat_map(|i| i.to_le_bytes()).collect();
    write_st(
        &base.join("model.safetensors"),
        &[
            t("w", "BF16", &[64, 512], b1),
            t("b", "BF16", &[64], b2),
            t("ids", "I64", &[64], ids.clone()),
        ],
    );
    write_st(
        &ft.join("model.safetensors"),
        &[
            t("w", "BF16", &[64, 512], f1),
            t("b", "BF16", &[64], f2),
            t("ids", "I64", &[64], ids),
        ],
    );
    (base, ft)
}

fn opts(spec: &str, max_error: Option<f64>) -> MakeOptions {
    MakeOptions {
        chunk_bytes: 1 << 14,
        codecs: CodecPolicy {
            default: spec.parse::<CodecSpec>().unwrap(),
            max_error,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn every_codec_applies_and_verifies_its_recorded_error() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = pair(dir.path());
    let cases: &[(&str, Option<f64>)] = &[
        ("quant:bits=4", None),
        ("quant", Some(0.05)),
        ("sparse:keep=0.2", None),
        ("dare:keep=0.5", None),
        ("sign", None),
        ("sign-axis", None),
        ("auto", Some(0.2)),
    ];
    for &(spec, e) in cases {
        let delta = dir.path().join("d.dpk");
        let made = make(
            &base,
            &ft,
            &delta,
            &MakeOptions {
                force: true,
                ..opts(spec, e)
            },
            &NoProgress,
        )
        .unwrap();
        let out = dir.path().join("out");
        apply(
            &base,
            &delta,
            &out,
            &ApplyOptions {
                force: true,
                ..Default::default()
            },
            &NoProgress,
        )
        .unwrap();
        let r = verify(&base, &delta, Some(&ft), &NoProgress).unwrap();
        let d = Delta::open(&delta).unwrap();
        let w = d.index.tensors().find(|t| t.name == "w").unwrap();
        let b = d.index.tensors().find(|t| t.name == "b").unwrap();
        assert!(b.codec.is_none(), "{spec}: 1-D tensors stay exact");
        if spec != "auto" {
            assert!(w.codec.is_some(), "{spec}: the weight is lossy");
        }
        let recorded = w.quality.unwrap().error;
        if let Some(m) = r.measured.iter().find(|m| m.name == "w") {
            assert!(
                (m.error - recorded).abs() < 1e-12,
                "{spec}: measured {} recorded {recorded}",
                m.error
            );
        }
        if let Some(e) = e {
            assert!(recorded <= e, "{spec}: {recorded} over the budget {e}");
        }
        assert!((r.measured_error - made.error).abs() < 1e-9, "{spec}: model error");
        // Non-finite values survive every codec, the int tensor stays exact.
        let rebuilt = std::fs::read(out.join("model.safetensors")).unwrap();
        let orig = std::fs::read(ft.join("model.safetensors")).unwrap();
        assert_eq!(rebuilt.len(), orig.len());
        let hdr = 8 + u64::from_le_bytes(orig[..8].try_into().unwrap()) as usize;
        assert_eq!(
            rebuilt[hdr + 100..hdr + 102],
            orig[hdr + 100..hdr + 102],
            "{spec}: NaN kept"
        );
        assert_eq!(
            rebuilt[rebuilt.len() - 512..],
            orig[orig.len() - 512..],
            "{spec}: ints exact"
        );
    }
}

#[test]
fn lossy_output_does_not_depend_on_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = pair(dir.path());
    for (spec, e) in [("sign-axis", None), ("auto", Some(0.1)), ("quant", Some(0.05))] {
        let run = |threads: usize| {
            let out = dir.path().join(format!("d{threads}.dpk"));
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                make(
                    &base,
                    &ft,
                    &out,
                    &MakeOptions {
                        force: true,
                        ..opts(spec, e)
                    },
                    &NoProgress,
                )
            })
            .unwrap();
            std::fs::read(out).unwrap()
        };
        assert_eq!(run(1), run(3), "{spec}");
    }
}

#[test]
fn tensor_rules_override_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = pair(dir.path());
    let delta = dir.path().join("d.dpk");
    let mut o = opts("sign", None);
    o.codecs.rules = vec!["b=quant:bits=8".parse().unwrap(), "w=exact".parse().unwrap()];
    make(&base, &ft, &delta, &o, &NoProgress).unwrap();
    let d = Delta::open(&delta).unwrap();
    let codec = |n: &str| {
        d.index
            .tensors()
            .find(|t| t.name == n)
            .unwrap()
            .codec
            .as_ref()
            .map(|c| c.name())
    };
    assert_eq!(codec("w"), None);
    assert_eq!(codec("b"), Some("quant"), "a rule makes a 1-D tensor lossy");
}

#[test]
fn dare_takes_no_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = pair(dir.path());
    let err = make(
        &base,
        &ft,
        &dir.path().join("d.dpk"),
        &opts("dare", Some(0.1)),
        &NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("expectation"), "{err}");
}

/// Index edits that a reader must refuse for a lossy tensor.
#[test]
fn hostile_lossy_indexes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = pair(dir.path());
    let delta = dir.path().join("d.dpk");
    make(&base, &ft, &delta, &opts("sign-axis", None), &NoProgress).unwrap();
    let d = Delta::open(&delta).unwrap();
    let payload = 16..d.size - 64;
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("rows", Box::new(|w| w["codec"]["rows"] = 63.into())),
        ("params", Box::new(|w| w["params"]["len"] = 4.into())),
        ("no params", Box::new(|w| w["params"] = serde_json::Value::Null)),
        ("codec gone", Box::new(|w| w["codec"] = serde_json::Value::Null)),
        ("unknown", Box::new(|w| w["codec"]["extra"] = 1.into())),
        ("quality", Box::new(|w| w["quality"]["error"] = (-1.0).into())),
        ("chunk codec", Box::new(|w| w["chunks"][0]["c"] = "exact".into())),
        (
            "step",
            Box::new(
                |w| w["codec"] = serde_json::json!({"name": "quant", "step": 0.0, "bits": null, "group": 128, "outliers": 0.0, "domain": "ulp"}),
            ),
        ),
    ];
    for (what, edit) in edits {
        let mut v = serde_json::to_value(&d.index).unwrap();
        let w = v["files"][0]["tensors"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|t| t["name"] == "w")
            .unwrap();
        edit(w);
        let parsed: Result<deltapack::container::index::Index, _> = serde_json::from_value(v);
        let refused = match parsed {
            Err(_) => true,
            Ok(i) => i.validate(payload.clone()).is_err(),
        };
        assert!(refused, "{what}: accepted");
    }
}
