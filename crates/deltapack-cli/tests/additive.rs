//! `apply` with a FastChat-style additive delta directory, and `export --format additive`:
//! JSON reports and exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deltapack"))
        .args(args)
        .output()
        .expect("deltapack runs")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn json(o: &Output) -> serde_json::Value {
    assert_eq!(code(o), 0, "stderr: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON document")
}

/// Writes `dir/model.safetensors` with F32 tensors `(name, rows, seed)` of 8 columns.
fn model(dir: &Path, tensors: &[(&str, usize, u16)]) {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, &(name, rows, seed)) in tensors.iter().enumerate() {
        let start = data.len();
        for k in 0..rows * 8 {
            let v = ((k as f32 * 0.37 + seed as f32).sin()) * 0.05;
            data.extend_from_slice(&v.to_le_bytes());
        }
        let sep = if i == 0 { "" } else { "," };
        header.push_str(&format!(
            r#"{sep}"{name}":{{"dtype":"F32","shape":[{rows},8],"data_offsets":[{start},{}]}}"#,
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
