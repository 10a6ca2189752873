"""deltapack.transformers: models and tokenizers straight from base + delta."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import deltapack
import deltapack.transformers as dt

TEXTS = ["return the sum of two numbers", "open a file and read its lines", "x"]


@pytest.mark.parametrize("which", ["a", "b"])
def test_from_pretrained_matches_the_finetune_output_for_output(which, base, ft_a, ft_b, delta_a, delta_b):
    ft, delta = (ft_a, delta_a) if which == "a" else (ft_b, delta_b)
    ours = dt.from_pretrained(base, delta)
    theirs = AutoModel.from_pretrained(ft)
    assert type(ours) is type(theirs)
    assert ours.config.to_dict() | {"_name_or_path": ""} == theirs.config.to_dict() | {"_name_or_path": ""}
    tok = AutoTokenizer.from_pretrained(ft)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = ours(**batch).last_hidden_state
        b = theirs(**batch).last_hidden_state
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, b)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_from_pretrained_passes_options_through(base, delta_a):
    model = dt.from_pretrained(base, delta_a, dtype=torch.float32)
    assert model.dtype == torch.float32
    explicit = dt.from_pretrained(base, delta_a, cls=AutoModel)
    assert type(explicit).__name__ == "BertModel"


def test_from_pretrained_writes_no_file(base, delta_a, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    dt.from_pretrained(base, delta_a)
    assert os.listdir(tmp_path) == []


def test_tokenizer_is_the_finetunes(base, ft_b, delta_b):
    ours = dt.tokenizer(base, delta_b)
    theirs = AutoTokenizer.from_pretrained(ft_b)
    assert len(ours) == len(theirs)
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]


def test_a_delta_without_config_is_refused_clearly(base, ft_a, tmp_path):
    from safetensors.torch import load_file

    deltapack.save(base, load_file(ft_a / "model.safetensors"), tmp_path / "bare.dpk")
    with pytest.raises(deltapack.BadInputError, match="config.json"):
        dt.from_pretrained(base, tmp_path / "bare.dpk")
