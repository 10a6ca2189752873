#!/usr/bin/env python3
"""deltatensors 0.2.0 against its deltapack drop-in, strategy by strategy, on a real pair.

For each deltatensors strategy, deltatensors itself (run with the Python that has it, as a
subprocess) and ``deltapack.compat.deltatensors`` (run here) save the delta of the same
fine-tune against the same base with ``save_delta_from_paths`` and load it back with
``load_delta_from_paths``; this script then measures both the same way: file bytes,
bits/param (8 x bytes / values of the fine-tune) and the relative RMS error of the delta over
the whole model, ``||D' - D|| / ||D||`` with ``D = fine-tune - base`` and ``D' = rebuilt -
base``, in float64 from the float32 arrays the loaders return. deltatensors' float32 output is
off the bf16 grid, so its error is given twice: as returned, and rounded to bf16 (the model one
saves). It prints a markdown table and writes it, with the mapping and this command, to --out.

    python3 -m venv /work/venv-dt
    echo /work/venv/lib/python3.11/site-packages > /work/venv-dt/lib/python3.11/site-packages/shared.pth
    /work/venv-dt/bin/pip install --no-deps deltatensors==0.2.0 zstandard
    /work/venv/bin/python scripts/bench_deltatensors_compat.py --deltatensors-python /work/venv-dt/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_np

import deltapack
import deltapack.compat.deltatensors as compat

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("int4", "sparse", "quantized")

# Runs in the Python that has deltatensors: save, time, load, and hand the float32 arrays back.
WORKER = r"""
import json, sys, time
import deltatensors as dt
from safetensors.numpy import save_file
out, ft, base, strategy, rebuilt = sys.argv[1:6]
assert dt.__version__ == "0.2.0", dt.__version__
t = time.perf_counter()
dt.save_delta_from_paths(out, ft, base, strategy=strategy, use_gpu=False)
save_s = time.perf_counter() - t
t = time.perf_counter()
sd = dt.load_delta_from_paths(out, base)
load_s = time.perf_counter() - t
save_file(sd, rebuilt)
print(json.dumps({"save_s": save_s, "load_s": load_s}))
"""


def bf16_values(path: Path) -> dict:
    """A checkpoint's tensors as float32 (bf16 widened exactly), without torch."""
    return {k: t.f32() for k, t in compat._read_checkpoint(path).tensors.items()}


def round_bf16(x: np.ndarray) -> np.ndarray:
    return compat._round_to(np.ascontiguousarray(x, dtype=np.float32), "BF16")


def error(rebuilt: dict, ft: dict, base: dict, rounded: bool = False) -> float:
    """||D' - D|| / ||D|| over the whole model (finite values of D)."""
    num = den = 0.0
    for k, f in ft.items():
        r = round_bf16(rebuilt[k]) if rounded else rebuilt[k]
        f64 = f.astype(np.float64).reshape(-1)
        d = f64 - base[k].reshape(-1)
        e = r.astype(np.float64).reshape(-1) - f64
        finite = np.isfinite(d)
        num += float(np.dot(e[finite], e[finite]))
        den += float(np.dot(d[finite], d[finite]))
    return (num / den) ** 0.5


def codec_mix(delta: Path) -> str:
    """The per-tensor codecs deltapack chose, by parameter share."""
    info = deltapack.inspect(delta)
    params = Counter()
    for t in info["tensors"]:
        params[t.get("codec") or "exact"] += int(np.prod(t["shape"]))
    total = sum(params.values())
    return ", ".join(f"{c} {100 * n / total:.0f} %" for c, n in params.most_common())


def run_deltatensors(python: str, work: Path, ft: Path, base: Path, strategy: str) -> dict:
    out, rebuilt = work / f"{strategy}.wdelta", work / f"{strategy}-rebuilt.safetensors"
    cmd = [python, "-c", WORKER, str(out), str(ft), str(base), strategy, str(rebuilt)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"deltatensors failed ({' '.join(cmd[:2])} ...):\n{done.stderr[-2000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    result = {"bytes": out.stat().st_size, "rebuilt": load_np(rebuilt), **times}
    rebuilt.unlink()
    return result


def run_compat(work: Path, ft: Path, base: Path, strategy: str) -> dict:
    out = work / f"{strategy}.dpk"
    t = time.perf_counter()
    compat.save_delta_from_paths(out, ft, base, strategy=strategy)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    rebuilt = compat.load_delta_from_paths(out, base)
    load_s = time.perf_counter() - t
    plan = compat.codec_for(strategy, ft, base)
    return {
        "bytes": out.stat().st_size,
        "rebuilt": rebuilt,
        "save_s": save_s,
        "load_s": load_s,
        "plan": plan,
        "out": out,
    }


def alternatives(work: Path, ft: Path, base: Path, budget: float, ft_values: dict, base_values: dict) -> list:
    """Other deltapack codecs at the same budget, to show why the mapping is ``auto``."""
    rows = []
    for codec, max_error in (
        ("quant", budget),
        ("sparse", budget),
        ("sign-axis", budget),
        ("sign-axis", None),
        ("exact", None),
    ):
        out = work / "alt.dpk"
        deltapack.make(base, ft, out, codec=codec, max_error=max_error, force=True)
        rebuilt = {k: np.asarray(v, dtype=np.float32) for k, v in deltapack.load(base, out, framework="np").items()}
        rows.append(
            (
                codec if max_error is None else f"{codec}, max_error {max_error:.4f}",
                out.stat().st_size,
                error(rebuilt, ft_values, base_values),
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--deltatensors-python",
        default="/work/venv-dt/bin/python",
        help="a Python with deltatensors 0.2.0 installed (not this one)",
    )
    p.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models")
    p.add_argument("--base", default="minilm-base-bf16")
    p.add_argument("--finetuned", default="ft-a-bf16")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "COMPAT_DELTATENSORS.md")
    p.add_argument("--no-alternatives", action="store_true", help="skip the table of other codecs")
    args = p.parse_args()
    base, ft = args.models / args.base, args.models / args.finetuned
    base_values, ft_values = bf16_values(base), bf16_values(ft)
    n = sum(v.size for v in ft_values.values())

    rows, alt = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-dt-compat-") as tmp:
        work = Path(tmp)
        for strategy in STRATEGIES:
            d = run_deltatensors(args.deltatensors_python, work, ft, base, strategy)
            c = run_compat(work, ft, base, strategy)
            row = {
                "strategy": strategy,
                "dt_bytes": d["bytes"],
                "dt_err": error(d["rebuilt"], ft_values, base_values),
                "dt_err_bf16": error(d["rebuilt"], ft_values, base_values, rounded=True),
                "dt_save_s": d["save_s"],
                "dp_bytes": c["bytes"],
                "dp_err": error(c["rebuilt"], ft_values, base_values),
                "dp_save_s": c["save_s"],
                "plan": c["plan"],
                "mix": codec_mix(c["out"]),
            }
            rows.append(row)
            print(
                f"{strategy}: deltatensors {row['dt_bytes']} B, error {row['dt_err']:.4f} "
                f"(bf16 {row['dt_err_bf16']:.4f}); deltapack {row['dp_bytes']} B, error {row['dp_err']:.4f}",
                file=sys.stderr,
            )
            if not args.no_alternatives:
                alt[strategy] = alternatives(work, ft, base, c["plan"]["max_error"], ft_values, base_values)

    bits = lambda b: 8 * b / n  # noqa: E731
    table = [
        "| strategy | deltatensors bytes | bits/param | error (float32 out) | error (as bf16) | save s "
        "| deltapack codec chosen | bytes | bits/param | error | save s | size ratio | error no larger |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        best = min(r["dt_err"], r["dt_err_bf16"])
        table.append(
            f"| `{r['strategy']}` | {r['dt_bytes']:,} | {bits(r['dt_bytes']):.3f} | {r['dt_err']:.4f} "
            f"| {r['dt_err_bf16']:.4f} | {r['dt_save_s']:.1f} "
            f"| `auto`, max_error {r['plan']['max_error']:.4f} | {r['dp_bytes']:,} | {bits(r['dp_bytes']):.3f} "
            f"| {r['dp_err']:.4f} | {r['dp_save_s']:.1f} | {r['dt_bytes'] / r['dp_bytes']:.1f}x "
            f"| {'yes' if r['dp_err'] <= best else 'NO'} |"
        )
    mix = [f"- `{r['strategy']}`: {r['mix']}" for r in rows]
    alt_lines = []
    for strategy, entries in alt.items():
        for name, size, err in entries:
            alt_lines.append(f"| `{strategy}` | {name} | {size:,} | {bits(size):.3f} | {err:.4f} |")
    command = (
        f"/work/venv/bin/python scripts/bench_deltatensors_compat.py --deltatensors-python {args.deltatensors_python}"
    )
    doc = render(table, mix, alt_lines, command, args, n)
    print("\n".join(table))
    args.out.write_text(doc)
    print(f"wrote {args.out}", file=sys.stderr)
    if any(r["dp_bytes"] > r["dt_bytes"] or r["dp_err"] > min(r["dt_err"], r["dt_err_bf16"]) for r in rows):
        sys.exit("the drop-in is larger or less accurate than deltatensors for some strategy")


def render(table: list, mix: list, alt_lines: list, command: str, args, n: int) -> str:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    when = datetime.date.today().isoformat()
    alt = ""
    if alt_lines:
        alt = "\n".join(
            [
                "",
                "### Other deltapack codecs at the same budget",
                "",
                "Why the mapping is `auto`: each codec family alone, at the budget of the strategy (a tensor no",
                "setting of the codec fits is stored exactly), and `exact` (made with `deltapack.make`, so",
                "with the config and tokenizer too).",
                "",
                "| strategy | deltapack codec | bytes | bits/param | error |",
                "|---|---|---:|---:|---:|",
                *alt_lines,
                "",
            ]
        )
    return f"""# deltatensors drop-in: `deltapack.compat.deltatensors`

`import deltapack.compat.deltatensors as dt` in place of `import deltatensors as dt` runs a script
written for deltatensors 0.2.0 on deltapack files: `save_delta`, `save_delta_from_paths`,
`load_delta`, `load_delta_from_paths`, `inspect`, `inspect_chain`, `load_delta_chain`,
`save_delta_chain_from_paths`, `hash_state_dict` and `DeltaTensorsCallback` (also as
`deltapack.compat.deltatensors.training.DeltaTensorsCallback`), with the same signatures and
return types (float32 numpy arrays). It writes deltapack deltas and reads those and `.wdelta`
files. The module's docstring lists what differs.

## Strategy -> codec

| deltatensors strategy (options) | deltapack codec |
|---|---|
| `int4` (`outlier_fraction`, default 0.01) | `auto`, `max_error` = the error deltatensors' `int4` has on the pair |
| `sparse` (`sparsity`, default 0.9) | `auto`, `max_error` = the error deltatensors' `sparse` has on the pair |
| `quantized` | `auto`, `max_error` = the error deltatensors' `quantized` has on the pair |
| `exact` (an extension) | `exact` |

The budget is computed on the pair being saved with deltatensors 0.2.0's own algorithm and the
options given (the smaller of its float32 output's error and of that output rounded to the
fine-tune's dtype). `auto` stores each tensor with the cheapest deltapack codec whose error is
within the budget (exact included; 1-D tensors stay exact), so the whole model's error is never
larger than deltatensors' would be, by construction, on any pair; that the file is smaller is
measured below. `codec=`, `max_error=` and `tensor_codecs=` override the mapping.
`dt.codec_for(strategy, finetuned, base, **options)` tells what a save would choose.

## Measured: {args.finetuned} against {args.base}

{n:,} values. Error: `||D' - D|| / ||D||` over the whole model, with `D = fine-tune - base` and
`D' = rebuilt - base`, in float64 from the float32 arrays each tool's loader returns; deltatensors'
float32 output is off the bf16 grid, so its error is also given after rounding to bf16 (the
model one would save). deltapack's output is on the grid, the same either way. Bits/param:
8 x file bytes / values; deltapack's file also holds the config and tokenizer, deltatensors' does
not. Save time: `save_delta_from_paths`, wall clock, deltatensors on CPU (`use_gpu=False`);
deltatensors' includes importing torch, which it does inside the call, and the drop-in's
includes computing deltatensors' error for the budget (its `argpartition`s are most of it).
Last columns: deltatensors' bytes over deltapack's, and whether deltapack's error is at most
the smaller of deltatensors' two.

{chr(10).join(table)}

What `auto` chose, by share of the parameters:

{chr(10).join(mix)}
{alt}
## Command

```bash
python3 -m venv /work/venv-dt
echo /work/venv/lib/python3.11/site-packages > /work/venv-dt/lib/python3.11/site-packages/shared.pth
/work/venv-dt/bin/pip install --no-deps deltatensors==0.2.0 zstandard
{command}
```

Measured {when} at commit {rev.stdout.strip() or "?"} (plus the working tree) on {platform.machine()},
{os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}. The script
exits non-zero if the drop-in is larger or less accurate than deltatensors for any strategy.
"""


if __name__ == "__main__":
    main()
