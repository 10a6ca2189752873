//! `deltapack sweep`: a grid of codecs and settings on one pair, as a CSV table and a
//! rate-distortion plot.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use deltapack::tune::{CodecPolicy, CodecSpec};

/// One grid point: the codec spec and the error budget, if any.
const GRID: &[(&str, Option<f64>)] = &[
    ("exact", None),
    ("sign", None),
    ("sign-axis", None),
    ("quant:bits=2", None),
    ("quant:bits=3", None),
    ("quant:bits=4", None),
    ("quant:bits=6", None),
    ("quant:bits=8", None),
    ("quant", Some(0.2)),
    ("quant", Some(0.1)),
    ("quant", Some(0.05)),
    ("quant", Some(0.02)),
    ("quant:domain=value", Some(0.1)),
    ("quant:domain=value", Some(0.05)),
    ("sparse:keep=0.01", None),
    ("sparse:keep=0.03", None),
    ("sparse:keep=0.1", None),
    ("sparse:keep=0.3", None),
    ("dare:keep=0.1", None),
    ("dare:keep=0.3", None),
    ("auto", Some(0.3)),
    ("auto", Some(0.1)),
    ("auto", Some(0.05)),
];

/// One measured grid point.
struct Point {
    codec: String,
    setting: String,
    max_error: Option<f64>,
    bits_per_param: f64,
    error: f64,
    seconds: f64,
    delta_bytes: u64,
}

/// What `sweep` was asked to do.
pub struct Sweep<'a> {
    /// The base checkpoint.
    pub base: &'a Path,
    /// The fine-tuned checkpoint.
    pub finetuned: &'a Path,
    /// Output directory: `sweep.csv`, `sweep.svg` and, if kept, the deltas.
    pub dir: &'a Path,
    /// Keep each grid point's delta as `dir/<point>.dpk`.
    pub keep_deltas: bool,
    /// Replace existing output files.
    pub force: bool,
    /// One JSON document on stdout.
    pub json: bool,
    /// No progress lines on stderr.
    pub quiet: bool,
}

/// Runs the grid and writes `dir/sweep.csv` and `dir/sweep.svg`. Inputs and existing
/// outputs are checked before anything is written; a directory the sweep created is removed
/// again if it fails.
pub fn run(s: &Sweep, bars: &dyn deltapack::progress::Progress) -> Result<()> {
    deltapack::checkpoint::check_output_disjoint(s.dir, &[("base", s.base), ("fine-tune", s.finetuned)])?;
    deltapack::checkpoint::Checkpoint::open(s.base)?;
    deltapack::checkpoint::Checkpoint::open(s.finetuned)?;
    let mut outputs = vec![s.dir.join("sweep.csv"), s.dir.join("sweep.svg")];
    if s.keep_deltas {
        outputs.extend(
            GRID.iter()
                .map(|&(spec, budget)| s.dir.join(format!("{}.dpk", point_name(spec, budget)))),
        );
    }
    if !s.force {
        if let Some(o) = outputs.iter().find(|o| o.exists()) {
            return Err(deltapack::Error::OutputExists { path: o.clone() }.into());
        }
    }
    let created = !s.dir.exists();
    std::fs::create_dir_all(s.dir).with_context(|| format!("creating {}", s.dir.display()))?;
    let result = run_grid(s, bars);
    if result.is_err() && created {
        let _ = std::fs::remove_dir_all(s.dir);
    }
    result
}

/// The file-name stem of a grid point.
fn point_name(spec: &str, budget: Option<f64>) -> String {
    format!(
        "{}{}",
        spec.replace([':', '=', ','], "-"),
        budget.map(|e| format!("-e{e}")).unwrap_or_default()
    )
}

fn run_grid(s: &Sweep, bars: &dyn deltapack::progress::Progress) -> Result<()> {
    let mut points = Vec::new();
    for (i, &(spec, budget)) in GRID.iter().enumerate() {
        let parsed: CodecSpec = spec.parse().map_err(anyhow::Error::msg)?;
        let name = point_name(spec, budget);
        let out = s.dir.join(format!("{name}.dpk"));
        let opts = deltapack::MakeOptions {
            force: s.force,
            codecs: CodecPolicy {
                default: parsed.clone(),
                max_error: budget,
                ..Default::default()
            },
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let r =
            deltapack::make(s.base, s.finetuned, &out, &opts, bars).with_context(|| format!("sweep point {name}"))?;
        let seconds = t.elapsed().as_secs_f64();
        if !s.keep_deltas {
            std::fs::remove_file(&out).with_context(|| format!("removing {}", out.display()))?;
        }
        if !s.json && !s.quiet {
            eprintln!(
                "[{:>2}/{}] {:<28} {:>9} {:>7.3} bits/param  error {:.4}  {:.2} s",
                i + 1,
                GRID.len(),
                name,
                budget.map(|e| format!("<= {e}")).unwrap_or_default(),
                r.bits_per_param,
                r.error,
                seconds
            );
        }
        points.push(Point {
            codec: parsed.name().to_string(),
            setting: spec.split_once(':').map(|s| s.1.to_string()).unwrap_or_default(),
            max_error: budget,
            bits_per_param: r.bits_per_param,
            error: r.error,
            seconds,
            delta_bytes: r.delta_bytes,
        });
    }
    let csv = s.dir.join("sweep.csv");
    write_file(&csv, to_csv(&points).as_bytes(), s.force)?;
    let svg = s.dir.join("sweep.svg");
    write_file(&svg, plot(&points).as_bytes(), s.force)?;
    if s.json {
        out!(
            "{}",
            serde_json::json!({"csv": csv, "svg": svg, "points": points.len()})
        );
    } else {
        out!("wrote {} and {}", csv.display(), svg.display());
    }
    Ok(())
}

/// Writes a whole file under a temporary name and renames it into place.
fn write_file(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    let mut f = deltapack::checkpoint::OutputFile::create(path, force)?;
    f.write_all(bytes)?;
    f.commit(false)?;
    Ok(())
}

fn to_csv(points: &[Point]) -> String {
    let mut s = String::from("codec,setting,max_error,bits_per_param,error,seconds,delta_bytes\n");
    for p in points {
        let _ = writeln!(
            s,
            "{},{},{},{:.5},{:.6},{:.3},{}",
            p.codec,
            p.setting.replace(',', ";"),
            p.max_error.map(|e| e.to_string()).unwrap_or_default(),
            p.bits_per_param,
            p.error,
            p.seconds,
            p.delta_bytes
        );
    }
    s
}

const COLORS: &[(&str, &str)] = &[
    ("exact", "#222222"),
    ("quant", "#1f77b4"),
    ("sparse", "#2ca02c"),
    ("dare", "#9467bd"),
    ("sign", "#d62728"),
    ("sign-axis", "#ff7f0e"),
    ("auto", "#17becf"),
];

/// The rate-distortion plot: bits/param against error on a log scale, with the Shannon
/// bound of a Gaussian delta (`error = 2^-R`). Written by hand: a plotting crate would pull
/// in font rendering for one scatter plot.
fn plot(points: &[Point]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 500.0, 70.0, 170.0, 30.0, 55.0);
    let xmax = points.iter().map(|p| p.bits_per_param).fold(2.0f64, f64::max).ceil();
    let floor_err: f64 = 1e-3;
    let worst = points
        .iter()
        .map(|p| p.error.max(floor_err).log10())
        .fold(0.0, f64::max);
    let (ylo, yhi) = (floor_err.log10(), worst.ceil());
    let x = |b: f64| left + (b / xmax) * (w - left - right);
    let y = |e: f64| top + (yhi - e.max(floor_err).log10()) / (yhi - ylo) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    // Axes and grid.
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        w - left - right,
        h - top - bottom
    );
    let step = match xmax {
        x if x <= 2.0 => 0.25,
        x if x <= 4.0 => 0.5,
        x if x <= 10.0 => 1.0,
        _ => 2.0,
    };
    let mut b = 0.0;
    while b <= xmax + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{1}" stroke="#ddd"/><text x="{0:.1}" y="{2}" text-anchor="middle">{b}</text>"##,
            x(b),
            h - bottom,
            h - bottom + 16.0
        );
        b += step;
    }
    for k in (ylo as i32)..=(yhi as i32) {
        let e = 10f64.powi(k);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{e}</text>"##,
            y(e),
            w - right,
            left - 6.0,
            y(e) + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">bits per parameter (whole delta file)</text>"#,
        (left + w - right) / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">relative RMS error of the delta</text>"#,
        (top + h - bottom) / 2.0
    );
    // The bound: error 2^-R for a Gaussian delta.
    let bound: Vec<String> = (1..=200)
        .map(|i| {
            let r = xmax * i as f64 / 200.0;
            format!("{:.1},{:.1}", x(r), y(2f64.powf(-r)))
        })
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#888" stroke-dasharray="5,4"/>"##,
        bound.join(" ")
    );
    // Points, then the legend.
    for p in points {
        let color = COLORS.iter().find(|c| c.0 == p.codec).map_or("#000", |c| c.1);
        let label = match p.max_error {
            Some(e) => format!("{} {} &lt;={e}", p.codec, p.setting),
            None => format!("{} {}", p.codec, p.setting),
        };
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"><title>{label}: {:.3} bits/param, error {:.4}</title></circle>"#,
            x(p.bits_per_param),
            y(p.error),
            p.bits_per_param,
            p.error
        );
    }
    let mut ly = top + 10.0;
    for (name, color) in COLORS.iter().filter(|(n, _)| points.iter().any(|p| p.codec == *n)) {
        let _ = writeln!(
            s,
            r#"<circle cx="{}" cy="{ly}" r="4" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            w - right + 15.0,
            w - right + 25.0,
            ly + 4.0
        );
        ly += 18.0;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="#888" stroke-dasharray="5,4"/><text x="{2}" y="{3}">Gaussian bound 2^-R</text>"##,
        w - right + 8.0,
        w - right + 22.0,
        w - right + 25.0,
        ly + 4.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="10">errors below {floor_err} drawn at the floor</text>"#,
        w - right + 8.0,
        ly + 22.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_and_table_hold_every_point() {
        let pts = vec![
            Point {
                codec: "quant".into(),
                setting: "bits=4".into(),
                max_error: None,
                bits_per_param: 4.2,
                error: 0.05,
                seconds: 1.0,
                delta_bytes: 10,
            },
            Point {
                codec: "exact".into(),
                setting: String::new(),
                max_error: None,
                bits_per_param: 6.0,
                error: 0.0,
                seconds: 1.0,
                delta_bytes: 20,
            },
        ];
        let svg = plot(&pts);
        assert_eq!(
            svg.matches("<circle cx").count(),
            2 + 2,
            "two points and two legend entries"
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(to_csv(&pts).lines().count(), 3);
    }
}
