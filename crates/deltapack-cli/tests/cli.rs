//! The `deltapack` binary: commands, JSON output and documented exit codes.

use std::path::Path;
use std::process::Command;

mod common;
use common::*;

/// The demo pair, made by the binary itself: DIR/base and DIR/finetuned, and DIR/ft.dpk.
fn pair(dir: &Path) -> (String, String, String) {
    let d = dir.to_str().unwrap();
    assert_eq!(code(&run(&["dev", "synth", "--preset", "demo", d])), 0);
    let (base, ft, delta) = (format!("{d}/base"), format!("{d}/finetuned"), format!("{d}/ft.dpk"));
    let made = json(&run(&[
        "make",
        "--base",
        &base,
        "--finetuned",
        &ft,
        "-o",
        &delta,
        "--json",
        "--base-id",
        "org/m@abc",
    ]));
    assert!(made["ratio"].as_f64().unwrap() > 3.0, "{made}");
    assert_eq!(made["tied"], 1);
    assert_eq!(made["resized"], 1);
    (base, ft, delta)
}

#[test]
fn demo_runs_end_to_end() {
    let o = run(&["demo"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("byte-identical"));
    let o = run(&["demo", "--json"]);
    assert_eq!(json(&o)["identical"], true);
}

#[test]
fn commands_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, delta) = pair(dir.path());
    let d = dir.path().to_str().unwrap();

    let inspect = json(&run(&["inspect", &delta, "--json"]));
    assert_eq!(inspect["base"]["id"], "org/m@abc");
    assert!(inspect["tensors"].as_array().unwrap().len() > 10);
    let text = run(&["inspect", &delta, "--tensors"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("lm_head.weight"));

    let out = format!("{d}/out");
    assert_eq!(
        json(&run(&[
            "apply",
            "--base",
            &base,
            &delta,
            "-o",
            &out,
            "--json",
            "--threads",
            "1"
        ]))["ok"],
        true
    );
    assert_eq!(
        json(&run(&["verify", "--base", &base, &delta, "--finetuned", &ft, "--json"]))["compared_with_finetuned"],
        true
    );

    // 2: the output exists and --force was not given.
    let o = run(&["apply", "--base", &base, &delta, "-o", &out]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    // 2: usage error.
    assert_eq!(code(&run(&["make", "--base", &base])), 2);
    // 3: the base is not the one the delta was made from.
    let o = run(&["verify", "--base", &ft, &delta]);
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("org/m@abc"));
    // 4: a corrupted delta.
    let mut bytes = std::fs::read(&delta).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = format!("{d}/bad.dpk");
    std::fs::write(&bad, &bytes).unwrap();
    assert_eq!(code(&run(&["verify", "--base", &base, &bad])), 4);
    assert_eq!(code(&run(&["inspect", &format!("{d}/base/config.json")])), 4);
    // 5: a file that does not exist.
    assert_eq!(code(&run(&["inspect", &format!("{d}/nope.dpk")])), 5);
    // 6: verify against a different fine-tune.
    let o = run(&["verify", "--base", &base, &delta, "--finetuned", &base]);
    assert_eq!(code(&o), 6, "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_full_disk_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, delta) = pair(dir.path());
    let out = dir.path().join("out");
    // A file-size limit makes writes fail with EFBIG part-way, as a full disk would.
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{}' apply --base '{base}' '{delta}' -o '{}'",
        env!("CARGO_BIN_EXE_deltapack"),
        out.display()
    );
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert_eq!(code(&o), 5, "{}", String::from_utf8_lossy(&o.stderr));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!out.exists() && left.len() == 3, "left behind: {left:?}");
    let ft = dir.path().join("finetuned");
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{}' make --base '{base}' --finetuned '{}' -o '{}' --force",
        env!("CARGO_BIN_EXE_deltapack"),
        ft.display(),
        delta
    );
    let before = std::fs::read(&delta).unwrap();
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert_eq!(code(&o), 5, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&delta).unwrap(),
        before,
        "the old delta must survive a failed --force"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 3, "left behind: {left:?}");
}

#[test]
fn bases_resolve_from_the_hugging_face_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, _) = pair(dir.path());
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let cache = dir.path().join("hub");
    let repo = cache.join("models--org--demo-base");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::rename(&base, repo.join("snapshots").join(commit)).unwrap();
    let delta = format!("{}/hub.dpk", dir.path().display());
    let with_cache = |args: &[&str]| bin().args(args).env("HF_HUB_CACHE", &cache).output().unwrap();
    let o = with_cache(&[
        "make",
        "--base",
        "org/demo-base",
        "--finetuned",
        &ft,
        "-o",
        &delta,
        "--json",
    ]);
    assert_eq!(json(&o)["tied"], 1);
    let inspect = json(&run(&["inspect", &delta, "--json"]));
    assert_eq!(inspect["base"]["id"], format!("org/demo-base@{commit}"));
    let o = with_cache(&[
        "verify",
        "--base",
        &format!("org/demo-base@{commit}"),
        &delta,
        "--finetuned",
        &ft,
    ]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let o = with_cache(&["verify", "--base", "org/missing", &delta]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("huggingface-cli download org/missing"));
}

#[test]
fn lossy_flags_reports_and_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, _) = pair(dir.path());
    let delta = format!("{}/lossy.dpk", dir.path().display());
    let made = json(&run(&[
        "make",
        "--base",
        &base,
        "--finetuned",
        &ft,
        "-o",
        &delta,
        "--json",
        "--codec",
        "quant",
        "--max-error",
        "0.05",
        "--tensor-codec",
        "*embed*=sign-axis",
    ]));
    let tensors = made["tensors"].as_array().unwrap();
    assert!(!tensors.is_empty());
    for t in tensors {
        let want = if t["name"].as_str().unwrap().contains("embed") {
            "sign-axis"
        } else {
            "quant"
        };
        if t["codec"] != "exact" {
            assert_eq!(t["codec"], want, "{t}");
        }
        if t["codec"] == "quant" {
            assert!(t["error"].as_f64().unwrap() <= 0.05, "{t}");
        }
    }
    let inspect = json(&run(&["inspect", &delta, "--json"]));
    assert!(inspect["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["quality"]["error"].as_f64().unwrap() > 0.0));
    let verified = json(&run(&["verify", "--base", &base, &delta, "--finetuned", &ft, "--json"]));
    assert!((verified["measured_error"].as_f64().unwrap() - made["error"].as_f64().unwrap()).abs() < 1e-9);
    // Usage errors: exit 2, with the reason.
    for bad in [
        &["--codec", "dare", "--max-error", "0.1"][..],
        &["--codec", "auto"],
        &["--codec", "quant:bits=12"],
        &["--tensor-codec", "nonsense"],
    ] {
        let mut args = vec!["make", "--base", &base, "--finetuned", &ft, "-o", &delta, "--force"];
        args.extend_from_slice(bad);
        let o = run(&args);
        assert_eq!(code(&o), 2, "{bad:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let out = format!("{}/sweep", dir.path().display());
    let o = run(&["sweep", "-q", "--base", &base, "--finetuned", &ft, "-o", &out]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(format!("{out}/sweep.csv")).unwrap();
    assert!(csv.starts_with("codec,setting,max_error,bits_per_param,error,seconds"));
    assert!(csv.lines().count() > 20 && csv.contains("sign-axis"));
    let svg = std::fs::read_to_string(format!("{out}/sweep.svg")).unwrap();
    assert!(svg.contains("Gaussian bound") && svg.trim_end().ends_with("</svg>"));
}

/// Relative paths of the files of a store, without its lock file.
fn store_paths(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.retain(|p| p != "lock");
    out.sort();
    out
}

fn entries(store: &str) -> Vec<String> {
    let v = json(&run(&["store", "list", store, "--json"]));
    let names = v["manifest"]["entries"].as_array().unwrap().iter();
    names.map(|e| e["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn concurrent_store_adds_both_land_in_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, _) = pair(dir.path());
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    assert_eq!(code(&run(&["store", "init", s, "--base", &base, "--quiet"])), 0);
    let spawn = |name: &str| {
        bin()
            .args(["store", "add", s, name, &ft, "--quiet"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("a"), spawn("b"));
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let mut names = entries(s);
    names.sort();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(code(&run(&["store", "fsck", s])), 0);
    let out = dir.path().join("got");
    assert_eq!(code(&run(&["store", "get", s, "b", "-o", out.to_str().unwrap()])), 0);
    // The second add chose the first as its parent: the same model costs almost nothing.
    let v = json(&run(&["store", "list", s, "--json"]));
    let second = &v["manifest"]["entries"][1];
    assert!(second["parent"].is_string(), "{v}");
}

#[test]
fn a_killed_store_add_leaves_none_of_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, _) = pair(dir.path());
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    assert_eq!(code(&run(&["store", "init", s, "--base", &base, "--quiet"])), 0);
    let mut before = store_paths(&store);
    for (i, ms) in [0u64, 10, 40, 100, 250].into_iter().enumerate() {
        let name = format!("x{i}");
        let mut child = bin()
            .args(["store", "add", s, &name, &ft, "--quiet"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let _ = child.kill();
        let _ = child.wait();
        // Leftovers are removed by the next command that takes the lock.
        assert_eq!(code(&run(&["store", "fsck", s])), 0, "after killing at {ms} ms");
        let now = store_paths(&store);
        if entries(s).contains(&name) {
            // It finished before the kill: the entry is whole.
            let out = dir.path().join(format!("got{i}"));
            assert_eq!(code(&run(&["store", "get", s, &name, "-o", out.to_str().unwrap()])), 0);
        } else {
            assert_eq!(now, before, "killed at {ms} ms");
        }
        before = now;
    }
}

#[test]
fn import_of_a_deltatensors_file_and_its_exit_codes() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deltapack/tests/data/wdelta");
    let (base, wdelta) = (data.join("base"), data.join("sparse.wdelta"));
    let (base, wdelta) = (base.to_str().unwrap(), wdelta.to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let dpk = format!("{d}/s.dpk");
    let made = json(&run(&["import", wdelta, "--base", base, "-o", &dpk, "--json"]));
    assert_eq!(made["changed"], 5, "{made}");
    let out = format!("{d}/out");
    assert_eq!(
        json(&run(&["apply", "--base", base, &dpk, "-o", &out, "--json"]))["ok"],
        true
    );
    let text = run(&["import", wdelta, "--base", base, "-o", &dpk, "--force"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("ratio"));
    assert_eq!(code(&run(&["import", wdelta, "--base", base, "-o", &dpk])), 2);
    // The fine-tune is not the base: its hash differs (3), unless the check is off.
    let ft = data.join("finetuned");
    let o = run(&[
        "import",
        wdelta,
        "--base",
        ft.to_str().unwrap(),
        "-o",
        &format!("{d}/w.dpk"),
    ]);
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--no-base-check"));
    let args = [
        "import",
        wdelta,
        "--base",
        ft.to_str().unwrap(),
        "-o",
        &format!("{d}/w.dpk"),
        "--no-base-check",
    ];
    assert_eq!(code(&run(&args)), 0);
    let mut bytes = std::fs::read(wdelta).unwrap();
    bytes[100] ^= 1;
    let bad = format!("{d}/bad.wdelta");
    std::fs::write(&bad, &bytes).unwrap();
    assert_eq!(
        code(&run(&["import", &bad, "--base", base, "-o", &format!("{d}/b.dpk")])),
        4
    );
}
