"""Type stubs of the compiled module ``deltapack._native`` (the PyO3 layer).

Tensors cross as ``(name, safetensors dtype name, shape, uint8 array)`` tuples; reports as
JSON text. Use the ``deltapack`` package's functions rather than these.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

Bytes = npt.NDArray[np.uint8]
TensorTuple = Tuple[str, str, List[int], Bytes]

def make(
    base: str,
    finetuned: str,
    out: str,
    parents: List[str],
    args: Dict[str, Any],
    threads: Optional[int] = None,
) -> str:
    """Make a delta; returns the report as JSON."""

def apply(
    base: str, deltas: List[str], out: str, force: bool = False, sync: bool = False, threads: Optional[int] = None
) -> str:
    """Rebuild into a directory; returns the report as JSON."""

def verify(base: str, deltas: List[str], finetuned: Optional[str] = None, threads: Optional[int] = None) -> str:
    """Rebuild in memory and check; returns the report as JSON."""

def inspect(delta: str) -> str:
    """The delta's summary as JSON."""

def cli_main(argv: List[str]) -> int:
    """Run the deltapack command line on ``argv``; returns its exit status."""

def checkpoint_tensors(checkpoint: str) -> List[str]:
    """The tensor names of a checkpoint."""

def checkpoint_dtypes(checkpoint: str) -> List[Tuple[str, str]]:
    """The (name, safetensors dtype) of every tensor of a checkpoint."""

def delta_scales(delta: str) -> List[Tuple[str, List[int], bool, Any]]:
    """The (name, shape, zeros, scales) of a delta's sign and sign-axis tensors.

    Scales are a float (sign) or a (rows, cols) pair of lists (sign-axis).
    """

def remake_with_scales(
    base: str,
    finetuned: str,
    delta: str,
    out: str,
    scales: Dict[str, Any],
    force: bool = False,
    threads: Optional[int] = None,
) -> str:
    """Makes ``delta`` again with new 1-bit scales, every chunk payload (sign) kept.

    Returns the make report as JSON.
    """

def load(
    base: str, deltas: List[str], aux_store: Optional[str] = None, threads: Optional[int] = None
) -> Tuple[List[TensorTuple], Dict[str, bytes], str, str]:
    """The whole fine-tune: tensors, other files, metadata (JSON), report (JSON)."""

def save(
    base: str,
    tensors: Sequence[TensorTuple],
    out: str,
    parents: List[str],
    args: Dict[str, Any],
    files: Optional[str] = None,
    metadata: Optional[str] = None,
    label: Optional[str] = None,
    threads: Optional[int] = None,
) -> str:
    """A delta of tensors in memory; returns the report as JSON."""

def save_pair(
    base_tensors: Sequence[TensorTuple],
    tensors: Sequence[TensorTuple],
    out: str,
    args: Dict[str, Any],
    metadata: Optional[str] = None,
    threads: Optional[int] = None,
) -> str:
    """A delta with both sides in memory; returns the report as JSON."""

def load_on(
    base_tensors: Sequence[TensorTuple], deltas: List[str], threads: Optional[int] = None
) -> Tuple[List[TensorTuple], str]:
    """The fine-tune's tensors rebuilt on a base held in memory."""

def import_wdelta(
    wdelta: str,
    base: str,
    out: str,
    force: bool = False,
    check_base: bool = True,
    base_id: Optional[str] = None,
    threads: Optional[int] = None,
) -> str:
    """A deltatensors .wdelta as an exact delta; returns the report as JSON."""

class Reader:
    """Random access to the model a delta or chain rebuilds."""

    def __init__(self, base: str, deltas: List[str], aux_store: Optional[str] = None) -> None: ...
    def tensors(self) -> List[Tuple[str, str, List[int]]]:
        """Names, dtypes and shapes, in file order."""
    def tensor(self, name: str) -> Bytes:
        """One tensor's bytes, rebuilt and checked."""
    def metadata(self) -> str:
        """The weight files' metadata as JSON."""
    def files(self) -> List[str]:
        """The other files' paths."""
    def file(self, path: str) -> bytes:
        """One other file's contents, checked."""

class Store:
    """An opened store."""

    def __init__(self, root: str) -> None: ...
    @staticmethod
    def init(root: str, base: str, name: Optional[str] = None) -> Store:
        """Create a store holding ``base``."""
    @property
    def root(self) -> str:
        """The store's directory."""
    def add(
        self, name: str, finetuned: str, parent: Optional[str], args: Dict[str, Any], threads: Optional[int] = None
    ) -> str:
        """Add a fine-tune; returns JSON."""
    def get(self, name: str, out: str, force: bool = False, threads: Optional[int] = None) -> str:
        """Rebuild an entry into a directory; returns JSON."""
    def load(self, name: str, threads: Optional[int] = None) -> Tuple[List[TensorTuple], Dict[str, bytes], str, str]:
        """Rebuild an entry in memory."""
    def chain(self, name: str) -> Tuple[str, List[str]]:
        """The base directory and delta files of an entry."""
    def verify(self, name: str, finetuned: Optional[str] = None, threads: Optional[int] = None) -> str:
        """Rebuild an entry in memory and check it; returns JSON."""
    def list(self) -> str:
        """The manifest and totals as JSON."""
    def remove(self, name: str, reparent: bool = False) -> List[str]:
        """Remove an entry; returns the entries re-coded."""
    def fsck(self, grace: Optional[float] = None) -> str:
        """Check every entry; returns JSON."""

class Resident:
    """A base in memory, switchable in place; tensors as views of its memory."""

    def __init__(self, base: str) -> None: ...
    def switch_to_chain(self, chain: List[str]) -> str:
        """Switch to a chain's model (empty: the base); returns the report as JSON."""
    def active_chain(self) -> List[str]:
        """The delta files held, from the base."""
    def undo_bytes(self) -> int:
        """Memory held to switch back."""
    def tensors(self) -> List[TensorTuple]:
        """Every tensor now, as views of the model's memory."""

class Owner:
    """The numpy base object of views of one buffer of a Resident."""

class Server:
    """Fine-tunes of one base held as packed deltas (the engine of ``deltapack.torch``)."""

    def __init__(self, threads: int) -> None: ...
    def add(
        self, deltas: List[str], base: Optional[str] = None, base_tensors: Optional[List[TensorTuple]] = None
    ) -> Tuple[int, str]:
        """Load a fine-tune on a base path or in-memory tensors; its index and a JSON report."""
    def matmul(self, tensor: str, x: np.ndarray, tenants: np.ndarray, rows: int) -> np.ndarray:
        """``x @ Δᵀ`` of ``tensor`` per row and its fine-tune (-1: the base), f32."""
    def rows(self, tenant: int, tensor: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a packed ``Δ``, dense f32."""
    def dense(self, tenant: int, tensor: str) -> np.ndarray:
        """The bytes of a tensor held densely."""
    def drop_dense(self, tenant: int) -> None:
        """Free the tensors held densely."""
    def bytes(self, tenant: int) -> int:
        """Bytes held for a fine-tune."""
