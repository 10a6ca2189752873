"""Fixtures: the real checkpoints in ../shared/models and deltas made from them once."""

from __future__ import annotations

from pathlib import Path

import pytest

import deltapack

MODELS = Path(__file__).resolve().parents[3].parent / "shared" / "models"


def _model(name: str) -> Path:
    path = MODELS / name
    if not path.is_dir():
        pytest.skip(f"{path} not found (the shared real checkpoints)")
    return path


@pytest.fixture(scope="session")
def base() -> Path:
    return _model("minilm-base-bf16")


@pytest.fixture(scope="session")
def ft_a() -> Path:
    return _model("ft-a-bf16")


@pytest.fixture(scope="session")
def ft_b() -> Path:
    return _model("ft-b-bf16-sharded")


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deltas")


@pytest.fixture(scope="session")
def delta_a(base, ft_a, work) -> Path:
    out = work / "ft-a.dpk"
    deltapack.make(base, ft_a, out)
    return out


@pytest.fixture(scope="session")
def delta_b(base, ft_b, work) -> Path:
    out = work / "ft-b.dpk"
    deltapack.make(base, ft_b, out)
    return out
