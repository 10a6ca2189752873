//! Hot swap against `apply`, side by side in one process (run by `scripts/bench_hotswap.sh`).
//!
//! ```text
//! bench_hotswap run BASE OUT_DIR REPEATS DELTA_A [DELTA_B [DELTA_B_ON_A]]
//!     For each of REPEATS rounds: apply DELTA_A to OUT_DIR (removed first, untimed), then on
//!     a model loaded once: switch base -> A, A -> base, and with DELTA_B, apply it too, and
//!     switch base -> A -> B -> base; with DELTA_B_ON_A (B made with `--parent DELTA_A`),
//!     switch from A to the chain A, B|A (one link applied) and back (one link reverted).
//!     Prints medians, and each operation's peak resident memory above what was resident
//!     before it (VmHWM after resetting it, minus VmRSS before). The first switch to A is
//!     checked against apply's output, tensor by tensor.
//! bench_hotswap perturb BASE OUT SEED STD
//!     Writes a second fine-tune of BASE: every BF16/F16/F32 value plus N(0, STD), drawn from SEED.
//! ```

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use deltapack::checkpoint::Checkpoint;
use deltapack::hotswap::Resident;
use deltapack::progress::NoProgress;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["run", base, out, repeats, a] => run(base.as_ref(), out.as_ref(), repeats.parse()?, a.as_ref(), None),
        ["run", base, out, repeats, a, b] => run(
            base.as_ref(),
            out.as_ref(),
            repeats.parse()?,
            a.as_ref(),
            Some((b.as_ref(), None)),
        ),
        ["run", base, out, repeats, a, b, ba] => run(
            base.as_ref(),
            out.as_ref(),
            repeats.parse()?,
            a.as_ref(),
            Some((b.as_ref(), Some(ba.as_ref()))),
        ),
        ["perturb", base, out, seed, std] => perturb(base.as_ref(), out.as_ref(), seed.parse()?, std.parse()?),
        _ => Err("usage: bench_hotswap run BASE OUT_DIR REPEATS DELTA_A [DELTA_B [DELTA_B_ON_A]] | perturb BASE OUT SEED STD".into()),
    }
}

/// kB of a `/proc/self/status` field.
fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `f`, returning its result, seconds, and the peak resident memory it added (bytes).
fn measure<T>(f: impl FnOnce() -> T) -> (T, f64, u64) {
    // Writing 5 to clear_refs resets VmHWM to the current resident size (Linux 4.0+).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status_kb("VmRSS:");
    let t = Instant::now();
    let r = f();
    let s = t.elapsed().as_secs_f64();
    (r, s, status_kb("VmHWM:").saturating_sub(before) * 1024)
}

#[derive(Default)]
struct Series {
    secs: Vec<f64>,
    peak: u64,
}

impl Series {
    fn add(&mut self, s: f64, peak: u64) {
        self.secs.push(s);
        self.peak = self.peak.max(peak);
    }

    fn median(&self) -> f64 {
        let mut v = self.secs.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn row(&self, name: &str, reference: f64) {
        println!(
            "  {name:<34} {:>8.3} s  {:>5.2}x apply  peak +{:>6.1} MB",
            self.median(),
            reference / self.median(),
            self.peak as f64 / 1e6
        );
    }
}

fn run(base: &Path, out: &Path, repeats: usize, a: &Path, b: Option<(&Path, Option<&Path>)>) -> Res<()> {
    let mb = |n: u64| n as f64 / 1e6;
    let (mut r, load_s, load_peak) = measure(|| Resident::load(base));
    let r = r.as_mut().map_err(|e| e.to_string())?;
    let model: u64 = r.tensors().map(|t| t.bytes.len() as u64).sum();
    println!(
        "== {} with {} ({} threads, medians of {repeats})",
        base.display(),
        a.display(),
        rayon::current_num_threads()
    );
    println!(
        "  load base: {load_s:.3} s, {:.1} MB of tensors (peak +{:.1} MB)",
        mb(model),
        mb(load_peak)
    );
    let (mut apply_s, mut up, mut down, mut a_to_b, mut b_to_base): (Series, Series, Series, Series, Series) =
        Default::default();
    let (mut apply_b, mut link_up, mut link_down): (Series, Series, Series) = Default::default();
    let out_b = out.with_extension("b");
    let mut undo = 0;
    for _ in 0..repeats {
        let _ = std::fs::remove_dir_all(out);
        let (res, s, p) = measure(|| deltapack::apply(base, a, out, &Default::default(), &NoProgress));
        res?;
        apply_s.add(s, p);
        let (res, s, p) = measure(|| r.switch_to(Some(a)));
        undo = res?.undo_bytes;
        up.add(s, p);
        if up.secs.len() == 1 {
            same_as_applied(r, out)?;
        }
        if let Some((b, b_on_a)) = b {
            let _ = std::fs::remove_dir_all(&out_b);
            let (res, s, p) = measure(|| deltapack::apply(base, b, &out_b, &Default::default(), &NoProgress));
            res?;
            apply_b.add(s, p);
            let (res, s, p) = measure(|| r.switch_to(Some(b)));
            res?;
            a_to_b.add(s, p);
            let (res, s, p) = measure(|| r.switch_to(None));
            res?;
            b_to_base.add(s, p);
            r.switch_to(Some(a))?;
            if let Some(ba) = b_on_a {
                let (res, s, p) = measure(|| r.switch_to_chain(&[a, ba]));
                res?;
                link_up.add(s, p);
                if link_up.secs.len() == 1 {
                    same_as_applied(r, &out_b)?;
                }
                let (res, s, p) = measure(|| r.switch_to_chain(&[a]));
                res?;
                link_down.add(s, p);
            }
        }
        let (res, s, p) = measure(|| r.switch_to(None));
        res?;
        down.add(s, p);
    }
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(&out_b);
    let reference = apply_s.median();
    let delta = std::fs::metadata(a)?.len();
    apply_s.row(&format!("apply A to {}", out.display()), reference);
    up.row("switch base -> A", reference);
    down.row("switch A -> base", reference);
    if let Some((_, b_on_a)) = b {
        // Switches to B are compared with `apply` of B's delta against the base.
        let reference = apply_b.median();
        println!("  against apply of B:");
        apply_b.row(&format!("apply B to {}", out_b.display()), reference);
        a_to_b.row("switch A -> B (revert A, apply B)", reference);
        b_to_base.row("switch B -> base", reference);
        if b_on_a.is_some() {
            link_up.row("switch A -> B as A's child (a link)", reference);
            link_down.row("switch back to A (revert the link)", reference);
        }
    }
    println!(
        "  delta A {:.1} MB; undo held at A {:.1} MB ({:.2}x the delta, {:.1} % of the model)",
        mb(delta),
        mb(undo),
        undo as f64 / delta as f64,
        100.0 * undo as f64 / model as f64
    );
    Ok(())
}

/// Every tensor of the model must be byte-identical to the checkpoint `apply` wrote.
fn same_as_applied(r: &Resident, out: &Path) -> Res<()> {
    let ck = Checkpoint::open(out)?;
    let mut n = 0;
    for t in r.tensors() {
        let theirs = ck
            .tensor(t.name)
            .ok_or(format!("{} is not in apply's output", t.name))?;
        if ck.bytes(theirs) != t.bytes || theirs.dtype != t.dtype || theirs.shape != t.shape {
            return Err(format!("{} differs from apply's output", t.name).into());
        }
        n += 1;
    }
    if n != ck.tensors.len() {
        return Err("apply's output has other tensors".into());
    }
    Ok(())
}

fn perturb(base: &Path, out: &Path, seed: u64, std: f32) -> Res<()> {
    let ck = Checkpoint::open(base)?;
    std::fs::create_dir_all(out)?;
    for a in &ck.aux {
        let to = out.join(&a.rel);
        std::fs::create_dir_all(to.parent().expect("inside out"))?;
        std::fs::copy(&a.path, to)?;
    }
    let normal = Normal::new(0.0f32, std)?;
    for (si, shard) in ck.shards.iter().enumerate() {
        let to = out.join(&shard.rel);
        std::fs::create_dir_all(to.parent().expect("inside out"))?;
        let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(to)?);
        w.write_all(shard.header_bytes())?;
        for (ti, t) in ck.tensors.iter().enumerate().filter(|(_, t)| t.shard == si) {
            let src = ck.bytes(t);
            let width = t.dtype.bitsize() / 8;
            // Pieces of 1M elements, a window of them at a time, each from its own seed.
            let piece = width << 20;
            for (wi, window) in src.chunks(piece * 16).enumerate() {
                let pieces: Vec<Vec<u8>> = window
                    .par_chunks(piece)
                    .enumerate()
                    .map(|(k, p)| {
                        let id = seed ^ ((ti as u64) << 40) ^ (wi as u64 * 16 + k as u64);
                        add_noise(t.dtype, p, normal, &mut rand_chacha::ChaCha8Rng::seed_from_u64(id))
                    })
                    .collect();
                pieces.iter().try_for_each(|p| w.write_all(p))?;
            }
            ck.release(t, 0..src.len());
        }
        w.flush()?;
    }
    Ok(())
}

/// `piece` of a tensor of `dtype` with noise added to every BF16/F16/F32 value.
fn add_noise(dtype: safetensors::Dtype, piece: &[u8], normal: Normal<f32>, rng: &mut impl rand::Rng) -> Vec<u8> {
    let mut v = piece.to_vec();
    let width = dtype.bitsize() / 8;
    for e in v.chunks_exact_mut(width) {
        let x: f32 = normal.sample(rng);
        match dtype {
            safetensors::Dtype::BF16 => {
                let y = half::bf16::from_le_bytes([e[0], e[1]]).to_f32() + x;
                e.copy_from_slice(&half::bf16::from_f32(y).to_le_bytes());
            }
            safetensors::Dtype::F16 => {
                let y = half::f16::from_le_bytes([e[0], e[1]]).to_f32() + x;
                e.copy_from_slice(&half::f16::from_f32(y).to_le_bytes());
            }
            safetensors::Dtype::F32 => {
                let y = f32::from_le_bytes(e[..4].try_into().expect("4 bytes")) + x;
                e.copy_from_slice(&y.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}
