#!/usr/bin/env python3
"""Benchmark of 1-bit deltas with learned scales (`deltapack.calibrate.distill`), side by side.

For each pair, in one run: the fine-tune itself, the `sign-axis` delta as `make` fits it
(rank-1 fit of |D|), the same fit weighted by activation statistics (`make --calibration`,
from `scripts/calibrate.py`), and the `sign-axis` delta with scales learned by distillation
(`python -m deltapack.calibrate`, from the same input delta, so the same signs). Quality:
acc1 of `../shared/models/eval_model.py` for the MiniLM pairs, perplexity on the held-out
task text for the causal LM pair of `scripts/make_causal_pair.py`.

    python3 scripts/bench_calibrate.py --models ../shared/models --f32 F32_DIR --causal CAUSAL_DIR \
        --train TRAIN_JSONL --work WORK

F32_DIR holds `minilm-base/` and `ft-a-f32/` (made by `../shared/models/make_models.py`);
TRAIN_JSONL is the task's train split it writes (never the test split). Writes the table
between the `calibrate:begin` / `calibrate:end` markers of docs/BENCHMARKS.md and prints it;
every measurement goes to WORK/runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from doc_tables import replace_between

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def make(cli: str, base: Path, ft: Path, out: Path, *extra) -> dict:
    r = run(
        [cli, "make", "--base", base, "--finetuned", ft, "-o", out, "--codec", "sign-axis", "--force", "--json", *extra]
    )
    return json.loads(r.stdout)


def applied(cli: str, base: Path, delta: Path, work: Path) -> Path:
    out = work / (delta.stem + "-applied")
    shutil.rmtree(out, ignore_errors=True)
    run([cli, "apply", "-q", "--base", base, delta, "-o", out])
    return out


def acc1(models: Path, model_dir: Path) -> float:
    r = run([sys.executable, models / "eval_model.py", model_dir, "--data", models / "data"])
    return json.loads(r.stdout.strip().splitlines()[-1])["acc1"]


def perplexity(model_dir: Path, texts: list, threads: int) -> float:
    """exp(mean next-token NLL) over the texts, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            b = tok(texts[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
            logits = model(**b).logits[:, :-1].float()
            labels = b["input_ids"][:, 1:]
            mask = b["attention_mask"][:, 1:].bool()
            lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
            nll -= float(lp[mask].sum())
            n += int(mask.sum())
    return math.exp(nll / n)


def calibrate(base: Path, ft: Path, delta: Path, out: Path, source: list, steps: int, threads: int, axis: str) -> dict:
    cmd = [sys.executable, "-m", "deltapack.calibrate", "--base", base, "--finetuned", ft, "--delta", delta]
    cmd += ["-o", out, *source, "--steps", steps, "--threads", threads, "--axis", axis, "--force", "--json"]
    r = run(cmd)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--f32", type=Path, required=True, help="folder with minilm-base/ and ft-a-f32/")
    ap.add_argument("--causal", type=Path, help="folder made by scripts/make_causal_pair.py")
    ap.add_argument("--train", type=Path, required=True, help="the task's train split (jsonl)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cli", default=shutil.which("deltapack") or str(ROOT / "target" / "release" / "deltapack"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-axes", action="store_true", help="also force rows and columns (MiniLM pairs)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    log = (a.work / "runs.jsonl").open("a")
    jsonl = ["--jsonl", a.train, "--field", "query", "--field", "code", "--limit", a.limit]
    rows = []

    def record(r: dict) -> None:
        rows.append(r)
        log.write(json.dumps(r) + "\n")
        log.flush()
        print(json.dumps(r), flush=True)

    pairs = [
        ("MiniLM f32", a.f32 / "minilm-base", a.f32 / "ft-a-f32", "acc1"),
        ("MiniLM bf16", a.models / "minilm-base-bf16", a.models / "ft-a-bf16", "acc1"),
    ]
    if a.causal:
        pairs.append(("Llama-style causal LM f32", a.causal / "base", a.causal / "finetuned", "ppl"))
    for name, base, ft, metric in pairs:
        tag = name.split()[0].lower() + "-" + name.split()[-1]
        if metric == "acc1":
            quality = lambda d: acc1(a.models, d)  # noqa: E731
            source = jsonl
            stats_texts = a.train
        else:
            test = (a.causal / "text" / "test.txt").read_text().splitlines()
            quality = lambda d, test=test: perplexity(d, test, a.threads)  # noqa: E731
            source = ["--texts", a.causal / "text" / "train.txt", "--limit", a.limit]
            stats_texts = a.causal / "text" / "train.txt"
        record({"pair": name, "method": "fine-tune", metric: quality(ft)})
        record({"pair": name, "method": "base", metric: quality(base)})
        plain = a.work / f"{tag}-rank1.dpk"
        m = make(a.cli, base, ft, plain)
        record(
            {
                "pair": name,
                "method": "rank-1 fit",
                "bits_per_param": m["bits_per_param"],
                "error": m["error"],
                metric: quality(applied(a.cli, base, plain, a.work)),
            }
        )
        if metric == "acc1":
            stats = a.work / f"{tag}-stats.safetensors"
            run(
                [
                    sys.executable,
                    ROOT / "scripts" / "calibrate.py",
                    ft,
                    stats_texts,
                    stats,
                    "--field",
                    "query,code",
                    "--n",
                    a.limit,
                ]
            )
            weighted = a.work / f"{tag}-weighted.dpk"
            m = make(a.cli, base, ft, weighted, "--calibration", stats)
            record(
                {
                    "pair": name,
                    "method": "rank-1 fit, activation-weighted",
                    "bits_per_param": m["bits_per_param"],
                    "error": m["error"],
                    metric: quality(applied(a.cli, base, weighted, a.work)),
                }
            )
        for axis in ["auto"] + (["row", "col"] if a.compare_axes and metric == "acc1" else []):
            learned = a.work / f"{tag}-learned-{axis}.dpk"
            t = time.perf_counter()
            c = calibrate(base, ft, plain, learned, [str(x) for x in source], a.steps, a.threads, axis)
            axes = {k: sum(1 for v in c["axes"].values() if v == k) for k in ("row", "col", "both", "tensor")}
            method = "learned scales" if axis == "auto" else f"learned scales, axis={axis}"
            record(
                {
                    "pair": name,
                    "method": method,
                    "bits_per_param": c["make"]["bits_per_param"],
                    "error": c["make"]["error"],
                    "seconds": time.perf_counter() - t,
                    "peak_rss_mib": c["peak_rss_mib"],
                    "loss_before": c["loss_before"],
                    "loss_after": c["loss_after"],
                    "axes": axes,
                    metric: quality(applied(a.cli, base, learned, a.work)),
                }
            )

    lines = [
        f"1-bit `sign-axis` deltas, scales learned by distillation ({a.steps} steps, at most {a.limit} calibration"
        f" texts from the train split, {a.threads} threads) against the rank-1 fits of `make`:",
        "",
        "| pair | method | bits/param | weight error | quality | calibration |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        metric = "acc1" if "acc1" in r else "ppl"
        q = f"acc1 {r['acc1']:.4f}" if metric == "acc1" else f"ppl {r['ppl']:.3f}"
        bits = f"{r['bits_per_param']:.3f}" if "bits_per_param" in r else ""
        err = f"{r['error']:.3f}" if "error" in r else ""
        cal = ""
        if "seconds" in r:
            ax = ", ".join(f"{k} {v}" for k, v in r["axes"].items() if v)
            cal = (
                f"{r['seconds']:.0f} s, {r['peak_rss_mib']:.0f} MiB peak; loss {r['loss_before']:.3g}"
                f" -> {r['loss_after']:.3g}; axes: {ax}"
            )
        lines.append(f"| {r['pair']} | {r['method']} | {bits} | {err} | {q} | {cal} |")
    lines += ["", "`scripts/bench_calibrate.py " + " ".join(sys.argv[1:]) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    replace_between(a.docs, "calibrate", text)


if __name__ == "__main__":
    main()
