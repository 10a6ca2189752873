#!/usr/bin/env python3
"""Diff pruning against full fine-tuning and after-the-fact pruning, on the shared retrieval task.

For each seed, in one run: a full fine-tune with the recipe of ../shared/models/make_models.py
(ft-a's learning rate, the same step budget) and a diff-pruned model per density, both by
``examples/diffprune_retrieval.py``, two trainings side by side on one thread each so that
their step times compare under the same load. Then:

- acc1 of every model on the held-out test split (``eval_model.py`` of the applied delta);
- the full fine-tune pruned after the fact to the same density
  (``deltapack make --codec sparse --keep K``, K chosen so the stored density matches) and its
  acc1;
- delta bits per parameter, training seconds per step and peak RSS against the full
  fine-tune's.

Trainings already in WORK (a delta and its log) are reused: delete them to train again.
Writes the table between the ``diffprune:begin`` / ``diffprune:end`` markers of
docs/BENCHMARKS.md (``--marker`` names others) and prints it; every run's JSON goes to ``WORK/runs.jsonl``.

Usage: scripts/bench_diffprune.py --models ../shared/models --work DIR [--seeds 1 2 3]
       [--density 0.01 --density 0.005] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from doc_tables import replace_between

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "diffprune_retrieval.py"


def write_train_split(path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_callback import pairs_from_stdlib

    with open(path, "w", encoding="utf-8") as f:
        for row in pairs_from_stdlib():
            f.write(json.dumps(row) + "\n")


def train(args: list, log: Path, delta: Path) -> dict:
    """Runs the example, or reads the result of an earlier run of the same name in WORK."""
    if log.exists() and delta.exists():
        last = log.read_text().strip().splitlines()[-1]
        if last.startswith("{"):
            return json.loads(last)
    with open(log, "w") as f:
        subprocess.run([sys.executable, str(EXAMPLE), *args], check=True, stdout=f, stderr=subprocess.STDOUT)
    return json.loads(log.read_text().strip().splitlines()[-1])


def acc1(models: Path, base: Path, delta: Path, cli: str, work: Path) -> float:
    out = work / (delta.stem + "-applied")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([cli, "apply", "-q", "--base", base, delta, "-o", out], check=True)
    r = subprocess.run(
        [sys.executable, str(models / "eval_model.py"), str(out), "--data", str(models / "data")],
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(out)
    return json.loads(r.stdout.strip().splitlines()[-1])["acc1"]


def pruned(cli: str, base: Path, full: Path, density: float, full_density: float, work: Path) -> tuple:
    """The full fine-tune pruned to ``density``: (delta, stored density)."""
    src = work / (full.stem + "-dir")
    if not src.exists():
        subprocess.run([cli, "apply", "-q", "--base", base, full, "-o", src], check=True)
    out = work / f"{full.stem}-sparse-{density}.dpk"

    def make(keep: float) -> float:
        subprocess.run(
            [cli, "make", "-q", "--force", "--base", base, "--finetuned", src, "--codec", "sparse",
             "--keep", str(min(1.0, keep)), "-o", out],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        info = json.loads(subprocess.run([cli, "inspect", "--json", out], check=True, capture_output=True).stdout)
        return info["density"]

    # --keep is a share of the changed values, some tensors (1-D) stay exact: one correction
    # brings the stored density close to the target.
    keep = density / full_density
    got = make(keep)
    if got > 0:
        got = make(keep * density / got)
    return out, got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("../shared/models"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cli", default=str(ROOT / "target" / "release" / "deltapack"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--density", type=float, action="append")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--method", default="l1")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--marker", default="diffprune", help="the table goes between <!-- MARKER:begin/end -->")
    a = ap.parse_args()
    densities = a.density or [0.01, 0.005]
    models, work = a.models.resolve(), a.work.resolve()
    base = models / "minilm-base-bf16"
    work.mkdir(parents=True, exist_ok=True)
    train_split = work / "train.jsonl"
    write_train_split(train_split)
    common = ["--base", str(base), "--train", str(train_split), "--steps", str(a.steps), "--threads", "1"]

    jobs = []
    for seed in a.seeds:
        jobs.append(("full", None, seed, ["--full-finetune"]))
        for d in densities:
            jobs.append((a.method, d, seed, ["--method", a.method, "--density", str(d)]))
    runs = []

    def run(job):
        method, d, seed, extra = job
        name = f"{method}-{d}-s{seed}" if d else f"full-s{seed}"
        delta = work / f"{name}.dpk"
        r = train([*common, *extra, "--seed", str(seed), "-o", str(delta)], work / f"{name}.log", delta)
        r.update(name=name, delta=str(delta))
        return r

    # Two trainings at a time, one thread each: a full fine-tune beside a diff-pruned one.
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(run, jobs))
    for r in runs:
        r["acc1"] = acc1(models, base, Path(r["delta"]), a.cli, work)
    full = {r["seed"]: r for r in runs if r["method"] == "full"}
    for r in runs:
        if r["method"] == "full":
            continue
        f = full[r["seed"]]
        p, pd = pruned(a.cli, base, Path(f["delta"]), r["target_density"], f["density"], work)
        r.update(pruned_density=pd, pruned_acc1=acc1(models, base, p, a.cli, work))
        r["step_ratio"] = r["seconds_per_step"] / f["seconds_per_step"]
        r["rss_ratio"] = r["peak_rss_mib"] / f["peak_rss_mib"]
    with open(work / "runs.jsonl", "a") as log:
        for r in runs:
            log.write(json.dumps(r) + "\n")

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    def per_seed(rs):
        return ", ".join(f"{r['acc1']:.4f}" for r in rs)

    fulls = list(full.values())
    lines = [
        f"Medians of seeds {', '.join(map(str, a.seeds))}; {a.steps} steps of batch 32 each; acc1 on the 400 held-out "
        "queries of `data/test.jsonl`.",
        "",
        "| model | density | bits/param | acc1 | acc1 per seed | pruned after the fact: density, acc1 | "
        "s/step (vs full) | peak RSS (vs full) |",
        "|---|---:|---:|---:|---|---|---:|---:|",
        f"| full fine-tune (lr 2e-5) | {med(fulls, 'density'):.4f} | {med(fulls, 'bits_per_param'):.3f} | "
        f"{med(fulls, 'acc1'):.4f} | {per_seed(fulls)} | | "
        f"{med(fulls, 'seconds_per_step'):.2f} | {med(fulls, 'peak_rss_mib'):.0f} MiB |",
    ]
    for d in densities:
        rs = [r for r in runs if r["target_density"] == d]
        lines.append(
            f"| diff pruning, {a.method}, density {d} | {med(rs, 'density'):.4f} | {med(rs, 'bits_per_param'):.3f} | "
            f"{med(rs, 'acc1'):.4f} | {per_seed(rs)} | "
            f"{med(rs, 'pruned_density'):.4f}, {med(rs, 'pruned_acc1'):.4f} | "
            f"{med(rs, 'seconds_per_step'):.2f} ({med(rs, 'step_ratio'):.2f}x) | "
            f"{med(rs, 'peak_rss_mib'):.0f} MiB ({med(rs, 'rss_ratio'):.2f}x) |"
        )
    cmd = "scripts/bench_diffprune.py " + " ".join(sys.argv[1:])
    lines += ["", f"`{cmd}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    replace_between(a.docs, a.marker, text)


if __name__ == "__main__":
    main()
