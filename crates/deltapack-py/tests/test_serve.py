"""deltapack.torch.attach on the real MiniLM pair: served fine-tunes against the stored ones,
multi-tenant batches against per-row runs, detach, and what is refused."""

from __future__ import annotations

import json

import pytest

import deltapack

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import deltapack.torch as dpt  # noqa: E402
from deltapack.errors import BadInputError, WrongBaseError  # noqa: E402


@pytest.fixture(scope="module")
def batch(ft_a):
    tok = transformers.AutoTokenizer.from_pretrained(ft_a)
    lines = (ft_a.parent / "data" / "test.jsonl").read_text().splitlines()[:8]
    texts = [json.loads(line)["query"] for line in lines]
    return tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")


def _model(path, dtype=torch.float32):
    return transformers.AutoModel.from_pretrained(path, dtype=dtype).eval()


def _run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state.float()


@pytest.fixture(scope="module")
def lossy(base, ft_a, work):
    """Deltas of ft-a in each served form, and the f32 outputs of their reconstructions."""
    out = {}
    for name, codec in [("sign-axis", "sign-axis"), ("quant", "quant:bits=4"), ("sparse", "sparse:keep=0.05")]:
        path = work / f"serve-{name}.dpk"
        deltapack.make(base, ft_a, path, codec=codec, force=True)
        rebuilt = work / f"serve-{name}"
        deltapack.apply(base, path, rebuilt, force=True)
        out[name] = (path, rebuilt)
    return out


@pytest.fixture(scope="module")
def outputs(lossy, base, batch):
    y_base = _run(_model(base), batch)
    return y_base, {name: _run(_model(rebuilt), batch) for name, (_, rebuilt) in lossy.items()}


@pytest.mark.parametrize("name", ["sign-axis", "quant", "sparse"])
def test_served_outputs_are_the_stored_fine_tunes(name, lossy, outputs, base, batch):
    """Within 2 % of how far the fine-tune moves the outputs (f32 model of the bf16 base)."""
    y_base, stored = outputs
    model = _model(base)
    h = dpt.attach(model, {"ft": lossy[name][0]}, base=base)
    with h.use("ft"):
        y = _run(model, batch)
    moved = (stored[name] - y_base).norm()
    assert (y - stored[name]).norm() <= 0.02 * moved
    forms = {t["form"] for t in h.report["ft"]["tensors"]}
    assert forms - {"dense"} == {"sign-axis": {"ternary"}, "quant": {"quant4"}, "sparse": {"sparse"}}[name]
    mem = h.memory()["ft"]
    bits = 8 * mem["packed"] / mem["weights"]
    # Ternary is 2 bits per weight plus an f32 scale per row and per column: 0.17 bits on
    # MiniLM's 384 x 384 layers, under 0.03 on a 2048-wide model's.
    assert bits <= {"sign-axis": 2.2, "quant": 4.3, "sparse": 64}[name], bits


def test_a_multi_tenant_batch_is_each_rows_fine_tune(lossy, outputs, base, batch):
    y_base, stored = outputs
    model = _model(base)
    h = dpt.attach(model, {"s": lossy["sign-axis"][0], "q": lossy["quant"][0]}, base=base)
    rows = ["s", "q", None, "s", "q", None, "q", "s"]
    with h.use(rows):
        y = _run(model, batch)
    for i, t in enumerate(rows):
        if t is None:
            assert torch.equal(y[i], y_base[i]), "a base row must be the base's output exactly"
            continue
        with h.use(t):
            alone = _run(model, batch)[i]
        assert torch.allclose(y[i], alone, atol=1e-4, rtol=1e-4), f"row {i} ({t})"


def test_detach_restores_the_model_bit_for_bit(lossy, base, batch):
    model = _model(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y_before = _run(model, batch)
    modules = dict(model.named_modules())
    h = dpt.attach(model, {"s": lossy["sign-axis"][0]}, base=base)
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "_DeltaLinear"
    with h.use("s"):
        assert not torch.equal(_run(model, batch), y_before)
    assert torch.equal(_run(model, batch), y_before), "outside use() the model is the base"
    h.detach()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m is modules[n] for n, m in model.named_modules())
    assert torch.equal(_run(model, batch), y_before)


def test_the_models_own_tensors_serve_as_the_base(lossy, base, batch):
    """base=None: the model (bf16, as the base is stored) is the base, checked by fingerprint."""
    model = _model(base, torch.bfloat16)
    h = dpt.attach(model, {"s": lossy["sign-axis"][0]})
    with h.use("s"):
        y = _run(model, batch)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_a_delta_of_another_base_is_refused_and_the_model_unchanged(lossy, base):
    model = _model(base, torch.bfloat16)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight[0, 0] += 1.0
    before = dict(model.named_modules())
    with pytest.raises(WrongBaseError):
        dpt.attach(model, {"s": lossy["sign-axis"][0]})
    assert dict(model.named_modules()) == before
    f32 = _model(base)
    with torch.no_grad():
        f32.encoder.layer[0].attention.self.query.weight[0, 0] += 1.0
    with pytest.raises(WrongBaseError):
        dpt.attach(f32, {"s": lossy["sign-axis"][0]}, base=base)


def test_exactly_coded_linear_weights_are_refused(delta_a, base):
    model = _model(base)
    before = dict(model.named_modules())
    with pytest.raises(BadInputError, match="Resident"):
        dpt.attach(model, {"exact": delta_a}, base=base)
    assert dict(model.named_modules()) == before


def test_bad_arguments(lossy, base, batch):
    model = _model(base)
    with pytest.raises(BadInputError):
        dpt.attach(model, {})
    h = dpt.attach(model, {"s": lossy["sign-axis"][0]}, base=base)
    with pytest.raises(BadInputError, match="no fine-tune named"):
        with h.use("nope"):
            pass
    with pytest.raises(BadInputError, match="one per batch row"):
        with h.use(["s", None]):
            _run(model, batch)
