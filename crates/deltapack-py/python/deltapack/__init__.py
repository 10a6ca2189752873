"""deltapack: fine-tuned models as compact deltas against their base, rebuilt bit for bit.

The verbs take the base first, as the command line does::

    import deltapack

    deltapack.make("base/", "finetuned/", "ft.dpk")          # a delta, exact by default
    state = deltapack.load("base/", "ft.dpk")                 # the fine-tune, in memory
    deltapack.save("base/", model.state_dict(), "ft2.dpk")    # a delta of tensors in memory
    with deltapack.safe_open("base/", "ft.dpk") as f:         # one tensor at a time
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")

Paths may be ``str`` or ``os.PathLike``; ``base`` and ``finetuned`` may also be Hugging Face
hub IDs (``ORG/NAME[@REVISION]``) found in the local cache. ``deltas`` is one delta or a
list of them (a chain, in order from the base). Every call that reads a delta checks what
``apply`` checks: the base's fingerprints and the rebuilt tensors' own. Long calls release
the GIL and stop at Ctrl-C, leaving no partial output. Errors are :mod:`deltapack.errors`.
torch is imported only by the functions that return torch tensors.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from deltapack import _native
from deltapack._tensors import convert, torch_bytes
from deltapack.errors import (
    BadInputError,
    CorruptDeltaError,
    DeltapackError,
    DeltapackIOError,
    MismatchError,
    WrongBaseError,
)

__version__: str = _native.__version__

PathLike = Union[str, "os.PathLike[str]"]
Deltas = Union[PathLike, Sequence[PathLike]]

_DEFAULT_CHUNK_BYTES = 1 << 21


def _path(p: PathLike) -> str:
    return os.fspath(p)


def _deltas(deltas: Deltas) -> List[str]:
    if isinstance(deltas, (str, os.PathLike)):
        return [_path(deltas)]
    out = [_path(d) for d in deltas]
    if not out:
        raise BadInputError("no delta given: pass a delta file or a list of them (a chain from the base)")
    return out


def _tensor_codecs(rules: Union[None, Mapping[str, str], Iterable[str]]) -> List[str]:
    if rules is None:
        return []
    if isinstance(rules, Mapping):
        return [f"{glob}={spec}" for glob, spec in rules.items()]
    if isinstance(rules, str):
        return [rules]
    return list(rules)


def _make_args(
    codec: str,
    max_error: Optional[float],
    tensor_codecs: Union[None, Mapping[str, str], Iterable[str]],
    force: bool,
    base_id: Optional[str],
    self_contained: bool,
    chunk_bytes: int,
    sync: bool,
    calibration: Optional[PathLike],
) -> Dict[str, Any]:
    return {
        "codec": codec,
        "max_error": max_error,
        "tensor_codecs": _tensor_codecs(tensor_codecs),
        "calibration": None if calibration is None else _path(calibration),
        "base_id": base_id,
        "chunk_bytes": chunk_bytes,
        "force": force,
        "sync": sync,
        "self_contained": self_contained,
    }


def _parents(parent: Optional[Deltas]) -> List[str]:
    return [] if parent is None else _deltas(parent)


def make(
    base: PathLike,
    finetuned: PathLike,
    out: PathLike,
    *,
    codec: str = "exact",
    max_error: Optional[float] = None,
    tensor_codecs: Union[None, Mapping[str, str], Iterable[str]] = None,
    parent: Optional[Deltas] = None,
    threads: Optional[int] = None,
    force: bool = False,
    base_id: Optional[str] = None,
    self_contained: bool = False,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
    sync: bool = False,
    calibration: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Make a delta of ``finetuned`` against ``base`` and write it to ``out`` (``.dpk``).

    ``codec`` is ``"exact"`` (bit-exact, the default), ``"quant"``, ``"sparse"``, ``"dare"``,
    ``"sign"``, ``"sign-axis"`` or ``"auto"``, with settings as ``"NAME:key=value,..."``;
    ``max_error`` bounds each tensor's relative RMS error (the cheapest setting within it is
    chosen per tensor); ``tensor_codecs`` maps globs to codecs (``{"*.mlp.*": "quant"}``,
    first match wins). ``parent`` is a delta or chain this one continues (it is then coded
    against the model they rebuild). ``threads`` defaults to all cores; the bytes written
    do not depend on it. Returns the report ``deltapack make --json`` prints.
    """
    args = _make_args(codec, max_error, tensor_codecs, force, base_id, self_contained, chunk_bytes, sync, calibration)
    report = _native.make(_path(base), _path(finetuned), _path(out), _parents(parent), args, threads)
    return json.loads(report)


def apply(
    base: PathLike,
    deltas: Deltas,
    out: PathLike,
    *,
    force: bool = False,
    sync: bool = False,
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Rebuild the fine-tune of ``deltas`` on ``base`` into the directory ``out``.

    The directory appears only once all of it is written and checked; ``force`` replaces an
    existing one (never an input). Returns the report ``deltapack apply --json`` prints.
    """
    report = _native.apply(_path(base), _deltas(deltas), _path(out), force, sync, threads)
    return json.loads(report)


def verify(
    base: PathLike,
    deltas: Deltas,
    *,
    finetuned: Optional[PathLike] = None,
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Check that ``deltas`` rebuild their fine-tune from ``base``, writing nothing.

    With ``finetuned``, every rebuilt byte is also compared with that checkpoint (lossy
    tensors' error is measured instead); a difference raises :class:`MismatchError`.
    Returns the report ``deltapack verify --json`` prints.
    """
    ft = None if finetuned is None else _path(finetuned)
    return json.loads(_native.verify(_path(base), _deltas(deltas), ft, threads))


def inspect(delta: PathLike) -> Dict[str, Any]:
    """Describe a delta from its index alone (``deltapack inspect --json``'s fields)."""
    return json.loads(_native.inspect(_path(delta)))


def _tensors_of(raw: list, framework: str, device: Any) -> Dict[str, Any]:
    return {name: convert(framework, dtype, shape, data, device) for name, dtype, shape, data in raw}


def load(
    base: PathLike,
    deltas: Deltas,
    framework: str = "pt",
    device: Any = "cpu",
    *,
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Rebuild the fine-tune in memory and return its tensors by name.

    With ``framework="pt"`` the tensors are torch tensors, bit-identical to
    ``safetensors.torch.load_file`` of the real fine-tune, in its dtypes (bf16 stays bf16).
    With ``framework="np"`` they are numpy arrays; numpy has no bfloat16 or float8, so those
    come as float32 arrays holding exactly the same values. Nothing is written; peak memory
    is the model's bytes plus a few chunks per thread.
    """
    raw, _files, _meta, _report = _native.load(_path(base), _deltas(deltas), None, threads)
    return _tensors_of(raw, framework, device)


def _dedupe_shared(state_dict: Mapping[str, Any], prefer: Iterable[str]) -> Dict[str, Any]:
    """The state dict with tensors that share memory kept once, as ``save_pretrained`` does.

    Of the names of one storage, a name the base checkpoint has is kept (the base was saved
    with the same tying), else the first in sorted order, as ``safetensors`` does.
    """
    import torch

    groups: Dict[tuple, List[str]] = {}
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() > 0:
            key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
            groups.setdefault(key, []).append(name)
    preferred = set(prefer)
    drop = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        in_base = sorted(n for n in names if n in preferred)
        keep = in_base[0] if in_base else sorted(names)[0]
        drop.update(n for n in names if n != keep)
    return {k: v for k, v in state_dict.items() if k not in drop}


def save(
    base: PathLike,
    state_dict: Mapping[str, Any],
    out: PathLike,
    *,
    files: Optional[PathLike] = None,
    metadata: Optional[Mapping[str, str]] = None,
    codec: str = "exact",
    max_error: Optional[float] = None,
    tensor_codecs: Union[None, Mapping[str, str], Iterable[str]] = None,
    parent: Optional[Deltas] = None,
    threads: Optional[int] = None,
    force: bool = False,
    base_id: Optional[str] = None,
    self_contained: bool = False,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
    sync: bool = False,
    calibration: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Make a delta of tensors in memory (a torch state dict) against ``base``.

    Nothing is written but ``out``: the delta is what :func:`make` makes of the same tensors
    saved by ``safetensors.torch.save_file(state_dict, "model.safetensors", metadata)``
    (``metadata`` defaults to ``{"format": "pt"}``, as ``save_pretrained`` writes).
    Tensors that share memory (tied weights) are stored once, as ``save_pretrained`` does;
    non-contiguous and non-CPU tensors are copied to contiguous CPU memory first, the others
    are read in place. ``files`` is a model directory whose other files (config, tokenizer)
    travel with the delta. The other options are :func:`make`'s. Returns its report.
    """
    if not isinstance(state_dict, Mapping):
        raise BadInputError(f"state_dict must be a mapping of names to tensors, not {type(state_dict).__name__}")
    base_names = _native.checkpoint_tensors(_path(base))
    kept = _dedupe_shared(state_dict, base_names)
    tensors = [torch_bytes(name, t) for name, t in kept.items()]
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    args = _make_args(codec, max_error, tensor_codecs, force, base_id, self_contained, chunk_bytes, sync, calibration)
    report = _native.save(
        _path(base),
        tensors,
        _path(out),
        _parents(parent),
        args,
        None if files is None else _path(files),
        json.dumps(meta),
        None,
        threads,
    )
    return json.loads(report)


class safe_open:  # noqa: N801 - named after safetensors.safe_open, whose shape it has
    """Random access to the fine-tune a delta rebuilds, shaped like ``safetensors.safe_open``.

    ``get_tensor(name)`` rebuilds that tensor alone from its own chunks and checks it (its
    fingerprint and its base tensor's), so reading one tensor costs a fraction of
    :func:`load`. Use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        base: PathLike,
        deltas: Deltas,
        framework: str = "pt",
        device: Any = "cpu",
        *,
        _aux_store: Optional[str] = None,
    ) -> None:
        self._reader = _native.Reader(_path(base), _deltas(deltas), _aux_store)
        self._framework = framework
        self._device = device
        self._info = {name: (dtype, shape) for name, dtype, shape in self._reader.tensors()}

    def __enter__(self) -> safe_open:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the delta and base files (the object can no longer be used)."""
        self._reader = None

    def _open(self):
        if self._reader is None:
            raise BadInputError("this safe_open was closed")
        return self._reader

    def keys(self) -> List[str]:
        """The tensor names, in file order."""
        self._open()
        return list(self._info)

    def get_tensor(self, name: str):
        """Rebuild tensor ``name`` (a torch tensor, or numpy array with ``framework="np"``)."""
        reader = self._open()
        if name not in self._info:
            raise KeyError(name)
        dtype, shape = self._info[name]
        return convert(self._framework, dtype, shape, reader.tensor(name), self._device)

    def metadata(self) -> Optional[Dict[str, str]]:
        """The weight files' ``__metadata__`` (``None`` when they have none)."""
        meta = json.loads(self._open().metadata())
        return meta or None

    def files(self) -> List[str]:
        """The other files the model has (config, tokenizer, ...), by relative path."""
        return self._open().files()

    def read_file(self, path: str) -> bytes:
        """The contents of one of :meth:`files`, checked against its recorded hash."""
        return self._open().file(path)


from deltapack.resident import Resident  # noqa: E402
from deltapack.store import Store  # noqa: E402 - it uses the verbs above

__all__ = [
    "BadInputError",
    "CorruptDeltaError",
    "DeltapackError",
    "DeltapackIOError",
    "MismatchError",
    "Resident",
    "Store",
    "WrongBaseError",
    "apply",
    "inspect",
    "load",
    "make",
    "safe_open",
    "save",
    "verify",
]
