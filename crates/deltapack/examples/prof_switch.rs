//! Hot swap in a loop, for profiling one switch at a time (`perf record` around it).
//!
//! ```text
//! prof_switch BASE DELTA_A ROUNDS [DELTA_B]
//!     Without DELTA_B: ROUNDS times base -> A -> base; prints the median of each switch.
//!     With DELTA_B: switches to A once, then ROUNDS times A -> B -> A; prints both medians.
//! ```
//!
//! Run with `RAYON_NUM_THREADS=1` to see one core's work; `scripts/bench_hotswap.sh` is the
//! side-by-side benchmark against `apply`.

use std::path::Path;
use std::time::Instant;

use deltapack::hotswap::Resident;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (base, a, rounds, b) = match &args[..] {
        [base, a, rounds] => (base, a, rounds.parse::<usize>()?, None),
        [base, a, rounds, b] => (base, a, rounds.parse::<usize>()?, Some(b)),
        _ => return Err("usage: prof_switch BASE DELTA_A ROUNDS [DELTA_B]".into()),
    };
    let mut model = Resident::load(Path::new(base))?;
    let (one, two) = match b {
        None => (Some(Path::new(a)), None),
        Some(b) => {
            model.switch_to(Some(Path::new(a)))?;
            (Some(Path::new(b)), Some(Path::new(a)))
        }
    };
    let (mut there, mut back) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        there.push(timed(|| model.switch_to(one))?);
        back.push(timed(|| model.switch_to(two))?);
    }
    let (to, from) = if b.is_some() { ("a->b", "b->a") } else { ("fwd", "rev") };
    println!("{to} {:.4} s  {from} {:.4} s", median(there), median(back));
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> deltapack::Result<T>) -> Res<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
