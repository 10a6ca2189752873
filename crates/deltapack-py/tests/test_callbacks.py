"""DeltapackCallback on a short real training run of the shared base, with a resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments

import deltapack
from deltapack.callbacks import MARKER, DeltapackCallback, restore_checkpoint


class _Contrastive(Trainer):
    """The shared recipe's loss: in-batch negatives between query and code embeddings."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        def embed(batch):
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            return F.normalize((h * m).sum(1) / m.sum(1), dim=-1).float()

        q, c = embed(inputs["q"]), embed(inputs["c"])
        return F.cross_entropy(q @ c.T * 20.0, torch.arange(len(q)))


def _trainer(base, out, rows, max_steps, callback):
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base, dtype=torch.bfloat16)

    def encode(batch, key):
        texts = [r[key] for r in batch]
        return tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")

    def collate(batch):
        return {"q": encode(batch, "query"), "c": encode(batch, "code")}

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=8,
        learning_rate=5e-5,
        remove_unused_columns=False,
        report_to=[],
        logging_steps=100,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        save_only_model=False,
    )
    return _Contrastive(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[callback])


@pytest.fixture(scope="module")
def rows(base):
    data = base.parent / "data" / "test.jsonl"
    return [json.loads(line) for line in data.read_text().splitlines()[:64]]


def test_checkpoints_come_back_byte_identical(base, rows, tmp_path):
    cb = DeltapackCallback(tmp_path / "store", base, prefix="run-")
    _trainer(base, tmp_path / "out", rows, 4, cb).train()
    assert cb.entries == ["run-step-00000002", "run-step-00000004"]
    store = deltapack.Store(tmp_path / "store")
    listing = {e["name"]: e for e in store.list()["manifest"]["entries"]}
    assert listing["run-step-00000004"]["parent"] == "run-step-00000002"
    for step in (2, 4):
        ckpt = tmp_path / "out" / f"checkpoint-{step}"
        want = load_file(ckpt / "model.safetensors")
        got = store.load(f"run-step-{step:08d}")
        assert want.keys() == got.keys()
        for name, t in want.items():
            assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
        assert json.loads((ckpt / MARKER).read_text())["entry"] == f"run-step-{step:08d}"


def test_stripped_checkpoints_resume(base, rows, tmp_path):
    cb = DeltapackCallback(tmp_path / "store", base, prefix="run-", remove_weights=True)
    first = _trainer(base, tmp_path / "out", rows, 4, cb)
    first.train()
    for step in (2, 4):
        assert not (tmp_path / "out" / f"checkpoint-{step}" / "model.safetensors").exists()
    weights_at_4 = {k: v.clone() for k, v in first.model.state_dict().items()}

    resumed_cb = DeltapackCallback(tmp_path / "store", base, prefix="run-", remove_weights=True)
    again = _trainer(base, tmp_path / "out", rows, 6, resumed_cb)  # on_init_end restores checkpoint-4
    assert (tmp_path / "out" / "checkpoint-4" / "model.safetensors").exists()
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 6
    store = deltapack.Store(tmp_path / "store")
    entries = {e["name"]: e for e in store.list()["manifest"]["entries"]}
    assert entries["run-step-00000006"]["parent"] == "run-step-00000004"
    restored = store.load("run-step-00000004")
    for name, t in weights_at_4.items():
        if name in restored:
            assert torch.equal(restored[name], t), name
    # An older stripped checkpoint comes back on request.
    assert restore_checkpoint(tmp_path / "out" / "checkpoint-2")
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()
    assert not restore_checkpoint(tmp_path / "out" / "checkpoint-2")
