"""Tensors between the engine's byte arrays and torch or numpy.

The engine hands every tensor over as a 1-D ``uint8`` numpy array of its safetensors bytes
(little-endian, contiguous). Turning it into a torch tensor is a view (no copy). numpy has
no bfloat16 and no float8: for those dtypes ``framework="np"`` returns float32 arrays,
converted exactly (every bf16 and f8 value is a float32 value), so that the values can be
used at once; the bytes themselves are what ``framework="pt"`` keeps.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# safetensors dtype name -> numpy dtype, for the dtypes numpy has.
_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def torch_dtypes() -> dict:
    """Safetensors dtype names and the torch dtypes they are (those this torch has)."""
    import torch

    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }
    return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


def to_torch(dtype: str, shape: Sequence[int], data: np.ndarray, device: Any = "cpu"):
    """The torch tensor of ``data``'s bytes, viewed (not copied) as ``dtype`` and ``shape``."""
    import torch

    t = torch.from_numpy(data)
    if dtype != "U8":
        try:
            t = t.view(torch_dtypes()[dtype])
        except KeyError:
            from deltapack.errors import BadInputError

            raise BadInputError(f"this torch has no dtype for safetensors dtype {dtype}") from None
    t = t.reshape(tuple(shape))
    if str(device) != "cpu":
        t = t.to(device)
    return t


def to_numpy(dtype: str, shape: Sequence[int], data: np.ndarray) -> np.ndarray:
    """The numpy array of ``data``'s bytes: a view for numpy's dtypes, float32 otherwise."""
    if dtype in _NUMPY:
        return data.view(_NUMPY[dtype]).reshape(tuple(shape))
    if dtype == "BF16":
        bits = data.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tuple(shape))
    # float8 and others: through torch, which knows them.
    return to_torch(dtype, shape, data).float().numpy()


def convert(framework: str, dtype: str, shape: Sequence[int], data: np.ndarray, device: Any = "cpu"):
    """A tensor for ``framework`` ("pt" or "np") from the engine's bytes."""
    if framework in ("pt", "torch"):
        return to_torch(dtype, shape, data, device)
    if framework in ("np", "numpy"):
        return to_numpy(dtype, shape, data)
    from deltapack.errors import BadInputError

    raise BadInputError(f'framework must be "pt" or "np", not {framework!r}')


def torch_bytes(name: str, tensor) -> tuple:
    """A torch tensor as the engine takes it: (name, dtype name, shape, uint8 array).

    The array shares the tensor's memory where the tensor is a contiguous CPU tensor; other
    tensors are copied once (to the CPU, or to contiguous memory) first.
    """
    import torch

    from deltapack.errors import BadInputError

    if not isinstance(tensor, torch.Tensor):
        raise BadInputError(
            f"state dict entry '{name}' is a {type(tensor).__name__}, not a torch.Tensor; "
            "pass tensors only (model.state_dict() gives them)"
        )
    names = {v: k for k, v in torch_dtypes().items()}
    dtype = names.get(tensor.dtype)
    if dtype is None:
        raise BadInputError(f"state dict entry '{name}' has dtype {tensor.dtype}, which safetensors cannot hold")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy()
    return (name, dtype, list(t.shape), data)
