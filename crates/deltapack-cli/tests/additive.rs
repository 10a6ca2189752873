//! `apply` with a FastChat-style additive delta directory, and `export --format additive`:
//! JSON reports and exit codes.

use std::path::Path;

mod common;
use common::*;

/// The values of an F32 tensor of `rows` rows of 8 columns, from `seed`.
fn values(rows: usize, seed: u16) -> Vec<f32> {
    (0..rows * 8)
        .map(|k| ((k as f32 * 0.37 + seed as f32).sin()) * 0.05)
        .collect()
}

/// Writes `dir/model.safetensors` with F32 tensors `(name, rows, seed)` of 8 columns.
fn model(dir: &Path, tensors: &[(&str, usize, u16)]) {
    let v: Vec<(&str, Vec<f32>)> = tensors.iter().map(|&(n, rows, seed)| (n, values(rows, seed))).collect();
    write_model(dir, &v);
}

/// Writes `dir/model.safetensors` with F32 tensors `(name, values)` of 8 columns, and a config.
fn write_model(dir: &Path, tensors: &[(&str, Vec<f32>)]) {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, (name, v)) in tensors.iter().enumerate() {
        let start = data.len();
        v.iter().for_each(|x| data.extend_from_slice(&x.to_le_bytes()));
        let sep = if i == 0 { "" } else { "," };
        header.push_str(&format!(
            r#"{sep}"{name}":{{"dtype":"F32","shape":[{},8],"data_offsets":[{start},{}]}}"#,
            v.len() / 8,
            data.len()
        ));
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    std::fs::write(dir.join("config.json"), b"{}").unwrap();
}

/// A fine-tune of `model(dir, tensors)`: every value moved by up to 1 %.
fn fine_tune(dir: &Path, tensors: &[(&str, usize, u16)]) {
    let v: Vec<(&str, Vec<f32>)> = tensors
        .iter()
        .map(|&(n, rows, seed)| {
            let moved = values(rows, seed)
                .iter()
                .enumerate()
                .map(|(k, x)| x * (1.0 + 0.01 * (k as f32 * 1.7).cos()))
                .collect();
            (n, moved)
        })
        .collect();
    write_model(dir, &v);
}

/// The JSON header of a safetensors file.
fn header(file: &Path) -> serde_json::Value {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

/// Removes the `deltapack_delta` marker from a safetensors file's `__metadata__`, padding the
/// header with spaces to its old length so that the data offsets still hold.
fn strip_marker(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h = header(file);
    let removed = h["__metadata__"].as_object_mut().unwrap().remove("deltapack_delta");
    assert_eq!(removed, Some("additive".into()));
    let mut text = serde_json::to_string(&h).unwrap().into_bytes();
    text.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&text);
    std::fs::write(file, bytes).unwrap();
}

/// Writes fine-tune minus base, `ft - base` in f32 (no marker), as another tool might.
fn difference(dir: &Path, tensors: &[(&str, usize, u16)]) {
    let v: Vec<(&str, Vec<f32>)> = tensors
        .iter()
        .map(|&(n, rows, seed)| {
            let d = values(rows, seed)
                .iter()
                .enumerate()
                .map(|(k, x)| x * 0.01 * (k as f32 * 1.7).cos())
                .collect();
            (n, d)
        })
        .collect();
    write_model(dir, &v);
}

#[test]
fn export_then_apply_an_additive_delta() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    model(&dir.path().join("base"), &[("embed", 10, 1), ("w", 6, 2)]);
    model(&dir.path().join("ft"), &[("embed", 12, 3), ("w", 6, 4)]);
    let (base, ft, dpk) = (p("base"), p("ft"), p("ft.dpk"));
    assert_eq!(
        code(&run(&["make", "-q", "--base", &base, "--finetuned", &ft, "-o", &dpk])),
        0
    );

    let (add, out) = (p("additive"), p("out"));
    let made = json(&run(&[
        "export", "--format", "additive", "--base", &base, &dpk, "-o", &add, "--json",
    ]));
    assert_eq!(
        (made["bound"].clone(), made["weight_files"].clone()),
        (false.into(), 1.into())
    );
    let applied = json(&run(&[
        "apply", "--base", &base, &add, "-o", &out, "--json", "--dtype", "bf16",
    ]));
    assert_eq!(applied["bound"], true);
    assert_eq!(applied["tensors"][0]["added_rows"], 2);
    assert_eq!(applied["tensors"][0]["dtype"], "BF16");
    assert!(applied["max_abs_error"].as_f64().unwrap() >= made["max_abs_error"].as_f64().unwrap());
    let text = run(&["apply", "--base", &base, &add, "-o", &out, "--force"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("worst-case error"),
        "{text:?}"
    );

    // 2: exists without --force; --dtype with a .dpk; an unknown format.
    assert_eq!(code(&run(&["apply", "--base", &base, &add, "-o", &out])), 2);
    assert_eq!(
        code(&run(&["apply", "--base", &base, &dpk, "-o", &p("x"), "--dtype", "f32"])),
        2
    );
    assert_eq!(
        code(&run(&[
            "export",
            "--format",
            "zip",
            "--base",
            &base,
            &dpk,
            "-o",
            &p("x")
        ])),
        2
    );
    // 2: a fine-tune tensor the base lacks cannot be written additively.
    model(
        &dir.path().join("ft2"),
        &[("embed", 10, 3), ("w", 6, 4), ("extra", 2, 5)],
    );
    let dpk2 = p("ft2.dpk");
    assert_eq!(
        code(&run(&[
            "make",
            "-q",
            "--base",
            &base,
            "--finetuned",
            &p("ft2"),
            "-o",
            &dpk2
        ])),
        0
    );
    let o = run(&["export", "--format", "additive", "--base", &base, &dpk2, "-o", &p("x")]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("extra"));
    // 3: the additive delta has a tensor this base lacks.
    model(&dir.path().join("small-base"), &[("w", 6, 2)]);
    assert_eq!(
        code(&run(&["apply", "--base", &p("small-base"), &add, "-o", &p("x")])),
        3
    );
    assert!(!dir.path().join("x").exists());
}

const TENSORS: [(&str, usize, u16); 2] = [("embed", 10, 1), ("w", 6, 2)];

#[test]
fn a_fine_tune_given_as_the_delta_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    model(&dir.path().join("base"), &TENSORS);
    fine_tune(&dir.path().join("ft"), &TENSORS);
    let (base, ft, out) = (p("base"), p("ft"), p("out"));

    // Before: exit 0 and base + fine-tune written, a wrong model.
    let o = run(&["apply", "--base", &base, &ft, "-o", &out]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(!dir.path().join("out").exists());
    let e = stderr(&o);
    for says in [
        "looks like a model (a fine-tune of the base: its tensors are within 0.",
        "not a difference",
        &format!("deltapack make --base {base} --finetuned {ft} -o ft.dpk"),
        "pass --additive",
    ] {
        assert!(e.contains(says), "{says:?} not in {e}");
    }
    let o = run(&["apply", "--base", &base, &base, "-o", &out]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("the base itself"), "{}", stderr(&o));
    // A single .safetensors file is judged the same way.
    let o = run(&["apply", "--base", &base, &format!("{ft}/model.safetensors"), "-o", &out]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("a fine-tune of the base"), "{}", stderr(&o));
    assert!(!dir.path().join("out").exists());

    // --additive forces it (for a difference the evidence cannot settle).
    let forced = json(&run(&[
        "apply",
        "--base",
        &base,
        &ft,
        "-o",
        &out,
        "--additive",
        "--json",
    ]));
    assert_eq!(forced["recognised"]["by"], "flag");
    assert!(dir.path().join("out/model.safetensors").exists());
}

#[test]
fn exported_deltas_carry_a_marker_and_apply_without_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    model(&dir.path().join("base"), &TENSORS);
    fine_tune(&dir.path().join("ft"), &TENSORS);
    let (base, ft, dpk, add) = (p("base"), p("ft"), p("ft.dpk"), p("additive"));
    assert_eq!(
        code(&run(&["make", "-q", "--base", &base, "--finetuned", &ft, "-o", &dpk])),
        0
    );
    assert_eq!(
        code(&run(&[
            "export", "-q", "--format", "additive", "--base", &base, &dpk, "-o", &add
        ])),
        0
    );
    let meta = &header(&dir.path().join("additive/model.safetensors"))["__metadata__"];
    assert_eq!(meta["deltapack_delta"], "additive", "{meta}");
    assert_eq!(meta["format"], "pt", "transformers needs a format: {meta}");

    let applied = json(&run(&["apply", "--base", &base, &add, "-o", &p("out"), "--json"]));
    assert_eq!(applied["recognised"]["by"], "marker");
    let text = run(&["apply", "--base", &base, &add, "-o", &p("out"), "--force"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("carries the marker of an additive delta"),
        "{text:?}"
    );
    // The applied model is a model: it does not keep the marker, and is refused as a delta.
    assert!(header(&dir.path().join("out/model.safetensors"))["__metadata__"]
        .get("deltapack_delta")
        .is_none());
    let o = run(&["apply", "--base", &base, &p("out"), "-o", &p("again")]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(!dir.path().join("again").exists());
}

#[test]
fn a_difference_without_a_marker_is_recognised_by_its_magnitudes() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    model(&dir.path().join("base"), &TENSORS);
    difference(&dir.path().join("diff"), &TENSORS);
    let base = p("base");
    let applied = json(&run(&["apply", "--base", &base, &p("diff"), "-o", &p("out"), "--json"]));
    assert_eq!(applied["recognised"]["by"], "evidence");
    let r = applied["recognised"]["relative_norm"].as_f64().unwrap();
    assert!(r > 0.0 && r < 0.01, "{applied}");
    assert_eq!(applied["recognised"]["tensors"][0]["name"], "embed", "largest first");

    // Neither small nor close to the base: refused, and --additive forces it.
    let far: Vec<(&str, Vec<f32>)> = TENSORS
        .iter()
        .map(|&(n, rows, seed)| (n, values(rows, seed + 100).iter().map(|x| 0.4 * x).collect()))
        .collect();
    write_model(&dir.path().join("far"), &far);
    let o = run(&["apply", "--base", &base, &p("far"), "-o", &p("x")]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot be told apart from a model"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("pass --additive"), "{}", stderr(&o));
    assert!(!dir.path().join("x").exists());
    let text = run(&["apply", "--base", &base, &p("far"), "-o", &p("x"), "--additive"]);
    assert_eq!(code(&text), 0, "{}", stderr(&text));
    assert!(String::from_utf8_lossy(&text.stdout).contains("as --additive says"));
}

#[test]
fn additive_takes_one_directory_never_a_dpk() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    model(&dir.path().join("base"), &TENSORS);
    fine_tune(&dir.path().join("ft"), &TENSORS);
    let (base, ft, dpk) = (p("base"), p("ft"), p("ft.dpk"));
    assert_eq!(
        code(&run(&["make", "-q", "--base", &base, "--finetuned", &ft, "-o", &dpk])),
        0
    );
    let o = run(&["apply", "--base", &base, &dpk, "-o", &p("x"), "--additive"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("is a deltapack delta (.dpk), not an additive delta"),
        "{}",
        stderr(&o)
    );
    // Told by its bytes, whatever its name.
    std::fs::copy(&dpk, dir.path().join("renamed.safetensors")).unwrap();
    let o = run(&[
        "apply",
        "--base",
        &base,
        &p("renamed.safetensors"),
        "-o",
        &p("x"),
        "--additive",
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("is a deltapack delta (.dpk)"), "{}", stderr(&o));
    let o = run(&["apply", "--base", &base, &ft, &ft, "-o", &p("x"), "--additive"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("not a chain"), "{}", stderr(&o));
    assert!(!dir.path().join("x").exists());
    // The .dpk itself still applies, to the fine-tune.
    assert_eq!(code(&run(&["apply", "-q", "--base", &base, &dpk, "-o", &p("x")])), 0);
}

/// The real checkpoints in ../shared/models, when present.
#[test]
fn real_fine_tune_is_refused_and_its_difference_recognised() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models");
    if !models.join("minilm-base-bf16").is_dir() || !models.join("ft-a-bf16").is_dir() {
        eprintln!("skipping: {} not found", models.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let m = |name: &str| models.join(name).to_str().unwrap().to_string();
    let (base, ft) = (m("minilm-base-bf16"), m("ft-a-bf16"));

    let o = run(&["apply", "--base", &base, &ft, "-o", &p("out")]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("a fine-tune of the base"), "{}", stderr(&o));
    assert!(!dir.path().join("out").exists());

    let (dpk, add) = (p("ft.dpk"), p("additive"));
    assert_eq!(
        code(&run(&["make", "-q", "--base", &base, "--finetuned", &ft, "-o", &dpk])),
        0
    );
    assert_eq!(
        code(&run(&[
            "export", "-q", "--format", "additive", "--base", &base, &dpk, "-o", &add
        ])),
        0
    );
    strip_marker(&dir.path().join("additive/model.safetensors"));
    let applied = json(&run(&["apply", "--base", &base, &add, "-o", &p("out"), "--json"]));
    assert_eq!(applied["recognised"]["by"], "evidence");
    let (r, d) = (
        applied["recognised"]["relative_norm"].as_f64().unwrap(),
        applied["recognised"]["relative_distance"].as_f64().unwrap(),
    );
    eprintln!("ft-a-bf16 minus base: ||X|| / ||B|| = {r:.4}, ||X - B|| / ||B|| = {d:.4}");
    assert!(r < 0.1 && d > 0.9, "{r} {d}");
}
