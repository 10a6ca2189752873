"""Diff pruning: train a sparse delta on top of frozen base weights, and store it as one.

Each selected parameter θ of a module becomes θ + Δθ (a ``torch.nn.utils.parametrize``
parametrization): θ stays frozen and untouched, Δθ is trainable and starts at zero. A
sparsity term pushes Δθ towards few changes; at a chosen point of training the diffs are
projected onto the requested density by magnitude (exactly that many positions are kept,
over the whole model), and training goes on with that mask fixed. Two methods:

- ``"l1"``: the penalty λ‖Δθ‖₁ of the first source document (Δθ = w);
- ``"l0"``: Guo, Rush and Kim (ACL 2021): Δθ = z ⊙ w with hard-concrete gates z (Louizos et
  al. 2018), whose expected L0 norm is the penalty.

``structured="row"`` or ``"tensor"`` adds the paper's group term: one more gate per row or per
tensor for ``"l0"`` (Δθ = z_group ⊙ z ⊙ w, and the expected number of open groups, weighted
by their size, joins the penalty), a group lasso Σ √|g| ‖Δθ_g‖₂ for ``"l1"``.

The result is stored with :meth:`DiffPruning.save` as an exact deltapack delta of the merged
weights, in the base checkpoint's dtypes: a position whose merged value rounds back to the
base's is not a change, and the delta costs only the positions that changed.

Typical use, in a plain PyTorch loop::

    dp = DiffPruning(model, density=0.01)
    opt = torch.optim.AdamW(dp.param_groups(lr=2e-4))
    for step in range(steps):
        loss = task_loss(model, batch) + dp.penalty()
        loss.backward(); opt.step(); opt.zero_grad()
        dp.step((step + 1) / steps)
    dp.save("ft.dpk", base="path/to/base")

or with the Hugging Face ``Trainer``: :class:`DiffPruningTrainer`.
"""

from __future__ import annotations

import fnmatch
import math
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from deltapack.errors import BadInputError

# Louizos et al.'s stretch of the concrete distribution: gates are exactly 0 or 1 with
# non-zero probability. Guo et al. stretch wider (-1.5, 1.5) with temperature 1; both work,
# these train faster on few steps.
_GAMMA, _ZETA, _BETA = -0.1, 1.1, 2.0 / 3.0
_LOG_RATIO = math.log(-_GAMMA / _ZETA)


def _hard_concrete(log_alpha: torch.Tensor, training: bool) -> torch.Tensor:
    """Gates in [0, 1]: sampled while training, their deterministic value otherwise."""
    if training:
        u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / _BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def _open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0): the expected L0 norm, per gate."""
    return torch.sigmoid(log_alpha - _BETA * _LOG_RATIO)


class _Diff(nn.Module):
    """The parametrization θ -> θ + Δθ of one parameter (shared by modules tying it)."""

    def __init__(self, theta: torch.Tensor, method: str, structured: Optional[str], dtype, alpha_init: float):
        super().__init__()
        self.structured = structured
        self.diff = nn.Parameter(torch.zeros(theta.shape, dtype=dtype, device=theta.device))
        self.log_alpha = None
        self.group_log_alpha = None
        if method == "l0":
            self.log_alpha = nn.Parameter(torch.full(theta.shape, alpha_init, dtype=torch.float32, device=theta.device))
            if structured is not None:
                shape = _group_shape(theta, structured)
                self.group_log_alpha = nn.Parameter(
                    torch.full(shape, alpha_init, dtype=torch.float32, device=theta.device)
                )
        # Set by the projection: the positions that keep a diff (then Δθ = mask ⊙ w).
        self.register_buffer("mask", None, persistent=False)

    def delta(self, training: bool) -> torch.Tensor:
        """Δθ as the forward pass uses it (gates sampled while training, before the mask)."""
        if self.mask is not None:
            return self.diff * self.mask
        if self.log_alpha is None:
            return self.diff
        z = _hard_concrete(self.log_alpha, training)
        if self.group_log_alpha is not None:
            z = z * _hard_concrete(self.group_log_alpha, training)
        return z * self.diff

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        d = self.delta(self.training)
        # The sum is rounded once, to θ's dtype, as the merged weights will be.
        return (theta.to(d.dtype) + d).to(theta.dtype)

    def penalty(self, theta: torch.Tensor) -> torch.Tensor:
        """The sparsity term of this parameter (zero once the mask is fixed)."""
        if self.mask is not None:
            return self.diff.new_zeros(())
        if self.log_alpha is not None:
            p = _open_probability(self.log_alpha)
            if self.group_log_alpha is None:
                return p.sum()
            g = _open_probability(self.group_log_alpha)
            # An element changes only if its group gate and its own gate are both open.
            return (p * g).sum() + (g * (theta.numel() / g.numel())).sum()
        loss = self.diff.abs().sum()
        if self.structured is not None:
            rows = self.diff.reshape(self.diff.shape[0], -1) if self.structured == "row" else self.diff.reshape(1, -1)
            loss = loss + math.sqrt(rows.shape[1]) * rows.norm(dim=1).sum()
        return loss


def _group_shape(theta: torch.Tensor, structured: str) -> Tuple[int, ...]:
    """The shape of one gate per row (broadcast over the other axes) or per tensor."""
    if structured == "tensor" or theta.dim() == 0:
        return (1,) * theta.dim()
    return (theta.shape[0],) + (1,) * (theta.dim() - 1)


class _Target:
    """A parameter under diff pruning (θ, frozen): its diff, and every (module, name) holding it."""

    def __init__(self, param: nn.Parameter, diff: _Diff):
        self.param, self.diff = param, diff
        self.owners: List[Tuple[nn.Module, str]] = []

    def merged(self) -> torch.Tensor:
        """θ + Δθ in θ's dtype, with the deterministic gates (no graph).

        Where Δθ is zero the value is θ's own bits: -0.0 + 0.0 would otherwise turn into
        +0.0, a change.
        """
        with torch.no_grad():
            d = self.diff.delta(False)
            return torch.where(d != 0, (self.param.to(d.dtype) + d).to(self.param.dtype), self.param)


class DiffPruning:
    """Wraps ``model`` in place so that training learns a sparse diff from its weights.

    ``density`` is the fraction of *all* the model's floating-point values that may end up
    different from the base's. ``method`` is ``"l0"`` (hard-concrete gates, Guo et al.) or
    ``"l1"`` (λ‖Δθ‖₁). ``include`` / ``exclude`` are globs on parameter names choosing what
    is trained (default: every floating-point parameter, embeddings included); parameters
    left out stay frozen. ``structured`` (``"row"`` or ``"tensor"``) adds a group term.
    ``project_at`` is the fraction of training at which the diffs are projected onto
    ``density`` by magnitude; the rest trains with that mask fixed. ``penalty_weight``
    scales :meth:`penalty` (per parameter: the L0 expectation or the L1 norm is a sum over
    millions of values). ``diff_dtype`` is the diffs' dtype (float32: a bf16 model still
    learns diffs smaller than its rounding step, which add up until they move a weight).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        density: float,
        method: str = "l0",
        include: Optional[Sequence[str]] = None,
        exclude: Sequence[str] = (),
        structured: Optional[str] = None,
        project_at: float = 0.5,
        penalty_weight: Optional[float] = None,
        alpha_init: float = 3.0,
        diff_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise BadInputError(f"density must be in (0, 1], not {density}")
        if method not in ("l0", "l1"):
            raise BadInputError(f"method must be 'l0' or 'l1', not {method!r}")
        if structured not in (None, "row", "tensor"):
            raise BadInputError(f"structured must be None, 'row' or 'tensor', not {structured!r}")
        if not 0.0 <= project_at <= 1.0:
            raise BadInputError(f"project_at must be in [0, 1], not {project_at}")
        self.model, self.density_target, self.method = model, density, method
        self.project_at = project_at
        self.penalty_weight = _default_penalty(method) if penalty_weight is None else penalty_weight
        self.projected = False
        self.total = _float_values(model)
        self._targets = self._wrap(include, exclude, structured, diff_dtype, alpha_init)
        if not self._targets:
            raise BadInputError("no floating-point parameter matches include/exclude: nothing to train")

    # -- wrapping ---------------------------------------------------------------------------
    def _wrap(self, include, exclude, structured, dtype, alpha_init) -> List[_Target]:
        by_param: Dict[int, _Target] = {}
        owners = []
        for mod_name, module in self.model.named_modules(remove_duplicate=False):
            for name, p in list(module.named_parameters(recurse=False)):
                full = f"{mod_name}.{name}" if mod_name else name
                if not p.is_floating_point() or not _selected(full, include, exclude):
                    continue
                if id(p) not in by_param:
                    by_param[id(p)] = _Target(p, _Diff(p, self.method, structured, dtype, alpha_init))
                owners.append((module, name, by_param[id(p)]))
        # Restored by `merge`: the wrapper freezes every parameter of the model.
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for module, name, target in owners:
            # A tied parameter gets the same parametrization object in every module holding
            # it: one diff, and the tie holds in the merged model.
            parametrize.register_parametrization(module, name, target.diff)
            target.owners.append((module, name))
        for t in by_param.values():
            for p in t.diff.parameters():
                p.requires_grad_(True)
        return list(by_param.values())

    # -- what training uses -----------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer trains: the diffs and, for ``"l0"``, the gates."""
        for t in self._targets:
            yield from t.diff.parameters()

    def param_groups(self, lr: float, *, gate_lr: Optional[float] = None, weight_decay: float = 0.0) -> List[dict]:
        """Optimizer parameter groups for the diffs and the gates.

        The diffs train at ``lr`` with ``weight_decay`` (which pulls a diff towards the base,
        not a weight towards zero), the gates at ``gate_lr`` (default ``100 * lr``: a gate
        moves in logits, a diff in weight units) without decay.
        """
        diffs = [t.diff.diff for t in self._targets]
        gates = [p for t in self._targets for p in (t.diff.log_alpha, t.diff.group_log_alpha) if p is not None]
        groups = [{"params": diffs, "lr": lr, "weight_decay": weight_decay}]
        if gates:
            groups.append({"params": gates, "lr": 100 * lr if gate_lr is None else gate_lr, "weight_decay": 0.0})
        return groups

    def penalty(self) -> torch.Tensor:
        """The sparsity term to add to the task loss (zero once the mask is fixed)."""
        if self.projected:
            return torch.zeros(())
        total = sum(t.diff.penalty(t.param) for t in self._targets)
        return self.penalty_weight * total

    def step(self, progress: float) -> None:
        """Runs the schedule: call it once per optimizer step.

        ``progress`` is the fraction of training done (0..1). At ``project_at`` the diffs are
        projected onto the target density and the mask is fixed from then on.
        """
        if not self.projected and progress >= self.project_at:
            self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Projects the diffs onto the target density by magnitude and fixes that mask.

        Exactly ``round(density * all float values)`` positions keep their diff: those with
        the largest |Δθ|, gates at their expected value, over the whole model.
        """
        k = min(round(self.density_target * self.total), sum(t.param.numel() for t in self._targets))
        scores = [t.diff.delta(False).abs().float() for t in self._targets]
        masks = _top_k(scores, k)
        for t, m in zip(self._targets, masks):
            d = t.diff
            baked = d.delta(False)
            d.diff.copy_(baked * m)
            d.mask = m.to(d.diff.dtype)
            for p in (d.log_alpha, d.group_log_alpha):
                if p is not None:
                    p.requires_grad_(False)
                    p.grad = None
        self.projected = True

    # -- results ----------------------------------------------------------------------------
    @torch.no_grad()
    def density(self) -> float:
        """The fraction of all the model's float values that differ from the base's now.

        Measured in the parameters' dtype, with the gates at their expected value.
        """
        changed = sum(int((t.merged() != t.param).sum()) for t in self._targets)
        return changed / self.total

    def merged_state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's state dict with θ + Δθ for each diff-pruned parameter.

        Keys are the parameters' own names (no ``parametrizations``); the model is left as
        it is.
        """
        merged = {id(t.param): t.merged() for t in self._targets}
        names = {id(t.param): t for t in self._targets}
        out: Dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if ".parametrizations." in key:
                # "<module>.parametrizations.<name>.original" holds θ; the diff's own
                # tensors are not part of the model.
                head, _, tail = key.partition(".parametrizations.")
                name, _, rest = tail.partition(".")
                if rest == "original" and id(value) in names:
                    out[f"{head}.{name}" if head else name] = merged[id(value)]
                continue
            out[key] = value.detach()
        return out

    def save(
        self,
        path: Any,
        base: Any,
        *,
        dtype: Any = "base",
        files: Any = None,
        force: bool = False,
        **make_options: Any,
    ) -> Dict[str, Any]:
        """Writes an exact deltapack delta of the merged model against ``base``.

        ``base`` is a model directory, a ``.safetensors`` file or a hub ID. Returns
        :func:`deltapack.save`'s report with ``density`` added (the stored share of changed
        values).
        ``dtype="base"`` stores each float tensor in the dtype the base checkpoint holds it in
        (the model trains in float32 from a bf16 base, its delta is bf16 like the base);
        a torch dtype stores every float tensor in it; ``None`` keeps the model's dtypes.
        ``files`` is a directory whose config and tokenizer files travel with the delta
        (default: the base's, when ``base`` is a directory; for a transformers model its own
        ``config.json`` replaces the base's).
        """
        import deltapack

        state = self.merged_state_dict()
        state = _cast(state, base, dtype)
        with tempfile.TemporaryDirectory(prefix="deltapack-diffprune-") as tmp:
            carried = _files_for(self.model, base, files, tmp)
            report = deltapack.save(base, state, path, files=carried, force=force, **make_options)
        report["density"] = _stored_density(path, self.total)
        return report

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Bakes θ + Δθ into the module's ordinary parameters and removes the wrapping.

        Values keep the parameters' dtype; tied parameters stay tied. Returns the model.
        """
        for t in self._targets:
            value = t.merged()
            for module, name in t.owners:
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            t.param.copy_(value)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._targets = []
        return self.model


def _default_penalty(method: str) -> float:
    """The default penalty weight of ``method``.

    It moves the diffs on a few hundred steps without drowning a task loss of order 1: the
    L0 expectation is a count of open gates, the L1 norm a sum of weight-sized diffs.
    """
    return 2e-7 if method == "l0" else 1e-4


def _selected(name: str, include: Optional[Sequence[str]], exclude: Sequence[str]) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in exclude)


def _float_values(model: nn.Module) -> int:
    """Number of floating-point values the model's state dict holds (shared tensors once)."""
    seen, n = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            n += t.numel()
    return n


def _top_k(scores: List[torch.Tensor], k: int) -> List[torch.Tensor]:
    """Masks keeping exactly the ``k`` largest scores (>= 0) over all tensors.

    The threshold is found by bisection on the scores' float32 bit patterns (ordered like the
    values for non-negative floats) with one counting pass per step, so no tensor the size of
    the model is ever concatenated; ties at the threshold are kept in tensor order.
    """
    bits = [s.contiguous().view(torch.int32) for s in scores]
    if k <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    lo, hi = 0, 0x7F800001  # the threshold is in [0, +inf]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(int((b >= mid).sum()) for b in bits) >= k:
            lo = mid
        else:
            hi = mid
    masks = [b > lo for b in bits]
    room = k - sum(int(m.sum()) for m in masks)
    for b, m in zip(bits, masks):
        if room <= 0:
            break
        ties = (b == lo).flatten().nonzero().flatten()[:room]
        m.view(-1)[ties] = True
        room -= ties.numel()
    return masks


def _base_dtypes(base: Any) -> Dict[str, torch.dtype]:
    """The dtype of every tensor of the base checkpoint."""
    from deltapack import _native, _path

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return {name: names.get(dt) for name, dt in _native.checkpoint_dtypes(_path(base))}


def _cast(state: Dict[str, torch.Tensor], base: Any, dtype: Any) -> Dict[str, torch.Tensor]:
    """``state`` with its float tensors in the dtype ``save`` was asked for."""
    if dtype is None:
        return state
    want = _base_dtypes(base) if dtype == "base" else None
    out = {}
    for name, t in state.items():
        target = want.get(name) if want is not None else dtype
        out[name] = t.to(target) if t.is_floating_point() and target is not None else t
    return out


def _files_for(model: nn.Module, base: Any, files: Any, tmp: str) -> Optional[str]:
    """The directory of files to carry with the delta.

    ``files`` when given, else the base's with the model's own config (a transformers
    model's ``config.json``) in place of the base's.
    """
    if files is not None:
        return os.fspath(files)
    base_dir = os.fspath(base) if isinstance(base, (str, os.PathLike)) and os.path.isdir(base) else None
    config = getattr(model, "config", None)
    if base_dir is None and config is None:
        return None
    if base_dir is not None:
        for name in os.listdir(base_dir):
            src = os.path.join(base_dir, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
                shutil.copyfile(src, os.path.join(tmp, name))
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(os.path.join(tmp, "config.json"))
    return tmp


def _stored_density(path: Any, total: int) -> float:
    """The share of the model's float values the delta at ``path`` records as changed."""
    import deltapack

    info = deltapack.inspect(path)
    return (info.get("changed") or 0) / total if total else 0.0


try:  # The Trainer path needs transformers; the rest of the module does not.
    from transformers import Trainer, TrainerCallback
except ImportError:  # pragma: no cover - transformers is optional
    Trainer = TrainerCallback = None  # type: ignore[assignment,misc]


if Trainer is not None:

    class DiffPruningCallback(TrainerCallback):
        """Runs :meth:`DiffPruning.step` after every optimizer step of a ``Trainer``."""

        def __init__(self, dp: DiffPruning) -> None:
            self.dp = dp

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            """Advances the schedule to the step the Trainer has reached."""
            self.dp.step(state.global_step / max(state.max_steps, 1))
            return control

    class DiffPruningTrainer(Trainer):
        """A ``Trainer`` that trains a :class:`DiffPruning`.

        It adds the penalty to the loss, optimizes the diffs and gates only
        (:meth:`DiffPruning.param_groups`, at the Trainer's learning rate and weight decay)
        and runs the schedule every step. Pass the wrapper as ``diff_pruning=``; the other
        arguments are the Trainer's.
        """

        def __init__(self, *args: Any, diff_pruning: DiffPruning, **kwargs: Any) -> None:
            self.diff_pruning = diff_pruning
            callbacks = list(kwargs.pop("callbacks", None) or []) + [DiffPruningCallback(diff_pruning)]
            super().__init__(*args, callbacks=callbacks, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            """The Trainer's loss plus :meth:`DiffPruning.penalty`."""
            out = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            loss, outputs = out if isinstance(out, tuple) else (out, None)
            loss = loss + self.diff_pruning.penalty().to(loss.device)
            return (loss, outputs) if return_outputs else loss

        def create_optimizer(self, model=None):
            """The Trainer's optimizer class over :meth:`DiffPruning.param_groups`."""
            if self.optimizer is None:
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                kwargs.pop("lr", None)
                groups = self.diff_pruning.param_groups(self.args.learning_rate, weight_decay=self.args.weight_decay)
                self.optimizer = cls(groups, **kwargs)
            return self.optimizer


__all__ = ["DiffPruning", "DiffPruningCallback", "DiffPruningTrainer"]
