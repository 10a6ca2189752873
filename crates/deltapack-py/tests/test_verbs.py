"""make, apply, verify, inspect from Python: the CLI's semantics and report fields."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import deltapack
from deltapack import errors


def _cli_json(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "deltapack", "--json", "-q", *args], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_make_reports_the_cli_fields(base, ft_a, tmp_path):
    report = deltapack.make(base, ft_a, tmp_path / "a.dpk")
    cli = _cli_json("make", "--base", str(base), "--finetuned", str(ft_a), "-o", str(tmp_path / "cli.dpk"))
    assert set(report) == set(cli)
    for key in ("delta_bytes", "finetuned_bytes", "same", "changed", "tensors"):
        assert report[key] == cli[key], key
    assert (tmp_path / "a.dpk").read_bytes()[:8] == b"\x89DPK\r\n\x1a\n"


def test_apply_rebuilds_the_finetune_byte_for_byte(base, ft_a, delta_a, tmp_path):
    report = deltapack.apply(base, delta_a, tmp_path / "out")
    assert report["ok"] and report["tensors"] == 103
    for f in ft_a.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


def test_apply_takes_pathlike_and_str_and_a_chain(base, ft_a, ft_b, delta_a, tmp_path):
    child = tmp_path / "b-after-a.dpk"
    deltapack.make(str(base), str(ft_b), str(child), parent=delta_a)
    deltapack.apply(str(base), [delta_a, child], tmp_path / "out")
    for f in ft_b.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


def test_verify_against_the_finetune(base, ft_a, delta_a):
    report = deltapack.verify(base, delta_a, finetuned=ft_a)
    assert report["ok"] and report["compared_with_finetuned"]


def test_verify_finds_a_different_finetune(base, ft_b, delta_a):
    with pytest.raises(errors.MismatchError):
        deltapack.verify(base, delta_a, finetuned=ft_b)


def test_inspect_matches_the_cli(delta_a):
    info = deltapack.inspect(delta_a)
    assert info == _cli_json("inspect", str(delta_a)) | {"path": str(delta_a)}
    assert info["base"]["tensors"] == 103


def test_lossy_options(base, ft_a, tmp_path):
    report = deltapack.make(base, ft_a, tmp_path / "q.dpk", codec="auto", max_error=0.1)
    assert 0 < report["error"] <= 0.1
    rules = deltapack.make(base, ft_a, tmp_path / "r.dpk", tensor_codecs={"*.attention.*": "quant:bits=4"}, threads=1)
    assert rules["lossy"] > 0


def test_threads_do_not_change_the_bytes(base, ft_a, tmp_path):
    deltapack.make(base, ft_a, tmp_path / "1.dpk", codec="quant:bits=3", threads=1)
    deltapack.make(base, ft_a, tmp_path / "2.dpk", codec="quant:bits=3", threads=2)
    assert (tmp_path / "1.dpk").read_bytes() == (tmp_path / "2.dpk").read_bytes()


def test_existing_output_needs_force(base, ft_a, delta_a, tmp_path):
    out = tmp_path / "a.dpk"
    out.write_bytes(b"precious")
    with pytest.raises(errors.BadInputError, match="force=True"):
        deltapack.make(base, ft_a, out)
    assert out.read_bytes() == b"precious"
    deltapack.make(base, ft_a, out, force=True)
    assert out.read_bytes() == delta_a.read_bytes()


def test_errors_are_typed(base, ft_a, delta_a, tmp_path):
    with pytest.raises(errors.WrongBaseError):
        deltapack.apply(ft_a, delta_a, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(errors.DeltapackIOError) as e:
        deltapack.inspect(tmp_path / "missing.dpk")
    assert isinstance(e.value, OSError) and e.value.errno == 2
    bad = tmp_path / "bad.dpk"
    bad.write_bytes(delta_a.read_bytes()[:-100])
    with pytest.raises(errors.CorruptDeltaError):
        deltapack.inspect(bad)
    with pytest.raises(errors.BadInputError, match="max_error"):
        deltapack.make(base, ft_a, tmp_path / "x.dpk", max_error=0.1)
    with pytest.raises(errors.BadInputError, match="codec"):
        deltapack.make(base, ft_a, tmp_path / "x.dpk", codec="zip")
    with pytest.raises(errors.BadInputError):
        deltapack.make(base, tmp_path, tmp_path / "x.dpk")
    assert all(issubclass(c, errors.DeltapackError) for c in (errors.WrongBaseError, errors.MismatchError))


def test_output_that_is_or_lies_in_an_input_is_refused(base, delta_a, tmp_path):
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    before = {f.name: f.read_bytes() for f in copy.iterdir()}
    for out in (copy, copy / "inside", delta_a):
        with pytest.raises(errors.BadInputError):
            deltapack.apply(copy, delta_a, out, force=True)
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before


def test_console_script_is_the_cli(delta_a):
    out = subprocess.run([sys.executable, "-m", "deltapack", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("deltapack ")
    out = subprocess.run([sys.executable, "-m", "deltapack", "inspect", "/nonexistent.dpk"], capture_output=True)
    assert out.returncode == 5
