"""deltapack.compat.deltatensors: deltatensors 0.2.0's API on deltapack files.

Runs without deltatensors: its own files and outputs are in tests/data/deltatensors-0.2.0 (made
by make_fixture.py there, with deltatensors 0.2.0), and the tests below write .wdelta files by
hand in its format (magic, version, JSON header, array records, SHA-256 trailer).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file, save_file

import deltapack
import deltapack.compat.deltatensors as dt

FIXTURE = Path(__file__).resolve().parent / "data" / "deltatensors-0.2.0"
FIELDS = {
    "sparse": ("indices", "values"),
    "quantized": ("scales", "packed_signs"),
    "int4": ("outlier_idx", "outlier_vals", "scale", "zero_point", "packed"),
}


def f32(sd):
    """What deltatensors' users hand it: {k: v.float().numpy()}."""
    return {k: v.float().numpy() for k, v in sd.items()}


def model(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rel_error(rebuilt: dict, ft: dict, base: dict) -> float:
    num = den = 0.0
    for k in ft:
        d = ft[k].astype(np.float64) - base[k]
        num += float(np.sum((rebuilt[k].astype(np.float64) - ft[k]) ** 2))
        den += float(np.sum(d**2))
    return (num / den) ** 0.5


def dt_payload_bytes(strategy: str, shapes) -> int:
    """A lower bound of a .wdelta's size: its arrays' bytes alone (deltatensors 0.2.0's layout)."""
    total = 0
    for shape in shapes:
        n = int(np.prod(shape))
        if strategy == "sparse":
            total += max(1, int(n * 0.1)) * (8 + 4)
        elif strategy == "quantized":
            total += (n + 7) // 8 + 2 * (shape[0] if len(shape) > 1 else 1)
        else:
            k = max(1, int(n * 0.01))
            total += k * (8 + 2) + (n - k + 1) // 2 + 4
    return total


def write_wdelta(path: Path, parent_hash: str, strategy: str, tensors: dict) -> None:
    """A .wdelta file in deltatensors 0.2.0's format (format.py's write_wdelta)."""
    header = {"parent_hash": parent_hash, "strategy": strategy, "tensors": {}}
    records = b""
    for name, payload in tensors.items():
        fields = FIELDS[payload["strategy"]]
        header["tensors"][name] = {k: ({"_ref": k} if k in fields else v) for k, v in payload.items()}
        for field in fields:
            arr = np.asarray(payload[field])
            for text in (name, field, str(arr.dtype)):
                records += struct.pack("<I", len(text.encode())) + text.encode()
            records += struct.pack("<I", arr.ndim) + b"".join(struct.pack("<Q", d) for d in arr.shape)
            records += struct.pack("<Q", arr.nbytes) + arr.tobytes()
    hb = json.dumps(header, separators=(",", ":")).encode()
    content = b"wdelta\x00" + struct.pack("<II", 1, len(hb)) + hb + records
    path.write_bytes(content + hashlib.sha256(content).digest())


def stored_hash(sd: dict) -> str:
    """deltatensors' parent_hash of a bf16 folder: names sorted, bf16 as its 16-bit pattern."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def real(base, ft_a):
    b, f = model(base), model(ft_a)
    return SimpleNamespace(base=b, ft=f, base32=f32(b), ft32=f32(f))


# A script written for deltatensors (the shape of its README), with only its import changed.
README_SCRIPT = """
import deltatensors as dt
import numpy as np

dt.save_delta_from_paths(OUT / "checkpoint.wdelta", FT, BASE, strategy="int4", outlier_fraction=0.01, use_gpu=False)
recon_sd = dt.load_delta_from_paths(OUT / "checkpoint.wdelta", BASE)
info = dt.inspect(OUT / "checkpoint.wdelta")
assert info["n_tensors"] == len(recon_sd)
assert all(v.dtype == np.float32 for v in recon_sd.values())
print(info["size_mb"], "MB", info["strategy"], info["parent_hash"][:8])

parent_hash = dt.save_delta(OUT / "mem.wdelta", FT32, BASE32, strategy="quantized")
reconstructed = dt.load_delta(OUT / "mem.wdelta", BASE32)
assert parent_hash == dt.inspect(OUT / "mem.wdelta")["parent_hash"]

dt.save_delta_chain_from_paths(OUT / "v2.wdelta", finetuned_dir=FT_B, parent_delta_path=OUT / "checkpoint.wdelta",
                               base_dir=BASE, strategy="int4", outlier_fraction=0.05)
history = dt.inspect_chain([OUT / "checkpoint.wdelta", OUT / "v2.wdelta"])
for entry in history:
    print(entry["step"], entry["size_mb"], "MB", entry["parent_hash"][:8])
sd = dt.load_delta_chain([OUT / "checkpoint.wdelta", OUT / "v2.wdelta"], base=BASE)
"""


def test_readme_script_runs_with_only_the_import_changed(tmp_path, base, ft_a, ft_b, real):
    script = README_SCRIPT.replace("import deltatensors as dt", "import deltapack.compat.deltatensors as dt")
    scope = {"OUT": tmp_path, "FT": ft_a, "BASE": base, "FT_B": ft_b, "FT32": real.ft32, "BASE32": real.base32}
    exec(compile(script, "readme_script", "exec"), scope)
    # int4 on the real pair: within deltatensors' error (0.1113 here) and far below its size.
    err = rel_error(scope["recon_sd"], real.ft32, real.base32)
    expected = dt.codec_for("int4", ft_a, base)
    assert expected["codec"] == "auto" and abs(expected["deltatensors_error"] - 0.1113) < 1e-3
    assert err <= expected["deltatensors_error"]
    size = (tmp_path / "checkpoint.wdelta").stat().st_size
    assert size < dt_payload_bytes("int4", [v.shape for v in real.ft.values()])
    assert rel_error(scope["reconstructed"], real.ft32, real.base32) <= 0.7063
    # The chain's end is ft-b (a resized vocabulary, which deltapack stores) within int4's error.
    ft_b32 = f32(model(ft_b))
    assert set(scope["sd"]) == set(ft_b32)
    assert scope["sd"]["embeddings.word_embeddings.weight"].shape == (30530, 384)
    assert scope["history"][1]["parent_hash"] != scope["history"][0]["parent_hash"]


def test_exact_round_trip_is_bit_exact(tmp_path, base, ft_a, real):
    out = tmp_path / "exact.wdelta"
    h = dt.save_delta_from_paths(out, ft_a, base, strategy="exact")
    assert h == deltapack.inspect(out)["base"]["fingerprint"]
    for rebuilt in (
        dt.load_delta_from_paths(out, base),
        dt.load_delta(out, real.base32),
        dt.load_delta(out, real.base),
    ):
        assert set(rebuilt) == set(real.ft32)
        assert all(np.array_equal(rebuilt[k], real.ft32[k]) for k in real.ft32)
    assert dt.inspect(out)["strategy"] == "exact"
    # An ordinary deltapack delta: the CLI's verbs take it.
    deltapack.verify(base, out, finetuned=ft_a)


SUBSET = ("encoder.layer.0.", "embeddings.position_embeddings", "embeddings.LayerNorm")


@pytest.mark.parametrize("strategy", ["int4", "sparse", "quantized"])
def test_lossy_round_trip_smaller_at_no_more_error(tmp_path, real, strategy):
    names = [k for k in real.ft if k.startswith(SUBSET)]
    b = {k: real.base32[k] for k in names}
    f = {k: real.ft32[k] for k in names}
    out = tmp_path / f"{strategy}.wdelta"
    dt.save_delta(out, f, b, strategy=strategy)
    rebuilt = dt.load_delta(out, b)
    budget = dt.codec_for(strategy, f, b)["deltatensors_error"]
    assert 0 < budget < 1
    assert rel_error(rebuilt, f, b) <= budget
    assert out.stat().st_size < dt_payload_bytes(strategy, [v.shape for v in f.values()])
    info = dt.inspect(out)
    assert info["format"] == "deltapack" and info["strategy"] != "exact"
    assert {t["stored_dtype"] for t in info["tensors"].values()} == {"BF16"}  # float32 arrays of bf16 values


def test_strategy_options_and_deltapack_options(tmp_path, real):
    names = [k for k in real.ft if k.startswith("encoder.layer.1.")]
    b = {k: real.base32[k] for k in names}
    f = {k: real.ft32[k] for k in names}
    more = dt.codec_for("int4", f, b, outlier_fraction=0.2)["deltatensors_error"]
    less = dt.codec_for("int4", f, b)["deltatensors_error"]
    assert more < less
    dt.save_delta(tmp_path / "q.dpk", f, b, strategy="int4", codec="quant:bits=3")
    assert dt.inspect(tmp_path / "q.dpk")["strategy"] == "quant"
    dt.save_delta(tmp_path / "e.dpk", f, b, strategy="sparse", max_error=0.05)
    assert rel_error(dt.load_delta(tmp_path / "e.dpk", b), f, b) <= 0.05
    with pytest.raises(ValueError, match="Unknown strategy 'zip'"):
        dt.save_delta(tmp_path / "x.dpk", f, b, strategy="zip")
    with pytest.raises(ValueError, match="sparsity must be in"):
        dt.save_delta(tmp_path / "x.dpk", f, b, strategy="sparse", sparsity=1.5)


def test_base_accepted_as_stored_or_float32(tmp_path, base, ft_a, real):
    out = tmp_path / "mem.wdelta"
    dt.save_delta(out, real.ft32, real.base32, strategy="exact")
    # float32 arrays of bf16 values were cast back: the delta is the checkpoints' bf16 delta.
    assert dt.inspect(out)["parent_hash"] == deltapack.inspect(tmp_path / "mem.wdelta")["base"]["fingerprint"]
    on_disk = deltapack.load(base, out)
    assert all(torch.equal(on_disk[k], real.ft[k]) for k in real.ft)
    for given in (real.base32, real.base, base):
        rebuilt = dt.load_delta(out, given)
        assert all(np.array_equal(rebuilt[k], real.ft32[k]) for k in real.ft32)
    # torch tensors, as stored, on the saving side too.
    dt.save_delta(tmp_path / "pt.dpk", real.ft, real.base, strategy="exact")
    assert dt.inspect(tmp_path / "pt.dpk")["parent_hash"] == dt.inspect(out)["parent_hash"]


def test_float32_finetune_stored_as_float32(tmp_path, real):
    names = [k for k in real.ft if k.startswith("encoder.layer.2.")]
    rng = np.random.default_rng(0)
    b = {k: real.base32[k] for k in names}
    f = {k: (real.ft32[k] + rng.standard_normal(real.ft32[k].shape).astype(np.float32) * 1e-5) for k in names}
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({k: real.base[k].contiguous() for k in names}, str(base_dir / "model.safetensors"))
    # exact: every float32 value comes back; the bf16 base is taken as stored or as float32.
    dt.save_delta(tmp_path / "exact.dpk", f, b, strategy="exact")
    assert {t["stored_dtype"] for t in dt.inspect(tmp_path / "exact.dpk")["tensors"].values()} == {"F32"}
    for rebuilt in (
        dt.load_delta(tmp_path / "exact.dpk", b),
        dt.load_delta_from_paths(tmp_path / "exact.dpk", base_dir),
    ):
        assert all(np.array_equal(rebuilt[k], f[k]) for k in f)
    # lossy: coded against the float32 base, which the loaders accept from the bf16 folder too.
    dt.save_delta(tmp_path / "int4.dpk", f, b, strategy="int4")
    budget = dt.codec_for("int4", f, b)["deltatensors_error"]
    for rebuilt in (dt.load_delta(tmp_path / "int4.dpk", b), dt.load_delta_from_paths(tmp_path / "int4.dpk", base_dir)):
        assert rel_error(rebuilt, f, b) <= budget


def test_wrong_base_raises(tmp_path, base, ft_a, real):
    names = [k for k in real.ft if k.startswith("encoder.layer.3.")]
    b = {k: real.base32[k] for k in names}
    f = {k: real.ft32[k] for k in names}
    dt.save_delta(tmp_path / "d.dpk", f, b, strategy="exact")
    with pytest.raises(ValueError, match="wrong base"):
        dt.load_delta(tmp_path / "d.dpk", f)
    with pytest.raises(dt.BaseMismatchError):
        dt.load_delta(tmp_path / "d.dpk", {k: v + 1.0 for k, v in b.items()})
    with pytest.raises(deltapack.WrongBaseError):
        dt.load_delta_from_paths(tmp_path / "d.dpk", ft_a)
    w = FIXTURE / "int4.wdelta"
    with pytest.raises(ValueError, match="Base model hash mismatch"):
        dt.load_delta_from_paths(w, FIXTURE / "ft1")
    assert set(dt.load_delta_from_paths(w, FIXTURE / "ft1", verify=False)) == {
        "emb.weight",
        "layer.bias",
        "layer.weight",
    }


def test_reads_deltatensors_files_as_deltatensors_does():
    expected = load_np(FIXTURE / "expected.safetensors")
    inspected = json.loads((FIXTURE / "inspect.json").read_text())
    base = load_file(FIXTURE / "base" / "model.safetensors")
    for strategy in ("int4", "sparse", "quantized"):
        path = FIXTURE / f"{strategy}.wdelta"
        rebuilt = dt.load_delta_from_paths(path, FIXTURE / "base")
        assert rebuilt.keys() == {k.split("/")[1] for k in expected if k.startswith(f"{strategy}/")}
        for k, v in rebuilt.items():
            assert v.dtype == np.float32 and np.array_equal(v, expected[f"{strategy}/{k}"])
        # the base as float32 arrays or as torch bf16 tensors, where deltatensors hashed the folder
        for given in (f32(base), base):
            assert all(np.array_equal(v, rebuilt[k]) for k, v in dt.load_delta(path, given).items())
        info = dt.inspect(path)
        assert info.pop("format") == "wdelta"
        assert dict(info, path=path.name) == inspected[f"{strategy}.wdelta"]
    # save_delta of float32 arrays hashed float32 bytes: the folder is accepted all the same.
    path = FIXTURE / "int4-f32.wdelta"
    assert inspected["int4-f32.wdelta"]["parent_hash"] == dt.hash_state_dict(f32(base))
    for rebuilt in (dt.load_delta_from_paths(path, FIXTURE / "base"), dt.load_delta(path, f32(base))):
        assert all(np.array_equal(v, expected[f"int4-f32/{k}"]) for k, v in rebuilt.items())
    dt.lineage.verify_base(f32(base), inspected["int4-f32.wdelta"]["parent_hash"])
    dt.lineage.verify_base(base, inspected["int4.wdelta"]["parent_hash"])
    with pytest.raises(ValueError, match="hash mismatch"):
        dt.lineage.verify_base(f32(base), inspected["chain2.wdelta"]["parent_hash"])
    chain = [FIXTURE / "int4.wdelta", FIXTURE / "chain2.wdelta"]
    rebuilt = dt.load_delta_chain(chain, base=FIXTURE / "base")
    assert all(np.array_equal(v, expected[f"chain/{k}"]) for k, v in rebuilt.items())
    assert [e["step"] for e in dt.inspect_chain(chain)] == [0, 1]
    with pytest.raises(ValueError, match="hash mismatch"):
        dt.load_delta_chain(chain[::-1], base=FIXTURE / "base")


def test_reads_a_wdelta_of_the_real_checkpoints(tmp_path, base, real):
    """A sparse .wdelta written by hand against the real base, read by the paths and in-memory APIs."""
    names = [k for k in sorted(real.ft) if k.startswith(("encoder.layer.5.", "pooler"))]
    payloads, expected = {}, {}
    for k in names:
        delta = (real.ft32[k] - real.base32[k]).reshape(-1)
        keep = max(1, int(delta.size * 0.1))
        idx = np.sort(np.argsort(-np.abs(delta), kind="stable")[:keep]).astype(np.int64)
        dense = np.zeros_like(delta)
        dense[idx] = delta[idx]
        shape = list(real.ft32[k].shape)
        payloads[k] = {"strategy": "sparse", "shape": shape, "dtype": "float32", "sparsity": 0.9}
        payloads[k].update(indices=idx, values=delta[idx])
        expected[k] = (real.base32[k] + dense.reshape(shape)).astype(np.float32)
    path = tmp_path / "real.wdelta"
    write_wdelta(path, stored_hash({k: real.base[k] for k in names}), "sparse", payloads)
    for rebuilt in (dt.load_delta_from_paths(path, base), dt.load_delta(path, {k: real.base32[k] for k in names})):
        assert rebuilt.keys() == expected.keys()
        assert all(np.array_equal(rebuilt[k], expected[k]) for k in names)
    # deltapack's importer reads the same file: the two agree.
    _native_out = tmp_path / "imported.dpk"
    deltapack._native.import_wdelta(str(path), str(base), str(_native_out))
    imported = deltapack.load(base, _native_out, framework="np")
    assert all(np.array_equal(imported[k], torch.from_numpy(expected[k]).bfloat16().float().numpy()) for k in names)


def test_wdelta_on_a_sharded_base_in_deltatensors_shard_order(tmp_path, ft_b):
    """deltatensors' loader hashes a sharded folder shard by shard: that order is accepted."""
    weight_map = json.loads((ft_b / "model.safetensors.index.json").read_text())["weight_map"]
    names = [k for k in sorted(weight_map) if k.startswith(("embeddings.", "encoder.layer.0.output."))]
    assert len({weight_map[k] for k in names}) > 1
    rank = {}
    for k in names:
        rank.setdefault(weight_map[k], len(rank))
    order = sorted(names, key=lambda k: (rank[weight_map[k]], k))
    assert order != names
    sd = model(ft_b)
    h = hashlib.sha256()
    for k in order:
        h.update(k.encode())
        h.update(sd[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    zero = {"strategy": "sparse", "dtype": "float32", "sparsity": 0.9}
    payloads = {
        k: dict(zero, shape=list(sd[k].shape), indices=np.zeros(1, np.int64), values=np.zeros(1, np.float32))
        for k in names
    }
    write_wdelta(tmp_path / "s.wdelta", h.hexdigest(), "sparse", payloads)
    rebuilt = dt.load_delta_from_paths(tmp_path / "s.wdelta", ft_b)
    assert all(np.array_equal(rebuilt[k], sd[k].float().numpy()) for k in names)


def test_corrupt_files_raise(tmp_path):
    data = bytearray((FIXTURE / "int4.wdelta").read_bytes())
    data[100] ^= 1
    (tmp_path / "bad.wdelta").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        dt.inspect(tmp_path / "bad.wdelta")
    (tmp_path / "junk.wdelta").write_bytes(b"not a delta at all")
    with pytest.raises(dt.CorruptFileError, match="neither a deltapack delta nor"):
        dt.load_delta_from_paths(tmp_path / "junk.wdelta", FIXTURE / "base")


def test_chains_of_deltapack_files(tmp_path, base, ft_a, ft_b):
    v1, v2 = tmp_path / "v1.dpk", tmp_path / "v2.dpk"
    dt.save_delta_from_paths(v1, ft_a, base, strategy="exact")
    h = dt.save_delta_chain_from_paths(v2, ft_b, v1, base, strategy="exact")
    history = dt.inspect_chain([v1, v2])
    assert history[1]["parent_hash"] == h != history[0]["parent_hash"]
    want = f32(model(ft_b))
    rebuilt = dt.load_delta_chain([v1, v2], base=base)
    assert all(np.array_equal(rebuilt[k], want[k]) for k in want)
    # Each link is a delta against the model the previous one rebuilds, as in deltatensors.
    mid = dt.load_delta_from_paths(v1, base)
    assert all(np.array_equal(v, want[k]) for k, v in dt.load_delta(v2, mid).items())
    with pytest.raises(ValueError):
        dt.load_delta_chain([v2, v1], base=base)
    with pytest.raises(ValueError, match="delta_paths is empty"):
        dt.load_delta_chain([], base=base)


def test_chain_on_a_wdelta_parent(tmp_path):
    out = tmp_path / "v2.dpk"
    dt.save_delta_chain_from_paths(out, FIXTURE / "ft2", FIXTURE / "int4.wdelta", FIXTURE / "base", strategy="exact")
    want = f32(load_file(FIXTURE / "ft2" / "model.safetensors"))
    rebuilt = dt.load_delta_chain([FIXTURE / "int4.wdelta", out], base=FIXTURE / "base")
    assert all(np.array_equal(rebuilt[k], want[k]) for k in want)
    dt.save_delta_chain_from_paths(out, FIXTURE / "ft2", FIXTURE / "int4.wdelta", FIXTURE / "base", strategy="int4")
    assert dt.inspect(out)["format"] == "deltapack"
    assert set(dt.load_delta_chain([FIXTURE / "int4.wdelta", out], base=FIXTURE / "base")) == set(want)


def test_reads_deltapack_native_chains(tmp_path, base, ft_a, ft_b):
    v1, v2 = tmp_path / "v1.dpk", tmp_path / "v2.dpk"
    deltapack.make(base, ft_a, v1)
    deltapack.make(base, ft_b, v2, parent=v1)
    want = f32(model(ft_b))
    for rebuilt in (dt.load_delta_chain([v1, v2], base=base), dt.load_delta_from_paths(v2, base)):
        assert all(np.array_equal(rebuilt[k], want[k]) for k in want)


def test_trainer_callback(tmp_path, base, ft_a):
    trainer_callback = pytest.importorskip("transformers").TrainerCallback

    from deltapack.compat.deltatensors.training import DeltaTensorsCallback

    assert DeltaTensorsCallback is dt.DeltaTensorsCallback
    cb = DeltaTensorsCallback(base_dir=base, strategy="exact", delete_full_checkpoint=True)
    assert isinstance(cb, trainer_callback)
    ckpt = tmp_path / "outputs" / "checkpoint-500"
    shutil.copytree(ft_a, ckpt)
    (ckpt / "training_args.bin").write_bytes(b"\x80\x04 a pickle deltapack never reads")
    args, state = SimpleNamespace(output_dir=str(tmp_path / "outputs")), SimpleNamespace(global_step=500)
    cb.on_save(args, state, control=None)
    delta = ckpt / "model.wdelta"
    assert dt.inspect(delta)["format"] == "deltapack"
    assert not list(ckpt.glob("*.safetensors"))
    want = f32(model(ft_a))
    sd = dt.load_delta_from_paths(delta, base)
    assert all(np.array_equal(sd[k], want[k]) for k in want)
    # A missing checkpoint warns and trains on, as deltatensors does.
    with pytest.warns(UserWarning, match="checkpoint folder not found"):
        cb.on_save(args, SimpleNamespace(global_step=7), control=None)


def test_import_is_light():
    code = "import sys, deltapack.compat.deltatensors; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
