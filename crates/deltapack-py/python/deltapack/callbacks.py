"""Training checkpoints stored as deltas: :class:`DeltapackCallback` for the Hugging Face Trainer.

At every checkpoint the Trainer saves, the callback adds the checkpoint's weights to a
deltapack store as a delta chained to the previous checkpoint's (lossless by default, so
every checkpoint comes back bit for bit), and with ``remove_weights=True`` deletes the dense
weight files from the checkpoint directory once the delta is verified against them byte for
byte. The directory keeps everything else (optimizer, scheduler, RNG and trainer state,
config) and a ``deltapack.json`` naming the store entry, so that a stripped checkpoint can
be turned back into a complete one (:func:`restore_checkpoint`); the callback does that by
itself for the newest checkpoint when a Trainer is created, which is the one
``trainer.train(resume_from_checkpoint=True)`` resumes from.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

from transformers import TrainerCallback

from deltapack.errors import BadInputError
from deltapack.store import Store

MARKER = "deltapack.json"
_WEIGHT_FILE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$|^model\.safetensors\.index\.json$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _weight_files(directory: Path) -> list:
    return sorted(p for p in directory.iterdir() if _WEIGHT_FILE.match(p.name))


def restore_checkpoint(checkpoint_dir: Union[str, os.PathLike[str]]) -> bool:
    """Write the dense weights of a checkpoint the callback stripped back into its directory.

    Reads ``deltapack.json`` there and rebuilds the entry it names from its store (checked as
    ``apply`` checks it). Returns False (and does nothing) for a checkpoint that still has
    its weights or was not stored by the callback.
    """
    directory = Path(checkpoint_dir)
    marker = directory / MARKER
    if _weight_files(directory) or not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    store = Store(info["store"])
    staging = directory / ".deltapack-restore"
    store.get(info["entry"], staging, force=True)
    for f in staging.iterdir():
        if _WEIGHT_FILE.match(f.name):
            f.replace(directory / f.name)
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    return True


def _latest_checkpoint(output_dir: Path) -> Optional[Path]:
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


class DeltapackCallback(TrainerCallback):
    """Store every checkpoint the Trainer saves as a delta in a deltapack store.

    ``store`` is the store's directory (created with ``base`` in it if it does not exist);
    ``base`` is the model the training started from (a model directory or hub ID). Each
    checkpoint becomes entry ``{prefix}step-{global_step:08d}`` (``prefix`` defaults to the
    run name and a hyphen), chained to the previous checkpoint's entry, so the store holds
    the history at a fraction of the size of independent deltas. ``codec``, ``max_error``
    and ``tensor_codecs`` are :func:`deltapack.make`'s (default: exact, every checkpoint
    bit for bit). With ``remove_weights``, each checkpoint's dense weight files are deleted
    once its delta is verified against them byte for byte (lossy codecs: within the error
    recorded). ``entries`` lists what was stored, in order.
    """

    def __init__(
        self,
        store: Union[str, os.PathLike[str]],
        base: Union[str, os.PathLike[str]],
        *,
        prefix: Optional[str] = None,
        codec: str = "exact",
        max_error: Optional[float] = None,
        tensor_codecs: Union[None, Mapping[str, str], Iterable[str]] = None,
        remove_weights: bool = False,
        threads: Optional[int] = None,
    ) -> None:
        self.store_path = Path(store)
        self.base = os.fspath(base)
        self.prefix = prefix
        self.codec = codec
        self.max_error = max_error
        self.tensor_codecs = tensor_codecs
        self.remove_weights = remove_weights
        self.threads = threads
        self.entries: list = []
        self._store: Optional[Store] = None

    @property
    def store(self) -> Store:
        """The store (created on first use)."""
        if self._store is None:
            if (self.store_path / "deltapack-store.json").exists():
                self._store = Store(self.store_path)
            else:
                self._store = Store.init(self.store_path, self.base)
        return self._store

    def _name(self, args: Any, step: int) -> str:
        prefix = self.prefix
        if prefix is None:
            run = getattr(args, "run_name", None) or Path(args.output_dir).name or "run"
            prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", run) + "-"
        return f"{prefix}step-{step:08d}"

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Restore the newest checkpoint's weights, so that resuming from it works."""
        latest = _latest_checkpoint(Path(args.output_dir))
        if latest is not None:
            restore_checkpoint(latest)
        return control

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """On a resumed run, continue the chain from the checkpoint resumed from."""
        if not self.entries and state.global_step > 0:
            name = self._name(args, state.global_step)
            if self._has(name):
                self.entries.append(name)
        return control

    def _has(self, name: str) -> bool:
        return self.store_path.exists() and name in self.store.names()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Add the checkpoint just saved to the store (and strip its weights if asked)."""
        if not state.is_world_process_zero:
            return control
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not _weight_files(checkpoint):
            raise BadInputError(f"{checkpoint} has no safetensors weights (set save_safetensors=True)")
        name = self._name(args, state.global_step)
        if self._has(name):
            self.store.remove(name, reparent=True)
        parent = self.entries[-1] if self.entries and self._has(self.entries[-1]) else None
        self.store.add(
            name,
            checkpoint,
            parent=parent,
            codec=self.codec,
            max_error=self.max_error,
            tensor_codecs=self.tensor_codecs,
            threads=self.threads,
        )
        self.entries.append(name)
        if self.remove_weights:
            # Before the marker is written: the comparison wants the directory as stored.
            self.store.verify(name, finetuned=checkpoint, threads=self.threads)
        info: Dict[str, Any] = {"store": str(self.store_path.resolve()), "entry": name, "base": self.base}
        (checkpoint / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if self.remove_weights:
            for f in _weight_files(checkpoint):
                f.unlink()
        return control


__all__ = ["DeltapackCallback", "restore_checkpoint"]
