"""Serve many fine-tunes of one base in one PyTorch model, from packed deltas: :func:`attach`.

A server that mixes requests for several fine-tunes of one base keeps the base's dense
weights once and each fine-tune as its delta in a packed compute layout (1 bit per weight for
``sign`` deltas, 2 for ternary, the code width for ``quant``, positions and values for
``sparse``). Each linear layer computes the base's product once for the whole batch, then
adds each fine-tune's ``x @ Δᵀ`` on its own rows, without ever building ``W + Δ``::

    h = deltapack.torch.attach(model, {"a": "a.dpk", "b": "b.dpk"})
    with h.use("a"):
        y = model(**batch)                  # the whole batch as fine-tune a
    with h.use(["a", "b", None, "a"]):
        y = model(**batch)                  # one fine-tune per batch row (None: the base)
    h.detach()                              # the model exactly as it was

What each kind of tensor becomes (``h.memory()`` counts it per fine-tune):

- the weight of an ``nn.Linear`` coded by a lossy codec: a packed delta, computed by the
  engine's kernels. A weight coded exactly is refused: serving it would take a dense copy per
  fine-tune; make the delta with a lossy codec (``codec="sign-axis"``, ``"quant"``,
  ``"sparse"``) or switch whole fine-tunes with :class:`deltapack.Resident`;
- the weight of an ``nn.Embedding`` (and an LM head, which is a Linear): packed like the
  others; an embedding adds the changed rows of the batch's tokens, rebuilt from the packed
  form per call; an embedding coded exactly is held densely per fine-tune;
- every other changed tensor (norms, biases: small, and coded exactly by default): held
  densely per fine-tune; its module runs with the fine-tune's tensors on that fine-tune's
  rows (``torch.func.functional_call``).

Deltas stored in the ``ulp`` domain (``zeros=keep`` sign deltas of 16-bit models) are
served in the value domain, their scales fitted again to the rebuilt change; ``quant`` deltas
are quantized again to their bit width. ``h.report`` gives, per tensor, the form held and its
relative distance from the stored reconstruction (``error``).

The kernels run on a thread pool as large as torch's (``torch.get_num_threads()``), while
torch waits: the two take turns on the same cores. Inference only: no gradient flows through
the deltas.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import AbstractSet, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from deltapack import _native
from deltapack._tensors import torch_bytes, torch_dtypes
from deltapack.errors import BadInputError, WrongBaseError

PathLike = Union[str, "os.PathLike[str]"]
Deltas = Union[PathLike, Sequence[PathLike]]
Tenants = Union[None, str, Sequence[Optional[str]]]

__all__ = ["Attached", "attach"]


def _chain(deltas: Deltas) -> List[str]:
    if isinstance(deltas, (str, os.PathLike)):
        return [os.fspath(deltas)]
    return [os.fspath(d) for d in deltas]


class Attached:
    """A model with fine-tunes attached: :meth:`use` picks them, :meth:`detach` restores it.

    ``report`` maps each fine-tune's name to what is held per tensor (form, bytes, codec,
    ``error``: the served change's relative distance from the stored one).
    """

    def __init__(self, server, names: List[str], reports: Dict[str, Any]) -> None:
        self._server = server
        self._index = {n: i for i, n in enumerate(names)}
        self.tenants: List[str] = list(names)
        self.report: Dict[str, Any] = reports
        self._active: Optional[List[int]] = None
        self._whole = True
        self._rows_cache: Dict[tuple, Optional[np.ndarray]] = {}
        self._replaced: List[tuple] = []
        self._dense_bytes: Dict[str, int] = {n: 0 for n in names}

    @contextlib.contextmanager
    def use(self, tenants: Tenants) -> Iterator[None]:
        """Run the model as ``tenants`` inside the ``with`` block.

        ``tenants`` is one fine-tune's name for the whole batch, a sequence with one name (or
        None, the base) per batch row, or None for the base.
        """
        if tenants is None or isinstance(tenants, str):
            active = None if tenants is None else [self._lookup(tenants)]
            whole = True
        else:
            active = [-1 if t is None else self._lookup(t) for t in tenants]
            whole = False
        previous = self._active, self._whole
        self._active, self._whole = active, whole
        self._rows_cache.clear()
        try:
            yield
        finally:
            self._active, self._whole = previous
            self._rows_cache.clear()

    def _lookup(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise BadInputError(
                f"no fine-tune named {name!r} is attached (attached: {', '.join(self.tenants)})"
            ) from None

    def rows(self, batch: int, per_row: int) -> Optional[np.ndarray]:
        """The fine-tune index of each of ``batch * per_row`` flattened rows (-1: the base).

        None when the whole batch runs as the base.
        """
        key = (batch, per_row)
        if key not in self._rows_cache:
            self._rows_cache[key] = self._rows(batch, per_row)
        return self._rows_cache[key]

    def _rows(self, batch: int, per_row: int) -> Optional[np.ndarray]:
        if self._active is None or all(t < 0 for t in self._active):
            return None
        if self._whole:
            return np.full(batch * per_row, self._active[0], dtype=np.int64)
        if len(self._active) != batch:
            raise BadInputError(
                f"use() was given {len(self._active)} fine-tunes, one per batch row, but the batch has {batch} rows"
            )
        return np.repeat(np.asarray(self._active, dtype=np.int64), per_row)

    def broadcast(self, x):
        """``x`` expanded to one row per fine-tune, where a batch of one is broadcast.

        Models broadcast some inputs (position ids, say) over the batch; rows that run as
        different fine-tunes need them one per row.
        """
        if self._whole or self._active is None or x.dim() < 2 or x.shape[0] != 1 or len(self._active) == 1:
            return x
        return x.expand(len(self._active), *x.shape[1:])

    def memory(self) -> Dict[str, Dict[str, int]]:
        """Bytes held per fine-tune.

        ``packed``: the packed deltas, with ``weights`` the number of weights they cover;
        ``dense``: the tensors held densely.
        """
        out = {}
        for n, i in self._index.items():
            packed = [t for t in self.report[n]["tensors"] if t["form"] != "dense"]
            out[n] = {
                "packed": self._server.bytes(i),
                "weights": sum(int(np.prod(t["shape"])) for t in packed),
                "dense": self._dense_bytes[n],
            }
        return out

    def detach(self) -> None:
        """Put every replaced module back: the model is then exactly as it was."""
        for parent, name, original in reversed(self._replaced):
            setattr(parent, name, original)
        self._replaced.clear()
        self._active = None


def _module_of(model, param: str):
    """(parent module, attribute name, module, parameter attribute) of a parameter name."""
    *path, attr = param.split(".")
    parent, name, module = None, None, model
    for p in path:
        parent, name, module = module, p, getattr(module, p, None)
        if module is None:
            return None
    return parent, name, module, attr


def _model_name(names: AbstractSet[str], prefix: str, tensor: str) -> Optional[str]:
    """The model's name of a checkpoint tensor.

    The same name, or with the base-model prefix (``bert.``, ``model.``) added or removed,
    as transformers matches them.
    """
    for cand in (tensor, f"{prefix}.{tensor}" if prefix else None):
        if cand and cand in names:
            return cand
    if prefix and tensor.startswith(prefix + "."):
        cut = tensor[len(prefix) + 1 :]
        if cut in names:
            return cut
    return None


def _model_tensors(model) -> Dict[str, Any]:
    """The model's parameters and buffers by name (a parameter first where both share one)."""
    tensors = dict(model.named_buffers())
    tensors.update(dict(model.named_parameters()))
    return tensors


def _base_tensors(model) -> List[tuple]:
    """The model's parameters and buffers as the engine takes a base held in memory."""
    return [torch_bytes(n, t) for n, t in _model_tensors(model).items()]


def _check_model_is_base(model, base: PathLike, names: Sequence[str], prefix: str) -> None:
    """Every model tensor a delta changes equals the base checkpoint's, in the model's dtype."""
    from safetensors import safe_open

    tensors = _model_tensors(model)
    with contextlib.ExitStack() as stack:
        where = {}
        for f in _safetensors_files(base):
            h = stack.enter_context(safe_open(f, framework="pt"))
            where.update({k: h for k in h.keys()})
        for tensor in names:
            mine = _model_name(tensors.keys(), prefix, tensor)
            if mine is None or tensor not in where:
                continue
            b = where[tensor].get_tensor(tensor)
            p = tensors[mine].detach()
            if p.shape != b.shape or not torch.equal(p.cpu(), b.to(p.dtype)):
                raise WrongBaseError(
                    f"the model's '{mine}' is not the base's '{tensor}' (in {os.fspath(base)}): attach fine-tunes "
                    "to the model of the base they were made from; the model is unchanged"
                )


def _safetensors_files(base: PathLike) -> List[str]:
    base = os.fspath(base)
    if os.path.isfile(base):
        return [base]
    return sorted(os.path.join(base, f) for f in os.listdir(base) if f.endswith(".safetensors"))


def attach(
    model, deltas: Mapping[str, Deltas], *, base: Optional[PathLike] = None, threads: Optional[int] = None
) -> Attached:
    """Attach fine-tunes of ``model``'s base to it, each held as a packed delta.

    ``deltas`` maps a name to a ``.dpk`` path or a chain (a list, base side first). With
    ``base=None`` the model's own tensors are the base: each delta checks the tensors it
    changes against the fingerprints it recorded (so the model must hold the base in its
    original dtype). With ``base`` (a checkpoint path), the deltas are read against that
    checkpoint and the model's tensors must equal its values cast to the model's dtype (a
    bf16 base run in float32, say). Any failure (another base, a weight coded exactly, a
    module the kernels cannot serve) raises before the model changes. ``threads``: the
    kernels' threads (default: torch's, ``torch.get_num_threads()``).
    Returns the :class:`Attached` handle.
    """
    if not isinstance(deltas, Mapping) or not deltas:
        raise BadInputError("deltas must be a non-empty mapping of fine-tune names to delta paths (or chains)")
    server = _native.Server(max(1, threads or torch.get_num_threads()))
    given = None if base is not None else _base_tensors(model)
    names, reports = [], {}
    for name, chain in deltas.items():
        if not isinstance(name, str):
            raise BadInputError(f"fine-tune names must be strings, not {type(name).__name__}")
        index, report = server.add(_chain(chain), None if base is None else os.fspath(base), given)
        assert index == len(names)
        names.append(name)
        reports[name] = json.loads(report)
    prefix = getattr(model, "base_model_prefix", "") or ""
    if base is not None:
        changed = sorted({t["name"] for r in reports.values() for t in r["tensors"]})
        _check_model_is_base(model, base, changed, prefix)
    handle = Attached(server, names, reports)
    plans = _plan(model, handle, reports, prefix)
    for i in range(len(names)):
        server.drop_dense(i)
    for parent, attr, wrapper in plans:
        handle._replaced.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, wrapper)
    return handle


def _plan(model, handle: Attached, reports: Dict[str, Any], prefix: str) -> List[tuple]:
    """The modules to replace and their wrappers.

    Raises, having changed nothing, on what the kernels cannot serve.
    """
    dtypes = torch_dtypes()
    names = _model_tensors(model).keys()
    by_module: Dict[str, Dict[str, Any]] = {}
    for tenant, report in reports.items():
        for t in report["tensors"]:
            mine = _model_name(names, prefix, t["name"])
            if mine is None:
                raise BadInputError(
                    f"fine-tune {tenant!r} changes '{t['name']}', which the model has no tensor for: "
                    "attach deltas of this model's base"
                )
            found = _module_of(model, mine)
            if found is None:
                raise BadInputError(f"no module holds the model's tensor '{mine}'")
            parent, attr, module, pname = found
            if parent is None:
                raise BadInputError(
                    f"fine-tune {tenant!r} changes '{mine}', which the model's root module holds: attach replaces "
                    "submodules only"
                )
            entry = by_module.setdefault(
                mine.rsplit(".", 1)[0], {"parent": parent, "attr": attr, "module": module, "tensors": {}}
            )
            entry["tensors"].setdefault(pname, []).append((handle._index[tenant], t))
    plans = []
    for path, e in by_module.items():
        module, tensors = e["module"], e["tensors"]
        packed_weight = {i: t["name"] for i, t in tensors.get("weight", []) if t["form"] != "dense"}
        dense = {}
        for pname, items in tensors.items():
            for i, t in items:
                if pname == "weight" and t["form"] != "dense":
                    continue
                if isinstance(module, torch.nn.Linear) and pname == "weight":
                    raise BadInputError(
                        f"'{t['name']}' is coded exactly in fine-tune {handle.tenants[i]!r}: "
                        "attach serves lossy deltas "
                        "(make it with codec='sign-axis', 'quant' or 'sparse'), or switch whole fine-tunes with "
                        "deltapack.Resident (hot swap)"
                    )
                current = getattr(module, pname)
                data = handle._server.dense(i, t["name"])
                value = torch.from_numpy(data).view(dtypes[t["dtype"]]).reshape(t["shape"]).to(current.dtype)
                dense.setdefault(i, {})[pname] = value
                handle._dense_bytes[handle.tenants[i]] += value.numel() * value.element_size()
        if packed_weight and isinstance(module, torch.nn.Linear):
            wrapper = _DeltaLinear(module, handle, packed_weight, dense)
        elif packed_weight and isinstance(module, torch.nn.Embedding):
            wrapper = _DeltaEmbedding(module, handle, packed_weight, dense)
        elif packed_weight:
            raise BadInputError(
                f"'{path}' is a {type(module).__name__}: attach serves packed deltas of nn.Linear and nn.Embedding "
                "weights only; code this tensor exactly (a tensor-codec rule) or use deltapack.Resident"
            )
        else:
            wrapper = _TenantModule(module, handle, dense)
        plans.append((e["parent"] if e["parent"] is not None else model, e["attr"], wrapper))
    return plans


class _Served(torch.nn.Module):
    """A module replaced by a wrapper that adds the active fine-tunes' changes."""

    def __init__(self, module, handle: Attached, dense: Dict[int, Dict[str, Any]]) -> None:
        super().__init__()
        self.module = module
        self._handle = handle
        self._dense = dense

    def _dense_outputs(self, x, y, per_row_rows: Optional[np.ndarray], batch: int):
        """``y`` with the module's output recomputed on each fine-tune's rows.

        Only for the fine-tunes that hold their own tensors of this module (norms, biases).
        """
        if not self._dense or per_row_rows is None:
            return y
        from torch.func import functional_call

        tenants = per_row_rows.reshape(batch, -1)[:, 0] if batch else per_row_rows
        for t, params in self._dense.items():
            sel = np.nonzero(tenants == t)[0]
            if len(sel) == 0:
                continue
            if len(sel) == batch:
                return functional_call(self.module, params, (x,))
            idx = torch.from_numpy(sel)
            y = y.clone()
            y[idx] = functional_call(self.module, params, (x[idx],))
        return y


class _DeltaLinear(_Served):
    """``nn.Linear`` plus packed deltas: the base product once, each fine-tune's on its rows.

    A fine-tune's change of the bias, where it has one, is added on its rows too.
    """

    def __init__(self, module, handle: Attached, weight: Dict[int, str], dense: Dict[int, Dict[str, Any]]) -> None:
        super().__init__(module, handle, {})
        self._weight = weight
        self._name = next(iter(weight.values()))
        self._tenants = np.asarray(sorted(weight), dtype=np.int64)
        self._last: Optional[tuple] = None
        self._bias = {t: (p["bias"].float() - module.bias.float()) for t, p in dense.items() if "bias" in p}

    def forward(self, x):
        x = self._handle.broadcast(x)
        y = self.module(x)
        batch = x.shape[0] if x.dim() > 1 else 1
        flat = x.reshape(-1, x.shape[-1])
        rows = self._handle.rows(batch, flat.shape[0] // max(batch, 1))
        if rows is None:
            return y
        served = self._served(rows)
        d = None
        if served is not None:
            xs = flat.detach().to(torch.float32).contiguous().numpy()
            d = torch.from_numpy(self._handle._server.matmul(self._name, xs, served, self.module.out_features))
        for t, b in self._bias.items():
            sel = np.nonzero(rows == t)[0]
            if len(sel):
                if d is None:
                    d = torch.zeros(flat.shape[0], self.module.out_features)
                d[torch.from_numpy(sel)] += b
        return y if d is None else y + d.reshape(y.shape).to(y.dtype)

    def _served(self, rows: np.ndarray) -> Optional[np.ndarray]:
        """``rows`` with the fine-tunes that leave this weight unchanged made the base (-1).

        None when no row needs the packed product. Cached for the last ``rows`` seen.
        """
        if self._last is not None and self._last[0] is rows:
            return self._last[1]
        served = np.where(np.isin(rows, self._tenants), rows, -1)
        out = served if (served >= 0).any() else None
        self._last = (rows, out)
        return out


class _DeltaEmbedding(_Served):
    """``nn.Embedding`` plus packed deltas: the changed rows of the batch's tokens added."""

    def __init__(self, module, handle: Attached, weight: Dict[int, str], dense: Dict[int, Dict[str, Any]]) -> None:
        super().__init__(module, handle, dense)
        self._weight = weight

    def forward(self, ids):
        ids = self._handle.broadcast(ids)
        y = self.module(ids)
        batch = ids.shape[0] if ids.dim() > 1 else 1
        flat = ids.reshape(-1)
        rows = self._handle.rows(batch, flat.shape[0] // max(batch, 1))
        if rows is None:
            return y
        y = self._dense_outputs(ids, y, rows, batch)
        out = y.reshape(-1, y.shape[-1]).clone()
        for t, name in self._weight.items():
            sel = np.nonzero(rows == t)[0]
            if len(sel) == 0:
                continue
            tokens = flat[torch.from_numpy(sel)].cpu().numpy().astype(np.int64)
            d = torch.from_numpy(self._handle._server.rows(t, name, tokens))
            out[torch.from_numpy(sel)] += d.to(out.dtype)
        return out.reshape(y.shape)


class _TenantModule(_Served):
    """Any module whose own tensors (norms, biases) some fine-tunes change.

    It runs with each fine-tune's tensors on that fine-tune's rows.
    """

    def forward(self, x, *args, **kwargs):
        x = self._handle.broadcast(x)
        y = self.module(x, *args, **kwargs)
        batch = x.shape[0] if x.dim() > 1 else 1
        rows = self._handle.rows(batch, max(1, x.numel() // max(batch, 1) // max(1, x.shape[-1])))
        if rows is not None and (args or kwargs):
            raise BadInputError(
                f"attach cannot run a fine-tune's own tensors of a {type(self.module).__name__} called with "
                "several inputs; switch whole fine-tunes with deltapack.Resident instead"
            )
        return self._dense_outputs(x, y, rows, batch)
