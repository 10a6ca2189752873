"""Diff pruning on the real shared base: the wrapper, the projection, the stored delta, the
plain-loop and Trainer paths."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, TrainingArguments

import deltapack
from deltapack.diffprune import DiffPruning, DiffPruningTrainer
from deltapack.errors import BadInputError


@pytest.fixture(scope="module")
def rows(base):
    data = base.parent / "data" / "test.jsonl"
    return [json.loads(line) for line in data.read_text().splitlines()[:48]]


@pytest.fixture(scope="module")
def tok(base):
    return AutoTokenizer.from_pretrained(base)


def _loss(model, tok, batch):
    def embed(texts):
        b = tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    q, c = embed([r["query"] for r in batch]), embed([r["code"] for r in batch])
    return F.cross_entropy(q @ c.T * 20.0, torch.arange(len(batch)))


def _train(model, tok, rows, dp, steps, lr=1e-3):
    """A plain PyTorch loop over batches of 8."""
    opt = torch.optim.AdamW(dp.param_groups(lr))
    for step in range(steps):
        batch = rows[(8 * step) % len(rows) :][:8]
        loss = _loss(model, tok, batch) + dp.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
        dp.step((step + 1) / steps)


def _args(tmp_path, max_steps, learning_rate):
    """Trainer arguments for a few CPU steps over batches of 8 rows, saving nothing."""
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=learning_rate,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )


def _model(base):
    torch.manual_seed(0)
    return AutoModel.from_pretrained(base, dtype=torch.float32)


@pytest.mark.parametrize("method", ["l0", "l1"])
def test_only_diffs_train_and_the_base_is_untouched(base, tok, rows, method):
    model = _model(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DiffPruning(model, density=0.02, method=method, project_at=1.0)
    loss = _loss(model, tok, rows[:8]) + dp.penalty()
    loss.backward()
    trained = {id(p) for p in dp.parameters()}
    for name, p in model.named_parameters():
        if id(p) not in trained:
            assert p.grad is None and not p.requires_grad, name
        elif not name.startswith("pooler."):  # the loss does not use the pooler
            assert p.grad is not None, name
    _train(model, tok, rows, dp, 3)
    originals = {
        k.replace(".parametrizations.", ".").replace(".original", ""): v
        for k, v in model.state_dict().items()
        if k.endswith(".original")
    }
    assert originals.keys() == before.keys()
    for k, v in originals.items():
        assert torch.equal(v, before[k]), k
    # Training moved the model away from its base.
    assert any(not torch.equal(v, before[k]) for k, v in dp.merged_state_dict().items())


@pytest.mark.parametrize("method", ["l0", "l1"])
def test_projection_hits_the_density_exactly(base, tok, rows, method):
    model = _model(base)
    dp = DiffPruning(model, density=0.003, method=method, project_at=0.5)
    _train(model, tok, rows, dp, 4)
    assert dp.projected
    assert round(dp.density() * dp.total) == round(0.003 * dp.total)
    # The fixed-mask phase trains only the kept positions and has no penalty.
    assert float(dp.penalty()) == 0.0
    kept = round(dp.density() * dp.total)
    _train(model, tok, rows, dp, 2)
    assert round(dp.density() * dp.total) <= kept


def test_saved_delta_applies_bit_exactly_and_grows_with_density(base, tok, rows, tmp_path):
    sizes = {}
    for density in (0.002, 0.02):
        model = _model(base)
        dp = DiffPruning(model, density=density, method="l1", project_at=0.5)
        _train(model, tok, rows, dp, 4)
        out = tmp_path / f"d{density}.dpk"
        report = dp.save(out, base=base)
        assert 0 < report["density"] <= density
        sizes[density] = out.stat().st_size
        # The rebuilt directory holds the merged weights in the base's dtype (bf16).
        applied = tmp_path / f"applied{density}"
        deltapack.apply(base, out, applied)
        rebuilt = load_file(applied / "model.safetensors")
        merged = dp.merged_state_dict()
        assert rebuilt.keys() == merged.keys()
        for name, t in rebuilt.items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, merged[name].to(torch.bfloat16)), name
        assert deltapack.verify(base, out)["compared_with_finetuned"] is False
        assert (applied / "config.json").exists() and (applied / "tokenizer.json").exists()
        # Merged in place, the model gives what the applied directory gives.
        dp.merge()
        again = AutoModel.from_pretrained(applied, dtype=torch.float32).eval()
        model.eval()
        b = tok(["read a file", "open a socket"], padding=True, return_tensors="pt")
        with torch.no_grad():
            want = again(**b).last_hidden_state
            got = model.to(torch.bfloat16).to(torch.float32)(**b).last_hidden_state
        assert torch.equal(want, got)
    assert sizes[0.002] < sizes[0.02]


def test_bf16_rounding_is_no_change_and_signed_zeros_stay(tmp_path):
    lin = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -0.0, 0.5, 2.0]] * 4))
    model = torch.nn.Sequential(lin)
    dp = DiffPruning(model, density=1.0, method="l1", project_at=0.0)
    with torch.no_grad():
        d = lin.parametrizations.weight[0].diff
        d.fill_(0.0)
        d[0, 0] = 1e-4  # below bf16's resolution at 1.0
        d[1, 2] = 0.25
    merged = dp.merged_state_dict()["0.weight"]
    assert torch.equal(merged[0, 1].view(torch.int32), torch.tensor(-0.0).view(torch.int32))
    as_bf16 = merged.to(torch.bfloat16)
    changed = int((as_bf16 != lin.parametrizations.weight.original.to(torch.bfloat16)).sum())
    assert changed == 1


def test_tied_weights_share_one_diff_and_stay_tied():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    dp = DiffPruning(model, density=0.5, method="l1")
    assert len(list(dp.parameters())) == 1
    with torch.no_grad():
        emb.parametrizations.weight[0].diff.fill_(0.5)
    assert torch.equal(emb.weight, head.weight)
    dp.merge()
    assert emb.weight is head.weight
    assert torch.all(emb.weight != 0)
    assert emb.weight.requires_grad


def test_merge_restores_what_was_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].bias.requires_grad_(False)
    dp = DiffPruning(model, density=0.5, method="l1", include=["1.*"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if "parametrizations" not in n)
    dp.merge()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        "0.weight": True,
        "0.bias": False,
        "1.weight": True,
        "1.bias": True,
    }


@pytest.mark.parametrize("method", ["l0", "l1"])
@pytest.mark.parametrize("structured", ["row", "tensor"])
def test_structured_variants_train(base, tok, rows, method, structured):
    model = _model(base)
    dp = DiffPruning(model, density=0.01, method=method, structured=structured, include=["encoder.layer.0.*"])
    _train(model, tok, rows, dp, 2)
    assert dp.projected
    assert 0 < dp.density() <= 0.01


def test_bad_arguments_are_clear(base):
    model = torch.nn.Linear(2, 2)
    for kw in ({"density": 0.0}, {"density": 0.1, "method": "l2"}, {"density": 0.1, "structured": "col"}):
        with pytest.raises(BadInputError):
            DiffPruning(model, **kw)
    with pytest.raises(BadInputError, match="nothing to train"):
        DiffPruning(model, density=0.1, include=["nothing.*"])


def test_the_trainer_path(base, tok, rows, tmp_path):
    model = _model(base)
    dp = DiffPruning(model, density=0.005, method="l0", project_at=0.5)

    class Contrastive(DiffPruningTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = _loss(model, tok, inputs["rows"]) + self.diff_pruning.penalty()
            return (loss, None) if return_outputs else loss

    args = _args(tmp_path, max_steps=4, learning_rate=1e-3)
    trainer = Contrastive(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=lambda batch: {"rows": batch},
        diff_pruning=dp,
    )
    trainer.train()
    assert dp.projected
    assert round(dp.density() * dp.total) <= round(0.005 * dp.total)
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in dp.parameters()}
    report = dp.save(tmp_path / "t.dpk", base=base)
    assert 0 < report["density"] <= 0.005


def test_the_trainer_adds_the_penalty_to_the_model_loss(base, tok, rows, tmp_path, monkeypatch):
    """DiffPruningTrainer's own compute_loss adds the penalty to the loss the model returns."""
    model = _model(base)
    dp = DiffPruning(model, density=0.01, method="l1", include=["encoder.layer.5.output.*"], project_at=1.0)
    monkeypatch.setattr(dp, "penalty", lambda: torch.tensor(100.0))
    seen = []

    class Recording(DiffPruningTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            total = super().compute_loss(model, inputs, return_outputs, **kwargs)
            seen.append(float(total.detach()))
            return total

    class Head(torch.nn.Module):
        """A model whose forward returns its loss, as transformers' task heads do."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, rows):
            return {"loss": _loss(self.inner, tok, rows)}

    args = _args(tmp_path, max_steps=2, learning_rate=1e-4)
    trainer = Recording(
        model=Head(model), args=args, train_dataset=rows, data_collator=lambda b: {"rows": b}, diff_pruning=dp
    )
    trainer.train()
    assert len(seen) == 2 and all(100.0 < s < 110.0 for s in seen)
