#!/usr/bin/env python3
"""Quality of a rebuilt model against its fine-tune on the shared retrieval task.

Same protocol as ../shared/models/eval_model.py (mean-pooled, normalised embeddings of
queries and code, max_length 64, first --n rows of test.jsonl), plus what that script does
not print: how many queries change their top-1 answer against the reference model.
Prints one JSON line: acc1, mrr, changed (queries whose answer differs from --ref's),
emb_cos_min and emb_cos_mean (embeddings against --ref's).
Needs torch, transformers, safetensors.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--ref", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--n", type=int, default=400)
a = ap.parse_args()
torch.set_num_threads(max(1, os.cpu_count() or 1))
rows = [json.loads(line) for line in open(os.path.join(a.data, "test.jsonl"))][: a.n]


@torch.no_grad()
def run(path):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    def embed(texts):
        outs = []
        for i in range(0, len(texts), 64):
            b = tok(texts[i : i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            outs.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(outs)

    q = embed([r["query"] for r in rows])
    c = embed([r["code"] for r in rows])
    sims = q @ c.T
    rank = (sims > sims.diag().unsqueeze(1)).sum(1)
    return {
        "acc1": float((rank == 0).float().mean()),
        "mrr": float((1.0 / (rank.float() + 1)).mean()),
        "top1": sims.argmax(1),
        "emb": torch.cat([q, c]),
    }


m, r = run(a.model), run(a.ref)
cos = (m["emb"] * r["emb"]).sum(1)
print(
    json.dumps(
        {
            "model": a.model,
            "acc1": m["acc1"],
            "mrr": m["mrr"],
            "changed": int((m["top1"] != r["top1"]).sum()),
            "emb_cos_min": float(cos.min()),
            "emb_cos_mean": float(cos.mean()),
        }
    )
)
