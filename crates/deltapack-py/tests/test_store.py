"""deltapack.Store: the CLI's store commands from Python."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltapack


def _finetune(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_store_round_trip(base, ft_a, ft_b, tmp_path):
    store = deltapack.Store.init(tmp_path / "store", base, name="minilm")
    added = store.add("a", ft_a)
    assert added["entry"]["name"] == "a" and added["entry"]["parent"] is None
    store.add("b", ft_b, parent="a")
    assert store.names() == ["a", "b"]
    listing = store.list()
    assert listing["delta_bytes"] < listing["naive_bytes"] / 4
    got = store.load("b")
    for name, t in _finetune(ft_b).items():
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
    store.get("a", tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (ft_a / "model.safetensors").read_bytes()
    base_dir, chain = store.chain("b")
    assert len(chain) == 2
    with pytest.raises(deltapack.BadInputError, match="reparent=True"):
        store.remove("a")
    assert store.remove("a", reparent=True) == ["b"]
    assert store.names() == ["b"]
    assert deltapack.Store(tmp_path / "store").fsck()["entries"] == 1
    got = store.load("b")
    assert torch.equal(got["embeddings.word_embeddings.weight"], _finetune(ft_b)["embeddings.word_embeddings.weight"])


def test_opening_a_missing_store_fails_clearly(tmp_path):
    with pytest.raises(deltapack.DeltapackError):
        deltapack.Store(tmp_path / "nothing")
