#!/usr/bin/env python3
"""Quality of served fine-tunes (``deltapack.torch.attach``) against the stored ones, on MiniLM.

For each delta: the model run in f32 (the base, loaded as f32) with the delta attached,
against the fine-tune the same delta rebuilds (``apply``), also run in f32:

- ``output error``: ``||Y_served - Y_stored|| / ||Y_stored - Y_base||`` over the last hidden
  states of the test queries and code (the issue's target: at most 0.02); the same for the
  rows of a multi-tenant batch (half the rows served, half the base);
- ``conversion``: the served change's relative distance from the stored one, over the
  weights (`h.report`'s per-tensor errors combined);
- acc1 on the retrieval task (the protocol of ``../shared/models/eval_model.py``) of the
  fine-tune, the stored delta's reconstruction and the served model.

    python3 scripts/eval_serve.py --models ../shared/models --f32 F32_DIR --work WORK --doc docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

import deltapack
import deltapack.torch as dpt

sys.path.insert(0, str(Path(__file__).resolve().parent))

CODECS = [("sign-axis", "sign-axis"), ("quant 4-bit", "quant:bits=4"), ("sparse 5 %", "sparse:keep=0.05")]


def embed(model, tok, texts):
    outs, hidden = [], []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            b = tok(texts[i : i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            h = model(**b).last_hidden_state.float()
            m = b["attention_mask"].unsqueeze(-1).float()
            hidden.append((h * m).reshape(-1, h.shape[-1]))
            outs.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(outs), torch.cat(hidden)


def acc1(q, c) -> float:
    sims = q @ c.T
    return float(((sims > sims.diag().unsqueeze(1)).sum(1) == 0).float().mean())


def evaluate(model, tok, rows):
    q, hq = embed(model, tok, [r["query"] for r in rows])
    c, hc = embed(model, tok, [r["code"] for r in rows])
    return acc1(q, c), torch.cat([hq, hc])


def small(x: float) -> str:
    """An error: four decimals, or two significant digits below 0.001."""
    return f"{x:.4f}" if x >= 1e-3 or x == 0 else f"{x:.1e}"


def row(r: dict) -> str:
    return (
        f"| {r['pair']} | `{r['codec']}` | {', '.join(r['form'])} | {small(r['conversion'])} | "
        f"{small(r['output_error'])} | {small(r['mixed_output_error'])} | {r['acc1_base']:.4f} | {r['acc1_ft']:.4f} | "
        f"{r['acc1_stored']:.4f} | {r['acc1_served']:.4f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="../shared/models")
    ap.add_argument("--f32", type=Path, help="make_models.py's output: minilm-base and ft-a-f32")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--doc", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in open(args.models / "data" / "test.jsonl")][: args.n]
    tok = AutoTokenizer.from_pretrained(args.models / "ft-a-bf16")
    pairs = [("bf16", args.models / "minilm-base-bf16", args.models / "ft-a-bf16")]
    if args.f32:
        pairs.append(("f32", args.f32 / "minilm-base", args.f32 / "ft-a-f32"))
    results = []
    for label, base, ft in pairs:
        model = AutoModel.from_pretrained(base, dtype=torch.float32).eval()
        a_base, y_base = evaluate(model, tok, rows)
        a_ft, _ = evaluate(AutoModel.from_pretrained(ft, dtype=torch.float32).eval(), tok, rows)
        for name, codec in CODECS:
            delta = args.work / f"{label}-{codec.replace(':', '_').replace('=', '_')}.dpk"
            deltapack.make(base, ft, delta, codec=codec, force=True)
            rebuilt = args.work / f"{label}-{name.replace(' ', '_')}-rebuilt"
            deltapack.apply(base, delta, rebuilt, force=True)
            a_stored, y_stored = evaluate(AutoModel.from_pretrained(rebuilt, dtype=torch.float32).eval(), tok, rows)
            h = dpt.attach(model, {"ft": delta}, base=base)
            with h.use("ft"):
                a_served, y_served = evaluate(model, tok, rows)
            # A multi-tenant batch: every other text served, the others the base.
            texts = [r["query"] for r in rows[:64]]
            b = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
            with torch.no_grad(), h.use(["ft", None] * (len(texts) // 2)):
                y_mixed = model(**b).last_hidden_state.float()[0::2]
            h.detach()
            with torch.no_grad():
                y_b = model(**b).last_hidden_state.float()[0::2]
            stored_model = AutoModel.from_pretrained(rebuilt, dtype=torch.float32).eval()
            with torch.no_grad():
                y_s = stored_model(**b).last_hidden_state.float()[0::2]
            tensors = [t for t in h.report["ft"]["tensors"] if t["form"] != "dense"]
            num = sum((t["error"] * t["delta_norm"]) ** 2 for t in tensors)
            den = sum(t["delta_norm"] ** 2 for t in tensors)
            results.append(
                {
                    "pair": label,
                    "codec": name,
                    "form": sorted({t["form"] for t in tensors}),
                    "conversion": (num / den) ** 0.5 if den else 0.0,
                    "output_error": float((y_served - y_stored).norm() / (y_stored - y_base).norm()),
                    "mixed_output_error": float((y_mixed - y_s).norm() / (y_s - y_b).norm()),
                    "acc1_base": a_base,
                    "acc1_ft": a_ft,
                    "acc1_stored": a_stored,
                    "acc1_served": a_served,
                }
            )
            print(json.dumps(results[-1]), flush=True)
    lines = [
        "| pair | codec | served form | conversion error | output error | mixed batch | acc1 base | acc1 fine-tune | "
        "acc1 stored | acc1 served |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(r) for r in results]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.doc:
        from doc_tables import replace_between

        replace_between(args.doc, "serve-quality", text)


if __name__ == "__main__":
    main()
