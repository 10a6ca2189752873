"""Many fine-tunes of one or more bases in one directory: :class:`Store`."""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from deltapack import _native
from deltapack._tensors import convert


class Store:
    """A store: bases and named deltas chained to one another, as ``deltapack store`` uses it.

    ``Store(path)`` opens an existing store; :meth:`Store.init` creates one. Each entry is a
    delta chained to the entry nearest to it (chosen by ``add``), so a training run's
    checkpoints or many fine-tunes of one base cost a fraction of independent deltas. Every
    method takes the store's lock, so several processes may use one store on a local disk.
    """

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:  # noqa: F821
        import os

        self._native = _native.Store(os.fspath(path))

    @classmethod
    def init(cls, path, base, *, name: Optional[str] = None) -> Store:
        """Create a store at ``path`` (if needed) holding ``base`` (named ``name``)."""
        import os

        store = cls.__new__(cls)
        store._native = _native.Store.init(os.fspath(path), os.fspath(base), name)
        return store

    @property
    def path(self) -> str:
        """The store's directory."""
        return str(self._native.root)

    def add(
        self,
        name: str,
        finetuned,
        *,
        parent: Optional[str] = None,
        codec: str = "exact",
        max_error: Optional[float] = None,
        tensor_codecs: Union[None, Mapping[str, str], Iterable[str]] = None,
        threads: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Add the fine-tune at ``finetuned`` (a model directory) as entry ``name``.

        ``parent`` names the entry to code against (default: the nearest one, or the base).
        Returns ``{"entry": ..., "report": ..., "seconds": ...}`` as the CLI's JSON.
        """
        import os

        from deltapack import _make_args

        args = _make_args(codec, max_error, tensor_codecs, False, None, False, 1 << 21, False, None)
        return json.loads(self._native.add(name, os.fspath(finetuned), parent, args, threads))

    def get(self, name: str, out, *, force: bool = False, threads: Optional[int] = None) -> Dict[str, Any]:
        """Rebuild entry ``name`` into the directory ``out``; returns the apply report."""
        import os

        return json.loads(self._native.get(name, os.fspath(out), force, threads))

    def load(self, name: str, framework: str = "pt", device: Any = "cpu", *, threads: Optional[int] = None):
        """Rebuild entry ``name`` in memory: its state dict, as :func:`deltapack.load` gives it."""
        raw, _files, _meta, _report = self._native.load(name, threads)
        return {n: convert(framework, dtype, shape, data, device) for n, dtype, shape, data in raw}

    def verify(self, name: str, *, finetuned=None, threads: Optional[int] = None) -> Dict[str, Any]:
        """Rebuild entry ``name`` in memory and check it, writing nothing.

        With ``finetuned`` (a model directory), every rebuilt byte is compared with it; a
        difference raises :class:`deltapack.MismatchError`.
        """
        import os

        ft = None if finetuned is None else os.fspath(finetuned)
        return json.loads(self._native.verify(name, ft, threads))

    def chain(self, name: str) -> Tuple[str, List[str]]:
        """The base directory and the delta files of entry ``name``, in order from the base."""
        base, deltas = self._native.chain(name)
        return str(base), [str(d) for d in deltas]

    def list(self) -> Dict[str, Any]:
        """The manifest (bases and entries) and totals, as ``store list --json``."""
        return json.loads(self._native.list())

    def names(self) -> List[str]:
        """The entries' names, in the order they were added."""
        return [e["name"] for e in self.list()["manifest"]["entries"]]

    def remove(self, name: str, *, reparent: bool = False) -> List[str]:
        """Remove entry ``name``; returns the names of the entries re-coded.

        With ``reparent``, entries coded against it are re-coded against its parent (else
        removing an entry others depend on is an error).
        """
        return self._native.remove(name, reparent)

    def fsck(self, *, grace: Optional[float] = None) -> Dict[str, Any]:
        """Rebuild and check every entry; remove leftovers of interrupted operations.

        In object storage, objects the manifest does not name are removed once they are
        ``grace`` seconds old (default one hour: an add in progress elsewhere has such objects).
        """
        return json.loads(self._native.fsck(grace))

    def __repr__(self) -> str:
        return f"deltapack.Store({self.path!r})"
