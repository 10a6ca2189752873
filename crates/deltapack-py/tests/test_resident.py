"""deltapack.Resident: hot swap from Python, tensors sharing the model's memory."""

from __future__ import annotations

import gc

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import deltapack


def _finetune(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_tensors_share_memory_across_switches(base, ft_a, ft_b, delta_a, delta_b):
    model = deltapack.Resident(base)
    want_base, want_a, want_b = _finetune(base), _finetune(ft_a), _finetune(ft_b)
    views = model.tensors()
    name = "encoder.layer.2.attention.self.query.weight"
    held = views[name]
    ptr = held.data_ptr()
    assert torch.equal(_bits(held), _bits(want_base[name]))

    model.switch_to(delta_a)
    assert model.active == [str(delta_a)]
    assert held.data_ptr() == ptr and torch.equal(_bits(held), _bits(want_a[name]))
    now = model.tensors()
    assert now[name].data_ptr() == ptr
    for n, t in want_a.items():
        assert torch.equal(_bits(now[n]), _bits(t)), n

    model.switch_to(delta_b)  # grows the embedding by 8 rows
    now = model.tensors()
    for n, t in want_b.items():
        assert now[n].shape == t.shape and torch.equal(_bits(now[n]), _bits(t)), n
    assert torch.equal(_bits(held), _bits(want_b[name]))
    # A view of a buffer the switch replaced still reads what it held, safely.
    old_emb = views["embeddings.word_embeddings.weight"]
    assert torch.equal(_bits(old_emb), _bits(want_base["embeddings.word_embeddings.weight"]))

    model.switch_to(None)
    assert model.active == []
    for n, t in want_base.items():
        assert torch.equal(_bits(model.tensors()[n]), _bits(t)), n
    del views, now, held, old_emb
    gc.collect()


def test_attach_makes_a_torch_model_follow_switches(base, ft_a, delta_a):
    model = deltapack.Resident(base)
    module = AutoModel.from_pretrained(base)
    attached = model.attach(module)
    assert sorted(attached) == sorted(module.state_dict())
    reference = AutoModel.from_pretrained(ft_a)
    tok = AutoTokenizer.from_pretrained(ft_a)
    batch = tok(["sum two numbers", "open a file"], padding=True, return_tensors="pt")
    model.switch_to(delta_a)
    with torch.no_grad():
        assert torch.equal(module(**batch).last_hidden_state, reference(**batch).last_hidden_state)


def test_views_keep_the_model_alive(base, delta_a):
    model = deltapack.Resident(base)
    model.switch_to(delta_a)
    t = model.tensors()["pooler.dense.weight"]
    expected = t.clone()
    del model
    gc.collect()
    assert torch.equal(t, expected)


def test_a_wrong_delta_leaves_the_model_where_it_was(base, ft_a, delta_a, tmp_path):
    model = deltapack.Resident(base)
    model.switch_to(delta_a)
    bad = tmp_path / "bad.dpk"
    bad.write_bytes(b"not a delta")
    try:
        model.switch_to(bad)
    except deltapack.DeltapackError:
        pass
    else:
        raise AssertionError("a corrupt delta was accepted")
    assert model.active == [str(delta_a)]
    for n, t in _finetune(ft_a).items():
        assert torch.equal(_bits(model.tensors()[n]), _bits(t)), n
