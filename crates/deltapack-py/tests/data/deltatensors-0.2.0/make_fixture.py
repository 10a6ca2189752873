"""Makes this folder's fixture with the real deltatensors 0.2.0 (not a test; run it by hand).

    python3 -m venv /work/venv-dt
    echo /work/venv/lib/python3.11/site-packages > /work/venv-dt/lib/python3.11/site-packages/shared.pth
    /work/venv-dt/bin/pip install --no-deps deltatensors==0.2.0 zstandard
    /work/venv-dt/bin/python crates/deltapack-py/tests/data/deltatensors-0.2.0/make_fixture.py

It writes a tiny bf16 base and two fine-tunes (``base/``, ``ft1/``, ``ft2/``), the ``.wdelta``
files deltatensors makes of them, what deltatensors' loaders rebuild from those files
(``expected.safetensors``, float32) and what its ``inspect`` says (``inspect.json``), so that
the tests check deltapack's reader against deltatensors itself without having it installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import deltatensors as dt
import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
SHAPES = {"emb.weight": (20, 16), "layer.bias": (32,), "layer.weight": (48, 32)}


def bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)


def write(name: str, tensors: dict) -> None:
    (HERE / name).mkdir(exist_ok=True)
    save_file(tensors, str(HERE / name / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    assert dt.__version__ == "0.2.0", dt.__version__
    rng = np.random.default_rng(20261207)
    base = {k: bf16(rng.standard_normal(s) * 0.05) for k, s in SHAPES.items()}
    ft1, ft2 = {}, {}
    for k, s in SHAPES.items():
        step = rng.standard_normal(s) * 0.002 * (rng.random(s) < 0.5)
        ft1[k] = bf16(base[k].float().numpy() + step)
        ft2[k] = bf16(ft1[k].float().numpy() + rng.standard_normal(s) * 0.001)
    write("base", base)
    write("ft1", ft1)
    write("ft2", ft2)
    os.chdir(HERE)
    expected, inspected = {}, {}
    for strategy in ("int4", "sparse", "quantized"):
        dt.save_delta_from_paths(f"{strategy}.wdelta", "ft1", "base", strategy=strategy, use_gpu=False)
        for k, v in dt.load_delta_from_paths(f"{strategy}.wdelta", "base").items():
            expected[f"{strategy}/{k}"] = torch.from_numpy(v)
        inspected[f"{strategy}.wdelta"] = dt.inspect(f"{strategy}.wdelta")
    # The in-memory API, handed float32 arrays: its parent_hash covers float32 bytes.
    base32 = {k: v.float().numpy() for k, v in base.items()}
    ft32 = {k: v.float().numpy() for k, v in ft1.items()}
    dt.save_delta("int4-f32.wdelta", ft32, base32, strategy="int4", use_gpu=False, outlier_fraction=0.05)
    for k, v in dt.load_delta("int4-f32.wdelta", base32).items():
        expected[f"int4-f32/{k}"] = torch.from_numpy(v)
    inspected["int4-f32.wdelta"] = dt.inspect("int4-f32.wdelta")
    # A chain: ft2 against what int4.wdelta rebuilds.
    dt.save_delta_chain_from_paths("chain2.wdelta", "ft2", "int4.wdelta", "base", strategy="sparse", use_gpu=False)
    for k, v in dt.load_delta_chain(["int4.wdelta", "chain2.wdelta"], base="base").items():
        expected[f"chain/{k}"] = torch.from_numpy(v)
    inspected["chain2.wdelta"] = dt.inspect("chain2.wdelta")
    save_file({k: v.contiguous() for k, v in expected.items()}, "expected.safetensors")
    (HERE / "inspect.json").write_text(json.dumps(inspected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
