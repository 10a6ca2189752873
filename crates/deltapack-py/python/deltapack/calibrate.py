"""Calibration: learn the scales of a 1-bit delta from a small set of inputs (distillation).

A ``sign`` or ``sign-axis`` delta made by ``make`` stores the sign of every change and
scales fitted to the weights (a rank-1 fit of ``|D|``): what is closest to the fine-tune's
weights, not what makes the model compute what the fine-tune computes. :func:`distill`
keeps the signs and learns the scales so that the compressed model's outputs match the
fine-tune's on calibration inputs, as BitDelta does for one scale per matrix and the per-axis
paper (the second source document) for per-row or per-column scales:

1. **Axis** (``axis="auto"``): for each linear layer, the layer's inputs on the calibration
   set give the Gram matrix ``G = XᵀX``; per-row, per-column and per-row-and-column scales are
   each fitted in closed form to minimise the layer's output error ``‖X (W_ft − Ŵ)ᵀ‖²``, and
   the layer keeps one axis (rows or columns, the better of the two) when its error is within
   ``tolerance`` of the best, else both (one vector of scales overfits a small calibration set
   less; the container stores a row and a
   column vector either way, so the choice costs nothing in size). Embedding matrices keep
   row-and-column scales (their "inputs" are token ids).
2. **Distillation**: every scale is trained (Adam, in log space so it stays positive) with the
   signs frozen, end to end, to match the fine-tune's outputs: the mean-pooled sentence
   embeddings of an encoder (cosine distance), the next-token distributions of a causal LM
   (KL divergence).
3. **Output**: the delta is made again with the learned scales (``remake_with_scales`` in the
   engine): every chunk payload, hence every sign, is the input delta's byte for byte, which
   the engine checks; only the scales and the recorded fingerprints and quality change. The
   result applies, verifies, inspects and hot-swaps like any delta.

Memory: the whole model is trained at once, which holds the fine-tune (the teacher) in f32,
the base weights of the 1-bit tensors in f32, their signs in int8 and, during a step, one
set of rebuilt weights (the autograd function saves only signs and scales for backward):
about 3.25 times the fine-tune's f32 size (one more with kept zeros: each value's ULP), plus
one batch's activations and torch itself (1.5 GB peak for MiniLM's 91 MB, of which 0.74 GB is
torch, transformers and the loaded fine-tune). That fits the models one calibrates on a CPU;
end-to-end training is what matches the outputs (a layer-by-layer scheme would bound the memory to one
layer's but match each layer's output in isolation), and step 1 needs only one Gram matrix
per 1-bit linear layer.

From the command line: ``python -m deltapack.calibrate --help``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from deltapack import _native
from deltapack.errors import BadInputError, CorruptDeltaError, DeltapackError, DeltapackIOError, WrongBaseError

PathLike = Union[str, "os.PathLike[str]"]

AXES = ("row", "col", "both")


@dataclass
class CalibrationReport:
    """What :func:`distill` did.

    ``loss_before`` and ``loss_after`` are the distillation loss on the calibration set with
    the input delta's scales and with the learned ones; ``layer_error`` maps each tensor to
    its layer-output error (relative to the fine-tune's change of that output) with the
    input delta's scales and with the chosen axis's fit; ``axes`` is the axis chosen per
    tensor; ``peak_rss_mib`` the process's peak resident memory (Linux; ``None`` elsewhere);
    ``make`` is the engine's report of the written delta (as ``deltapack.make``).
    """

    out: str
    steps: int
    seconds: float
    loss_before: float
    loss_after: float
    axes: Dict[str, str] = field(default_factory=dict)
    layer_error: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    peak_rss_mib: Optional[float] = None
    make: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        """The report as a JSON-serialisable dict."""
        return {
            "out": self.out,
            "steps": self.steps,
            "seconds": self.seconds,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "axes": self.axes,
            "layer_error": self.layer_error,
            "peak_rss_mib": self.peak_rss_mib,
            "make": self.make,
        }


def read_texts(path: PathLike, limit: Optional[int] = None) -> List[str]:
    """The non-empty lines of a text file, at most ``limit`` of them."""
    with open(os.fspath(path), encoding="utf-8") as fh:
        lines = [line.rstrip("\n") for line in fh if line.strip()]
    return lines[:limit] if limit is not None else lines


def read_jsonl(path: PathLike, field: str, limit: Optional[int] = None) -> List[str]:
    """The string ``field`` of each record of a jsonl file, at most ``limit`` of them."""
    out: List[str] = []
    with open(os.fspath(path), encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            value = json.loads(line).get(field)
            if not isinstance(value, str):
                raise BadInputError(f"{os.fspath(path)}:{n}: no string field '{field}'")
            out.append(value)
            if limit is not None and len(out) == limit:
                break
    return out


# ---- the model side: which parameters are 1-bit, their base values and signs


class _SignParam:
    """One 1-bit tensor during calibration: base values, frozen signs, learnable log-scales."""

    def __init__(self, name: str, key: str, base, finetuned, zeros: bool, scales) -> None:
        import torch

        self.name, self.key = name, key
        b = base.to(torch.float32).reshape(finetuned.shape[0], -1) if finetuned.dim() > 1 else base.float()
        f = finetuned.detach().to(torch.float32).reshape(b.shape)
        # Non-finite values are kept exactly by the codec: no sign, and the fine-tune's value.
        keep = torch.isfinite(b) & torch.isfinite(f)
        d = torch.where(keep, f - b, torch.zeros_like(f))
        self.base = torch.where(keep, b, f)
        # With `zeros` the codec moves each value by a whole number (at least 1) of its base
        # value's ULPs: the forward pass does the same, the gradient passes straight through.
        self.ulp = _ulps(base).reshape(b.shape) if zeros else None
        sign = torch.where(d < 0, -1, 1).to(torch.int8)
        if zeros:
            sign = torch.where(d == 0, torch.zeros_like(sign), sign)
        self.sign = torch.where(keep, sign, torch.zeros_like(sign))
        self.delta = d
        self.shape = finetuned.shape
        # What the rebuild rounds to: the checkpoint's dtype (float32 holds it exactly).
        self.dtype = base.dtype
        if isinstance(scales, float):
            self.init = (torch.tensor(scales, dtype=torch.float64), None)
        else:
            rows, cols = scales
            self.init = (torch.tensor(rows, dtype=torch.float64), torch.tensor(cols, dtype=torch.float64))
        self.fit = self.init
        self.axis = "tensor" if self.init[1] is None else "both"
        self.log: List[Any] = []

    def start(self, fit) -> None:
        """Takes ``fit`` (row, column) as the starting scales, with the log-scales to train.

        Which ones :attr:`axis` says: one, the rows', the columns', or both.
        """
        import torch

        self.fit = fit
        sizes = {"tensor": [()], "row": [len(fit[0])], "col": [len(fit[1])]}.get(self.axis)
        sizes = sizes or [len(fit[0]), len(fit[1])]
        self.log = [torch.zeros(n, dtype=torch.float32, requires_grad=True) for n in sizes]

    def scales(self) -> Tuple[Any, Optional[Any]]:
        """The current (row, column) scales, column ``None`` for a per-tensor scale."""
        import torch

        r0, c0 = (v.to(torch.float32) if v is not None else None for v in self.fit)
        if c0 is None:
            return r0 * torch.exp(self.log[0]), None
        if self.axis == "row":
            return r0 * torch.exp(self.log[0]), c0
        if self.axis == "col":
            return r0, c0 * torch.exp(self.log[0])
        return r0 * torch.exp(self.log[0]), c0 * torch.exp(self.log[1])

    def weight(self, scales=None):
        """The reconstructed weight ``base + sign * scales``, differentiable in the scales.

        ``scales`` is a (row, column) pair to use instead of the current scales.
        """
        r, c = (v.to(self.base.dtype) if v is not None else None for v in scales) if scales else self.scales()
        return _sign_weight().apply(self.base, self.sign, self.ulp, r, c, self.dtype).reshape(self.shape)

    def stored(self) -> Union[float, Tuple[List[float], List[float]]]:
        """The scales as the engine takes them."""
        import torch

        with torch.no_grad():
            r, c = self.scales()
        if c is None:
            return float(r)
        return r.clamp(min=0).tolist(), c.clamp(min=0).tolist()


# (bits type, exponent shift, exponent mask, bias, mantissa bits) of the float dtypes.
_FORMATS = {"bfloat16": ("int16", 7, 0xFF, 127, 7), "float16": ("int16", 10, 0x1F, 15, 10)}
_FORMATS["float32"] = ("int32", 23, 0xFF, 127, 23)


def _ulps(base):
    """The spacing of values at each base value's exponent (subnormals: the smallest normal's)."""
    import torch

    name = str(base.dtype).removeprefix("torch.")
    if name not in _FORMATS:
        raise BadInputError(f"a 1-bit tensor with kept zeros in {name} is not supported; use bf16, f16 or f32")
    bits, shift, mask, bias, mant = _FORMATS[name]
    e = (base.view(getattr(torch, bits)).to(torch.int64) >> shift) & mask
    return torch.exp2((e.clamp(min=1) - bias - mant).to(torch.float32))


_SIGN_WEIGHT = None


def _sign_weight():
    """The autograd function ``round(base + sign * snap(r ⊗ c))`` (``r`` alone: a per-tensor scale).

    Written by hand so that backward keeps only the signs and the scales, not a model-sized
    magnitude per tensor: ``∂L/∂r_i = Σ_j g_ij s_ij c_j`` and ``∂L/∂c_j = Σ_i g_ij s_ij r_i``.
    The forward pass rebuilds what the codec does: with kept zeros (``ulp`` given) each move
    is snapped to whole ULPs, at least one, halves rounded away from zero; the result is
    rounded to the checkpoint's ``dtype``. The gradient passes straight through both roundings.
    """
    global _SIGN_WEIGHT
    if _SIGN_WEIGHT is not None:
        return _SIGN_WEIGHT
    import torch

    class SignWeight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, base, sign, ulp, r, c, dtype):
            mag = r if c is None else r[:, None] * c[None, :]
            if ulp is not None:
                # The codec's count of ULPs saturates at 2^63 (a base value of 0 has subnormal
                # ULPs, so its moves are tiny); an f32 quotient that overflows saturates too.
                steps = torch.clamp(torch.floor(mag / ulp + 0.5), min=1, max=2.0**63)
                mag = torch.where(mag == 0, mag, steps * ulp)
            ctx.save_for_backward(sign, r, c if c is not None else r)
            ctx.per_tensor = c is None
            w = base + sign * mag
            return w if dtype in (None, w.dtype) else w.to(dtype).to(w.dtype)

        @staticmethod
        def backward(ctx, grad):
            sign, r, c = ctx.saved_tensors
            g = grad * sign
            if ctx.per_tensor:
                return None, None, None, g.sum(), None, None
            return None, None, None, g @ c, r @ g, None

    _SIGN_WEIGHT = SignWeight
    return SignWeight


def _base_files(checkpoint: str) -> List[str]:
    """The safetensors files of a model directory, or the single file given."""
    files = [checkpoint] if os.path.isfile(checkpoint) else sorted(glob.glob(os.path.join(checkpoint, "*.safetensors")))
    if not files:
        raise BadInputError(f"{checkpoint}: no .safetensors files; give the base's model directory")
    return files


def _model_key(known: Set[str], prefix: str, name: str) -> Optional[str]:
    """The model's state-dict key of a checkpoint tensor (with or without the base prefix)."""
    for k in (name, name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else None, f"{prefix}.{name}"):
        if k in known:
            return k
    return None


def _sign_params(model, base: str, tensors: list) -> List[_SignParam]:
    from contextlib import ExitStack

    from safetensors import safe_open

    state = model.state_dict(keep_vars=True)
    known = set(state)
    prefix = getattr(model, "base_model_prefix", "")
    out = []
    with ExitStack() as stack:
        # Each base file opened once: tensor name -> its open file.
        where = {}
        for f in _base_files(base):
            st = stack.enter_context(safe_open(f, framework="pt"))
            where.update(dict.fromkeys(st.keys(), st))
        for name, shape, zeros, scales in tensors:
            key = _model_key(known, prefix, name)
            if key is None:
                raise BadInputError(f"tensor '{name}' of the delta is not a parameter of the fine-tune's model")
            if name not in where:
                raise BadInputError(f"tensor '{name}' of the delta is not in the base {base}")
            b = where[name].get_tensor(name)
            if list(b.shape) != list(shape) or list(state[key].shape) != list(shape):
                raise BadInputError(f"tensor '{name}': base, fine-tune and delta disagree on its shape")
            out.append(_SignParam(name, key, b, state[key], zeros, scales))
    return out


# ---- step 1: the axis of each linear layer, by its output error on the calibration inputs


def _row_fit(s, d, g):
    """Per-row scales minimising ``Σ_i (D_i − r_i S_i) G (D_i − r_i S_i)ᵀ``."""
    sg = s @ g
    den = (sg * s).sum(1)
    r = (sg * d).sum(1) / den.clamp(min=1e-30)
    return r.clamp(min=0)


def _col_fit(s, d, g, dg):
    """Per-column scales minimising ``Σ_i (D_i − S_i∘c) G (D_i − S_i∘c)ᵀ``: a linear system."""
    import torch

    m = g * (s.T @ s)
    v = (s * dg).sum(0)
    ridge = 1e-9 * m.diagonal().abs().mean().clamp(min=1e-30)
    c = torch.linalg.solve(m + ridge * torch.eye(len(v), dtype=m.dtype), v)
    return c.clamp(min=0)


def _layer_error(d, dhat, g) -> float:
    """``tr((D − D̂) G (D − D̂)ᵀ)``: the layer's squared output error summed over the inputs."""
    e = d - dhat
    return float(((e @ g) * e).sum())


def fit_axes(sign, delta, gram, init, rounds: int = 4) -> Dict[str, Tuple[Any, Any, float]]:
    """The closed-form fits of each axis for one matrix, with their layer-output errors.

    ``sign`` and ``delta`` are (out, in), ``gram`` is ``XᵀX`` of the layer's inputs, ``init``
    the (row, column) scales to start the alternating row-and-column fit from. Returns
    ``{axis: (rows, cols, error)}`` for ``"row"``, ``"col"``, ``"both"``, ``"init"`` (the
    input scales) and ``"zero"`` (no change at all: the fine-tune's change of the layer's
    output), in float64.
    """
    import torch

    s, d, g = sign.to(torch.float64), delta.to(torch.float64), gram.to(torch.float64)
    rows, cols = s.shape
    one_r, one_c = torch.ones(rows, dtype=torch.float64), torch.ones(cols, dtype=torch.float64)
    dg = d @ g
    out = {"zero": (None, None, _layer_error(d, torch.zeros_like(d), g))}
    r0, c0 = init
    out["init"] = (r0, c0, _layer_error(d, s * (r0[:, None] * c0[None, :]), g))
    r = _row_fit(s, d, g)
    out["row"] = (r, one_c, _layer_error(d, s * r[:, None], g))
    c = _col_fit(s, d, g, dg)
    out["col"] = (one_r, c, _layer_error(d, s * c[None, :], g))
    r, c = r0.clone(), c0.clone()
    for _ in range(rounds):
        r = _row_fit(s * c[None, :], d, g)
        c = _col_fit(s * r[:, None], d, g, dg)
    both = (r, c, _layer_error(d, s * (r[:, None] * c[None, :]), g))
    # The column solve is clamped to non-negative scales, so a round can do worse than its
    # start: keep the input scales when it did.
    out["both"] = both if both[2] <= out["init"][2] else out["init"]
    return out


def relative_error(fits: Dict[str, Tuple[Any, Any, float]], axis: str) -> float:
    """An axis's layer-output error relative to the fine-tune's change of that output."""
    change = fits["zero"][2]
    return math.sqrt(fits[axis][2] / change) if change > 0 else 0.0


def choose_axis(fits: Dict[str, Tuple[Any, Any, float]], tolerance: float = 0.01) -> str:
    """A layer's axis: ``"row"`` or ``"col"`` (the better) within ``tolerance`` of the best, else ``"both"``.

    Relative errors under 1e-4 count as equal: that is the rounding of the weights.
    """
    rel = {a: relative_error(fits, a) for a in AXES}
    best = min(rel.values())
    ok = [a for a in AXES if rel[a] <= best * (1 + tolerance) + 1e-4]
    singles = [a for a in ok if a != "both"]
    if not singles:
        return "both"
    return min(singles, key=lambda a: fits[a][2])


def _grams(model, params: List[_SignParam], batches, forward) -> Dict[str, Any]:
    """``XᵀX`` of each 1-bit linear layer's inputs over the batches, padding excluded."""
    import torch

    keys = {p.key: p for p in params}
    grams: Dict[str, Any] = {}
    hooks, mask = [], {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        key = f"{mod_name}.weight" if mod_name else "weight"
        if key not in keys:
            continue

        def hook(_m, inputs, _out, key=key):
            x = inputs[0].detach().to(torch.float32)
            m = mask.get("m")
            x = x[m.bool()] if m is not None and x.dim() == 3 and m.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])
            grams[key] = grams.get(key, 0) + x.T @ x

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                mask["m"] = b.get("attention_mask")
                forward(model, b)
    finally:
        for h in hooks:
            h.remove()
    return grams


# ---- step 2: distillation


def _batches(finetuned: str, calibration, batch_size: int, max_length: int) -> List[Dict[str, Any]]:
    """Calibration inputs as a list of model-input dicts."""
    import torch

    items = list(calibration)
    if not items:
        raise BadInputError("the calibration set is empty")
    if isinstance(items[0], str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(finetuned)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return [
            dict(
                tokenizer(
                    items[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
            )
            for i in range(0, len(items), batch_size)
        ]
    out = []
    for b in items:
        if isinstance(b, dict):
            out.append({k: torch.as_tensor(v) for k, v in b.items()})
        else:
            ids = torch.as_tensor(b)
            out.append(
                {
                    "input_ids": ids if ids.dim() == 2 else ids[None],
                    "attention_mask": torch.ones_like(ids if ids.dim() == 2 else ids[None]),
                }
            )
    return out


def _encoder_out(model, batch, weights=None):
    """Mean-pooled, normalised last hidden states (sentence embeddings)."""
    import torch.nn.functional as F
    from torch.func import functional_call

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    h = (functional_call(model, weights, (), inputs, strict=False) if weights else model(**inputs)).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def _causal_out(model, batch, weights=None):
    """Next-token log-probabilities."""
    import torch
    from torch.func import functional_call

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    logits = (functional_call(model, weights, (), inputs, strict=False) if weights else model(**inputs)).logits
    return torch.log_softmax(logits.float(), dim=-1)


def _loss(causal: bool, student, teacher, batch):

    if not causal:
        return (1 - (student * teacher).sum(-1)).mean()
    m = batch["attention_mask"].to(student.dtype)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return (kl * m).sum() / m.sum().clamp(min=1)


def _peak_rss_mib() -> Optional[float]:
    """The peak resident memory (VmHWM) of the process, in MiB, where /proc tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            line = next(x for x in fh if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def _teacher(finetuned: str) -> Tuple[Any, bool]:
    """The fine-tune in f32, frozen, and whether it is a causal LM (by its config's class)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with open(os.path.join(finetuned, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(finetuned, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model, causal


def _fit_axes(model, params: List[_SignParam], batches, forward, axis: str, tolerance: float) -> tuple:
    """Step 1: each linear layer's axis and closed-form scales, by its calibration error.

    The other 1-bit tensors (per-tensor scales, embeddings) start from the input delta's
    scales. Returns the axis per tensor and the (input, fitted) relative layer errors.
    """
    axes: Dict[str, str] = {}
    layer_error: Dict[str, Tuple[float, float]] = {}
    grams = _grams(model, params, batches, forward) if any(p.init[1] is not None for p in params) else {}
    for p in params:
        g = grams.pop(p.key, None)
        if p.init[1] is None or g is None:
            # A per-tensor scale, or an embedding.
            p.start(p.init)
        else:
            fits = fit_axes(p.sign, p.delta, g, p.init)
            p.axis = axis if axis != "auto" else choose_axis(fits, tolerance)
            layer_error[p.name] = (relative_error(fits, "init"), relative_error(fits, p.axis))
            p.start(fits[p.axis][:2])
        axes[p.name] = p.axis
        p.delta = None  # only the fits need it: a model-sized f32 tensor less to hold
    return axes, layer_error


def _distill(model, causal: bool, forward, params, batches, steps: int, lr: float, seed: int, say) -> tuple:
    """Step 2: every scale trained against the fine-tune's outputs.

    Returns the mean loss over the calibration set with the input delta's scales and with
    the learned ones.
    """
    import torch

    with torch.no_grad():
        # An encoder's targets are small (one embedding per input): computed once. A causal
        # LM's (a distribution per token) are recomputed per batch instead of held.
        targets = None if causal else [forward(model, b) for b in batches]

    def target(i: int):
        if targets is not None:
            return targets[i]
        with torch.no_grad():
            return forward(model, batches[i])

    def mean_loss(weights) -> float:
        with torch.no_grad():
            losses = [
                float(_loss(causal, forward(model, b, weights), target(i), b)) * len(b["input_ids"])
                for i, b in enumerate(batches)
            ]
        return sum(losses) / sum(len(b["input_ids"]) for b in batches)

    before = mean_loss({p.key: p.weight(p.init) for p in params})
    say(f"loss with the input scales {before:.6g}")
    opt = torch.optim.Adam([v for p in params for v in p.log], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        i = int(torch.randint(len(batches), (1,), generator=g))
        loss = _loss(causal, forward(model, batches[i], {p.key: p.weight() for p in params}), target(i), batches[i])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            say(f"step {step} loss {loss.item():.6g}")
    after = mean_loss({p.key: p.weight() for p in params})
    say(f"loss with the learned scales {after:.6g}")
    return before, after


def distill(
    base: PathLike,
    finetuned: PathLike,
    delta_in: PathLike,
    calibration: Iterable[Any],
    out: PathLike,
    *,
    steps: int = 200,
    axis: str = "auto",
    lr: float = 5e-3,
    batch_size: int = 16,
    max_length: int = 128,
    tolerance: float = 0.01,
    seed: int = 0,
    threads: Optional[int] = None,
    force: bool = False,
    log: Any = None,
) -> CalibrationReport:
    """Learns the scales of a 1-bit delta by distillation and writes a delta with them.

    ``delta_in`` is a delta of ``finetuned`` against ``base`` made by ``make`` with the
    ``sign`` or ``sign-axis`` codec (other tensors keep their codec); its signs are kept.
    ``calibration`` is a list of texts (tokenized with the fine-tune's tokenizer, at most
    ``max_length`` tokens) or an iterable of token-id batches (tensors or model-input dicts);
    a few hundred to a thousand texts from the task's training data are enough, never its
    test data. ``axis`` is ``"auto"`` (chosen per linear layer, see the module's doc),
    ``"row"``, ``"col"`` or ``"both"`` for every sign-axis tensor; ``steps`` of Adam at
    learning rate ``lr`` (on log-scales, so 5e-3 moves a scale by about 0.5 % a step) on
    batches of ``batch_size`` inputs; ``steps=0`` only fits the axes. Encoders (a model whose
    class ends in ``Model``) match mean-pooled sentence embeddings, causal LMs their
    next-token distributions. ``base`` and ``finetuned`` are local model directories (or
    single ``.safetensors`` files for the base). ``log`` is called with a line of progress
    text, if given. Returns a :class:`CalibrationReport`.
    """
    import torch

    if axis not in ("auto",) + AXES:
        raise BadInputError(f"axis must be 'auto', 'row', 'col' or 'both', not {axis!r}")
    if steps < 0 or batch_size < 1:
        raise BadInputError("steps must be at least 0 and batch_size at least 1")
    base, finetuned, delta_in, out = (os.fspath(p) for p in (base, finetuned, delta_in, out))
    if os.path.exists(out) and not force:
        raise BadInputError(f"{out} exists; pass force=True to replace it")
    say = log or (lambda _line: None)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tensors = _native.delta_scales(delta_in)
    if not tensors:
        raise BadInputError(f"{delta_in} has no sign or sign-axis tensors; make it with codec 'sign-axis' or 'sign'")

    model, causal = _teacher(finetuned)
    forward = _causal_out if causal else _encoder_out
    batches = _batches(finetuned, calibration, batch_size, max_length)
    params = _sign_params(model, base, tensors)
    axes, layer_error = _fit_axes(model, params, batches, forward, axis, tolerance)
    say("axes: " + ", ".join(f"{a} {n}" for a in ("tensor",) + AXES if (n := list(axes.values()).count(a))))
    loss_before, loss_after = _distill(model, causal, forward, params, batches, steps, lr, seed, say)
    scales = {p.name: p.stored() for p in params}
    report = json.loads(_native.remake_with_scales(base, finetuned, delta_in, out, scales, force, threads))
    return CalibrationReport(
        out=out,
        steps=steps,
        seconds=time.perf_counter() - t0,
        loss_before=loss_before,
        loss_after=loss_after,
        axes=axes,
        layer_error=layer_error,
        peak_rss_mib=_peak_rss_mib(),
        make=report,
    )


# The exit codes of the deltapack command line, by error.
_EXIT_CODES = ((BadInputError, 2), (WrongBaseError, 3), (CorruptDeltaError, 4), (DeltapackIOError, 5))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m deltapack.calibrate``: :func:`distill` from the command line."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="python -m deltapack.calibrate",
        description="Learn the scales of a 1-bit (sign or sign-axis) delta from calibration texts, by distillation.",
    )
    ap.add_argument("--base", required=True, help="the base model directory")
    ap.add_argument("--finetuned", required=True, help="the fine-tune's model directory")
    ap.add_argument("--delta", required=True, help="the 1-bit delta made by `deltapack make --codec sign-axis`")
    ap.add_argument("-o", "--output", required=True, help="the delta to write, with the learned scales")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="calibration texts, one per line")
    src.add_argument("--jsonl", help="calibration records, one JSON object per line (see --field)")
    ap.add_argument("--field", action="append", help="the text field(s) of --jsonl records (repeatable; default: text)")
    ap.add_argument("--limit", type=int, default=1000, help="at most this many texts (default 1000)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--axis", choices=("auto",) + AXES, default="auto")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace the output if it exists")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON line")
    a = ap.parse_args(argv)
    try:
        if a.texts:
            texts = read_texts(a.texts, a.limit)
        else:
            fields = a.field or ["text"]
            per_field = max(1, a.limit // len(fields))
            texts = [t for f in fields for t in read_jsonl(a.jsonl, f, per_field)][: a.limit]
        report = distill(
            a.base,
            a.finetuned,
            a.delta,
            texts,
            a.output,
            steps=a.steps,
            axis=a.axis,
            lr=a.lr,
            batch_size=a.batch_size,
            max_length=a.max_length,
            seed=a.seed,
            threads=a.threads,
            force=a.force,
            log=None if a.json else (lambda line: print(line, file=sys.stderr, flush=True)),
        )
    except DeltapackError as e:
        code = next((c for cls, c in _EXIT_CODES if isinstance(e, cls)), 1)
        print(f"error: {e}", file=sys.stderr)
        return code
    if a.json:
        print(json.dumps(report.to_json()))
    else:
        m = report.make
        print(
            f"wrote {report.out}: {m['bits_per_param']:.3f} bits/param, "
            f"loss {report.loss_before:.4g} -> {report.loss_after:.4g} in {report.seconds:.0f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
