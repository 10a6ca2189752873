//! FastChat-style additive deltas: `apply` given a model directory, and `export --format additive`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use deltapack::additive::TensorRounding;
use deltapack::progress::Progress;
use deltapack::{AdditiveOptions, AdditiveReport, ExportOptions};
use serde_json::json;

use crate::report::human;

/// The formats `export` writes.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// FastChat-style additive delta: a model directory of fine-tune minus base, in fp16.
    Additive,
}

/// The dtype of the float tensors `apply` writes from an additive delta.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OutDtype {
    F16,
    Bf16,
    F32,
}

impl OutDtype {
    fn name(self) -> &'static str {
        match self {
            OutDtype::F16 => "F16",
            OutDtype::Bf16 => "BF16",
            OutDtype::F32 => "F32",
        }
    }
}

/// The library's options for `apply` with an additive delta.
pub fn options(force: bool, sync: bool, dtype: Option<OutDtype>) -> AdditiveOptions {
    AdditiveOptions {
        force,
        sync,
        dtype: dtype.map(|d| deltapack::dtype::parse(d.name()).expect("a safetensors dtype name")),
    }
}

/// True when `apply`'s delta is an additive delta, a model directory, rather than a `.dpk` file.
pub fn is_additive(delta: &Path) -> bool {
    delta.is_dir()
}

/// `apply --base B DIR -o OUT` with an additive delta directory.
pub fn apply(
    base: &Path,
    delta: &Path,
    out: &Path,
    opts: &AdditiveOptions,
    json_out: bool,
    progress: &dyn Progress,
) -> Result<()> {
    let t = Instant::now();
    let r = deltapack::apply_additive(base, delta, out, opts, progress)
        .with_context(|| format!("applying the additive delta {}", delta.display()))?;
    print(json_out, out, &r, t.elapsed())
}

/// `export --format additive --base B DELTA.. -o DIR`.
pub fn export(
    base: &Path,
    deltas: &[PathBuf],
    out: &Path,
    opts: &ExportOptions,
    json_out: bool,
    progress: &dyn Progress,
) -> Result<()> {
    let t = Instant::now();
    let r = deltapack::export_additive(base, deltas, out, opts, progress)
        .with_context(|| format!("exporting {} as an additive delta", crate::names(deltas)))?;
    print(json_out, out, &r, t.elapsed())
}

/// Prints what was written and how far it is from the fine-tune.
fn print(json_out: bool, out: &Path, r: &AdditiveReport, took: Duration) -> Result<()> {
    if json_out {
        let mut v = serde_json::to_value(r)?;
        v["output"] = json!(out);
        v["seconds"] = json!(took.as_secs_f64());
        v["ok"] = json!(true);
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    out!(
        "wrote {} in {:.2} s: {} safetensors files ({}), {} other files, {} tensors",
        out.display(),
        took.as_secs_f64(),
        r.weight_files,
        human(r.bytes),
        r.aux_files,
        r.tensors.len()
    );
    let (what, le) = if r.bound {
        ("worst-case error against the fine-tune (fp16 rounding)", "<=")
    } else {
        ("error of FastChat's apply_delta against the fine-tune", "=")
    };
    out!(
        "  {what}: max |error| {le} {:.3e}, ||error|| / ||delta|| {le} {:.3e}",
        r.max_abs_error,
        r.relative_error
    );
    out!(
        "  fp16 overflow to inf: {} values; subnormal fp16 delta or sum: {} values",
        r.overflowed,
        r.subnormal
    );
    if !r.base_only.is_empty() {
        out!("  base tensors left out (not in the delta): {}", r.base_only.join(", "));
    }
    if !r.skipped.is_empty() {
        out!("  skipped: {}", r.skipped.join(", "));
    }
    worst_tensors(&r.tensors);
    Ok(())
}

/// The tensors with the largest errors (all of them are in `--json`).
fn worst_tensors(tensors: &[TensorRounding]) {
    const SHOWN: usize = 8;
    let mut worst: Vec<&TensorRounding> = tensors
        .iter()
        .filter(|t| t.max_abs_error > 0.0 || t.overflowed > 0)
        .collect();
    if worst.is_empty() {
        return;
    }
    worst.sort_by(|a, b| b.max_abs_error.total_cmp(&a.max_abs_error));
    out!();
    out!(
        "  {:<52} {:>11} {:>10} {:>10} {:>9} {:>6}",
        "tensor",
        "max |error|",
        "rms error",
        "delta rms",
        "overflow",
        "rows+"
    );
    for t in worst.iter().take(SHOWN) {
        out!(
            "  {:<52} {:>11.3e} {:>10.3e} {:>10.3e} {:>9} {:>6}",
            t.name,
            t.max_abs_error,
            t.rms_error,
            t.delta_rms,
            t.overflowed,
            t.added_rows
        );
    }
    if worst.len() > SHOWN {
        out!(
            "  ... {} more tensors with a nonzero error (--json lists all)",
            worst.len() - SHOWN
        );
    }
}
