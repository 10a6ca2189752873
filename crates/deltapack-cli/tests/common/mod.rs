//! Running the `deltapack` binary in tests, shared by the CLI test files (each uses a part).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deltapack"))
}

/// Runs the binary with `args` and waits for it.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("deltapack runs")
}

/// The exit code (the binary never dies of a signal in these tests).
pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts success, naming stderr otherwise; returns stdout.
pub fn ok(o: &Output) -> String {
    assert_eq!(code(o), 0, "stderr: {}", stderr(o));
    stdout(o)
}

/// Asserts success and parses stdout as the one JSON document `--json` prints.
pub fn json(o: &Output) -> serde_json::Value {
    assert_eq!(code(o), 0, "stderr: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON document")
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The synthetic demo pair, made by the binary itself: (DIR/base, DIR/finetuned).
pub fn demo_pair(dir: &Path) -> (PathBuf, PathBuf) {
    ok(&run(&["dev", "synth", "--preset", "demo", s(dir)]));
    (dir.join("base"), dir.join("finetuned"))
}
