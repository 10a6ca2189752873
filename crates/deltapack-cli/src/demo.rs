//! `deltapack demo`: the whole round trip on a small synthetic pair.

use std::path::{Path, PathBuf};

use crate::synth::{self, Spec};
use anyhow::{Context, Result};
use serde_json::json;

use crate::progress::Bars;
use crate::report;

/// Makes the demo pair under `dir` (or a temporary directory) and runs make, inspect, apply, verify.
pub fn run(dir: Option<PathBuf>, json_out: bool, bars: &Bars) -> Result<()> {
    let tmp;
    let root = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let say = |s: String| {
        if !json_out {
            out!("{s}");
        }
    };
    let spec = Spec::demo();
    let (base, ft) = (root.join("base"), root.join("finetuned"));
    say(format!("== making a demo pair in {}", root.display()));
    synth::write_model(&spec, &base, false, 1).context("writing the demo base")?;
    synth::write_model(&spec, &ft, true, 2).context("writing the demo fine-tune")?;
    say(format!(
        "   base: {} tensors; fine-tune: 2 shards, {} rows added to the vocabulary, its own lm_head",
        spec.tensors(false).len(),
        spec.added_tokens
    ));
    let delta = root.join("finetuned.dpk");
    let out = root.join("rebuilt");
    say(format!(
        "\n== deltapack make --base {} --finetuned {} -o {}",
        base.display(),
        ft.display(),
        delta.display()
    ));
    let opts = deltapack::MakeOptions {
        base_id: Some("deltapack/demo-base@v1".into()),
        force: true,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let made = deltapack::make(&base, &ft, &delta, &opts, bars)?;
    if !json_out {
        report::make(false, &delta, &made, t.elapsed(), false)?;
    }
    say(format!("\n== deltapack inspect {}", delta.display()));
    let inspection = deltapack::inspect(&delta)?;
    if !json_out {
        report::inspect(false, &delta, &inspection, false)?;
    }
    say(format!(
        "\n== deltapack apply --base {} {} -o {}",
        base.display(),
        delta.display(),
        out.display()
    ));
    let t = std::time::Instant::now();
    let applied = deltapack::apply(
        &base,
        &delta,
        &out,
        &deltapack::ApplyOptions {
            force: true,
            ..Default::default()
        },
        bars,
    )?;
    if !json_out {
        report::rebuild(false, "applied", Some(&out), &applied, t.elapsed(), false)?;
    }
    say(format!(
        "\n== deltapack verify --base {} {} --finetuned {}",
        base.display(),
        delta.display(),
        ft.display()
    ));
    let t = std::time::Instant::now();
    let verified = deltapack::verify(&base, &delta, Some(&ft), bars)?;
    if !json_out {
        report::rebuild(false, "verified", None, &verified, t.elapsed(), false)?;
    }
    let identical = same_files(&ft, &out)?;
    anyhow::ensure!(identical, "the rebuilt directory differs from the fine-tune");
    if json_out {
        out!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"make": made, "apply": applied, "verify": verified, "identical": identical})
            )?
        );
    } else {
        out!(
            "\nrebuilt directory is byte-identical to the fine-tune: {} files",
            std::fs::read_dir(&ft)?.count()
        );
    }
    Ok(())
}

fn same_files(a: &Path, b: &Path) -> Result<bool> {
    for e in std::fs::read_dir(a)? {
        let e = e?;
        if std::fs::read(e.path())? != std::fs::read(b.join(e.file_name()))? {
            return Ok(false);
        }
    }
    Ok(std::fs::read_dir(a)?.count() == std::fs::read_dir(b)?.count())
}
