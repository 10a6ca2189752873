#!/usr/bin/env python3
"""Writes a deltapack calibration file: per linear layer, the mean squared input activation
of each input channel, over some text run through the fine-tune.

    python3 scripts/calibrate.py MODEL_DIR TEXTS.jsonl OUT.safetensors [--field query] [--n 256]

TEXTS.jsonl holds one JSON object per line; --field names the texts, comma-separated
(default "query"; a plain-text file with one text per line also works). The output maps each nn.Linear's weight
name, as the checkpoint names it, to a float32 vector of length in_features: what
`deltapack make --codec sign-axis --calibration OUT.safetensors` weights its fit with, so
that the columns fed by large activations are fitted best. Needs torch, transformers, safetensors.
"""

import argparse
import json

import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("texts")
ap.add_argument("out")
ap.add_argument("--field", default="query")
ap.add_argument("--n", type=int, default=256)
a = ap.parse_args()

texts = []
for line in open(a.texts):
    line = line.strip()
    if not line:
        continue
    try:
        row = json.loads(line)
        texts.extend(row[f] for f in a.field.split(","))
    except (ValueError, KeyError, TypeError):
        texts.append(line)
texts = texts[: a.n]

tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModel.from_pretrained(a.model, dtype=torch.float32).eval()
sums, counts = {}, {}


def hook(name):
    def record(module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    return record


# Module names match the checkpoint's tensor names when the checkpoint was saved from this
# model class; a prefix (e.g. "bert.") can be added here if the checkpoint has one.
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear):
        module.register_forward_hook(hook(f"{name}.weight"))
with torch.no_grad():
    for i in range(0, len(texts), 32):
        model(**tok(texts[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
save_file({k: (v / counts[k]).contiguous() for k, v in sums.items()}, a.out)
print(f"{len(sums)} linear layers, {len(texts)} texts -> {a.out}")
