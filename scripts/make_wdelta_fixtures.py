#!/usr/bin/env python3
"""Writes the deltatensors fixtures of crates/deltapack/tests/data/wdelta/ with the real
deltatensors 0.2.0 (PyPI), whose in-memory API needs only numpy.

    pip install --no-deps deltatensors==0.2.0
    python3 scripts/make_wdelta_fixtures.py [OUT_DIR]

It makes a tiny base and fine-tune (bf16, f16, f32 and int64 tensors; bf16 packed by hand,
since numpy has no bfloat16) and writes:

- base/model.safetensors and base/config.json, finetuned/model.safetensors;
- STRATEGY.wdelta for int4, sparse and quantized, made by `deltatensors.save_delta`;
- STRATEGY.expected.safetensors: what `deltatensors.load_delta` returns for it (float32).

The base tensor `extra.buffer` is left out of the state dicts given to deltatensors, so an
importer must keep it unchanged. int4 and sparse get the arrays as a numpy user holds them
(bf16 widened to float32, the rest as stored); quantized gets every tensor as float32, as
`{k: v.float().numpy()}` gives them. The base's parent_hash differs accordingly.
"""

import json
import os
import struct
import sys

import deltatensors as dt
import numpy as np

assert dt.__version__ == "0.2.0", f"needs deltatensors 0.2.0, found {dt.__version__}"

OUT = (
    sys.argv[1]
    if len(sys.argv) > 1
    else os.path.join(os.path.dirname(__file__), "..", "crates", "deltapack", "tests", "data", "wdelta")
)
ST_DTYPE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I64": np.int64}


def bf16_bits(x):
    """float32 -> bfloat16 bit patterns, rounded to nearest-even (finite inputs)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path, tensors):
    """tensors: name -> (safetensors dtype, array in that dtype's storage type)."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text.encode())
        for b in blobs:
            f.write(b)


def make_pair(rng):
    """Base and fine-tune: name -> (dtype, stored array)."""
    specs = {
        "embed.weight": ("BF16", (40, 24)),
        "layer.0.weight": ("F32", (24, 16)),
        "layer.0.bias": ("F16", (16,)),
        "layer.0.norm.weight": ("BF16", (24,)),
        "conv.weight": ("F32", (3, 4, 5)),
        "position_ids": ("I64", (1, 12)),
        "extra.buffer": ("F32", (7,)),
    }
    base, ft = {}, {}
    for name, (dtype, shape) in specs.items():
        if dtype == "I64":
            b = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
            base[name], ft[name] = (dtype, b), (dtype, b.copy())
            continue
        w = rng.normal(0, 0.02, shape).astype(np.float32)
        d = rng.normal(0, 0.002, shape).astype(np.float32) * (rng.random(shape) < 0.7)
        if dtype == "BF16":
            bb = bf16_bits(w)
            bb.reshape(-1)[:5] = 0x8000  # -0.0 in the base, unchanged by the fine-tune
            fb = bf16_bits(bf16_values(bb) + d)
            fb.reshape(-1)[:5] = 0x8000
            base[name], ft[name] = (dtype, bb), (dtype, fb)
        else:
            t = ST_DTYPE[dtype]
            base[name], ft[name] = (dtype, w.astype(t)), (dtype, (w + d).astype(t))
    return base, ft


def as_numpy(tensors, all_float32):
    """The state dict a numpy user hands deltatensors (without extra.buffer)."""
    out = {}
    for name, (dtype, arr) in tensors.items():
        if name == "extra.buffer":
            continue
        a = bf16_values(arr) if dtype == "BF16" else arr
        out[name] = a.astype(np.float32) if all_float32 else a
    return out


def main():
    rng = np.random.default_rng(20261125)
    base, ft = make_pair(rng)
    write_safetensors(os.path.join(OUT, "base", "model.safetensors"), base)
    with open(os.path.join(OUT, "base", "config.json"), "w") as f:
        f.write('{"model_type": "tiny", "torch_dtype": "bfloat16"}\n')
    write_safetensors(os.path.join(OUT, "finetuned", "model.safetensors"), ft)
    runs = [("int4", False, {"outlier_fraction": 0.05}), ("sparse", False, {"sparsity": 0.75}), ("quantized", True, {})]
    for strategy, all_f32, kwargs in runs:
        b, f = as_numpy(base, all_f32), as_numpy(ft, all_f32)
        path = os.path.join(OUT, f"{strategy}.wdelta")
        dt.save_delta(path, f, b, strategy=strategy, use_gpu=False, **kwargs)
        got = dt.load_delta(path, b)
        write_safetensors(
            os.path.join(OUT, f"{strategy}.expected.safetensors"),
            {k: ("F32", v.astype(np.float32)) for k, v in sorted(got.items())},
        )
    for root, _, files in sorted(os.walk(OUT)):
        for n in sorted(files):
            p = os.path.join(root, n)
            print(f"{os.path.getsize(p):7d}  {os.path.relpath(p, OUT)}")


if __name__ == "__main__":
    main()
