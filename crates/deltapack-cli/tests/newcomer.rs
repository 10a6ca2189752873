//! What a newcomer runs into (issue 15): outputs that overlap inputs, interrupted runs,
//! output-path rules, silent no-ops, messages without hints, and noisy output. Each test
//! failed before its fix.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod common;
use common::*;
use std::time::{Duration, Instant};

/// The pair and an exact delta of it, `dir/ft.dpk`.
fn pair_and_delta(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (base, ft) = demo_pair(dir);
    let delta = dir.join("ft.dpk");
    ok(&run(&[
        "make",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&delta),
    ]));
    (base, ft, delta)
}

/// Every file below `dir` with its bytes, to show a directory was left as it was.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Names in `dir` of deltapack's temporaries.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".deltapack-"))
        .collect()
}

// 2. Outputs never overlap inputs, and --force replaces only what the command writes.

#[test]
fn an_output_that_is_or_holds_or_lies_in_an_input_is_refused_even_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, delta) = pair_and_delta(dir.path());
    let before = snapshot(dir.path());
    let cases: Vec<Vec<String>> = vec![
        vec!["apply", "--base", s(&base), s(&delta), "-o", s(&base), "--force"],
        vec![
            "apply",
            "--base",
            s(&base),
            s(&delta),
            "-o",
            &format!("{}/out", s(&base)),
            "--force",
        ],
        vec!["apply", "--base", s(&base), s(&delta), "-o", s(dir.path()), "--force"],
        vec![
            "make",
            "--base",
            s(&base),
            "--finetuned",
            s(&ft),
            "-o",
            &format!("{}/x.dpk", s(&ft)),
        ],
        vec![
            "make",
            "--base",
            s(&base),
            "--finetuned",
            s(&ft),
            "-o",
            &format!("{}/model.safetensors", s(&base)),
            "--force",
        ],
        vec![
            "export",
            "--format",
            "additive",
            "--base",
            s(&base),
            s(&delta),
            "-o",
            s(&base),
            "--force",
        ],
        vec!["squash", "--base", s(&base), s(&delta), "-o", s(&delta), "--force"],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("never writes into its inputs"), "{}", stderr(&o));
    }
    assert_eq!(snapshot(dir.path()), before, "no input was touched");
}

#[test]
fn force_replaces_a_previous_output_but_never_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, delta) = pair_and_delta(dir.path());
    let out = dir.path().join("out");
    ok(&run(&["apply", "--base", s(&base), s(&delta), "-o", s(&out)]));
    ok(&run(&[
        "apply",
        "--base",
        s(&base),
        s(&delta),
        "-o",
        s(&out),
        "--force",
    ]));
    std::fs::write(out.join("my-notes.txt"), b"weeks of work").unwrap();
    let o = run(&["apply", "--base", s(&base), s(&delta), "-o", s(&out), "--force"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("my-notes.txt"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("my-notes.txt")).unwrap(), b"weeks of work");
    assert!(out.join("model.safetensors").is_file());
    assert!(temporaries(dir.path()).is_empty());
}

#[test]
fn store_get_into_the_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let store = dir.path().join("store");
    ok(&run(&["store", "init", s(&store), "--base", s(&base)]));
    ok(&run(&["store", "add", s(&store), "ft", s(&ft)]));
    let o = run(&["store", "get", s(&store), "ft", "-o", &format!("{}/bases/x", s(&store))]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("never writes into its inputs"));
    let inner = dir.path().join("ft-copy");
    std::fs::create_dir(&inner).unwrap();
    for e in std::fs::read_dir(&ft).unwrap().flatten() {
        std::fs::copy(e.path(), inner.join(e.file_name())).unwrap();
    }
    let nested = inner.join("store");
    ok(&run(&["store", "init", s(&nested), "--base", s(&base)]));
    let o = run(&["store", "add", s(&nested), "x", s(&inner)]);
    assert_eq!(code(&o), 2, "a store inside the fine-tune: {}", stderr(&o));
}

// 3. Interrupted runs leave nothing behind; a dead process's leftovers are removed.

/// Starts `args` and stops it (SIGSTOP) as soon as a temporary appears in `dir`; `None` if
/// it finished first.
fn start_and_freeze(args: &[&str], dir: &Path) -> Option<Child> {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if !temporaries(dir).is_empty() {
            signal(&child, "STOP");
            return Some(child);
        }
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("no temporary appeared in {}", dir.display());
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status();
    assert!(st.unwrap().success());
}

/// A slow `make` (a lossy search on one thread) of the pair into `out`.
fn slow_make<'a>(base: &'a str, ft: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "make",
        "--base",
        base,
        "--finetuned",
        ft,
        "-o",
        out,
        "--codec",
        "auto",
        "--max-error",
        "0.01",
        "--threads",
        "1",
    ]
}

#[test]
fn sigterm_and_sigint_remove_the_temporary_output() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let outdir = dir.path().join("o");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("ft.dpk");
    for sig in ["TERM", "INT"] {
        let args = slow_make(s(&base), s(&ft), s(&out));
        let mut child = (0..5)
            .find_map(|_| start_and_freeze(&args, &outdir))
            .expect("make ran long enough to be interrupted");
        assert!(!temporaries(&outdir).is_empty());
        signal(&child, sig);
        signal(&child, "CONT");
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "{sig}");
        assert_eq!(temporaries(&outdir), Vec::<String>::new(), "{sig} left temporaries");
        assert!(!out.exists());
    }
}

#[test]
fn a_killed_runs_temporary_is_removed_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let outdir = dir.path().join("o");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("ft.dpk");
    let args = slow_make(s(&base), s(&ft), s(&out));
    let mut child = (0..5)
        .find_map(|_| start_and_freeze(&args, &outdir))
        .expect("make ran long enough to be killed");
    signal(&child, "KILL");
    child.wait().unwrap();
    let left = temporaries(&outdir);
    assert_eq!(left.len(), 1, "SIGKILL cannot be caught: {left:?}");
    ok(&run(&[
        "make",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        &format!("{}/other.dpk", s(&outdir)),
    ]));
    assert_eq!(temporaries(&outdir), Vec::<String>::new());
}

// 4. An I/O error says the OS error once.

#[test]
fn io_errors_say_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.dpk");
    let o = run(&["inspect", s(&missing)]);
    assert_eq!(code(&o), 5);
    assert_eq!(stderr(&o).matches("os error 2").count(), 1, "{}", stderr(&o));
    let o = run(&["make", "--base", s(&missing), "--finetuned", s(&missing), "-o", "x.dpk"]);
    assert_eq!(stderr(&o).matches("os error 2").count(), 1, "{}", stderr(&o));
}

// 5. One rule for output paths.

#[test]
fn every_command_creates_missing_parents_only_when_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, delta) = pair_and_delta(dir.path());
    let deep = dir.path().join("a/b/ft.dpk");
    ok(&run(&[
        "make",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&deep),
    ]));
    let deep_dir = dir.path().join("c/d/out");
    ok(&run(&["apply", "--base", s(&base), s(&delta), "-o", s(&deep_dir)]));
    let missing = dir.path().join("nope");
    for args in [
        vec!["make", "--base", s(&missing), "--finetuned", s(&ft), "-o"],
        vec!["apply", "--base", s(&missing), s(&delta), "-o"],
        vec!["sweep", "--base", s(&missing), "--finetuned", s(&ft), "-o"],
    ] {
        let target = dir.path().join("new/parent/out");
        let mut args = args.clone();
        args.push(s(&target));
        let o = run(&args);
        assert_ne!(code(&o), 0);
        assert!(!dir.path().join("new").exists(), "{args:?} left a directory behind");
    }
}

#[test]
fn sweep_checks_inputs_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let out = dir.path().join("sweep");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("sweep.csv"), b"mine").unwrap();
    let o = run(&["sweep", "-q", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("sweep.csv")).unwrap(), b"mine");
}

#[test]
fn store_init_with_a_bad_base_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let store = dir.path().join("store");
    let o = run(&["store", "init", s(&store), "--base", s(&empty)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(!store.exists(), "store init left {}", store.display());
}

// 6. No silent no-ops.

#[test]
fn max_error_with_the_exact_codec_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let out = dir.path().join("x.dpk");
    let o = run(&[
        "make",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&out),
        "--max-error",
        "0.1",
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--codec auto"), "{}", stderr(&o));
    assert!(!out.exists());
    let rule = "--tensor-codec=*mlp*=quant";
    ok(&run(&[
        "make",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&out),
        "--max-error",
        "0.1",
        rule,
    ]));
}

#[test]
fn one_shard_given_as_the_finetune_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    ok(&run(&[
        "dev",
        "synth",
        "--preset",
        "demo",
        "--shards",
        "3",
        s(dir.path()),
    ]));
    let shard = dir.path().join("finetuned/model-00001-of-00003.safetensors");
    let out = dir.path().join("x.dpk");
    let o = run(&[
        "make",
        "--base",
        s(&dir.path().join("base")),
        "--finetuned",
        s(&shard),
        "-o",
        s(&out),
    ]);
    ok(&o);
    let e = stderr(&o);
    assert!(
        e.contains("warning:") && e.contains("one shard of a sharded model"),
        "{e}"
    );
    assert!(e.contains(s(&dir.path().join("finetuned"))), "{e}");
    let whole = run(&[
        "make",
        "--base",
        s(&dir.path().join("base")),
        "--finetuned",
        s(&dir.path().join("finetuned")),
        "-o",
        s(&dir.path().join("y.dpk")),
    ]);
    assert!(!stderr(&whole).contains("warning"), "{}", stderr(&whole));
}

#[test]
fn store_add_says_when_an_entry_is_identical_to_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let store = dir.path().join("store");
    ok(&run(&["store", "init", s(&store), "--base", s(&base)]));
    ok(&run(&["store", "add", s(&store), "a", s(&ft)]));
    let o = ok(&run(&[
        "store",
        "add",
        s(&store),
        "b",
        s(&ft),
        "--codec",
        "auto",
        "--max-error",
        "0.1",
    ]));
    assert!(o.contains("identical to it") && o.contains("entry a"), "{o}");
    assert!(!o.contains("exact"), "{o}");
}

#[test]
fn urls_where_a_local_path_is_needed_are_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, delta) = pair_and_delta(dir.path());
    let o = bin()
        .current_dir(dir.path())
        .args(["apply", "--base", s(&base), s(&delta), "-o", "s3://bucket/rebuilt"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("is a URL"), "{}", stderr(&o));
    assert!(!dir.path().join("s3:").exists());
    // Schemes deltapack does not read are refused, not taken as directories named `https:`.
    let o = run(&["inspect", "https://example.invalid/x.dpk"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("s3://BUCKET/KEY"), "{}", stderr(&o));
}

// 7. Messages with the hint a user needs.

#[test]
fn a_pickle_only_directory_says_how_to_convert() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = demo_pair(dir.path());
    let pt = dir.path().join("pt");
    std::fs::create_dir(&pt).unwrap();
    std::fs::write(pt.join("pytorch_model.bin"), b"not read").unwrap();
    std::fs::write(pt.join("config.json"), b"{}").unwrap();
    let o = run(&[
        "make",
        "--base",
        s(&base),
        "--finetuned",
        s(&pt),
        "-o",
        s(&dir.path().join("x.dpk")),
    ]);
    assert_eq!(code(&o), 2);
    let e = stderr(&o);
    assert!(
        e.contains("pytorch_model.bin") && e.contains("safe_serialization=True"),
        "{e}"
    );
}

#[test]
fn invalid_settings_give_their_valid_range() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let out = dir.path().join("x.dpk");
    for (args, range) in [
        (vec!["--codec", "quant", "--bits", "12"], "from 2 to 8"),
        (vec!["--codec", "sparse", "--keep", "2"], "at most 1"),
        (vec!["--codec", "quant", "--step", "0"], "positive"),
        (vec!["--codec", "quant:group=7"], "power of two"),
    ] {
        let mut a = vec!["make", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out)];
        a.extend(&args);
        let o = run(&a);
        assert_eq!(code(&o), 2, "{args:?}");
        assert!(stderr(&o).contains(range), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn inspect_explains_links_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, delta) = pair_and_delta(dir.path());
    let child = dir.path().join("child.dpk");
    ok(&run(&[
        "make",
        "--base",
        s(&base),
        "--parent",
        s(&delta),
        "--finetuned",
        s(&ft),
        "-o",
        s(&child),
    ]));
    let o = ok(&run(&["inspect", s(&child)]));
    assert!(o.contains("link:") && o.contains("ft.dpk"), "{o}");
    assert!(!o.contains("origin not recorded"), "{o}");
    let o = run(&["inspect", s(&ft)]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("is a directory, not a deltapack delta"),
        "{}",
        stderr(&o)
    );
}

// 8. Output.

#[test]
fn lossy_make_prints_a_summary_unless_asked_for_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let out = dir.path().join("x.dpk");
    let lossy = ["--codec", "quant", "--bits", "4", "--force"];
    let mut a = vec!["make", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out)];
    a.extend(lossy);
    let summary = ok(&run(&a));
    assert!(summary.lines().count() < 12, "{summary}");
    assert!(summary.contains("--tensors lists every tensor"), "{summary}");
    a.push("--tensors");
    let table = ok(&run(&a));
    assert!(table.lines().count() > 20, "{table}");
    a.pop();
    a.push("-v");
    assert_eq!(ok(&run(&a)).lines().count(), table.lines().count());
}

#[test]
fn quiet_sweep_prints_nothing_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = demo_pair(dir.path());
    let out = dir.path().join("sweep");
    let o = run(&["sweep", "-q", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out)]);
    ok(&o);
    assert_eq!(stderr(&o), "");
    let o = run(&[
        "sweep",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&out),
        "--force",
    ]);
    ok(&o);
    assert!(
        stderr(&o).contains("[ 1/"),
        "progress lines count the points: {}",
        stderr(&o)
    );
}

#[test]
fn json_errors_are_json_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["inspect", s(&dir.path().join("missing.dpk")), "--json"]);
    assert_eq!(code(&o), 5);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(v["exit_code"], 5);
    assert_eq!(v["kind"], "io");
    assert!(v["error"].as_str().unwrap().contains("missing.dpk"));
    let o = run(&["make", "--json", "--bogus"]);
    assert_eq!(code(&o), 2);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(v["kind"], "usage");
}

#[test]
fn apply_json_names_the_output_and_text_uses_plurals() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, delta) = pair_and_delta(dir.path());
    let out = dir.path().join("out");
    let o = ok(&run(&["apply", "--base", s(&base), s(&delta), "-o", s(&out), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    assert_eq!(v["output"], s(&out));
    let text = ok(&run(&["inspect", s(&delta)]));
    assert!(
        text.contains("1 weight file ") || text.contains("1 weight file;"),
        "{text}"
    );
    assert!(!text.contains("1 weight files"), "{text}");
    let store = dir.path().join("store");
    let listed = ok(&run(&["store", "init", s(&store), "--base", s(&base)]));
    assert!(listed.contains("no entries yet"), "{listed}");
    assert!(!listed.contains("0.0x"), "{listed}");
}
