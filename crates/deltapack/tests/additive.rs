//! FastChat-style round trips: `export_additive` from a `.dpk` and `apply_additive` give what
//! FastChat's fp16 arithmetic gives, within the error they report; hostile inputs are clean
//! errors that leave nothing behind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{files, noise, t, write_st, T};
use deltapack::progress::NoProgress;
use deltapack::{apply_additive, export_additive, make, AdditiveOptions, ErrorKind, ExportOptions, MakeOptions};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

/// `n` weights from 2^-22 to 4 in magnitude, both signs.
fn weights(seed: u64, n: usize) -> Vec<f32> {
    noise(seed, 4 * n)
        .chunks(4)
        .map(|c| {
            let u = u32::from_le_bytes(c.try_into().unwrap()) as f32 / u32::MAX as f32 - 0.5;
            u * 2f32.powi((c[0] % 24) as i32 - 20)
        })
        .collect()
}

/// A fine-tune of `w`: a third unchanged, most moved by a small fraction, some by several
/// times their size (sign changes: there fp16 really rounds); `extra` new rows of `cols`.
fn tune(w: &[f32], seed: u64, extra: usize) -> Vec<f32> {
    let r = noise(seed, w.len() + extra);
    let mut out: Vec<f32> = w
        .iter()
        .zip(&r)
        .map(|(&x, &k)| match k % 6 {
            0 | 1 => x,
            2 => x * -2.5 + 1e-3,
            _ => x * (1.0 + (k as f32 - 128.0) / 4096.0),
        })
        .collect();
    out.extend(weights(seed + 1, extra));
    out
}

fn encode(dtype: &str, v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| match dtype {
            "BF16" => bf16::from_f32(x).to_bits().to_le_bytes().to_vec(),
            "F16" => f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
            _ => x.to_le_bytes().to_vec(),
        })
        .collect()
}

/// Element `i` of float `bytes` as PyTorch's `.half()` gives it.
fn half_of(dtype: Dtype, bytes: &[u8], i: usize) -> f16 {
    match dtype {
        Dtype::BF16 => f16::from_f32(bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()),
        Dtype::F16 => f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
        _ => f16::from_f32(f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())),
    }
}

fn value(dtype: Dtype, bytes: &[u8], i: usize) -> f64 {
    match dtype {
        Dtype::BF16 => bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f64(),
        Dtype::F16 => f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f64(),
        _ => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()) as f64,
    }
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// Every tensor of a model directory: dtype, shape, bytes.
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn tensors(dir: &Path) -> Tensors {
    let mut out = BTreeMap::new();
    for (rel, bytes) in files(dir).into_iter().filter(|(k, _)| k.ends_with(".safetensors")) {
        let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
        for (name, v) in st.tensors() {
            out.insert(name, (v.dtype(), v.shape().to_vec(), v.data().to_vec()));
        }
    }
    out
}

/// FastChat's make_delta then apply_delta, written out plainly with `half`'s operators:
/// the delta `f16(ft) - f16(b)` and the result `f16(b) + delta`, the base's rows only.
fn fastchat(base: &Tensors, ft: &Tensors) -> (Tensors, Tensors) {
    let (mut delta, mut result) = (BTreeMap::new(), BTreeMap::new());
    for (name, (fd, shape, fb)) in ft {
        let (bd, _, bb) = &base[name];
        if !is_float(*fd) {
            // The fixtures' only integer tensors are I64.
            let sub: Vec<u8> = fb
                .chunks(8)
                .zip(bb.chunks(8))
                .flat_map(|(f, b)| {
                    (i64::from_le_bytes(f.try_into().unwrap()) - i64::from_le_bytes(b.try_into().unwrap()))
                        .to_le_bytes()
                })
                .collect();
            delta.insert(name.clone(), (*fd, shape.clone(), sub));
            result.insert(name.clone(), (*fd, shape.clone(), fb.clone()));
            continue;
        }
        let (n, common) = (fb.len() / (fd.bitsize() / 8), bb.len() / (bd.bitsize() / 8));
        let (mut d, mut r) = (Vec::new(), Vec::new());
        for i in 0..n {
            let f = half_of(*fd, fb, i);
            let (di, ri) = if i < common {
                let b = half_of(*bd, bb, i);
                (f - b, b + (f - b))
            } else {
                (f, f)
            };
            d.extend_from_slice(&di.to_bits().to_le_bytes());
            r.extend_from_slice(&ri.to_bits().to_le_bytes());
        }
        delta.insert(name.clone(), (Dtype::F16, shape.clone(), d));
        result.insert(name.clone(), (Dtype::F16, shape.clone(), r));
    }
    (delta, result)
}

const VOCAB: usize = 50;
const HIDDEN: usize = 24;

/// A base and a fine-tune of `dtype`: embedding and head grown by 3 rows, a changed weight,
/// an unchanged norm and integer position ids; the fine-tune in two shards with an index.
fn pair(root: &Path, dtype: &'static str) -> (PathBuf, PathBuf) {
    let (base, ft) = (root.join(format!("base-{dtype}")), root.join(format!("ft-{dtype}")));
    let (emb, head, w, norm) = (
        weights(1, VOCAB * HIDDEN),
        weights(2, VOCAB * HIDDEN),
        weights(3, 4000),
        weights(4, HIDDEN),
    );
    let ids: Vec<u8> = (0..16i64).flat_map(|i| i.to_le_bytes()).collect();
    write_st(
        &base.join("model.safetensors"),
        &[
            t(
                "model.embed_tokens.weight",
                dtype,
                &[VOCAB, HIDDEN],
                encode(dtype, &emb),
            ),
            t("lm_head.weight", dtype, &[VOCAB, HIDDEN], encode(dtype, &head)),
            t("layers.0.mlp.weight", dtype, &[100, 40], encode(dtype, &w)),
            t("layers.0.norm.weight", dtype, &[HIDDEN], encode(dtype, &norm)),
            t("position_ids", "I64", &[16], ids.clone()),
        ],
    );
    let rows = VOCAB + 3;
    let shard1 = [
        t(
            "model.embed_tokens.weight",
            dtype,
            &[rows, HIDDEN],
            encode(dtype, &tune(&emb, 5, 3 * HIDDEN)),
        ),
        t("position_ids", "I64", &[16], ids),
    ];
    let shard2 = [
        t("layers.0.mlp.weight", dtype, &[100, 40], encode(dtype, &tune(&w, 6, 0))),
        t("layers.0.norm.weight", dtype, &[HIDDEN], encode(dtype, &norm)),
        t(
            "lm_head.weight",
            dtype,
            &[rows, HIDDEN],
            encode(dtype, &tune(&head, 7, 3 * HIDDEN)),
        ),
    ];
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    write_st(&ft.join(names[0]), &shard1);
    write_st(&ft.join(names[1]), &shard2);
    let bytes: usize = shard1.iter().chain(&shard2).map(|x| x.data.len()).sum();
    let map: serde_json::Map<String, serde_json::Value> = [(&shard1[..], names[0]), (&shard2[..], names[1])]
        .iter()
        .flat_map(|(ts, f)| ts.iter().map(move |x: &T| (x.name.clone(), (*f).into())))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": bytes}, "weight_map": map});
    std::fs::write(ft.join("model.safetensors.index.json"), index.to_string()).unwrap();
    for d in [&base, &ft] {
        std::fs::write(d.join("config.json"), format!(r#"{{"vocab_size": {VOCAB}}}"#)).unwrap();
    }
    std::fs::write(ft.join("tokenizer.json"), br#"{"added": ["<a>", "<b>", "<c>"]}"#).unwrap();
    (base, ft)
}

fn make_dpk(base: &Path, ft: &Path, out: &Path) {
    let opts = MakeOptions {
        chunk_bytes: 4096,
        ..Default::default()
    };
    make(base, ft, out, &opts, &NoProgress).unwrap();
}

#[test]
fn fastchat_style_round_trips_reproduce_fastchat_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in ["BF16", "F16", "F32"] {
        let (base, ft) = pair(dir.path(), dtype);
        let dpk = dir.path().join(format!("{dtype}.dpk"));
        make_dpk(&base, &ft, &dpk);
        let exported = dir.path().join(format!("additive-{dtype}"));
        let made = export_additive(
            &base,
            std::slice::from_ref(&dpk),
            &exported,
            &ExportOptions::default(),
            &NoProgress,
        )
        .unwrap();
        let rebuilt = dir.path().join(format!("rebuilt-{dtype}"));
        let applied = apply_additive(&base, &exported, &rebuilt, &AdditiveOptions::default(), &NoProgress).unwrap();

        let (want_delta, want_result) = fastchat(&tensors(&base), &tensors(&ft));
        assert_eq!(tensors(&exported), want_delta, "{dtype}: delta");
        assert_eq!(tensors(&rebuilt), want_result, "{dtype}: result");

        // Same files as the fine-tune; the other files are the fine-tune's.
        let (ft_files, out_files) = (files(&ft), files(&rebuilt));
        assert_eq!(
            ft_files.keys().collect::<Vec<_>>(),
            out_files.keys().collect::<Vec<_>>()
        );
        for name in ["config.json", "tokenizer.json"] {
            assert_eq!(out_files[name], ft_files[name]);
        }
        let index: serde_json::Value = serde_json::from_slice(&out_files["model.safetensors.index.json"]).unwrap();
        let data: usize = want_result.values().map(|(_, _, b)| b.len()).sum();
        assert_eq!(
            index["metadata"]["total_size"], data,
            "{dtype}: the index follows the fp16 sizes"
        );

        // Measured (export) within the bound (apply), tensor by tensor, and some rounding happened.
        assert!(made.max_abs_error > 0.0 && !made.bound && applied.bound);
        for (m, a) in made.tensors.iter().zip(&applied.tensors) {
            assert_eq!(m.name, a.name);
            assert!(m.max_abs_error <= a.max_abs_error, "{dtype} {}: {m:?} vs {a:?}", m.name);
            assert!(m.rms_error <= a.rms_error, "{dtype} {}", m.name);
        }
        let grown: Vec<_> = applied
            .tensors
            .iter()
            .filter(|t| t.added_rows == 3)
            .map(|t| &t.name)
            .collect();
        assert_eq!(grown, ["model.embed_tokens.weight", "lm_head.weight"]);
        let (max, rel) = measured(&tensors(&base), &tensors(&ft), &tensors(&rebuilt));
        assert_eq!(made.max_abs_error, max, "{dtype}");
        assert!(
            (made.relative_error - rel).abs() <= 1e-9 * rel,
            "{dtype}: {} vs {rel}",
            made.relative_error
        );
    }
}

/// The largest absolute error and `||error|| / ||delta||` of `result` against `ft`, over the
/// float tensors, with the delta `ft - base` (the fine-tune itself in rows the base lacks).
fn measured(base: &Tensors, ft: &Tensors, result: &Tensors) -> (f64, f64) {
    let (mut max, mut err_sq, mut delta_sq) = (0.0f64, 0.0, 0.0);
    for (name, (fd, _, fb)) in ft.iter().filter(|(_, (d, _, _))| is_float(*d)) {
        let (bd, _, bb) = &base[name];
        let (rd, _, rb) = &result[name];
        let common = bb.len() / (bd.bitsize() / 8);
        for i in 0..fb.len() / (fd.bitsize() / 8) {
            let f = value(*fd, fb, i);
            let e = value(*rd, rb, i) - f;
            let d = if i < common { f - value(*bd, bb, i) } else { f };
            max = max.max(e.abs());
            err_sq += e * e;
            delta_sq += d * d;
        }
    }
    (max, (err_sq / delta_sq).sqrt())
}

#[test]
fn the_reported_bound_holds_for_an_f16_finetune() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = pair(dir.path(), "F16");
    // The additive delta written the way FastChat writes it, without deltapack.
    let (delta, _) = fastchat(&tensors(&base), &tensors(&ft));
    let additive = dir.path().join("vicuna-style-delta");
    let ts: Vec<T> = delta
        .iter()
        .map(|(name, (dt, shape, bytes))| {
            t(
                name,
                if *dt == Dtype::I64 { "I64" } else { "F16" },
                shape,
                bytes.clone(),
            )
        })
        .collect();
    write_st(&additive.join("model.safetensors"), &ts);
    for dtype in [None, Some(Dtype::BF16), Some(Dtype::F32)] {
        let out = dir.path().join(format!("out-{dtype:?}"));
        let opts = AdditiveOptions {
            dtype,
            ..Default::default()
        };
        let r = apply_additive(&base, &additive, &out, &opts, &NoProgress).unwrap();
        let (ft_t, base_t, out_t) = (tensors(&ft), tensors(&base), tensors(&out));
        for tr in &r.tensors {
            let one = |m: &Tensors| {
                m.iter()
                    .filter(|(k, _)| *k == &tr.name)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Tensors>()
            };
            let (max, _) = measured(&one(&base_t), &one(&ft_t), &one(&out_t));
            assert!(
                max <= tr.max_abs_error,
                "{dtype:?} {}: error {max:e} > bound {:e}",
                tr.name,
                tr.max_abs_error
            );
        }
        let (max, rel) = measured(&base_t, &ft_t, &out_t);
        assert!(
            max > 0.0 && max <= r.max_abs_error && rel <= r.relative_error,
            "{dtype:?}"
        );
        let written = out_t["layers.0.mlp.weight"].0;
        assert_eq!(written, dtype.unwrap_or(Dtype::F16));
        assert_eq!(out_t["position_ids"], ft_t["position_ids"], "integers are exact");
    }
}

#[test]
fn output_does_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1_300_000;
    let (w, additive) = (weights(9, n), dir.path().join("delta"));
    write_st(
        &dir.path().join("base/model.safetensors"),
        &[t("w", "BF16", &[n], encode("BF16", &w))],
    );
    let d: Vec<f32> = weights(10, n).iter().map(|x| x * 1e-3).collect();
    write_st(
        &additive.join("model.safetensors"),
        &[t("w", "F16", &[n], encode("F16", &d))],
    );
    let run = |threads: usize| {
        let out = dir.path().join(format!("out{threads}"));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let r = pool.install(|| {
            apply_additive(
                &dir.path().join("base"),
                &additive,
                &out,
                &AdditiveOptions::default(),
                &NoProgress,
            )
        });
        (files(&out), serde_json::to_string(&r.unwrap()).unwrap())
    };
    let one = run(1);
    assert_eq!(one, run(3));
}

fn kind<T>(r: deltapack::Result<T>) -> ErrorKind {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind(),
    }
}

/// A directory holding one safetensors file of `tensors`.
fn model(root: &Path, name: &str, tensors: &[T]) -> PathBuf {
    let dir = root.join(name);
    write_st(&dir.join("model.safetensors"), tensors);
    dir
}

#[test]
fn hostile_inputs_are_clean_errors_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let f16s = |n: usize, seed: u64| encode("F16", &weights(seed, n));
    let base = model(
        root,
        "base",
        &[t("a", "F16", &[4, 3], f16s(12, 1)), t("b", "F16", &[5], f16s(5, 2))],
    );
    let apply = |delta: &Path| {
        let out = root.join("out");
        let k = kind(apply_additive(
            &base,
            delta,
            &out,
            &AdditiveOptions::default(),
            &NoProgress,
        ));
        assert!(!out.exists());
        k
    };
    let missing = model(
        root,
        "missing",
        &[t("a", "F16", &[4, 3], f16s(12, 3)), t("c", "F16", &[5], f16s(5, 4))],
    );
    assert_eq!(apply(&missing), ErrorKind::WrongBase, "a tensor the base lacks");
    let cols = model(root, "cols", &[t("a", "F16", &[4, 4], f16s(16, 3))]);
    assert_eq!(apply(&cols), ErrorKind::WrongBase, "another shape");
    let shrunk = model(root, "shrunk", &[t("a", "F16", &[3, 3], f16s(9, 3))]);
    assert_eq!(apply(&shrunk), ErrorKind::WrongBase, "fewer rows");
    let int = model(root, "int", &[t("b", "I32", &[5], vec![0; 20])]);
    assert_eq!(apply(&int), ErrorKind::WrongBase, "an integer delta of a float tensor");
    let bools = model(root, "bools", &[t("b", "BOOL", &[5], vec![0; 5])]);
    assert_eq!(apply(&bools), ErrorKind::BadInput, "a dtype that does not add");
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_eq!(apply(&empty), ErrorKind::BadInput, "no safetensors");
    let truncated = model(root, "truncated", &[t("a", "F16", &[4, 3], f16s(12, 3))]);
    let shard = truncated.join("model.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    assert_eq!(apply(&truncated), ErrorKind::BadInput, "a truncated shard");
    let bad_dtype = AdditiveOptions {
        dtype: Some(Dtype::I8),
        ..Default::default()
    };
    let out = root.join("out");
    assert_eq!(
        kind(apply_additive(&base, &missing, &out, &bad_dtype, &NoProgress)),
        ErrorKind::BadInput
    );

    // A tensor only the base has is left out and reported; an existing output needs force.
    let fine = model(root, "fine", &[t("a", "F16", &[4, 3], f16s(12, 3))]);
    let r = apply_additive(&base, &fine, &out, &AdditiveOptions::default(), &NoProgress).unwrap();
    assert_eq!(r.base_only, ["b"]);
    assert_eq!(tensors(&out).keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(
        kind(apply_additive(
            &base,
            &fine,
            &out,
            &AdditiveOptions::default(),
            &NoProgress
        )),
        ErrorKind::BadInput
    );
    std::fs::remove_dir_all(&out).unwrap();

    // Export: fine-tune tensors the base lacks, or coded against another tensor, do not fit.
    let ft = model(
        root,
        "ft-new",
        &[
            t("a", "F16", &[4, 3], f16s(12, 5)),
            t("b", "F16", &[5], f16s(5, 2)),
            t("new", "F16", &[2], f16s(2, 6)),
        ],
    );
    let dpk = root.join("new.dpk");
    make_dpk(&base, &ft, &dpk);
    let export = |b: &Path, d: &Path| {
        kind(export_additive(
            b,
            &[d.to_path_buf()],
            &out,
            &ExportOptions::default(),
            &NoProgress,
        ))
    };
    assert_eq!(export(&base, &dpk), ErrorKind::BadInput);
    let tied_base = model(
        root,
        "tied-base",
        &[t("model.embed_tokens.weight", "F16", &[4, 3], f16s(12, 1))],
    );
    let tied_ft = model(
        root,
        "tied-ft",
        &[
            t("model.embed_tokens.weight", "F16", &[4, 3], f16s(12, 1)),
            t("lm_head.weight", "F16", &[4, 3], f16s(12, 7)),
        ],
    );
    let tied = root.join("tied.dpk");
    make_dpk(&tied_base, &tied_ft, &tied);
    assert_eq!(export(&tied_base, &tied), ErrorKind::BadInput);
    // The wrong base for a delta that does fit.
    let ok_ft = model(
        root,
        "ft-ok",
        &[t("a", "F16", &[4, 3], f16s(12, 5)), t("b", "F16", &[5], f16s(5, 2))],
    );
    let ok = root.join("ok.dpk");
    make_dpk(&base, &ok_ft, &ok);
    assert_eq!(export(&missing, &ok), ErrorKind::WrongBase);
    let other = model(
        root,
        "other-base",
        &[t("a", "F16", &[4, 3], f16s(12, 8)), t("b", "F16", &[5], f16s(5, 2))],
    );
    assert_eq!(export(&other, &ok), ErrorKind::WrongBase);

    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary outputs left behind: {leftovers:?}");
}

/// Rewrites the header of the safetensors file `path` through `edit`, padded with spaces to
/// its old length so that the data offsets still hold.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_string(&header).unwrap().into_bytes();
    assert!(text.len() <= n, "the edited header must not grow");
    text.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&text);
    std::fs::write(path, bytes).unwrap();
}

/// The `__metadata__` of the one safetensors file of `dir`.
fn metadata(dir: &Path) -> serde_json::Value {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

/// A bf16 base of realistic weights and a fine-tune moving some by a few ULPs, with one
/// tensor large enough that the classifier samples blocks of it rather than all of it.
fn realistic_pair(root: &Path) -> (PathBuf, PathBuf) {
    let (b1, f1) = common::bf16_pair(11, 300 * 1000);
    let (b2, f2) = common::bf16_pair(12, 64 * 64);
    let (b3, _) = common::bf16_pair(13, 64);
    let base = model(
        root,
        "real-base",
        &[
            t("embed", "BF16", &[300, 1000], b1),
            t("w", "BF16", &[64, 64], b2),
            t("norm", "BF16", &[64], b3.clone()),
        ],
    );
    let ft = model(
        root,
        "real-ft",
        &[
            t("embed", "BF16", &[300, 1000], f1),
            t("w", "BF16", &[64, 64], f2),
            t("norm", "BF16", &[64], b3),
        ],
    );
    (base, ft)
}

#[test]
fn classify_tells_a_difference_from_a_model() {
    use deltapack::additive::{classify, Verdict, MARKER_KEY, MARKER_VALUE};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (base, ft) = realistic_pair(root);

    // The fine-tune itself, and the base: models.
    let c = classify(&base, &ft).unwrap();
    assert_eq!(c.verdict, Verdict::FineTune, "{c:?}");
    let (r, d) = (c.relative_norm.unwrap(), c.relative_distance.unwrap());
    assert!((r - 1.0).abs() < 0.01 && d > 0.0 && d < 0.02, "{c:?}");
    assert!(c.describe().contains("a fine-tune of the base"), "{}", c.describe());
    let names: Vec<_> = c.tensors.iter().map(|t| (t.name.as_str(), t.sampled)).collect();
    assert_eq!(
        names,
        [("embed", 65536), ("w", 4096), ("norm", 64)],
        "largest first, sampled"
    );
    let c = classify(&base, &base).unwrap();
    assert_eq!((c.verdict, c.relative_distance), (Verdict::FineTune, Some(0.0)));
    assert!(c.describe().contains("the base itself"), "{}", c.describe());

    // An exported delta carries the marker beside the fine-tune's metadata.
    let dpk = root.join("ft.dpk");
    make_dpk(&base, &ft, &dpk);
    let exported = root.join("exported");
    export_additive(&base, &[dpk], &exported, &ExportOptions::default(), &NoProgress).unwrap();
    assert_eq!(metadata(&exported)[MARKER_KEY], MARKER_VALUE);
    assert_eq!(metadata(&exported)["format"], "pt");
    assert_eq!(classify(&base, &exported).unwrap().verdict, Verdict::Marked);

    // Without the marker, its magnitudes tell: a few ULPs of bf16 are well under 1 %.
    edit_header(&exported.join("model.safetensors"), |h| {
        h["__metadata__"].as_object_mut().unwrap().remove(MARKER_KEY);
    });
    let c = classify(&base, &exported).unwrap();
    assert_eq!(c.verdict, Verdict::Difference, "{c:?}");
    assert!(c.relative_norm.unwrap() < 0.02, "{c:?}");

    // An applied model drops the marker: given back as a delta, it is a model again.
    let marked = root.join("marked");
    export_additive(
        &base,
        &[root.join("ft.dpk")],
        &marked,
        &ExportOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let applied = root.join("applied");
    apply_additive(&base, &marked, &applied, &AdditiveOptions::default(), &NoProgress).unwrap();
    assert!(metadata(&applied).get(MARKER_KEY).is_none(), "{}", metadata(&applied));
    assert_eq!(metadata(&applied)["format"], "pt");
    assert_eq!(classify(&base, &applied).unwrap().verdict, Verdict::FineTune);

    // Another model of the base's scale; one of a tenth of it is unsettled (between the
    // thresholds); no float tensor in common settles nothing either.
    let (other, _) = common::bf16_pair(99, 300 * 1000);
    let other = model(root, "other", &[t("embed", "BF16", &[300, 1000], other)]);
    assert_eq!(classify(&base, &other).unwrap().verdict, Verdict::OtherModel);
    let (independent, _) = common::bf16_pair(98, 300 * 1000);
    let scaled: Vec<f32> = independent
        .chunks(2)
        .map(|b| 0.4 * bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let unsettled = model(
        root,
        "unsettled",
        &[t("embed", "F32", &[300, 1000], encode("F32", &scaled))],
    );
    let c = classify(&base, &unsettled).unwrap();
    assert_eq!(c.verdict, Verdict::Unknown, "{c:?}");
    let strangers = model(root, "strangers", &[t("x", "BF16", &[64], vec![0; 128])]);
    let c = classify(&base, &strangers).unwrap();
    assert_eq!((c.verdict, c.tensors.len()), (Verdict::Unknown, 0));
    assert_eq!(kind(classify(&base, &root.join("missing"))), ErrorKind::Io);
}
