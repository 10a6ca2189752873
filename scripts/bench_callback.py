#!/usr/bin/env python3
"""DeltapackCallback on the shared retrieval task's ft-b recipe, through the Hugging Face Trainer.

The recipe of ../shared/models/make_models.py (run B: 600 steps of batch 32 drawn as it draws
them, AdamW lr 5e-5 with weight decay 0.01 on every parameter, its warm-up and linear decay,
no gradient clipping, seed 2, 8 tokens added to the vocabulary, contrastive loss with in-batch
negatives), trained in f32 with a checkpoint every 100 steps, saved in bf16 as
the recipe saves its history (``--save-dtype bf16``) or in f32 (``--save-dtype f32``). The
callback stores every checkpoint as an exact delta chained to the previous one. Then:

- every checkpoint's weights come back byte-identical from the store (``Store.load``
  against ``safetensors.torch.load_file`` of the checkpoint, byte for byte);
- the store's delta bytes against six independent exact deltas of the checkpoints (each
  ``deltapack.make`` against the base).

Prints one JSON line and appends it to ``--log``.

Usage: scripts/bench_callback.py --models ../shared/models --work DIR --save-dtype bf16
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments

import deltapack
from deltapack.callbacks import DeltapackCallback


def pairs_from_stdlib():
    """The task's pairs, as make_models.py builds them (docstring summary -> signature)."""
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    files = [f for f in files if "/test" not in f and "site-packages" not in f and "idlelib" not in f]
    pairs = []
    for f in files:
        try:
            tree = ast.parse(open(f, encoding="utf-8").read())
        except Exception:
            continue
        mod = os.path.relpath(f, root)[:-3].replace("/", ".")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if not doc or node.name.startswith("_"):
                    continue
                summary = doc.strip().split("\n\n")[0].replace("\n", " ")[:300]
                if len(summary) < 20:
                    continue
                if isinstance(node, ast.FunctionDef):
                    sig = f"def {mod}.{node.name}({', '.join(a.arg for a in node.args.args)})"
                else:
                    sig = f"class {mod}.{node.name}"
                pairs.append({"module": mod, "query": summary, "code": sig})
    mods = sorted({p["module"] for p in pairs})
    random.Random(0).shuffle(mods)
    test_mods = set(mods[: len(mods) // 5])
    return [p for p in pairs if p["module"] not in test_mods]


class RecipeTrainer(Trainer):
    """The recipe's loss and schedule, saving weights in ``save_dtype``."""

    save_dtype = torch.bfloat16

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        def embed(b):
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

        q, c = embed(inputs["q"]), embed(inputs["c"])
        return F.cross_entropy(q @ c.T * 20.0, torch.arange(len(q)))

    def _save(self, output_dir=None, state_dict=None):
        state = {k: v.detach().to(self.save_dtype) for k, v in self.model.state_dict().items()}
        return super()._save(output_dir, state_dict=state)

    def create_optimizer(self, model=None):
        # The recipe decays every parameter (the Trainer's default spares biases and norms).
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.args.learning_rate, weight_decay=0.01)
        return self.optimizer

    def _get_train_sampler(self, *args, **kwargs):
        # The recipe's batches, in the order it drew them.
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def create_scheduler(self, num_training_steps, optimizer=None):
        steps = num_training_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer, lambda s: min(1.0, (s + 1) / 30) * max(0.0, 1 - s / steps)
        )
        return self.lr_scheduler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("../shared/models"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--save-dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--log", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(2)
    base = a.models / "minilm-base-bf16"
    work = a.work / a.save_dtype
    work.mkdir(parents=True, exist_ok=False)

    torch.manual_seed(2)
    rng = random.Random(2)
    train = pairs_from_stdlib()
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": [f"<|extra_{i}|>" for i in range(8)]})
    model = AutoModel.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    batches = [rng.sample(train, 32) for _ in range(a.steps)]

    def encode(rows, key):
        return tok([r[key] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")

    args = TrainingArguments(
        output_dir=str(work / "out"),
        max_steps=a.steps,
        save_steps=a.save_every,
        per_device_train_batch_size=32,
        learning_rate=5e-5,
        weight_decay=0.01,
        remove_unused_columns=False,
        report_to=[],
        logging_steps=50,
        use_cpu=True,
        seed=2,
        dataloader_num_workers=0,
        max_grad_norm=0.0,  # the recipe does not clip gradients
    )
    callback = DeltapackCallback(work / "store", base, prefix="b-")
    trainer = RecipeTrainer(
        model=model,
        args=args,
        # One sampled batch per step, as the recipe draws them.
        train_dataset=[row for b in batches for row in b],
        data_collator=lambda rows: {"q": encode(rows, "query"), "c": encode(rows, "code")},
        callbacks=[callback],
    )
    trainer.save_dtype = torch.bfloat16 if a.save_dtype == "bf16" else torch.float32
    t = time.time()
    trainer.train()
    train_s = time.time() - t

    store = deltapack.Store(work / "store")
    entries = store.list()["manifest"]["entries"]
    stored = sum(e["delta_bytes"] for e in entries)
    independent = 0
    identical = True
    for e in entries:
        step = int(e["name"].rsplit("-", 1)[1])
        ckpt = work / "out" / f"checkpoint-{step}"
        got = store.load(e["name"])
        want = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            want.update(load_file(f))
        same = got.keys() == want.keys() and all(
            torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8)) for k in want
        )
        identical = identical and same
        independent += deltapack.make(base, ckpt, work / f"independent-{step}.dpk")["delta_bytes"]
    result = {
        "save_dtype": a.save_dtype,
        "steps": a.steps,
        "checkpoints": len(entries),
        "all_identical": identical,
        "store_delta_bytes": stored,
        "independent_exact_bytes": independent,
        "ratio_to_independent": stored / independent,
        "checkpoint_bytes": sum(e["finetuned_bytes"] for e in entries),
        "train_seconds": train_s,
        "command": f"scripts/bench_callback.py --models {a.models} --work {a.work} --save-dtype {a.save_dtype}",
    }
    line = json.dumps(result)
    print(line, flush=True)
    if a.log:
        with open(a.log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
