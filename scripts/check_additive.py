#!/usr/bin/env python3
"""Cross-check deltapack's FastChat-style additive deltas against PyTorch's own fp16 arithmetic.

    python3 scripts/check_additive.py BASE FINETUNED EXPORTED APPLIED

BASE and FINETUNED are model directories; EXPORTED is the output of
`deltapack export --format additive --base BASE FT.dpk -o EXPORTED`, APPLIED the output of
`deltapack apply --base BASE EXPORTED -o APPLIED`. FastChat's make_delta and apply_delta are
redone in torch (every tensor to float16, `ft - base`, `base + delta`; rows a grown vocabulary
adds keep the fine-tune's values) and compared bit for bit with both directories. Then
APPLIED is measured against FINETUNED: the largest absolute error and ||error|| / ||delta||,
with delta = FINETUNED - BASE in float64.
Prints one JSON line. Needs torch and safetensors.
"""

import glob
import json
import os
import sys

import torch
from safetensors import safe_open


def tensors(path):
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def rows(b):
    """The base's rows: all of a tensor of its shape, the old ones of a grown vocabulary."""
    return slice(0, b.shape[0]) if b.dim() else Ellipsis


def fastchat_delta(ft, b):
    """make_delta: ft.half() -= base.half(); integer tensors subtract as they are."""
    if not ft.is_floating_point():
        return ft - b
    d = ft.half().clone()
    d[rows(b)] -= b.half()
    return d


def fastchat_apply(b, d):
    """apply_delta: base.half() + delta."""
    if not d.is_floating_point():
        return b + d
    r = d.clone()
    r[rows(b)] += b.half()
    return r


def same_bits(x, y):
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def main():
    base, ft, exported, applied = (tensors(p) for p in sys.argv[1:5])
    delta_same = apply_same = 0
    max_abs, err_sq, delta_sq = 0.0, 0.0, 0.0
    for name, f in ft.items():
        b = base[name]
        d_same = same_bits(exported[name], fastchat_delta(f, b))
        r_same = same_bits(applied[name], fastchat_apply(b, exported[name]))
        for ok, what in ((d_same, "delta"), (r_same, "result")):
            if not ok:
                print(f"{what} of {name} differs from torch's", file=sys.stderr)
        delta_same += d_same
        apply_same += r_same
        if not f.is_floating_point():
            continue
        err = applied[name].double() - f.double()
        exact = f.double()
        exact[rows(b)] -= b.double()
        max_abs = max(max_abs, float(err.abs().max()))
        err_sq += float((err * err).sum())
        delta_sq += float((exact * exact).sum())
    print(
        json.dumps(
            {
                "tensors": len(ft),
                "delta_identical_to_torch": delta_same,
                "result_identical_to_torch": apply_same,
                "max_abs_error": max_abs,
                "relative_error": (err_sq / delta_sq) ** 0.5 if delta_sq else 0.0,
            }
        )
    )


if __name__ == "__main__":
    main()
