//! FastChat-style additive deltas: `apply` given a model directory that is recognised as one
//! (or `--additive`), and `export --format additive`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use deltapack::additive::{Classification, TensorRounding, Verdict};
use deltapack::progress::Progress;
use deltapack::{AdditiveOptions, AdditiveReport, ExportOptions};
use serde_json::json;

use crate::report::{count, human};

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
    fn dtype(self) -> deltapack::Dtype {
        match self {
            OutDtype::F16 => deltapack::Dtype::F16,
            OutDtype::Bf16 => deltapack::Dtype::BF16,
            OutDtype::F32 => deltapack::Dtype::F32,
        }
    }
}

/// The library's options for `apply` with an additive delta.
pub fn options(force: bool, sync: bool, dtype: Option<OutDtype>) -> AdditiveOptions {
    AdditiveOptions {
        force,
        sync,
        dtype: dtype.map(OutDtype::dtype),
    }
}

/// Why `apply` takes its delta for an additive delta.
pub enum Recognised {
    /// `--additive` says so.
    Flag,
    /// The marker `export --format additive` writes, or the magnitudes of its tensors
    /// against the base's (the library's verdict).
    Classified(Classification),
}

impl Recognised {
    fn json(&self) -> serde_json::Value {
        match self {
            Recognised::Flag => json!({"by": "flag"}),
            Recognised::Classified(c) => {
                let by = if c.verdict == Verdict::Marked {
                    "marker"
                } else {
                    "evidence"
                };
                json!({
                    "by": by,
                    "relative_norm": c.relative_norm,
                    "relative_distance": c.relative_distance,
                    "tensors": c.tensors,
                })
            }
        }
    }

    fn text(&self) -> String {
        match self {
            Recognised::Flag => "taken for an additive delta, as --additive says (not judged)".into(),
            Recognised::Classified(c) => c.describe(),
        }
    }
}

/// Decides whether `apply`'s `deltas` are one additive delta, and why; `None` for `.dpk` deltas.
///
/// Being a directory is not enough: a fine-tune given in place of a difference would be added
/// to the base, a wrong model with plausible error figures. A lone directory (or
/// `.safetensors` file) is an additive delta when it carries the marker `export` writes or
/// its tensors are small against the base's (the library's `classify`); one that looks like
/// a model, or that the evidence cannot settle, is refused (exit 2) with what it looks like
/// and how to go on. `--additive` (`forced`) skips the judgement, for differences from other
/// tools that the evidence cannot settle; it never turns a `.dpk` or a chain into one.
pub fn recognise(base: &Path, deltas: &[PathBuf], forced: bool) -> Result<Option<Recognised>> {
    let candidate = match deltas {
        [one] => Candidate::of(one),
        _ if forced => {
            return Err(crate::usage(
                "--additive takes one additive delta (a model directory of fine-tune minus base tensors), not a \
                 chain of deltas",
            ))
        }
        _ => return Ok(None),
    };
    let dir = &deltas[0];
    match (candidate, forced) {
        (Candidate::Dpk, true) => Err(crate::usage(format!(
            "{} is a deltapack delta (.dpk), not an additive delta; apply it without --additive",
            dir.display()
        ))),
        (Candidate::Other, true) => Err(crate::usage(format!(
            "--additive takes a model directory (or a .safetensors file) of fine-tune minus base tensors; {} is \
             neither",
            dir.display()
        ))),
        (Candidate::Checkpoint, true) => Ok(Some(Recognised::Flag)),
        (Candidate::Dpk | Candidate::Other, false) => Ok(None),
        (Candidate::Checkpoint, false) => {
            let c = deltapack::additive::classify(base, dir)
                .with_context(|| format!("judging whether {} is an additive delta", dir.display()))?;
            if c.verdict.is_additive() {
                Ok(Some(Recognised::Classified(c)))
            } else {
                Err(refusal(base, dir, &c))
            }
        }
    }
}

/// What `apply` was given as its one delta.
#[derive(Clone, Copy)]
enum Candidate {
    /// A model directory or a `.safetensors` file: possibly an additive delta.
    Checkpoint,
    /// A deltapack container, by its magic bytes or its extension.
    Dpk,
    /// Any other file (or a missing path): left to the `.dpk` reader to report.
    Other,
}

impl Candidate {
    fn of(p: &Path) -> Candidate {
        if p.is_dir() {
            return Candidate::Checkpoint;
        }
        let mut magic = [0u8; 8];
        let starts_dpk = std::fs::File::open(p)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == deltapack::container::MAGIC;
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if starts_dpk || ext.eq_ignore_ascii_case("dpk") {
            Candidate::Dpk
        } else if ext.eq_ignore_ascii_case("safetensors") && p.is_file() {
            Candidate::Checkpoint
        } else {
            Candidate::Other
        }
    }
}

/// The usage error (exit 2) for a directory that does not look like a difference: what it
/// looks like, in the library's words, and the commands that go on from there.
fn refusal(base: &Path, dir: &Path, c: &Classification) -> anyhow::Error {
    let stem = dir
        .file_name()
        .map_or("finetuned".into(), |n| n.to_string_lossy().into_owned());
    let make = |b: &str| {
        format!(
            "`deltapack make --base {b} --finetuned {} -o {}.dpk`",
            dir.display(),
            stem.trim_end_matches(".safetensors")
        )
    };
    let base_s = base.display().to_string();
    let next = match c.verdict {
        Verdict::FineTune if c.relative_distance == Some(0.0) => {
            "there is nothing to apply; if it really is an additive delta, pass --additive".into()
        }
        Verdict::FineTune => format!(
            "to store it as a delta run {}; if it really is an additive delta, pass --additive",
            make(&base_s)
        ),
        Verdict::OtherModel => format!(
            "if it is a fine-tune of another base, {} stores it as a delta; if it really is an additive delta \
             against {base_s}, pass --additive",
            make("ITS_BASE")
        ),
        _ => format!(
            "if it really is an additive delta (fine-tune minus base), pass --additive; if it is a model, {} \
             stores it as a delta",
            make(&base_s)
        ),
    };
    crate::usage(format!("{} {}; {next}", dir.display(), c.describe()))
}

/// `apply --base B DIR -o OUT` with an additive delta directory, recognised as `how` says.
pub fn apply(
    base: &Path,
    delta: &Path,
    out: &Path,
    opts: &AdditiveOptions,
    how: &Recognised,
    json_out: bool,
    progress: &dyn Progress,
) -> Result<()> {
    if !json_out {
        // Said first: it is what the result rests on.
        out!("{}: {}", delta.display(), how.text());
    }
    let t = Instant::now();
    let r = deltapack::apply_additive(base, delta, out, opts, progress)
        .with_context(|| format!("applying the additive delta {}", delta.display()))?;
    if json_out {
        return print_json(out, &r, t.elapsed(), Some(how.json()));
    }
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
        return print_json(out, r, took, None);
    }
    out!(
        "wrote {} in {:.2} s: {} ({}), {}, {}",
        out.display(),
        took.as_secs_f64(),
        count(r.weight_files as u64, "safetensors file"),
        human(r.bytes),
        count(r.aux_files as u64, "other file"),
        count(r.tensors.len() as u64, "tensor")
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

/// The `--json` report, with how the delta was recognised (`recognised`) after `apply`.
fn print_json(out: &Path, r: &AdditiveReport, took: Duration, recognised: Option<serde_json::Value>) -> Result<()> {
    let mut v = serde_json::to_value(r)?;
    v["output"] = json!(out);
    v["seconds"] = json!(took.as_secs_f64());
    if let Some(how) = recognised {
        v["recognised"] = how;
    }
    v["ok"] = json!(true);
    out!("{}", serde_json::to_string_pretty(&v)?);
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
