"""deltapack.calibrate: 1-bit scales learned by distillation, signs kept, axes chosen by the layers' errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

import deltapack
from deltapack import _native
from deltapack.calibrate import choose_axis, distill, fit_axes

WORDS = [f"w{i}" for i in range(90)]


def _structured(shape, axis: str, gen: torch.Generator, size: float = 0.02) -> torch.Tensor:
    """Random signs times scales with the structure of ``axis``: one per row, per column, or both."""
    rows, cols = shape
    signs = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    r = torch.rand(rows, generator=gen) * 1.5 + 0.5 if axis in ("row", "both") else torch.ones(rows)
    c = torch.rand(cols, generator=gen) * 1.5 + 0.5 if axis in ("col", "both") else torch.ones(cols)
    noise = 1 + 0.3 * torch.rand(shape, generator=gen) if axis == "noisy" else 1
    return size * signs * r[:, None] * c[None, :] * noise


def _pair(root, model, structure) -> tuple:
    """Saves ``model`` as the base and a fine-tune of it whose linear deltas follow ``structure``."""
    base, ft = root / "base", root / "ft"
    model.save_pretrained(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.add_(_structured(p.shape, structure(name), gen))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(ft)
    return base, ft


def _bert(root):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertModel(cfg)
    # The constructed case: layer 0's query delta has one scale per row, its key one per
    # column, its value both; every other matrix is noisy (no exact structure).
    axes = {"layer.0.attention.self.query": "row", "layer.0.attention.self.key": "col"}
    axes["layer.0.attention.self.value"] = "both"
    base, ft = _pair(root, model, lambda n: next((a for k, a in axes.items() if k in n), "noisy"))
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(ft)
    return base, ft


def _texts(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (8,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base, ft = _bert(root)
    delta = root / "sign.dpk"
    deltapack.make(base, ft, delta, codec="sign-axis")
    return base, ft, delta, root


def _weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_learned_scales_keep_signs_lower_the_loss_and_apply(bert):
    base, ft, delta, root = bert
    out = root / "cal.dpk"
    report = distill(base, ft, delta, _texts(64), out, steps=40, batch_size=16)
    assert report.loss_after < report.loss_before
    # Every sign is the fine-tune's: no rebuilt weight moves against the fine-tune's change
    # (one whose learned scale is 0 stays put; the engine checks the payloads byte for byte).
    b, f = _weights(base), _weights(ft)
    rebuilt = deltapack.load(base, out)
    scaled = {name for name, *_ in _native.delta_scales(str(out))}
    assert scaled == {name for name, *_ in _native.delta_scales(str(delta))}
    for name in scaled:
        moved, want = torch.sign(rebuilt[name] - b[name]), torch.sign(f[name] - b[name])
        assert (moved * want >= 0).all(), name
        assert (moved == want).float().mean() > 0.9, name
    # The scales changed, and it is a delta like any other.
    before = dict((n, s) for n, _, _, s in _native.delta_scales(str(delta)))
    after = dict((n, s) for n, _, _, s in _native.delta_scales(str(out)))
    assert any(before[n] != after[n] for n in scaled)
    deltapack.verify(base, out)
    applied = root / "applied"
    deltapack.apply(base, out, applied)
    for name, t in _weights(applied).items():
        assert torch.equal(t, rebuilt[name]), name
    info = deltapack.inspect(out)
    assert info["tensors"] and all(t["codec"] in ("exact", "sign-axis") for t in info["tensors"])
    model = deltapack.Resident(base)
    model.switch_to(out)
    for name, t in model.tensors().items():
        assert torch.equal(t, rebuilt[name]), name
    model.switch_to(None)


def test_auto_picks_the_axis_the_constructed_layers_need(bert):
    base, ft, delta, root = bert
    report = distill(base, ft, delta, _texts(64), root / "axes.dpk", steps=0)
    layer0 = "encoder.layer.0.attention.self"
    assert report.axes[f"{layer0}.query.weight"] == "row"
    assert report.axes[f"{layer0}.key.weight"] == "col"
    assert report.axes[f"{layer0}.value.weight"] == "both"
    # Exactly structured deltas are fitted exactly; no layer's output error grows beyond
    # the tolerance that buys fewer scales.
    for axis in ("query", "key", "value"):
        assert report.layer_error[f"{layer0}.{axis}.weight"][1] < 1e-3, axis
    for name, (init, fitted) in report.layer_error.items():
        assert fitted <= init * 1.01 + 1e-9, name


@pytest.mark.parametrize("axis", ["row", "col", "both"])
def test_a_forced_axis_trains_its_scales_only(bert, axis):
    base, ft, delta, root = bert
    out = root / f"forced-{axis}.dpk"
    report = distill(base, ft, delta, _texts(32), out, steps=5, axis=axis)
    linear = {n: a for n, a in report.axes.items() if "embeddings" not in n}
    assert linear and set(linear.values()) == {axis}
    stored = {n: s for n, _, _, s in _native.delta_scales(str(out))}
    for name in linear:
        rows, cols = stored[name]
        # The axis not trained stays at the closed-form fit's ones.
        assert (set(cols) == {1.0}) == (axis == "row") and (set(rows) == {1.0}) == (axis == "col"), name
    assert report.loss_after < report.loss_before


def test_fit_axes_closed_forms():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64)
    gram = x.T @ x
    for axis in ("row", "col", "both"):
        d = _structured((16, 24), axis, g).double()
        s = torch.sign(d)
        init = (d.abs().mean(1), torch.ones(24, dtype=torch.float64))
        fits = fit_axes(s, d, gram, init)
        assert fits[axis][2] < 1e-12 * float((d @ gram * d).sum())
        assert choose_axis(fits) == axis


def test_the_sign_weight_gradient_is_the_formula_s():
    from deltapack.calibrate import _sign_weight

    g = torch.Generator().manual_seed(5)
    base = torch.randn(7, 5, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(7, 5, generator=g) < 0.5, -1, 1).to(torch.int8)
    r = torch.rand(7, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.rand(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, c: _sign_weight().apply(base, sign, None, r, c, None), (r, c))
    s = torch.rand((), generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: _sign_weight().apply(base, sign, None, s, None, None), (s,))
    # With kept zeros, moves are whole ULPs (at least one) of each base value.
    ulp = torch.full((7, 5), 0.25, dtype=torch.float64)
    w = _sign_weight().apply(
        base, sign, ulp, torch.full((7,), 0.3, dtype=torch.float64), torch.ones(5, dtype=torch.float64), None
    )
    assert torch.allclose((w - base).abs(), torch.full((7, 5), 0.25, dtype=torch.float64), rtol=0, atol=1e-12)
    # Halves round away from zero, as the codec's do (not to even): 2.5 ULPs move 3.
    half = _sign_weight().apply(
        base, sign, ulp, torch.full((7,), 0.625, dtype=torch.float64), torch.ones(5, dtype=torch.float64), None
    )
    assert torch.allclose((half - base).abs(), torch.full((7, 5), 0.75, dtype=torch.float64), rtol=0, atol=1e-12)


def test_training_sees_what_the_rebuild_gives_in_bf16(tmp_path):
    """The student's weights are the engine's reconstruction: snapped moves, rounded to bf16."""
    from deltapack.calibrate import _SignParam

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    model = BertModel(cfg).to(torch.bfloat16)
    base, ft = _pair(tmp_path, model, lambda n: "noisy")
    b, f = _weights(base), _weights(ft)
    for zeros in ("keep", "sign"):
        delta = tmp_path / f"{zeros}.dpk"
        deltapack.make(base, ft, delta, codec=f"sign-axis:zeros={zeros}")
        rebuilt = deltapack.load(base, delta)
        for name, _shape, kept, scales in _native.delta_scales(str(delta)):
            assert kept == (zeros == "keep")
            p = _SignParam(name, name, b[name], f[name].float(), kept, scales)
            mine = p.weight(p.init).detach().to(torch.bfloat16)
            # Products of f32 scales are formed in f32 here, in f64 by the codec: a rare tie may differ.
            assert (mine == rebuilt[name]).float().mean() > 0.999, (zeros, name)


def test_causal_lm_logits_are_matched(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        architectures=["LlamaForCausalLM"],
    )
    base, ft = _pair(tmp_path, LlamaForCausalLM(cfg), lambda n: "noisy")
    delta = tmp_path / "sign.dpk"
    deltapack.make(base, ft, delta, codec="sign-axis")
    ids = [torch.randint(64, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    report = distill(base, ft, delta, ids, tmp_path / "cal.dpk", steps=30)
    assert report.loss_after < report.loss_before
    deltapack.verify(base, tmp_path / "cal.dpk")


def test_refusals(bert, tmp_path):
    base, ft, delta, root = bert
    exact = tmp_path / "exact.dpk"
    deltapack.make(base, ft, exact)
    with pytest.raises(deltapack.BadInputError, match="no sign or sign-axis tensors"):
        distill(base, ft, exact, _texts(8), tmp_path / "o.dpk", steps=1)
    with pytest.raises(deltapack.BadInputError, match="axis must be"):
        distill(base, ft, delta, _texts(8), tmp_path / "o.dpk", axis="diagonal")
    with pytest.raises(deltapack.BadInputError, match="exists"):
        distill(base, ft, delta, _texts(8), delta, steps=1)
    # Another fine-tune: its signs differ, and nothing is written.
    with pytest.raises(deltapack.BadInputError, match="not the one that delta was made from"):
        distill(base, base, delta, _texts(8), tmp_path / "o.dpk", steps=1)
    assert not (tmp_path / "o.dpk").exists()


def test_command_line(bert, tmp_path):
    base, ft, delta, root = bert
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(_texts(32)) + "\n")
    out = tmp_path / "cli.dpk"
    cmd = [sys.executable, "-m", "deltapack.calibrate", "--base", str(base), "--finetuned", str(ft)]
    cmd += ["--delta", str(delta), "-o", str(out), "--texts", str(texts), "--steps", "5", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["out"] == str(out) and out.exists() and report["steps"] == 5
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
