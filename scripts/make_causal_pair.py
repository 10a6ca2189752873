"""A small Llama-style causal LM pair made on CPU: a base and a full fine-tune of it.

No small Llama-style model ships its weights in a package on the registries this project may
use, so this recipe makes one (about 15 minutes on 2 cores), for measuring 1-bit deltas
with learned scales on a causal LM (`scripts/bench_calibrate.py`):

- tokenizer: byte-level BPE (4,096 tokens) trained on CPython's standard library sources;
- base: a 4-layer Llama (hidden 256, 8 heads, 4 KV heads, SwiGLU 704, 5.0M parameters)
  trained from scratch on those sources;
- fine-tune: every parameter trained further, in float32, on the retrieval task of
  `../shared/models/make_models.py` written as text (`Docstring: ...` then `Code: ...`),
  from the task's train split (`train.jsonl`: modules disjoint from `test.jsonl`'s).

Writes under OUT: `base/`, `finetuned/` (safetensors, f32, with config and tokenizer) and
`text/{train,test}.txt` (one task example per line). Training on CPU is not bit-reproducible.

Usage: python scripts/make_causal_pair.py --data DIR_WITH_TRAIN_AND_TEST_JSONL --out OUT
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEQ = 128


def stdlib_sources() -> list[str]:
    """The standard library's Python sources (tests excluded), as the base's corpus."""
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    texts = []
    for f in files:
        if "/test" in f or "site-packages" in f:
            continue
        try:
            with open(f, encoding="utf-8") as fh:
                texts.append(fh.read())
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def task_text(path: str) -> list[str]:
    """The retrieval pairs of a jsonl split, one example of text each."""
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [f"Docstring: {r['query']}\nCode: {r['code']}\n" for r in rows]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE of 4,096 tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>", "<pad>"])
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def windows(tok, texts: list[str]) -> torch.Tensor:
    """The texts tokenized, joined by end-of-text and cut into windows of SEQ tokens."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t)["input_ids"] + [tok.eos_token_id])
    n = len(ids) // SEQ
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


def train(model, data: torch.Tensor, steps: int, lr: float, seed: int, batch: int = 16) -> None:
    """AdamW with warm-up and cosine decay over random windows."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with train.jsonl and test.jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base-steps", type=int, default=900)
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    random.seed(0)

    sources = stdlib_sources()
    train_text = task_text(os.path.join(a.data, "train.jsonl"))
    test_text = task_text(os.path.join(a.data, "test.jsonl"))
    os.makedirs(os.path.join(a.out, "text"), exist_ok=True)
    for name, rows in (("train", train_text), ("test", test_text)):
        with open(os.path.join(a.out, "text", f"{name}.txt"), "w", encoding="utf-8") as fh:
            fh.writelines(r.replace("\n", " ").strip() + "\n" for r in rows)

    tok = train_tokenizer(sources)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    print(f"parameters: {sum(p.numel() for p in model.parameters())}", flush=True)
    train(model, windows(tok, sources), a.base_steps, 1e-3, seed=1)
    model.save_pretrained(os.path.join(a.out, "base"), safe_serialization=True)
    tok.save_pretrained(os.path.join(a.out, "base"))

    random.Random(2).shuffle(train_text)
    train(model, windows(tok, train_text), a.ft_steps, 3e-4, seed=2)
    model.save_pretrained(os.path.join(a.out, "finetuned"), safe_serialization=True)
    tok.save_pretrained(os.path.join(a.out, "finetuned"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
