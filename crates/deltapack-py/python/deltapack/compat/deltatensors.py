"""A drop-in for deltatensors 0.2.0 that writes deltapack deltas and reads both formats.

Change only the import::

    import deltapack.compat.deltatensors as dt          # was: import deltatensors as dt

    dt.save_delta_from_paths("checkpoint.wdelta", "qwen-wiki/", "qwen-base/", strategy="int4")
    recon_sd = dt.load_delta_from_paths("checkpoint.wdelta", "qwen-base/")   # name -> float32 array
    info = dt.inspect("checkpoint.wdelta")

    from deltapack.compat.deltatensors.training import DeltaTensorsCallback

Every public function of deltatensors 0.2.0 is here with its signature and return type:
:func:`save_delta`, :func:`save_delta_from_paths`, :func:`load_delta`,
:func:`load_delta_from_paths`, :func:`inspect`, :func:`inspect_chain`, :func:`load_delta_chain`,
:func:`save_delta_chain_from_paths`, :func:`hash_state_dict` and ``DeltaTensorsCallback``
(also as ``.training.DeltaTensorsCallback``; ``.lineage`` has :func:`hash_state_dict` and
:func:`verify_base`).

**Writing.** The save functions write a deltapack container at the path given, whatever its
extension (``deltapack inspect``, ``apply`` and ``load`` read it). Each ``strategy`` maps to
the deltapack codec measured to be smaller at no more error:

- ``"int4"`` (``outlier_fraction``, default 0.01): ``auto`` with ``max_error`` = the error
  deltatensors' int4 would have;
- ``"sparse"`` (``sparsity``, default 0.9): ``auto`` with ``max_error`` = the error
  deltatensors' sparse would have;
- ``"quantized"``: ``auto`` with ``max_error`` = the error deltatensors' quantized would have;
- ``"exact"`` (an extension): ``exact``, the fine-tune back bit for bit.

The error is the relative RMS error of the delta over the whole model, ``||D' - D|| / ||D||``.
deltatensors' is computed on the pair being saved, with its own algorithm and the options
given (``sparsity``, ``outlier_fraction``): the smaller of its float32 output's error and that
output's rounded to the fine-tune's dtype. ``auto`` then stores each tensor with the cheapest
codec whose error is within it (exact included; 1-D tensors stay exact), so the model's error
is never larger than deltatensors' would be. ``docs/COMPAT_DELTATENSORS.md`` has the
measurements. deltapack options may be passed too and then win: ``codec=``, ``max_error=``,
``tensor_codecs=``, ``threads=`` (as :func:`deltapack.make` takes them). ``use_gpu`` and
``prefetch`` are accepted and ignored.

**Reading.** The load functions read deltapack deltas and deltatensors' ``.wdelta`` files (told
apart by their first bytes) and, as deltatensors does, return ``float32`` numpy arrays.
A ``.wdelta`` is decoded as deltatensors 0.2.0 decodes it, to the same values.

**Bases.** deltatensors' users pass a base as stored (a folder, torch tensors) or as float32
arrays (``{k: v.float().numpy()}``, since numpy has no bfloat16). Both are accepted:

- for a ``.wdelta``, the base's SHA-256 (``parent_hash``) may be over its tensors as given, as
  stored, all as float32, or bf16 ones as float32 (and, for a sharded folder, in deltatensors'
  shard order), as ``deltapack import`` accepts;
- for a deltapack delta, each base tensor is cast exactly to the dtype the delta recorded
  (float32 arrays holding bf16 values back to bf16; bf16 widened to float32) before its
  fingerprint is checked. Values that do not convert exactly are not that base: the check fails.

When :func:`save_delta` is given float32 arrays whose values are all bf16 values (a bf16 model
given as float32), the delta is a bf16 delta, fingerprinted as the real bf16 checkpoint, so
that ``deltapack load BASE_DIR`` and the CLI take it too. Otherwise (a float32 fine-tune) the
tensors are stored as float32, exactly with ``"exact"``; for a lossy strategy the base is then
fingerprinted as float32, which this module's loaders accept from the bf16 base folder too,
while ``deltapack apply`` needs that float32 base.

**Chains** are as deltatensors makes them: each link a delta against the model the previous
link rebuilds (:func:`save_delta_chain_from_paths`), applied in turn (:func:`load_delta_chain`).
deltapack's own chains (``deltapack make --parent``) are read too.

**Differences**, each kept small on purpose:

- ``parent_hash`` of a deltapack delta (from :func:`inspect` and returned by the save
  functions) is deltapack's fingerprint of the model the delta was made against (BLAKE3, 64
  hex digits), not deltatensors' SHA-256; :func:`hash_state_dict` still hashes as
  deltatensors does, for ``.wdelta`` files.
- ``verify=False`` skips the SHA-256 check of a ``.wdelta`` only: a deltapack delta always
  checks its base, which costs nothing extra.
- Nothing is printed: progress goes to the ``logging`` logger of this module.
- Fine-tunes with tensors the base lacks, or with a resized vocabulary, are saved (deltatensors
  refuses them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np

import deltapack
from deltapack import _native
from deltapack._tensors import to_numpy, torch_bytes
from deltapack.errors import BadInputError, CorruptDeltaError, WrongBaseError

__version__ = "0.2.0"
"""The deltatensors version whose API this module offers."""

__all__ = [
    "save_delta",
    "save_delta_from_paths",
    "load_delta",
    "load_delta_from_paths",
    "inspect",
    "inspect_chain",
    "load_delta_chain",
    "save_delta_chain_from_paths",
    "hash_state_dict",
]

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Dict[str, Any]

_log = logging.getLogger(__name__)

STRATEGIES = ("sparse", "quantized", "int4")
"""deltatensors' strategies; ``"exact"`` is accepted too."""

_WDELTA_MAGIC = b"wdelta\x00"
_DPK_MAGIC = b"\x89DPK\r\n\x1a\n"
_FLOATS = ("F64", "F32", "F16", "BF16")
_CHUNK_BYTES = 1 << 21
_PASS_THROUGH = ("codec", "max_error", "tensor_codecs", "threads")


class BaseMismatchError(WrongBaseError, ValueError):
    """The base is not the one the delta was made against.

    A :class:`deltapack.errors.WrongBaseError` and, as deltatensors raises, a ``ValueError``.
    """


class CorruptFileError(CorruptDeltaError, ValueError):
    """The file is corrupted, truncated, or neither a deltapack delta nor a ``.wdelta``.

    A :class:`deltapack.errors.CorruptDeltaError` and, as deltatensors raises, a ``ValueError``.
    """


@contextlib.contextmanager
def _as_compat_errors() -> Iterator[None]:
    """Re-raises deltapack's base and corruption errors as the ``ValueError`` kinds above."""
    try:
        yield
    except WrongBaseError as e:
        if isinstance(e, ValueError):
            raise
        raise BaseMismatchError(str(e)) from e
    except CorruptDeltaError as e:
        if isinstance(e, ValueError):
            raise
        raise CorruptFileError(str(e)) from e


# ---------------------------------------------------------------------------------------------
# Tensors: a safetensors dtype name, a shape and the little-endian bytes.
# ---------------------------------------------------------------------------------------------

_ST_OF_NUMPY = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


class _Tensor(NamedTuple):
    dtype: str
    shape: Tuple[int, ...]
    data: np.ndarray  # 1-D uint8: the tensor's safetensors bytes

    def values(self) -> np.ndarray:
        """Its values as numpy has them (bf16 and float8 as float32, exactly)."""
        return to_numpy(self.dtype, self.shape, self.data)

    def f32(self) -> np.ndarray:
        """Its values as float32, as deltatensors computes with them."""
        return np.asarray(self.values(), dtype=np.float32)

    def native(self, name: str) -> tuple:
        """The form ``deltapack._native`` takes."""
        return (name, self.dtype, list(self.shape), self.data)


def _of_array(arr: np.ndarray) -> Optional[_Tensor]:
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    dtype = _ST_OF_NUMPY.get(arr.dtype)
    if dtype is None:
        return None
    arr = np.ascontiguousarray(arr)
    return _Tensor(dtype, tuple(int(d) for d in arr.shape), arr.reshape(-1).view(np.uint8))


def _given(name: str, value: Any) -> _Tensor:
    """A tensor from what a deltatensors user passes: a numpy array or a torch tensor."""
    if isinstance(value, np.ndarray):
        t = _of_array(value)
        if t is None:
            raise TypeError(
                f"Cannot convert tensor '{name}' of dtype {value.dtype}: pass float, integer or bool arrays."
            )
        return t
    if type(value).__module__.split(".")[0] == "torch":
        _, dtype, shape, data = torch_bytes(name, value)
        return _Tensor(dtype, tuple(shape), data)
    raise TypeError(
        f"Cannot convert tensor '{name}' of type {type(value).__name__} to numpy: pass numpy arrays or torch tensors."
    )


def _bf16_bits(values: np.ndarray) -> Optional[np.ndarray]:
    """The bf16 bit patterns of float32 values that are all bf16 values, else None."""
    bits = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    if np.any(bits & 0xFFFF):
        return None
    return (bits >> 16).astype("<u2")


def _cast_exact(t: _Tensor, dtype: str) -> Optional[_Tensor]:
    """``t`` as ``dtype`` if every value converts exactly (floats only), else None."""
    if t.dtype == dtype:
        return t
    if t.dtype not in _FLOATS or dtype not in _FLOATS:
        return None
    v = t.values()
    if dtype == "BF16":
        wide = v.astype(np.float32)
        if v.dtype == np.float64 and not np.array_equal(wide.astype(np.float64), v, equal_nan=True):
            return None
        bits = _bf16_bits(wide)
        return None if bits is None else _Tensor("BF16", t.shape, bits.view(np.uint8))
    target = {"F64": np.float64, "F32": np.float32, "F16": np.float16}[dtype]
    out = v.astype(target)
    back = out.astype(np.float64)
    if not np.array_equal(back, v.astype(np.float64), equal_nan=True):
        return None
    return _Tensor(dtype, t.shape, np.ascontiguousarray(out).reshape(-1).view(np.uint8))


def _round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` rounded (to nearest even) to ``dtype``, as float32."""
    if dtype == "F16":
        return values.astype(np.float16).astype(np.float32)
    if dtype != "BF16":
        return values
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    finite = (u & 0x7F800000) != 0x7F800000  # the carry below cannot overflow these
    r = ((u + (0x7FFF + ((u >> 16) & 1)) * finite) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32).reshape(values.shape)


def _f32_dict(tensors: Dict[str, _Tensor]) -> Dict[str, np.ndarray]:
    return {name: t.f32() for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints on disk, read with numpy (no torch needed): a folder of *.safetensors, or a file.
# ---------------------------------------------------------------------------------------------

_MAX_HEADER = 100 << 20


class _Checkpoint(NamedTuple):
    root: Path
    tensors: Dict[str, _Tensor]
    shard: Dict[str, int]  # tensor name -> index of its file, in sorted file order


def _read_checkpoint(path: PathLike) -> _Checkpoint:
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.iterdir() if p.name.endswith(".safetensors"))
    else:
        raise FileNotFoundError(f"{root} does not exist: pass a model folder of .safetensors files")
    if not files:
        raise BadInputError(f"no .safetensors file in {root}: pass the model's folder (or one .safetensors file)")
    tensors: Dict[str, _Tensor] = {}
    shard: Dict[str, int] = {}
    for i, f in enumerate(files):
        size = f.stat().st_size
        mm = np.memmap(f, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

        def bad(reason: str, f: Path = f) -> BadInputError:
            return BadInputError(f"{f} is not a safetensors file ({reason}): check the model folder")

        if size < 8:
            raise bad("shorter than its header length")
        n = int.from_bytes(mm[:8].tobytes(), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise bad("header length past the end")
        try:
            header = json.loads(mm[8 : 8 + n].tobytes())
        except ValueError as e:
            raise bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        start = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = str(meta["dtype"]), tuple(int(d) for d in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"bad entry for tensor '{name}'") from None
            if not 0 <= begin <= end <= size - start:
                raise bad(f"tensor '{name}' lies outside the file")
            if name in tensors:
                raise bad(f"tensor '{name}' is in {files[shard[name]].name} too")
            tensors[name] = _Tensor(dtype, shape, mm[start + begin : start + end].view(np.ndarray))
            shard[name] = i
    return _Checkpoint(root, tensors, shard)


# ---------------------------------------------------------------------------------------------
# deltatensors' .wdelta format (version 1) and its codecs, as deltatensors 0.2.0 has them.
# ---------------------------------------------------------------------------------------------

_WDELTA_FIELDS = {
    "sparse": ("indices", "values"),
    "quantized": ("scales", "packed_signs"),
    "int4": ("outlier_idx", "outlier_vals", "scale", "zero_point", "packed"),
}
_WDELTA_DTYPES = {
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
}


class _Wdelta(NamedTuple):
    path: Path
    size: int
    parent_hash: str
    strategy: str
    tensors: Dict[str, Dict[str, Any]]  # name -> payload, arrays included


def _magic(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def _is_wdelta(path: PathLike) -> bool:
    head = _magic(path)
    if head.startswith(_WDELTA_MAGIC):
        return True
    if head == _DPK_MAGIC:
        return False
    raise CorruptFileError(
        f"{path} is neither a deltapack delta nor a deltatensors .wdelta file (it starts with {head!r}): check the path"
    )


def _read_wdelta(path: PathLike) -> _Wdelta:
    """Reads and checks a ``.wdelta`` file: SHA-256 trailer, magic, version, header, arrays."""
    path = Path(path)
    content = path.read_bytes()

    def corrupt(reason: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: {reason}; the .wdelta file is damaged: copy or make it again")

    if len(content) < len(_WDELTA_MAGIC) + 8 + 32:
        raise corrupt("too short")
    if hashlib.sha256(content[:-32]).digest() != content[-32:]:
        raise corrupt("checksum mismatch (corrupted or truncated)")
    body = memoryview(content)[:-32]
    if bytes(body[:7]) != _WDELTA_MAGIC:
        raise corrupt(f"bad magic {bytes(body[:7])!r}")
    version, header_len = struct.unpack_from("<II", body, 7)
    if version != 1:
        raise corrupt(f"unsupported .wdelta version {version} (deltatensors 0.2.0 writes version 1)")
    pos = 15 + header_len
    if pos > len(body):
        raise corrupt("header past the end")
    try:
        header = json.loads(bytes(body[15:pos]).decode("utf-8"))
        parent_hash, strategy, metas = header["parent_hash"], header["strategy"], header["tensors"]
    except (ValueError, KeyError, TypeError):
        raise corrupt("bad JSON header") from None
    if not (isinstance(parent_hash, str) and isinstance(strategy, str) and isinstance(metas, dict)):
        raise corrupt("bad JSON header")

    def take(n: int) -> memoryview:
        nonlocal pos
        if n > len(body) - pos:
            raise corrupt("an array record runs past the end")
        out = body[pos : pos + n]
        pos += n
        return out

    def u32() -> int:
        return struct.unpack("<I", take(4))[0]

    def text() -> str:
        return bytes(take(u32())).decode("utf-8", errors="replace")

    arrays: Dict[Tuple[str, str], np.ndarray] = {}
    while pos < len(body):
        name, field, dtype_name = text(), text(), text()
        if dtype_name not in _WDELTA_DTYPES:
            raise corrupt(f"array '{name}.{field}' has dtype '{dtype_name}'")
        shape = tuple(struct.unpack("<Q", take(8))[0] for _ in range(u32()))
        length = struct.unpack("<Q", take(8))[0]
        dtype = np.dtype(dtype_name)
        if math.prod(shape) * dtype.itemsize != length:
            raise corrupt(f"array '{name}.{field}' has {length} bytes for shape {list(shape)}")
        arrays[(name, field)] = np.frombuffer(take(length), dtype=dtype).reshape(shape)
    tensors: Dict[str, Dict[str, Any]] = {}
    for name, meta in metas.items():
        if not isinstance(meta, dict) or meta.get("strategy") not in _WDELTA_FIELDS:
            raise corrupt(f"tensor '{name}' has no known strategy")
        payload = dict(meta)
        for field in _WDELTA_FIELDS[meta["strategy"]]:
            if (name, field) not in arrays:
                raise corrupt(f"tensor '{name}' lacks its array '{field}'")
            payload[field] = arrays[(name, field)]
        tensors[name] = payload
    return _Wdelta(path, len(content), parent_hash, strategy, tensors)


def _dt_compress(delta: np.ndarray, strategy: str, sparsity: float, outlier_fraction: float) -> Dict[str, Any]:
    """The payload deltatensors 0.2.0's ``compress`` (its CPU path) makes of a float32 delta."""
    shape = list(delta.shape)
    flat = delta.reshape(-1).astype(np.float32)
    n = flat.size
    if strategy == "sparse":
        k = max(1, int(n * (1.0 - sparsity)))
        idx = np.sort(np.argpartition(np.abs(flat), -k)[-k:]).astype(np.int64)
        return {"strategy": "sparse", "shape": shape, "dtype": "float32", "indices": idx, "values": flat[idx]}
    if strategy == "quantized":
        mat = flat.reshape(delta.shape[0], -1) if delta.ndim > 1 else flat.reshape(1, -1)
        signs = np.sign(mat).astype(np.int8)
        signs[signs == 0] = 1
        return {
            "strategy": "quantized",
            "shape": shape,
            "dtype": "float32",
            "scales": np.mean(np.abs(mat), axis=1).astype(np.float16),
            "packed_signs": np.packbits((signs > 0).astype(np.uint8).reshape(-1)),
            "n_elements": int(mat.size),
            "n_cols": int(mat.shape[1]),
        }
    n_outliers = max(1, int(n * outlier_fraction))
    outlier_idx = np.sort(np.argpartition(np.abs(flat), -n_outliers)[-n_outliers:]).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[outlier_idx] = False
    rest = flat[mask]
    if rest.size == 0:  # deltatensors fails here; every value is an outlier
        scale, zero_point, quantized = np.float16(1.0), np.float16(0.0), np.zeros(0, np.uint8)
    else:
        q_min, q_max = float(rest.min()), float(rest.max())
        q_range = q_max - q_min
        if q_range < 1e-8:
            scale, zero_point = np.float16(1.0), np.float16(q_min)
            quantized = np.zeros(rest.size, dtype=np.uint8)
        else:
            scale, zero_point = np.float16(q_range / 15.0), np.float16(q_min)
            quantized = np.clip(np.round((rest - q_min) / q_range * 15.0), 0, 15).astype(np.uint8)
    if quantized.size % 2:
        quantized = np.concatenate([quantized, np.zeros(1, np.uint8)])
    return {
        "strategy": "int4",
        "shape": shape,
        "dtype": "float32",
        "n_elements": n,
        "n_outliers": n_outliers,
        "outlier_idx": outlier_idx,
        "outlier_vals": flat[outlier_idx].astype(np.float16),
        "scale": np.array([scale], dtype=np.float16),
        "zero_point": np.array([zero_point], dtype=np.float16),
        "packed": ((quantized[0::2] << 4) | (quantized[1::2] & 0x0F)).astype(np.uint8),
    }


def _dt_decompress(payload: Dict[str, Any]) -> np.ndarray:
    """The float32 delta of a payload, as deltatensors 0.2.0's ``decompress`` rebuilds it."""
    shape = [int(d) for d in payload["shape"]]
    dtype = payload.get("dtype", "float32")
    if dtype not in ("float16", "float32", "float64"):
        raise ValueError(f"delta dtype '{dtype}'")
    n = math.prod(shape)
    strategy = payload["strategy"]
    if strategy == "sparse":
        flat = np.zeros(n, dtype=np.float32)
        flat[payload["indices"]] = payload["values"]
        return flat.reshape(shape).astype(dtype)
    if strategy == "quantized":
        n_elements, n_cols = int(payload["n_elements"]), int(payload["n_cols"])
        if n_elements != n or n_cols <= 0 or n_elements % n_cols:
            raise ValueError("sizes do not match the shape")
        signs = np.unpackbits(payload["packed_signs"])[:n_elements].reshape(n_elements // n_cols, n_cols)
        signs = signs.astype(np.float32)
        signs[signs == 0] = -1.0
        mat = signs * payload["scales"].astype(np.float32)[:, np.newaxis]
        return mat.reshape(shape).astype(dtype)
    n_elements, n_outliers = int(payload["n_elements"]), int(payload["n_outliers"])
    if n_elements != n or not 0 <= n_outliers <= n:
        raise ValueError("sizes do not match the shape")
    packed = payload["packed"]
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = (packed >> 4) & 0x0F
    codes[1::2] = packed & 0x0F
    codes = codes[: n - n_outliers]
    scale, zero_point = float(payload["scale"][0]), float(payload["zero_point"][0])
    flat = np.empty(n, dtype=np.float32)
    mask = np.ones(n, dtype=bool)
    mask[payload["outlier_idx"]] = False
    flat[mask] = codes.astype(np.float32) / 15.0 * (scale * 15.0) + zero_point
    flat[payload["outlier_idx"]] = payload["outlier_vals"].astype(np.float32)
    return flat.reshape(shape).astype(dtype)


def _wdelta_delta(w: _Wdelta, name: str) -> np.ndarray:
    try:
        return _dt_decompress(w.tensors[name])
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise CorruptFileError(
            f"{w.path}: tensor '{name}' cannot be decoded ({e}); the .wdelta file is damaged: make it again"
        ) from None


# ---------------------------------------------------------------------------------------------
# deltatensors' base hash, in the forms its users produce.
# ---------------------------------------------------------------------------------------------


def hash_state_dict(state_dict: StateDict) -> str:
    """Deterministic SHA-256 of a state dict, as deltatensors computes ``parent_hash``.

    Over each name (sorted) and the bytes of its array. numpy arrays are hashed as given (their
    ``tobytes()``); torch tensors by their stored bytes, bf16 included.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict.keys()):
        value = state_dict[key]
        h.update(key.encode("utf-8"))
        if isinstance(value, np.ndarray) or type(value).__module__.split(".")[0] != "torch":
            h.update(np.asarray(value).tobytes())
        else:
            h.update(_given(key, value).data)
    return h.hexdigest()


def _wrong_parent(expected: str, got: str) -> BaseMismatchError:
    return BaseMismatchError(
        f"Base model hash mismatch.\n"
        f"  Expected : {expected}\n"
        f"  Got      : {got}\n"
        f"Make sure you're loading the exact base model this delta was computed against "
        f"(accepted: its tensors as stored or as float32)."
    )


def verify_base(state_dict: StateDict, expected_hash: str) -> None:
    """Raise :class:`BaseMismatchError` (a ``ValueError``) unless the state dict hashes to ``expected_hash``.

    The state dict is accepted as given, as stored, or as float32 (see :func:`hash_state_dict`).
    """
    tensors = {k: _given(k, v) for k, v in state_dict.items()}
    got = _match_parent_hash(expected_hash, tensors, [sorted(tensors)])
    if got is not None:
        raise _wrong_parent(expected_hash, got)


_Form = Callable[[_Tensor], _Tensor]


def _stored(t: _Tensor) -> _Tensor:
    return t


def _as_f32(t: _Tensor) -> _Tensor:
    return t if t.dtype == "F32" else (_of_array(t.f32()) or t)


def _bf16_as_f32(t: _Tensor) -> _Tensor:
    return _as_f32(t) if t.dtype == "BF16" else t


def _f32_as_bf16(t: _Tensor) -> _Tensor:
    return (_cast_exact(t, "BF16") or t) if t.dtype == "F32" else t


def _match_parent_hash(expected: str, tensors: Dict[str, _Tensor], orders: List[List[str]]) -> Optional[str]:
    """None if ``tensors`` hash to ``expected`` in some order and form; else the first hash tried."""
    first = None
    dtypes = {t.dtype for t in tensors.values()}
    forms: List[_Form] = [_stored, _as_f32]
    if "BF16" in dtypes and dtypes - {"BF16", "F32"}:
        forms.append(_bf16_as_f32)  # differs from all-float32 only when other dtypes are present
    if "F32" in dtypes:
        forms.append(_f32_as_bf16)  # float32 arrays of a bf16 model, hashed as stored on disk
    for order in orders:
        for form in forms:
            h = hashlib.sha256()
            for name in order:
                h.update(name.encode("utf-8"))
                h.update(form(tensors[name]).data)
            got = h.hexdigest()
            if got == expected:
                return None
            first = first or got
    return first


def _shard_order(names: List[str], shard: Dict[str, int]) -> List[str]:
    """The order deltatensors' loader hashes in: shards as the names first reach them, names sorted within."""
    rank: Dict[int, int] = {}
    for n in names:
        rank.setdefault(shard[n], len(rank))
    return sorted(names, key=lambda n: (rank[shard[n]], n))


# ---------------------------------------------------------------------------------------------
# Strategies -> deltapack codecs.
# ---------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    codec: str
    max_error: Optional[float]
    tensor_codecs: Any
    threads: Optional[int]
    deltatensors_error: Optional[float]


class _Options(NamedTuple):
    strategy: str
    sparsity: float
    outlier_fraction: float
    explicit: Dict[str, Any]

    @property
    def lossy(self) -> bool:
        codec = self.explicit.get("codec")
        if codec is not None:
            return str(codec).split(":")[0] != "exact"
        return self.strategy != "exact" or self.explicit.get("max_error") is not None


def _options(strategy: str, kwargs: Dict[str, Any]) -> _Options:
    if strategy not in STRATEGIES and strategy != "exact":
        raise ValueError(
            f"Unknown strategy '{strategy}'. Choose 'sparse', 'quantized', or 'int4' "
            "(or 'exact' for a bit-exact deltapack delta, or pass codec='...' for any deltapack codec)."
        )
    sparsity = float(kwargs.get("sparsity", 0.9))
    if strategy == "sparse" and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    outlier_fraction = float(kwargs.get("outlier_fraction", 0.01))
    if strategy == "int4" and not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"outlier_fraction must be in [0, 1), got {outlier_fraction}")
    explicit = {k: kwargs[k] for k in _PASS_THROUGH if kwargs.get(k) is not None}
    return _Options(strategy, sparsity, outlier_fraction, explicit)


def _dt_error_sums(base: _Tensor, ft: _Tensor, stored_dtype: str, opts: _Options) -> Tuple[float, float, float]:
    """The squared error of deltatensors on one tensor (float32 output, and rounded to ``stored_dtype``)."""
    b, f = base.f32(), ft.f32()
    if f.size == 0:
        return 0.0, 0.0, 0.0
    delta = f - b
    recon = (b + _dt_decompress(_dt_compress(delta, opts.strategy, opts.sparsity, opts.outlier_fraction))).astype(
        np.float32
    )
    f64 = f.reshape(-1).astype(np.float64)
    d = f64 - b.reshape(-1)
    finite = np.isfinite(d)
    every = bool(finite.all())

    def sq(x: np.ndarray) -> float:
        x = x if every else x[finite]
        return float(np.dot(x, x))

    den = sq(d)
    num = sq(recon.reshape(-1).astype(np.float64) - f64)
    rounded = _round_to(recon, stored_dtype)
    num_rounded = num if rounded is recon else sq(rounded.reshape(-1).astype(np.float64) - f64)
    return num, num_rounded, den


def _dt_error(pairs: Iterable[Tuple[_Tensor, _Tensor]], opts: _Options) -> float:
    """The relative RMS error deltatensors' strategy would have on these (base, fine-tune) pairs."""
    num = num_rounded = den = 0.0
    for b, f in pairs:
        x, y, z = _dt_error_sums(b, f, f.dtype, opts)
        num, num_rounded, den = num + x, num_rounded + y, den + z
    if den == 0.0:
        return 0.0
    return math.sqrt(min(num, num_rounded) / den)


def _lossy_pairs(base: Dict[str, _Tensor], ft: Dict[str, _Tensor]) -> Iterator[Tuple[_Tensor, _Tensor]]:
    """The tensor pairs deltatensors would code: in both, same shape, floats."""
    for name in sorted(ft):
        b, f = base.get(name), ft[name]
        if b is not None and b.shape == f.shape and b.dtype in _FLOATS and f.dtype in _FLOATS:
            yield b, f


def _plan(opts: _Options, pairs: Callable[[], Iterable[Tuple[_Tensor, _Tensor]]]) -> _Plan:
    """The deltapack codec for ``opts`` on a pair (see the module's table)."""
    x = opts.explicit
    tensor_codecs, threads = x.get("tensor_codecs"), x.get("threads")
    if "codec" in x or "max_error" in x:
        codec = x.get("codec", "auto" if "max_error" in x else "exact")
        return _Plan(str(codec), x.get("max_error"), tensor_codecs, threads, None)
    if opts.strategy == "exact":
        return _Plan("exact", None, tensor_codecs, threads, None)
    error = _dt_error(pairs(), opts)
    if not (math.isfinite(error) and error > 0.0):
        return _Plan("exact", None, tensor_codecs, threads, error)
    return _Plan("auto", error, tensor_codecs, threads, error)


def _make_args(plan: _Plan) -> Dict[str, Any]:
    return deltapack._make_args(
        plan.codec, plan.max_error, plan.tensor_codecs, True, None, False, _CHUNK_BYTES, False, None
    )


def codec_for(
    strategy: str,
    finetuned: Union[PathLike, StateDict],
    base: Union[PathLike, StateDict],
    **kwargs: Any,
) -> Dict[str, Any]:
    """The deltapack codec a save with ``strategy`` would use on this pair (an extension).

    Returns ``{"codec", "max_error", "deltatensors_error"}``: ``deltatensors_error`` is the
    error deltatensors 0.2.0's strategy has on the pair (None when not computed), which
    ``max_error`` then equals. ``finetuned`` and ``base`` are folders or state dicts.
    """
    opts = _options(strategy, kwargs)
    ft = _state_or_dir(finetuned)
    bs = _state_or_dir(base)
    bs, ft = _harmonize(bs, ft, opts.lossy)
    plan = _plan(opts, lambda: _lossy_pairs(bs, ft))
    return {"codec": plan.codec, "max_error": plan.max_error, "deltatensors_error": plan.deltatensors_error}


def _state_or_dir(x: Union[PathLike, StateDict]) -> Dict[str, _Tensor]:
    if isinstance(x, (str, os.PathLike)):
        return dict(_read_checkpoint(x).tensors)
    return {k: _given(k, v) for k, v in x.items()}


def _harmonize(
    base: Dict[str, _Tensor], ft: Dict[str, _Tensor], lossy: bool
) -> Tuple[Dict[str, _Tensor], Dict[str, _Tensor]]:
    """Chooses the dtypes a delta of tensors given in memory is made in.

    float32 tensors that all hold bf16 values (both sides) are bf16 tensors given as float32:
    they become bf16 again, so the delta is the bf16 delta of the real checkpoints. Otherwise,
    for a lossy codec, a tensor whose two sides differ in dtype is made one dtype where that
    is exact (deltapack codes lossily only tensors whose base has the fine-tune's dtype).
    """
    f32 = [t for t in (*base.values(), *ft.values()) if t.dtype == "F32"]
    if f32 and all(t.dtype in ("F32", "BF16") for t in (*base.values(), *ft.values()) if t.dtype in _FLOATS):
        if all(_bf16_bits(t.values()) is not None for t in f32):
            narrow = {"F32": "BF16"}
            base = {k: _cast_exact(t, narrow.get(t.dtype, t.dtype)) or t for k, t in base.items()}
            ft = {k: _cast_exact(t, narrow.get(t.dtype, t.dtype)) or t for k, t in ft.items()}
            return base, ft
    if not lossy:
        return base, ft
    base, ft = dict(base), dict(ft)
    for name, f in ft.items():
        b = base.get(name)
        if b is None or b.dtype == f.dtype or b.shape != f.shape or b.dtype not in _FLOATS or f.dtype not in _FLOATS:
            continue
        cast = _cast_exact(b, f.dtype)
        if cast is not None:
            base[name] = cast
            continue
        cast = _cast_exact(f, b.dtype)
        if cast is not None:
            ft[name] = cast
    return base, ft


# ---------------------------------------------------------------------------------------------
# deltapack deltas read on a base given as tensors.
# ---------------------------------------------------------------------------------------------


def _inspect_dpk(path: PathLike) -> Dict[str, Any]:
    with _as_compat_errors():
        return deltapack.inspect(path)


def _source_dtype(relation: str, ft_dtype: str, given: _Tensor) -> str:
    """The dtype a delta expects of a base tensor (its index records it; inspect shows the relation)."""
    if relation != "converted":
        return ft_dtype
    others = [d for d in _FLOATS if d != ft_dtype]
    if given.dtype in others:
        return given.dtype
    for d in ("BF16", "F16"):
        if d in others and _cast_exact(given, d) is not None:
            return d
    return "F64" if "F64" in others else given.dtype


def _base_for(info: Dict[str, Any], given: Dict[str, _Tensor]) -> List[tuple]:
    """``given`` as the delta's base: each source tensor cast exactly to the dtype it expects."""
    want: Dict[str, Tuple[str, str]] = {}
    for t in info["tensors"]:
        if t.get("source"):
            want.setdefault(t["source"], (t["relation"], t["dtype"]))
    out = []
    for name, g in given.items():
        if name in want:
            relation, ft_dtype = want[name]
            g = _cast_exact(g, _source_dtype(relation, ft_dtype, g)) or g
        out.append(g.native(name))
    return out


def _raw_dict(raw: List[tuple]) -> Dict[str, _Tensor]:
    return {name: _Tensor(dtype, tuple(shape), data) for name, dtype, shape, data in raw}


class _Dir(NamedTuple):
    """A base given as a model folder (read lazily)."""

    path: Path


_Model = Union[_Dir, Dict[str, _Tensor]]


def _dpk_ancestors(path: Path) -> List[Path]:
    """The deltapack chain a delta made with ``--parent`` continues, found beside it."""
    chain = [path]
    seen = {path.resolve()}
    info = _inspect_dpk(path)
    while info.get("parent"):
        link = info["parent"]
        parent = path.parent / str(link.get("file") or "")
        if not link.get("file") or not parent.is_file() or parent.resolve() in seen:
            raise BadInputError(
                f"{chain[0]} continues a deltapack chain whose link '{link.get('file')}' is not beside it: "
                "pass the whole chain in order (load_delta_chain([...], base))"
            )
        seen.add(parent.resolve())
        chain.insert(0, parent)
        info = _inspect_dpk(parent)
    return chain


def _apply_dpk(run: List[Path], current: _Model, threads: Optional[int] = None) -> Dict[str, _Tensor]:
    """The model a deltapack delta (or chain) rebuilds on ``current``."""
    if _inspect_dpk(run[0]).get("parent"):
        run = _dpk_ancestors(run[0])[:-1] + run
    deltas = [str(p) for p in run]
    first = _inspect_dpk(run[0])
    if isinstance(current, _Dir):
        try:
            with _as_compat_errors():
                raw, _files, _meta, _report = _native.load(str(current.path), deltas, None, threads)
            return _raw_dict(raw)
        except BaseMismatchError:
            # The delta may expect the base in another dtype (bf16 given as float32, or the
            # reverse): cast it exactly and check again; a real mismatch fails the same way.
            given = dict(_read_checkpoint(current.path).tensors)
            if all(
                _source_dtype(t["relation"], t["dtype"], given[t["source"]]) == given[t["source"]].dtype
                for t in first["tensors"]
                if t.get("source") in given
            ):
                raise
            current = given
    with _as_compat_errors():
        raw, _report = _native.load_on(_base_for(first, current), deltas, threads)
    return _raw_dict(raw)


def _apply_wdelta(path: Path, current: _Model, verify: bool) -> Dict[str, _Tensor]:
    """The model a ``.wdelta`` rebuilds on ``current``, as deltatensors 0.2.0 rebuilds it."""
    w = _read_wdelta(path)
    names = list(w.tensors)
    if isinstance(current, _Dir):
        ck = _read_checkpoint(current.path)
        base = ck.tensors
        missing = [n for n in names if n not in base]
        if missing:
            raise KeyError(f"Tensor '{missing[0]}' not found in {current.path}")
        orders = [sorted(names)]
        sharded = _shard_order(names, ck.shard)
        if sharded != orders[0]:
            orders.append(sharded)
    else:
        base = current
        orders = [sorted(base)]
        if sorted(names) != orders[0] and all(n in base for n in names):
            orders.append(sorted(names))
    if verify:
        got = _match_parent_hash(w.parent_hash, base, orders)
        if got is not None:
            raise _wrong_parent(w.parent_hash, got)
    out: Dict[str, _Tensor] = {}
    for name, payload in w.tensors.items():
        if name not in base:
            raise KeyError(f"Tensor '{name}' not found in base model.")
        delta = _wdelta_delta(w, name)
        b = base[name].f32()
        if b.shape != delta.shape:
            raise BaseMismatchError(
                f"tensor '{name}' of the base has shape {list(b.shape)}, but {path} holds a delta of shape "
                f"{list(delta.shape)}: pass the base this delta was made against"
            )
        rebuilt = (b + delta).astype(payload.get("dtype", "float32"))
        out[name] = _of_array(rebuilt) or _Tensor("F32", rebuilt.shape, rebuilt.astype(np.float32).view(np.uint8))
    _log.info("loaded %s (%d tensors, strategy=%s)", path.name, len(out), w.strategy)
    return out


def _load_chain(paths: List[PathLike], current: _Model, verify: bool) -> Dict[str, _Tensor]:
    """Applies deltas in turn: each ``.wdelta`` alone; deltapack deltas as deltapack chains."""
    todo = [Path(p) for p in paths]
    while todo:
        path = todo.pop(0)
        if _is_wdelta(path):
            current = _apply_wdelta(path, current, verify)
            continue
        run = [path]
        while todo and not _is_wdelta(todo[0]) and _inspect_dpk(todo[0]).get("parent"):
            run.append(todo.pop(0))
        current = _apply_dpk(run, current)
    if isinstance(current, _Dir):
        return dict(_read_checkpoint(current.path).tensors)
    return current


def _as_model(base: Union[PathLike, StateDict]) -> _Model:
    if isinstance(base, (str, os.PathLike)):
        return _Dir(Path(base))
    if not hasattr(base, "items"):
        raise TypeError(f"base must be a state dict or a model folder, not {type(base).__name__}")
    return {k: _given(k, v) for k, v in base.items()}


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def _parent_hash(info: Dict[str, Any]) -> str:
    parent = info.get("parent")
    if parent:
        return str(parent["fingerprint"])
    return str(info["base"]["fingerprint"])


def _out_path(path: PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _save_pair(out: Path, base: Dict[str, _Tensor], ft: Dict[str, _Tensor], plan: _Plan) -> Dict[str, Any]:
    with _as_compat_errors():
        report = _native.save_pair(
            [t.native(n) for n, t in base.items()],
            [t.native(n) for n, t in ft.items()],
            str(out),
            _make_args(plan),
            json.dumps({"format": "pt"}),
            plan.threads,
        )
    return json.loads(report)


def _log_saved(out: Path, report: Dict[str, Any], strategy: str, plan: _Plan) -> str:
    info = _inspect_dpk(out)
    _log.info(
        "saved %s (%d tensors, %.1f MB, strategy=%s -> codec=%s%s, error %.4g)",
        out.name,
        len(info["tensors"]),
        report.get("delta_bytes", 0) / 1e6,
        strategy,
        plan.codec,
        "" if plan.max_error is None else f" max_error={plan.max_error:.4g}",
        report.get("error", 0.0),
    )
    return _parent_hash(info)


def save_delta(
    path: Union[str, Path],
    finetuned: StateDict,
    base: StateDict,
    strategy: str = "sparse",
    use_gpu: bool = True,
    **kwargs: Any,
) -> str:
    """Compute the delta between ``finetuned`` and ``base`` (state dicts) and save it to ``path``.

    ``finetuned`` and ``base`` map names to numpy arrays or torch tensors. The file is a
    deltapack delta whatever ``path``'s extension. ``strategy`` is ``"sparse"`` (``sparsity=``,
    default 0.9), ``"quantized"``, ``"int4"`` (``outlier_fraction=``, default 0.01) or
    ``"exact"``; each maps to the deltapack codec in the module's table, never worse in size or
    error than deltatensors' on the same pair. float32 arrays that all hold bf16 values are
    stored as bf16. ``use_gpu`` is ignored.

    Returns the base's fingerprint (``inspect(path)["parent_hash"]``).
    """
    del use_gpu
    opts = _options(strategy, kwargs)
    ft = {k: _given(k, v) for k, v in finetuned.items()}
    bs = {k: _given(k, v) for k, v in base.items()}
    bs, ft = _harmonize(bs, ft, opts.lossy)
    plan = _plan(opts, lambda: _lossy_pairs(bs, ft))
    out = _out_path(path)
    report = _save_pair(out, bs, ft, plan)
    return _log_saved(out, report, strategy, plan)


def _within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _make_into(out: Path, base: Path, finetuned: Path, plan: _Plan) -> Dict[str, Any]:
    """``deltapack.make``, also when ``out`` lies in the fine-tune's folder (deltatensors allows it)."""

    def make(to: Path) -> Dict[str, Any]:
        with _as_compat_errors():
            return deltapack.make(
                base,
                finetuned,
                to,
                codec=plan.codec,
                max_error=plan.max_error,
                tensor_codecs=plan.tensor_codecs,
                threads=plan.threads,
                force=True,
            )

    if not (finetuned.is_dir() and _within(out, finetuned)):
        return make(out)
    if out.exists():
        out.unlink()  # the old output would otherwise be read as one of the fine-tune's files
    scratch = Path(tempfile.mkdtemp(prefix="deltapack-compat-"))
    try:
        report = make(scratch / out.name)
        shutil.move(str(scratch / out.name), str(out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def save_delta_from_paths(
    out_path: Union[str, Path],
    finetuned_dir: Union[str, Path],
    base_dir: Union[str, Path],
    strategy: str = "sparse",
    prefetch: int = 2,
    use_gpu: bool = True,
    **kwargs: Any,
) -> str:
    """Save the delta between two safetensors model folders to ``out_path`` (a deltapack delta).

    ``strategy`` and ``kwargs`` are :func:`save_delta`'s. The fine-tune's other files (config,
    tokenizer) travel with the delta, so ``deltapack apply`` rebuilds the whole folder (not
    when the folders' float dtypes differ and the strategy is lossy: the delta is then made in
    memory, of the weights, as :func:`save_delta` makes it). ``out_path`` may lie inside
    ``finetuned_dir``. ``prefetch`` and ``use_gpu`` are ignored:
    deltapack streams the folders and uses every core. Returns the base's fingerprint.
    """
    del prefetch, use_gpu
    opts = _options(strategy, kwargs)
    finetuned, base = Path(finetuned_dir), Path(base_dir)
    out = _out_path(out_path)
    ft_ck, base_ck = _read_checkpoint(finetuned), _read_checkpoint(base)
    bs, ft = base_ck.tensors, ft_ck.tensors
    mixed = any(b.dtype != f.dtype and b.dtype in _FLOATS and f.dtype in _FLOATS for b, f in _lossy_pairs(bs, ft))
    if opts.lossy and mixed:
        # deltapack codes lossily only tensors whose base has the fine-tune's dtype: make the
        # delta in memory with the dtypes made equal, as save_delta does.
        bs, ft = _harmonize(bs, ft, lossy=True)
        plan = _plan(opts, lambda: _lossy_pairs(bs, ft))
        report = _save_pair(out, bs, ft, plan)
    else:
        plan = _plan(opts, lambda: _lossy_pairs(bs, ft))
        report = _make_into(out, base, finetuned, plan)
    return _log_saved(out, report, strategy, plan)


def load_delta(
    path: Union[str, Path],
    base: StateDict,
    verify: bool = True,
) -> Dict[str, np.ndarray]:
    """Rebuild a fine-tuned model from a delta (deltapack or ``.wdelta``) and a base state dict.

    ``base`` maps names to numpy arrays or torch tensors, as stored or as float32 (a model
    folder is accepted too). ``verify=False`` skips a ``.wdelta``'s base hash check; a
    deltapack delta always checks its base. Returns ``{name: float32 numpy array}``.
    """
    return _f32_dict(_load_chain([path], _as_model(base), verify))


def load_delta_from_paths(
    path: Union[str, Path],
    base_dir: Union[str, Path],
    verify: bool = True,
) -> Dict[str, np.ndarray]:
    """Rebuild a fine-tuned model from a delta (deltapack or ``.wdelta``) and a base model folder.

    A deltapack delta made with ``deltapack make --parent`` is read with the chain it continues
    (found beside it). Returns ``{name: float32 numpy array}``.
    """
    return _f32_dict(_load_chain([path], _Dir(Path(base_dir)), verify))


def _inspect_wdelta(path: Path) -> Dict[str, Any]:
    w = _read_wdelta(path)
    return {
        "path": str(path),
        "size_mb": round(w.size / 1e6, 2),
        "parent_hash": w.parent_hash,
        "strategy": w.strategy,
        "n_tensors": len(w.tensors),
        "tensors": {name: {"shape": p["shape"], "dtype": p["dtype"]} for name, p in w.tensors.items()},
        "format": "wdelta",
    }


def inspect(path: Union[str, Path]) -> dict:
    """Describe a delta file without a base, in deltatensors' fields.

    ``{"path", "size_mb", "parent_hash", "strategy", "n_tensors", "tensors": {name: {"shape",
    "dtype"}}, "format"}``, where ``format`` is ``"wdelta"`` or ``"deltapack"``. For a deltapack
    delta, ``dtype`` is ``"float32"`` (what the loaders return) and ``stored_dtype`` the
    checkpoint's; ``strategy`` names the codecs used (``"exact"``, or e.g. ``"quant+sparse"``),
    and ``bits_per_param`` and ``error`` are deltapack's figures.
    """
    path = Path(path)
    if _is_wdelta(path):
        return _inspect_wdelta(path)
    info = _inspect_dpk(path)
    codecs = sorted({str(t.get("codec")) for t in info["tensors"] if t.get("codec") not in (None, "exact")})
    return {
        "path": str(path),
        "size_mb": round(int(info["size"]) / 1e6, 2),
        "parent_hash": _parent_hash(info),
        "strategy": "+".join(codecs) if codecs else "exact",
        "n_tensors": len(info["tensors"]),
        "tensors": {
            t["name"]: {"shape": list(t["shape"]), "dtype": "float32", "stored_dtype": t["dtype"]}
            for t in info["tensors"]
        },
        "format": "deltapack",
        "bits_per_param": info.get("bits_per_param"),
        "error": info.get("error"),
    }


def inspect_chain(delta_paths: list) -> list:
    """:func:`inspect` of each step of a chain, oldest first, each with its ``"step"`` (0-based)."""
    return [dict(inspect(p), step=i) for i, p in enumerate(delta_paths)]


def load_delta_chain(
    delta_paths: list,
    base: Union[str, Path, StateDict],
    verify: bool = True,
) -> Dict[str, np.ndarray]:
    """Rebuild the model at the end of a chain of deltas, applied in order on ``base``.

    ``base`` is a state dict or a model folder. Each delta is applied to the model the previous
    one rebuilt, and checked against it (deltapack deltas always; ``.wdelta`` files unless
    ``verify=False``), so a chain out of order raises :class:`BaseMismatchError` (a
    ``ValueError``). Returns ``{name: float32 numpy array}``.
    """
    if not delta_paths:
        raise ValueError("delta_paths is empty — provide at least one delta file.")
    model = _load_chain(list(delta_paths), _as_model(base), verify)
    _log.info("chain: applied %d delta(s) successfully", len(delta_paths))
    return _f32_dict(model)


def save_delta_chain_from_paths(
    out_path: Union[str, Path],
    finetuned_dir: Union[str, Path],
    parent_delta_path: Union[str, Path],
    base_dir: Union[str, Path],
    strategy: str = "sparse",
    use_gpu: bool = True,
    **kwargs: Any,
) -> str:
    """Save the delta of ``finetuned_dir`` against the model ``parent_delta_path`` rebuilds on ``base_dir``.

    The parent is a deltapack delta or a ``.wdelta`` made against ``base_dir`` (a deltapack
    chain link is read with its chain). The new delta is coded against the parent's
    reconstruction, so :func:`load_delta_chain` of ``[parent, out_path]`` rebuilds the
    fine-tune within the strategy's error. Returns the parent model's fingerprint
    (``inspect(out_path)["parent_hash"]``).
    """
    del use_gpu
    opts = _options(strategy, kwargs)
    parent = _load_chain([parent_delta_path], _Dir(Path(base_dir)), True)
    ft = dict(_read_checkpoint(finetuned_dir).tensors)
    parent, ft = _harmonize(parent, ft, opts.lossy)
    plan = _plan(opts, lambda: _lossy_pairs(parent, ft))
    out = _out_path(out_path)
    report = _save_pair(out, parent, ft, plan)
    return _log_saved(out, report, strategy, plan)


# ---------------------------------------------------------------------------------------------
# deltatensors.training and deltatensors.lineage.
# ---------------------------------------------------------------------------------------------


def _callback_class() -> type:
    try:
        from transformers import TrainerCallback as base
    except ImportError:  # as in deltatensors: the Trainer only calls the methods it finds
        base = object

    class DeltaTensorsCallback(base):  # type: ignore[misc, valid-type]
        """HuggingFace Trainer callback that saves each checkpoint as a delta against a fixed base.

        After every checkpoint save, ``{output_dir}/checkpoint-{step}/model.wdelta`` is written:
        a deltapack delta (the name is deltatensors', so that scripts find it), made with
        :func:`save_delta_from_paths` and ``strategy`` (``"int4"`` by default) and
        ``strategy_kwargs``. With ``delete_full_checkpoint=True`` the checkpoint's
        ``.safetensors`` files are removed once the delta is written (training can then not
        resume from it). A failure warns and leaves the checkpoint as it is.
        """

        filename = "model.wdelta"

        def __init__(
            self,
            base_dir: Union[str, Path],
            strategy: str = "int4",
            delete_full_checkpoint: bool = False,
            **strategy_kwargs: Any,
        ):
            self.base_dir = str(base_dir)
            self.strategy = strategy
            self.delete_full_checkpoint = delete_full_checkpoint
            self.strategy_kwargs = strategy_kwargs

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Called by the Trainer right after a checkpoint is saved: writes its delta."""
            checkpoint_dir = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            delta_path = os.path.join(checkpoint_dir, self.filename)
            if not os.path.isdir(checkpoint_dir):
                warnings.warn(f"expected checkpoint folder not found: {checkpoint_dir}; no delta saved", stacklevel=2)
                return
            weights = [
                os.path.join(checkpoint_dir, f) for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors")
            ]
            if not weights:
                warnings.warn(
                    f"no .safetensors in {checkpoint_dir}; no delta saved (set save_safetensors=True)", stacklevel=2
                )
                return
            try:
                save_delta_from_paths(
                    delta_path,
                    finetuned_dir=checkpoint_dir,
                    base_dir=self.base_dir,
                    strategy=self.strategy,
                    use_gpu=False,
                    **self.strategy_kwargs,
                )
            except Exception as exc:  # as in deltatensors: a failed delta never stops training
                warnings.warn(f"delta save failed at step {state.global_step}: {exc}", stacklevel=2)
                return
            if self.delete_full_checkpoint:
                for f in weights:
                    os.remove(f)
                _log.info("removed the full safetensors of %s (delta: %s)", checkpoint_dir, self.filename)

    DeltaTensorsCallback.__module__ = __name__
    return DeltaTensorsCallback


def __getattr__(name: str) -> Any:
    """``DeltaTensorsCallback``, made on first use (it imports transformers when available)."""
    if name == "DeltaTensorsCallback":
        cls = _callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _submodule(name: str, doc: str, attrs: Dict[str, Any], lazy: Optional[Callable[[str], Any]] = None):
    mod = types.ModuleType(f"{__name__}.{name}", doc)
    mod.__dict__.update(attrs)
    if lazy is not None:
        mod.__getattr__ = lazy  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    return mod


training = _submodule(
    "training",
    "deltatensors.training: ``DeltaTensorsCallback``, writing deltapack deltas.",
    {},
    lambda name: __getattr__(name),
)
lineage = _submodule(
    "lineage",
    "deltatensors.lineage: ``hash_state_dict`` and ``verify_base``.",
    {"hash_state_dict": hash_state_dict, "verify_base": verify_base},
)
