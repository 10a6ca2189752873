#!/usr/bin/env python3
"""The Python package's targets, measured side by side in one run (medians).

- ``deltapack.load`` of the reference pair's exact delta against CLI ``apply`` of it to
  disk: wall time, and peak RSS against the RSS after ``import torch, deltapack`` plus the
  model's bytes (each ``load`` in a fresh process, so peaks do not mix);
- ``safe_open(...).get_tensor("model.layers.0.mlp.down_proj.weight")`` against ``load``;
- ``deltapack.save`` of the reference fine-tune's tensors (held in memory) against CLI
  ``make`` of the same tensors on disk;
- ``deltapack.transformers.from_pretrained(base, delta)`` against ``from_pretrained`` of the
  fine-tune's directory, in one process, on ft-a-bf16 and ft-b-bf16-sharded (outputs
  compared bit for bit).

Prints a markdown table and writes it between the markers of docs/BENCHMARKS.md.

Usage: scripts/bench_python.py --ref REF_PAIR_DIR --models ../shared/models --cli target/release/deltapack
(REF_PAIR_DIR is what ``deltapack dev synth --preset reference DIR`` writes.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from doc_tables import replace_between

TENSOR = "model.layers.0.mlp.down_proj.weight"

LOAD_CHILD = r"""
import json, sys, time
import torch, deltapack
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
t = time.perf_counter()
sd = deltapack.load(sys.argv[1], sys.argv[2])
took = time.perf_counter() - t
# VmHWM, the peak of this process's own memory: ru_maxrss also counts the RSS of the parent
# it was forked from (Linux keeps the larger of the two across exec), here the benchmark's
# process holding the whole fine-tune.
peak = status("VmHWM")
print(json.dumps({"seconds": took, "rss_after_import": before, "peak_rss": peak,
                  "model_bytes": sum(v.numel() * v.element_size() for v in sd.values())}))
"""


def timed(cmd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def med(xs) -> float:
    return statistics.median(xs)


def bench_reference(ref: Path, cli: str, work: Path, repeats: int) -> list:
    from safetensors.torch import load_file

    import deltapack

    base, ft = ref / "base", ref / "finetuned"
    delta = work / "ref.dpk"
    make_s, save_s, apply_s, load_s, get_s, loads = [], [], [], [], [], []
    state = {}
    for f in sorted(ft.glob("*.safetensors")):
        state.update(load_file(f))
    for _ in range(repeats):
        make_s.append(timed([cli, "make", "-q", "--force", "--base", base, "--finetuned", ft, "-o", delta]))
        t = time.perf_counter()
        deltapack.save(base, state, work / "saved.dpk", force=True)
        save_s.append(time.perf_counter() - t)
        out = work / "applied"
        shutil.rmtree(out, ignore_errors=True)
        apply_s.append(timed([cli, "apply", "-q", "--base", base, delta, "-o", out]))
        shutil.rmtree(out)
        child = subprocess.run(
            [sys.executable, "-c", LOAD_CHILD, str(base), str(delta)], check=True, capture_output=True, text=True
        )
        r = json.loads(child.stdout)
        loads.append(r)
        load_s.append(r["seconds"])
        t = time.perf_counter()
        with deltapack.safe_open(base, delta) as f:
            f.get_tensor(TENSOR)
        get_s.append(time.perf_counter() - t)
    saved = {t["name"]: t["stored_bytes"] for t in deltapack.inspect(work / "saved.dpk")["tensors"]}
    made = {t["name"]: t["stored_bytes"] for t in deltapack.inspect(delta)["tensors"]}
    peak = max(r["peak_rss"] - r["rss_after_import"] - r["model_bytes"] for r in loads)
    return [
        ("`deltapack.load` of the reference exact delta", f"{med(load_s):.2f} s",
         f"CLI `apply` to disk {med(apply_s):.2f} s", f"{med(load_s) / med(apply_s):.2f}x (target <= 1)"),
        ("peak RSS of `load` above import + model bytes", f"{peak / 2**20:.0f} MiB",
         f"model {loads[0]['model_bytes'] / 2**20:.0f} MiB", "target <= 300 MiB"),
        (f"`safe_open(...).get_tensor(\"{TENSOR}\")`", f"{med(get_s):.3f} s", f"`load` {med(load_s):.2f} s",
         f"{med(get_s) / med(load_s):.3f}x (target <= 0.1)"),
        ("`deltapack.save` of the reference fine-tune's tensors", f"{med(save_s):.2f} s",
         f"CLI `make` of them on disk {med(make_s):.2f} s",
         f"{med(save_s) / med(make_s):.2f}x (target <= 1.2); per-tensor bytes equal: {saved == made}"),
    ]  # fmt: skip


def bench_transformers(models: Path, work: Path, cli: str, repeats: int) -> list:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import deltapack.transformers as dt

    base = models / "minilm-base-bf16"
    rows = []
    for name in ("ft-a-bf16", "ft-b-bf16-sharded"):
        ft = models / name
        delta = work / f"{name}.dpk"
        subprocess.run([cli, "make", "-q", "--force", "--base", base, "--finetuned", ft, "-o", delta], check=True)
        tok = AutoTokenizer.from_pretrained(ft)
        batch = tok(["return the sum of two numbers", "read a file"], padding=True, return_tensors="pt")
        ours, theirs = [], []
        dt.from_pretrained(base, delta)  # warm both paths (imports, page cache)
        AutoModel.from_pretrained(ft)
        for _ in range(repeats):
            t = time.perf_counter()
            a = dt.from_pretrained(base, delta)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = AutoModel.from_pretrained(ft)
            theirs.append(time.perf_counter() - t)
        with torch.no_grad():
            same = torch.equal(a(**batch).last_hidden_state, b(**batch).last_hidden_state)
        rows.append(
            (f"`deltapack.transformers.from_pretrained` on {name}", f"{med(ours):.3f} s",
             f"`from_pretrained` of the directory {med(theirs):.3f} s",
             f"{med(ours) / med(theirs):.2f}x (target <= 1.2); outputs identical: {same}")
        )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", type=Path, required=True)
    ap.add_argument("--models", type=Path, default=Path("../shared/models"))
    ap.add_argument("--cli", default="target/release/deltapack")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--docs", type=Path, default=Path("docs/BENCHMARKS.md"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="deltapack-bench-", dir=".") as d:
        work = Path(d)
        rows = bench_transformers(a.models, work, a.cli, a.repeats)
        rows = bench_reference(a.ref, a.cli, work, max(3, a.repeats // 2)) + rows
    table = ["| measure | deltapack | compared with | ratio |", "|---|---:|---:|---|"]
    table += [f"| {m} | {v} | {c} | {r} |" for m, v, c, r in rows]
    command = f"scripts/bench_python.py --ref {a.ref} --models {a.models} --cli {a.cli} --repeats {a.repeats}"
    text = "\n".join(table) + f"\n\nMedians; `{command}`.\n"
    print(text)
    replace_between(a.docs, "python", text)


if __name__ == "__main__":
    main()
