"""A base held in memory and switched between fine-tunes in place: :class:`Resident`."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence, Union

from deltapack import _native
from deltapack._tensors import convert

PathLike = Union[str, "os.PathLike[str]"]


class Resident:
    """A base model in memory, switched between its fine-tunes in place by their deltas.

    ``switch_to(delta)`` rewrites only the chunks the delta changes, reading only the delta,
    and checks every rebuilt chunk; ``switch_to(None)`` brings the base back bit for bit.
    :meth:`tensors` gives torch tensors that *share memory* with the model: a tensor the
    fine-tunes keep in place (the same dtype and size) changes with every switch, so a torch
    model whose parameters are those tensors (:meth:`attach`) changes fine-tune with no copy.
    A tensor a switch adds, resizes beyond its buffer or converts is new memory: call
    :meth:`tensors` (or :meth:`attach`) again after a switch to see it; views taken before
    stay valid (their memory is kept while they live) but hold what they held. Do not write
    to the tensors: the model's checks would refuse the next switch.
    """

    def __init__(self, base: PathLike) -> None:
        self._native = _native.Resident(os.fspath(base))

    def switch_to(self, deltas: Union[None, PathLike, Sequence[PathLike]]) -> Dict[str, Any]:
        """Switch to the fine-tune of ``deltas`` (one delta or a chain), or the base with None."""
        if deltas is None:
            chain: List[str] = []
        elif isinstance(deltas, (str, os.PathLike)):
            chain = [os.fspath(deltas)]
        else:
            chain = [os.fspath(d) for d in deltas]
        return json.loads(self._native.switch_to_chain(chain))

    def switch_to_chain(self, chain: Sequence[PathLike]) -> Dict[str, Any]:
        """Switch to the model a chain of deltas rebuilds, keeping the links already held."""
        return self.switch_to(list(chain))

    @property
    def active(self) -> List[str]:
        """The delta files of the chain held, from the base (empty at the base)."""
        return [str(p) for p in self._native.active_chain()]

    @property
    def undo_bytes(self) -> int:
        """Memory held to switch back, in bytes."""
        return self._native.undo_bytes()

    def tensors(self, framework: str = "pt") -> Dict[str, Any]:
        """The model's tensors now, by name, as views of its memory.

        torch tensors by default; with ``framework="np"`` numpy arrays, views for numpy's
        dtypes (bf16 comes as a float32 copy).
        """
        return {name: convert(framework, dtype, shape, data) for name, dtype, shape, data in self._native.tensors()}

    def attach(self, module: Any, *, strict: bool = True) -> List[str]:
        """Make the parameters and buffers of a torch module views of this model's tensors.

        Each parameter or persistent buffer (the module's state dict) gets the model's memory (no copy;
        the dtype and shape must match), so the module follows every switch. Call it again
        after a switch that changed a tensor's size or added one. With ``strict``, a name the
        model lacks is an error. Returns the names attached.
        """
        import torch

        from deltapack.errors import BadInputError

        views = self.tensors()
        attached = []
        with torch.no_grad():
            # The state dict's entries: parameters and persistent buffers, as checkpoints hold them.
            for name, tensor in module.state_dict(keep_vars=True).items():
                view = views.get(name)
                if view is None:
                    if strict:
                        raise BadInputError(f"the model held has no tensor '{name}' (pass strict=False to skip it)")
                    continue
                if view.dtype != tensor.dtype or view.shape != tensor.shape:
                    raise BadInputError(
                        f"tensor '{name}': the model held has {view.dtype} {tuple(view.shape)}, "
                        f"the module {tensor.dtype} {tuple(tensor.shape)}"
                    )
                tensor.data = view
                attached.append(name)
        return attached

    def __repr__(self) -> str:
        return f"deltapack.Resident(active={self.active!r})"


__all__ = ["Resident"]
