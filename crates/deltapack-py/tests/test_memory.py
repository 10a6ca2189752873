"""load, safe_open and save: fine-tunes in memory, checked as apply checks them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import deltapack
from deltapack import errors


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _finetune(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("which", ["a", "b"])
def test_load_is_bit_identical_to_load_file(which, base, ft_a, ft_b, delta_a, delta_b):
    ft, delta = (ft_a, delta_a) if which == "a" else (ft_b, delta_b)
    got = deltapack.load(base, delta)
    want = _finetune(ft)
    assert got.keys() == want.keys()
    for name in want:
        assert _same(got[name], want[name]), name
    assert got["embeddings.word_embeddings.weight"].dtype == torch.bfloat16


def test_load_numpy_gives_bf16_as_exact_float32(base, ft_a, delta_a):
    got = deltapack.load(base, delta_a, framework="np")
    want = _finetune(ft_a)
    for name, t in want.items():
        assert isinstance(got[name], np.ndarray)
        assert got[name].dtype == np.float32
        assert np.array_equal(got[name], t.float().numpy()), name


def test_load_of_a_chain(base, ft_b, delta_a, tmp_path):
    child = tmp_path / "child.dpk"
    deltapack.make(base, ft_b, child, parent=delta_a)
    got = deltapack.load(base, [delta_a, child])
    for name, t in _finetune(ft_b).items():
        assert _same(got[name], t), name


def test_load_checks_the_base(ft_a, ft_b, delta_a):
    with pytest.raises(errors.WrongBaseError, match="not the base"):
        deltapack.load(ft_b, delta_a)


def test_safe_open_reads_one_tensor(base, ft_a, delta_a):
    want = _finetune(ft_a)
    with deltapack.safe_open(base, delta_a) as f:
        assert f.keys() == list(deltapack.inspect(delta_a)["tensors"][i]["name"] for i in range(len(want)))
        assert f.metadata() == {"format": "pt"}
        for name in ("encoder.layer.3.output.dense.weight", "embeddings.LayerNorm.bias"):
            assert _same(f.get_tensor(name), want[name])
        assert "config.json" in f.files()
        assert json.loads(f.read_file("config.json")) == json.loads((ft_a / "config.json").read_text())
        with pytest.raises(KeyError):
            f.get_tensor("no.such.tensor")
    with pytest.raises(errors.BadInputError):
        f.keys()


def test_safe_open_numpy(base, ft_a, delta_a):
    with deltapack.safe_open(base, delta_a, framework="np") as f:
        w = f.get_tensor("encoder.layer.0.attention.self.query.weight")
    assert w.dtype == np.float32 and w.shape == (384, 384)


def test_save_makes_the_delta_make_makes_of_the_same_tensors(base, ft_a, delta_a, tmp_path):
    state = load_file(ft_a / "model.safetensors")
    report = deltapack.save(base, state, tmp_path / "s.dpk", files=ft_a)
    assert report["delta_bytes"] == delta_a.stat().st_size
    saved = {t["name"]: t["stored_bytes"] for t in deltapack.inspect(tmp_path / "s.dpk")["tensors"]}
    made = {t["name"]: t["stored_bytes"] for t in deltapack.inspect(delta_a)["tensors"]}
    assert saved == made
    deltapack.apply(base, tmp_path / "s.dpk", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (ft_a / "model.safetensors").read_bytes()


def test_save_equals_make_of_save_file(base, tmp_path):
    """Tensors saved with safetensors.torch.save_file, then made: the same per-tensor bytes."""
    base_state = load_file(base / "model.safetensors")
    torch.manual_seed(0)
    state = {k: (v.float() + 0.01 * torch.randn(v.shape)).to(v.dtype) for k, v in base_state.items()}
    state["extra.f32"] = torch.randn(7, 5)
    (tmp_path / "ft").mkdir()
    save_file(state, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    made = deltapack.make(base, tmp_path / "ft", tmp_path / "made.dpk")
    saved = deltapack.save(base, state, tmp_path / "saved.dpk")
    assert saved["delta_bytes"] == made["delta_bytes"]

    def stored(delta):
        return {t["name"]: (t["stored_bytes"], t["relation"]) for t in deltapack.inspect(delta)["tensors"]}

    assert stored(tmp_path / "saved.dpk") == stored(tmp_path / "made.dpk")


def test_save_handles_views_tied_weights_and_devices(base, tmp_path):
    state = dict(load_file(base / "model.safetensors"))
    emb = state["embeddings.word_embeddings.weight"]
    state["tied.decoder.weight"] = emb  # the same tensor under a second name
    q = state["encoder.layer.0.attention.self.query.weight"]
    state["encoder.layer.0.attention.self.query.weight"] = q.t().contiguous().t()  # non-contiguous
    assert not state["encoder.layer.0.attention.self.query.weight"].is_contiguous()
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.zeros(0, 4)
    deltapack.save(base, state, tmp_path / "s.dpk")
    names = {t["name"] for t in deltapack.inspect(tmp_path / "s.dpk")["tensors"]}
    assert "embeddings.word_embeddings.weight" in names and "tied.decoder.weight" not in names
    got = deltapack.load(base, tmp_path / "s.dpk")
    for name, t in state.items():
        if name != "tied.decoder.weight":
            assert _same(got[name], t.contiguous()), name


def test_save_refuses_bad_state_dicts(base, tmp_path):
    with pytest.raises(errors.BadInputError, match="not a torch.Tensor"):
        deltapack.save(base, {"a": [1, 2, 3]}, tmp_path / "x.dpk")
    with pytest.raises(errors.BadInputError, match="mapping"):
        deltapack.save(base, [torch.zeros(1)], tmp_path / "x.dpk")
    with pytest.raises(errors.BadInputError, match="shape"):
        # Bytes that do not hold the shape claimed: refused, never read out of bounds.
        from deltapack import _make_args, _native

        args = _make_args("exact", None, None, False, None, False, 1 << 21, False, None)
        data = np.zeros(8, dtype=np.uint8)
        _native.save(str(base), [("w", "F32", [4, 4], data)], str(tmp_path / "x.dpk"), [], args)
    assert not (tmp_path / "x.dpk").exists()


def test_save_of_a_differently_shaped_tensor_round_trips(base, tmp_path):
    state = dict(load_file(base / "model.safetensors"))
    state["embeddings.word_embeddings.weight"] = torch.cat(
        [state["embeddings.word_embeddings.weight"], torch.ones(3, 384, dtype=torch.bfloat16)]
    )
    state["pooler.dense.weight"] = state["pooler.dense.weight"][:10].clone()
    report = deltapack.save(base, state, tmp_path / "s.dpk")
    assert report["resized"] + report["new"] >= 1
    got = deltapack.load(base, tmp_path / "s.dpk")
    for name, t in state.items():
        assert _same(got[name], t), name


def _big_pair(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {f"w{i}": torch.randn(2048, 4096, generator=g) for i in range(8)}
    ft = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for name, state in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")


def test_ctrl_c_stops_a_long_call_and_leaves_nothing(tmp_path):
    _big_pair(tmp_path)
    script = textwrap.dedent(
        f"""
        import signal, sys, deltapack
        # Python's own Ctrl-C handler, also when this test runs in a background job
        # (whose children start with SIGINT ignored, and then Python installs none).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("start", flush=True)
        try:
            deltapack.make({str(tmp_path / "base")!r}, {str(tmp_path / "ft")!r}, {str(tmp_path / "out.dpk")!r},
                           codec="auto", max_error=0.05, threads=1)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        print("finished", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    # The signal arrives once the output's temporary file exists: the call is mid-way.
    deadline = time.monotonic() + 60
    while not any(n.startswith(".out.dpk") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, "make ended before writing"
        time.sleep(0.01)
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert time.monotonic() - t < 10
    assert proc.returncode == 3 and "interrupted" in rest
    leftovers = sorted(os.listdir(tmp_path))
    if "out.dpk" in leftovers:
        # The signal came as the call was finishing: the output is then whole, never partial.
        assert deltapack.inspect(tmp_path / "out.dpk")["tensors"]
        leftovers.remove("out.dpk")
    assert leftovers == ["base", "ft"], "a partial output was left"
