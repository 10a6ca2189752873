#!/usr/bin/env python3
"""Writes the small model pair behind the format-compatibility fixtures, and (given a
deltapack binary of the commit the fixtures pin) the deltas and the hashes of what that
binary's `apply` rebuilds from them.

    python3 scripts/make_compat_fixtures.py OUT_DIR [DELTAPACK_BINARY]

The pair is deterministic (a seeded generator, no numpy) and tiny (about 40 KB a model), yet
exercises every tensor relation: changed, same, resized (added vocabulary rows), converted
(bf16 -> f32), tied (an lm_head the fine-tune unties from the embedding), new and removed,
over several 4 KiB chunks, with config and tokenizer files. `crates/deltapack/tests/compat.rs`
applies the committed deltas with the current build and makes them again, and checks both
against what the pinned commit wrote. Python's standard library only: the fixtures must be
reproducible on a machine with nothing installed.
"""

import hashlib
import json
import os
import random
import struct
import subprocess
import sys


def bf16_bits(x):
    """float -> bf16 bits, rounding to nearest even (as torch does)."""
    (u,) = struct.unpack("<I", struct.pack("<f", x))
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def encode(dtype, values):
    if dtype == "BF16":
        return b"".join(struct.pack("<H", bf16_bits(v)) for v in values)
    if dtype == "F32":
        return struct.pack(f"<{len(values)}f", *values)
    raise ValueError(dtype)


def decode_bf16(data):
    return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for (h,) in struct.iter_unpack("<H", data)]


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype, shape, bytes), written in this order."""
    header, offset = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for *_, data in tensors:
            f.write(data)


HIDDEN, INTER, VOCAB, ADDED = 32, 96, 128, 8


def pair(rng):
    """Base and fine-tune tensors, as (name, dtype, shape, values)."""

    def normal(n, std):
        return [rng.gauss(0.0, std) for _ in range(n)]

    base = {
        "model.embed_tokens.weight": ("BF16", [VOCAB, HIDDEN], normal(VOCAB * HIDDEN, 0.02)),
        "model.layers.0.input_layernorm.weight": ("F32", [HIDDEN], [1.0 + x for x in normal(HIDDEN, 0.05)]),
        "model.layers.0.self_attn.q_proj.weight": ("BF16", [HIDDEN, HIDDEN], normal(HIDDEN * HIDDEN, 0.02)),
        "model.layers.0.self_attn.o_proj.weight": ("BF16", [HIDDEN, HIDDEN], normal(HIDDEN * HIDDEN, 0.02)),
        "model.layers.0.mlp.up_proj.weight": ("BF16", [INTER, HIDDEN], normal(INTER * HIDDEN, 0.02)),
        "model.layers.0.mlp.down_proj.weight": ("BF16", [HIDDEN, INTER], normal(HIDDEN * INTER, 0.02)),
        "model.layers.0.mlp.gate_proj.weight": ("BF16", [INTER, HIDDEN], normal(INTER * HIDDEN, 0.02)),
        "model.norm.weight": ("BF16", [HIDDEN], [1.0] * HIDDEN),
    }
    # The base's values as stored, so the fine-tune moves from what the base really holds.
    stored = {k: (d, s, decode_bf16(encode(d, v)) if d == "BF16" else v) for k, (d, s, v) in base.items()}

    def moved(name, std, frac=1.0):
        d, s, v = stored[name]
        return [x + rng.gauss(0.0, std) if rng.random() < frac else x for x in v]

    emb = moved("model.embed_tokens.weight", 0.002) + normal(ADDED * HIDDEN, 0.02)
    ft = {
        "model.embed_tokens.weight": ("BF16", [VOCAB + ADDED, HIDDEN], emb),
        "model.layers.0.input_layernorm.weight": (
            "F32",
            [HIDDEN],
            moved("model.layers.0.input_layernorm.weight", 0.01),
        ),
        "model.layers.0.self_attn.q_proj.weight": (
            "BF16",
            [HIDDEN, HIDDEN],
            moved("model.layers.0.self_attn.q_proj.weight", 0.002),
        ),
        # Converted: the fine-tune keeps this one in f32.
        "model.layers.0.self_attn.o_proj.weight": (
            "F32",
            [HIDDEN, HIDDEN],
            moved("model.layers.0.self_attn.o_proj.weight", 0.001),
        ),
        "model.layers.0.mlp.up_proj.weight": (
            "BF16",
            [INTER, HIDDEN],
            moved("model.layers.0.mlp.up_proj.weight", 0.002),
        ),
        # Few changes: the `changes` chunk codec.
        "model.layers.0.mlp.down_proj.weight": (
            "BF16",
            [HIDDEN, INTER],
            moved("model.layers.0.mlp.down_proj.weight", 0.01, 0.01),
        ),
        "model.norm.weight": ("BF16", [HIDDEN], stored["model.norm.weight"][2]),
        # New: only in the fine-tune.
        "model.layers.0.adapter.weight": ("BF16", [8, HIDDEN], normal(8 * HIDDEN, 0.02)),
        # Tied: the base ties the head to the embedding; the fine-tune unties it.
        "lm_head.weight": ("BF16", [VOCAB + ADDED, HIDDEN], [x + rng.gauss(0.0, 0.001) for x in emb]),
    }
    # gate_proj is removed in the fine-tune.
    return base, ft


def write_model(d, tensors, config, tokenizer):
    os.makedirs(d, exist_ok=True)
    write_safetensors(
        os.path.join(d, "model.safetensors"),
        [(n, dt, s, encode(dt, v)) for n, (dt, s, v) in tensors.items()],
    )
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f, indent=2)


def config(vocab, tie):
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
    }


def tokenizer(n):
    return {"model": {"type": "BPE", "vocab": {f"tok{i}": i for i in range(n)}}}


# Each fixture: file name, make arguments. All but `exact.dpk` are self-contained, so their
# bytes do not depend on how the default codes shard headers against the base's files.
FIXTURES = [
    ("exact.dpk", []),
    ("exact-self-contained.dpk", ["--self-contained"]),
    ("quant.dpk", ["--self-contained", "--codec", "quant", "--bits", "4"]),
    ("quant-value.dpk", ["--self-contained", "--codec", "quant:domain=value", "--max-error", "0.1"]),
    ("sparse.dpk", ["--self-contained", "--codec", "sparse", "--keep", "0.1"]),
    ("dare.dpk", ["--self-contained", "--codec", "dare", "--keep", "0.3", "--seed", "1"]),
    ("sign.dpk", ["--self-contained", "--codec", "sign"]),
    ("sign-axis.dpk", ["--self-contained", "--codec", "sign-axis"]),
    ("auto.dpk", ["--self-contained", "--codec", "auto", "--max-error", "0.1"]),
]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_hashes(d):
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, d)] = sha256(p)
    return dict(sorted(out.items()))


def main():
    out = sys.argv[1]
    binary = sys.argv[2] if len(sys.argv) > 2 else None
    rng = random.Random(20261207)
    base, ft = pair(rng)
    write_model(os.path.join(out, "base"), base, config(VOCAB, True), tokenizer(VOCAB))
    write_model(os.path.join(out, "finetuned"), ft, config(VOCAB + ADDED, False), tokenizer(VOCAB + ADDED))
    # A second fine-tune, a child of the first: the chain-link fixture.
    child = dict(ft)
    name = "model.layers.0.mlp.up_proj.weight"
    dt, s, v = ft[name]
    child[name] = (dt, s, [x + rng.gauss(0.0, 0.001) for x in decode_bf16(encode(dt, v))])
    write_model(os.path.join(out, "child"), child, config(VOCAB + ADDED, False), tokenizer(VOCAB + ADDED))
    if binary is None:
        return
    expected = {}
    common = ["--chunk-bytes", "4096", "--base-id", "fixtures/compat@6915cbf", "-q"]
    b, f = os.path.join(out, "base"), os.path.join(out, "finetuned")
    for fname, args in FIXTURES:
        dpk = os.path.join(out, fname)
        subprocess.run([binary, "make", "--base", b, "--finetuned", f, "-o", dpk, *common, *args], check=True)
        expected[fname] = {"make": args, "chain": [fname]}
    link = os.path.join(out, "link.dpk")
    subprocess.run(
        [
            binary,
            "make",
            "--base",
            b,
            "--parent",
            os.path.join(out, "exact.dpk"),
            "--finetuned",
            os.path.join(out, "child"),
            "-o",
            link,
            "-q",
        ],
        check=True,
    )
    expected["link.dpk"] = {"make": None, "chain": ["exact.dpk", "link.dpk"]}
    for fname, e in expected.items():
        rebuilt = os.path.join(out, "rebuilt-" + fname)
        chain = [os.path.join(out, c) for c in e["chain"]]
        subprocess.run([binary, "apply", "--base", b, *chain, "-o", rebuilt, "-q"], check=True)
        e["rebuilt_sha256"] = tree_hashes(rebuilt)
        subprocess.run(["rm", "-rf", rebuilt], check=True)
    with open(os.path.join(out, "expected.json"), "w") as fh:
        json.dump({"written_by": "deltapack at commit 6915cbf", "fixtures": expected}, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
