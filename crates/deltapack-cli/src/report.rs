//! Text and JSON output of each command.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use deltapack::container::index::Blob;
use deltapack::{MakeReport, RebuildReport};
use serde_json::json;

/// Formats a byte count with binary units.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

pub fn print_json(v: &serde_json::Value) -> Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `n noun`, with the noun in the plural unless `n` is 1 ("1 tensor", "2 entries").
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        return format!("1 {noun}");
    }
    match noun.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'o', 'u']) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

/// Prints the result of `make`: a summary, and with `list_tensors` every lossy tensor.
pub fn make(json_out: bool, out: &Path, r: &MakeReport, took: Duration, list_tensors: bool) -> Result<()> {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    if json_out {
        let mut v = serde_json::to_value(r)?;
        v["output"] = json!(out);
        v["seconds"] = json!(took.as_secs_f64());
        return print_json(&v);
    }
    out!("wrote {} in {:.2} s", out.display(), took.as_secs_f64());
    out!();
    out!("  tensors   same {:>5}   changed {:>5}   resized {:>3}   converted {:>3}   tied {:>3}   new {:>3}   removed {:>3}",
        r.same, r.changed, r.resized, r.converted, r.tied, r.new, r.removed);
    out!(
        "  files     {} ({} identical to the base's){}",
        count(r.aux_files as u64, "auxiliary file"),
        r.aux_same_as_base,
        if r.skipped.is_empty() {
            String::new()
        } else {
            format!(", skipped: {}", r.skipped.join(", "))
        }
    );
    out!("  fine-tune {:>12}", human(r.finetuned_bytes));
    out!(
        "  delta     {:>12}   ratio {:.2}x   ({:.3} bits per parameter)",
        human(r.delta_bytes),
        r.ratio,
        r.bits_per_param
    );
    if r.tensors.is_empty() {
        return Ok(());
    }
    out!(
        "  lossy     {}; model error ||D'-D||/||D|| = {:.5}",
        count(r.lossy as u64, "tensor"),
        r.error
    );
    if list_tensors {
        out!();
        quality_table(
            r.tensors
                .iter()
                .map(|t| (t.name.as_str(), t.codec.as_str(), t.setting.clone(), &t.quality)),
        );
        return Ok(());
    }
    let mut by_codec: Vec<(&str, usize)> = Vec::new();
    for t in &r.tensors {
        match by_codec.iter_mut().find(|(c, _)| *c == t.codec) {
            Some((_, n)) => *n += 1,
            None => by_codec.push((&t.codec, 1)),
        }
    }
    let codecs: Vec<String> = by_codec.iter().map(|(c, n)| format!("{c} {n}")).collect();
    out!("  codecs    {}", codecs.join(", "));
    if let Some(w) = r
        .tensors
        .iter()
        .max_by(|a, b| a.quality.error.total_cmp(&b.quality.error))
    {
        out!(
            "  worst     {} ({} {}): error {:.5}; --tensors lists every tensor",
            w.name,
            w.codec,
            w.setting,
            w.quality.error
        );
    }
    Ok(())
}

/// Prints one line per tensor: codec, setting, bits/param, error, max abs error.
fn quality_table<'a>(rows: impl Iterator<Item = (&'a str, &'a str, String, &'a deltapack::tune::Quality)>) {
    out!(
        "  {:<52} {:<9} {:>9} {:>9} {:>10}  setting",
        "tensor",
        "codec",
        "bits/par",
        "error",
        "max |err|"
    );
    for (name, codec, setting, q) in rows {
        out!(
            "  {:<52} {:<9} {:>9.3} {:>9.5} {:>10.3e}  {setting}",
            name,
            codec,
            q.bits_per_param,
            q.error,
            q.max_abs_error
        );
    }
}

/// Prints the result of `apply`, `store get` (with the `output` written) or `verify`; with
/// `list_tensors`, every lossy tensor measured against the fine-tune.
pub fn rebuild(
    json_out: bool,
    verb: &str,
    output: Option<&Path>,
    r: &RebuildReport,
    took: Duration,
    list_tensors: bool,
) -> Result<()> {
    if json_out {
        let mut v = serde_json::to_value(r)?;
        if let Some(o) = output {
            v["output"] = json!(o);
        }
        v["seconds"] = json!(took.as_secs_f64());
        v["ok"] = json!(true);
        return print_json(&v);
    }
    let what = match (r.compared_with_finetuned, r.measured.is_empty()) {
        (true, true) => ", identical to the fine-tune byte for byte",
        (true, false) => ", exact tensors identical to the fine-tune",
        _ => "",
    };
    let chain = match r.chain_length {
        1 => String::new(),
        n => format!(" through a chain of {n} deltas"),
    };
    let into = output.map(|o| format!(" into {}", o.display())).unwrap_or_default();
    out!(
        "{verb}{chain}{into}: {} in {} and {}, {} in {:.2} s; every fingerprint matched{what}",
        count(r.tensors as u64, "tensor"),
        count(r.weight_files as u64, "weight file"),
        count(r.aux_files as u64, "other file"),
        human(r.bytes),
        took.as_secs_f64()
    );
    if r.measured.is_empty() {
        return Ok(());
    }
    out!(
        "{} measured against the fine-tune: model error {:.5}",
        count(r.measured.len() as u64, "lossy tensor"),
        r.measured_error
    );
    if !list_tensors {
        if let Some(w) = r.measured.iter().max_by(|a, b| a.error.total_cmp(&b.error)) {
            out!(
                "  worst {} ({}): error {:.5}, recorded {:.5}; --tensors lists every tensor",
                w.name,
                w.codec,
                w.error,
                w.recorded_error
            );
        }
        return Ok(());
    }
    out!(
        "  {:<52} {:<9} {:>10} {:>10} {:>10}",
        "tensor",
        "codec",
        "recorded",
        "measured",
        "max |err|"
    );
    for m in &r.measured {
        out!(
            "  {:<52} {:<9} {:>10.5} {:>10.5} {:>10.3e}",
            m.name,
            m.codec,
            m.recorded_error,
            m.error,
            m.max_abs_error
        );
    }
    Ok(())
}

/// Prints what a delta holds.
pub fn inspect(json_out: bool, path: &Path, inspection: &deltapack::Inspection, list_tensors: bool) -> Result<()> {
    let (index, size) = (&inspection.index, inspection.size);
    let ft = index.finetuned_bytes();
    let tensors: Vec<_> = index.tensors().collect();
    if json_out {
        return print_json(&inspection.to_json(path));
    }
    out!(
        "{}: deltapack format v{}, {} ({})",
        path.display(),
        index.version,
        human(size),
        index.created_by
    );
    match &index.parent {
        Some(link) => {
            let parent = link.file.as_deref().unwrap_or("(its file name was not recorded)");
            out!(
                "link:      continues {parent}, the delta number {} of its chain",
                link.depth
            );
            out!(
                "           made against the model that chain rebuilds ({}, fingerprint {}), not against a base:",
                count(index.base.tensors, "tensor"),
                short(&index.base.fingerprint)
            );
            out!(
                "           apply the whole chain in order: deltapack apply --base BASE ... {parent} {}",
                path.display()
            );
        }
        None => {
            out!(
                "base:      {}",
                index
                    .base
                    .id
                    .as_deref()
                    .unwrap_or("(origin not recorded; see --base-id of make)")
            );
            out!(
                "           {}, {}, fingerprint {}",
                count(index.base.tensors, "tensor"),
                human(index.base.bytes),
                short(&index.base.fingerprint)
            );
        }
    }
    out!(
        "fine-tune: {} in {} and {}; ratio {:.2}x",
        human(ft),
        count(index.files.len() as u64, "weight file"),
        count(index.aux.len() as u64, "other file"),
        ft as f64 / size as f64
    );
    let same = tensors.iter().filter(|t| t.unchanged()).count();
    out!(
        "tensors:   {} ({same} unchanged), {} removed from the base",
        tensors.len(),
        index.removed.len()
    );
    if let Some((changed, n)) = inspection.changed() {
        out!(
            "changed:   {changed} of {n} values (density {:.3} %)",
            100.0 * changed as f64 / n.max(1) as f64
        );
    }
    let lossy = tensors.iter().filter(|t| t.codec.is_some()).count();
    if lossy > 0 {
        out!(
            "lossy:     {}; {:.3} bits per parameter; model error {:.5}",
            count(lossy as u64, "tensor"),
            inspection.bits_per_param(),
            index.model_error()
        );
    }
    for f in &index.files {
        out!(
            "  {}  {}  {}",
            f.path,
            human(f.size),
            count(f.tensors.len() as u64, "tensor")
        );
    }
    for a in &index.aux {
        let how = match &a.blob {
            Blob::SameAsBase { .. } => "same as base".to_string(),
            Blob::External => "kept in the store, by content".to_string(),
            Blob::Zstd { len, dict, .. } => format!(
                "stored in {}{}",
                human(*len),
                if dict.is_some() { " (against the base's)" } else { "" }
            ),
        };
        out!("  {}  {}  {how}", a.path, human(a.size));
    }
    for s in &index.skipped {
        out!("  skipped {}: {}", s.path, s.reason);
    }
    if list_tensors && index.tensors().any(|t| t.quality.is_some()) {
        out!();
        quality_table(tensors.iter().filter_map(|t| {
            let q = t.quality.as_ref()?;
            let codec = t.codec.as_ref().map_or("exact", |c| c.name());
            Some((
                t.name.as_str(),
                codec,
                t.codec.as_ref().map(|c| c.setting()).unwrap_or_default(),
                q,
            ))
        }));
    } else if list_tensors {
        out!();
        out!(
            "{:<60} {:>6} {:>18} {:>10} {:>10} {:>8} {:>9}",
            "tensor",
            "dtype",
            "shape",
            "relation",
            "stored",
            "bits/el",
            "density"
        );
        for t in tensors {
            let elems = t.shape.iter().product::<u64>().max(1);
            let shape = format!("{:?}", t.shape);
            let rel = if t.unchanged() {
                "same".to_string()
            } else {
                format!("{:?}", t.relation).to_lowercase()
            };
            let density = t
                .changed
                .map_or("-".to_string(), |c| format!("{:.3} %", 100.0 * c as f64 / elems as f64));
            out!(
                "{:<60} {:>6} {:>18} {:>10} {:>10} {:>8.3} {:>9}",
                t.name,
                t.dtype,
                shape,
                rel,
                human(t.stored_bytes()),
                8.0 * t.stored_bytes() as f64 / elems as f64,
                density
            );
        }
    }
    Ok(())
}

/// The first 16 hex digits of a fingerprint, as people compare them.
fn short(fingerprint: &str) -> &str {
    fingerprint.get(..16).unwrap_or(fingerprint)
}
