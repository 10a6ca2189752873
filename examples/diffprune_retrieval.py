#!/usr/bin/env python3
r"""Diff-prune all-MiniLM-L6-v2 on the shared retrieval task and store the result as a delta.

The task and recipe are those of ``../shared/models/make_models.py``: a docstring summary
must retrieve its function's signature; contrastive loss with in-batch negatives, batches of
32 drawn at random from the train split, AdamW with 30 warm-up steps and a linear decay. The
base is loaded in float32 from its bf16 checkpoint, the diffs train in float32, and the delta
is stored against the bf16 base in bf16 (positions where bf16 rounds the change away cost
nothing).

Usage:
    python examples/diffprune_retrieval.py --base DIR --train TRAIN.jsonl --density D \\
        [--method l0|l1] [--steps N] [--seed S] -o OUT.dpk

``--full-finetune`` trains the same recipe as a plain full fine-tune instead (the comparison
point), saved as an exact delta. ``--valid-modules F`` holds out that share of the train
split's modules and reports acc1 on them (tune on that, never on the test split). The last
line printed is one JSON object: ``density``, ``bits_per_param``, ``seconds`` (training),
``seconds_per_step``, ``peak_rss_mib``, ``bit_exact`` (the delta rebuilds the merged model
bit for bit) and ``valid_acc1`` when a validation split is held out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

import deltapack
from deltapack.diffprune import DiffPruning


def read_pairs(path: str) -> list:
    """The rows of a jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_by_module(pairs: list, share: float, seed: int = 0) -> tuple:
    """(train, valid): ``share`` of the modules held out, as make_models.py splits test."""
    if share <= 0:
        return pairs, []
    mods = sorted({p["module"] for p in pairs})
    random.Random(seed).shuffle(mods)
    held = set(mods[: int(len(mods) * share)])
    return [p for p in pairs if p["module"] not in held], [p for p in pairs if p["module"] in held]


def embed(model, tok, texts: list) -> torch.Tensor:
    """Mean-pooled, normalized sentence embeddings (the recipe's)."""
    b = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    h = model(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


@torch.no_grad()
def acc1(model, tok, rows: list) -> float:
    """Share of queries whose own signature ranks first among all of ``rows``'.

    The measure ``eval_model.py`` takes on the test split.
    """
    model.eval()
    q = torch.cat([embed(model, tok, [r["query"] for r in rows[i : i + 64]]) for i in range(0, len(rows), 64)])
    c = torch.cat([embed(model, tok, [r["code"] for r in rows[i : i + 64]]) for i in range(0, len(rows), 64)])
    sims = q @ c.T
    model.train()
    return float(((sims > sims.diag().unsqueeze(1)).sum(1) == 0).float().mean())


def peak_rss_mib() -> float:
    """The peak resident memory of the process (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def schedule(step: int, start: int, steps: int, warmup: int = 30) -> float:
    """The recipe's warm-up and linear decay, over steps ``start .. steps``."""
    s, n = step - start, steps - start
    return min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / n)


def main() -> None:
    """Trains, saves the delta and prints the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the base model directory (bf16)")
    ap.add_argument("--train", required=True, help="the task's train split (jsonl: module, query, code)")
    ap.add_argument("--density", type=float, default=0.01, help="share of all values that may change")
    ap.add_argument("--method", choices=["l0", "l1"], default="l1")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of batch 32, all phases")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4, help="diffs' learning rate before the projection")
    ap.add_argument("--mask-lr", type=float, default=5e-4, help="diffs' learning rate with the mask fixed")
    ap.add_argument("--project-at", type=float, default=0.5, help="share of the steps before the projection")
    ap.add_argument("--penalty-weight", type=float, help="DiffPruning's penalty_weight (default: its own)")
    ap.add_argument("--structured", choices=["row", "tensor"])
    ap.add_argument("--full-finetune", action="store_true", help="train a plain full fine-tune instead")
    ap.add_argument("--ft-lr", type=float, default=2e-5, help="learning rate of --full-finetune")
    ap.add_argument("--valid-modules", type=float, default=0.0, help="share of modules held out for validation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", required=True, help="the delta to write")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    train, valid = split_by_module(read_pairs(a.train), a.valid_modules)
    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModel.from_pretrained(a.base, dtype=torch.float32)
    model.train()

    dp = None
    if a.full_finetune:
        opt = torch.optim.AdamW(model.parameters(), lr=a.ft_lr, weight_decay=0.01)
        lrs = [a.ft_lr]
    else:
        dp = DiffPruning(
            model,
            density=a.density,
            method=a.method,
            structured=a.structured,
            project_at=a.project_at,
            penalty_weight=a.penalty_weight,
        )
        opt = torch.optim.AdamW(dp.param_groups(a.lr))
        lrs = [g["lr"] for g in opt.param_groups]
    projected_at = None
    t0 = time.perf_counter()
    for step in range(a.steps):
        batch = rng.sample(train, 32)
        start = 0 if projected_at is None else projected_at
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr * schedule(step, start, a.steps)
        q = embed(model, tok, [r["query"] for r in batch])
        c = embed(model, tok, [r["code"] for r in batch])
        loss = F.cross_entropy(q @ c.T * 20.0, torch.arange(len(batch)))
        if dp is not None:
            loss = loss + dp.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if dp is not None:
            dp.step((step + 1) / a.steps)
            if dp.projected and projected_at is None:
                # With the mask fixed, few diffs carry the whole change: they train at a higher
                # rate, on a schedule of their own.
                projected_at = step + 1
                lrs = [a.mask_lr] + lrs[1:]
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0

    result = {"seconds": seconds, "seconds_per_step": seconds / max(a.steps, 1), "steps": a.steps, "seed": a.seed}
    if valid:
        result["valid_acc1"] = acc1(model, tok, valid)
    if os.path.exists(a.out):
        os.remove(a.out)
    if dp is None:
        state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        deltapack.save(a.base, state, a.out, files=a.base)
    else:
        dp.save(a.out, base=a.base)
        # What `apply` rebuilds is the merged model, bit for bit, in the base's dtype (bf16).
        rebuilt = deltapack.load(a.base, a.out)
        merged = dp.merge().state_dict()
        result["bit_exact"] = rebuilt.keys() == merged.keys() and all(
            torch.equal(t, merged[k].to(t.dtype)) for k, t in rebuilt.items()
        )
    info = deltapack.inspect(a.out)
    result["density"] = info["density"]
    result["bits_per_param"] = info["bits_per_param"]
    result["delta_bytes"] = os.path.getsize(a.out)
    result["peak_rss_mib"] = peak_rss_mib()
    result.update(method="full" if dp is None else a.method, target_density=None if dp is None else a.density)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
