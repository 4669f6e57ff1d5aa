"""Float64 gradients of a loss at given parameters, and the residuals of candidate symmetries.

Private helper of :mod:`torch_momentum.balance.symmetry`. :class:`Evaluator` computes
``grad loss_fn(model, batch)`` at any parameter values without touching the model (the
parameters are swapped by :func:`torch.func.functional_call`, the buffers are copies, the norm
layers' eps is set for the call and restored). :class:`Verifier` folds each gradient into the
largest relative residual ``|<g, xi_u>| / (||g_u|| ||xi_u||)`` of every candidate, all units of
all candidates at once (a few tensor operations per parameter, whatever the number of
candidates), and measures which parameters or slices get no gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from torch_momentum.balance._symmetry_proposal import Proposal, ZeroSlice
from torch_momentum.balance._symmetry_units import norm_modules

QUADRATIC = ("scale", "rescale")
# The norm layers' eps during verification: far below any variance met in float64 (so the scale
# symmetries are exact to round-off), yet positive, so that a constant channel gives 0, not nan.
TINY_EPS = 1e-30


class CallFailedError(Exception):
    """``loss_fn(model, batch)`` raised: the caller retries in the model's dtype or reports it."""


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: lets ``functional_call`` swap the parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def cast(obj: Any, dtype: torch.dtype | None) -> Any:
    """``obj`` with every floating tensor in it cast to ``dtype`` (tuples, lists, mappings).

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_verify import cast
        >>> x, y = cast((torch.ones(2), torch.ones(2, dtype=torch.long)), torch.float64)
        >>> x.dtype, y.dtype
        (torch.float64, torch.int64)
    """
    if dtype is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(cast(o, dtype) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast(o, dtype) for o in obj)
    if isinstance(obj, Mapping):
        items = {k: cast(v, dtype) for k, v in obj.items()}
        try:
            return type(obj)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    return obj


def _check_loss(loss: Any, index: int) -> None:
    call = f"loss_fn(model, batches[{index}])"
    if not isinstance(loss, Tensor):
        raise TypeError(f"{call} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{call} must return a scalar, got a tensor of shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            f"{call} is not differentiable in the model's trainable parameters (the loss does"
            " not require grad: detached, computed under no_grad, or from frozen parameters)"
        )
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"{call} is not finite: {loss.item()}")


@contextmanager
def _norm_eps(norms: list[tuple[nn.Module, str]], value: float | None) -> Iterator[None]:
    """Set every norm layer's eps to ``value`` (None: leave it) and restore it on exit."""
    saved = [(m, attr, getattr(m, attr)) for m, attr in norms]
    try:
        if value is not None:
            for m, attr, _ in saved:
                setattr(m, attr, value)
        yield
    finally:
        for m, attr, old in saved:
            setattr(m, attr, old)


class Evaluator:
    """Gradients of ``loss_fn(model, batch)`` at given parameters, leaving the model untouched.

    ``functional_call`` swaps in the given parameters and copies of the buffers (so BatchNorm's
    running statistics are updated in the copies); the norm layers' eps is set for the call and
    restored; the caller forks the RNG. ``dtype`` None: the model's own dtypes.
    """

    def __init__(
        self, model: nn.Module, loss_fn: Callable[..., Tensor], dtype: torch.dtype | None
    ) -> None:
        self.module = _LossModule(model, loss_fn)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers = dict(model.named_buffers())
        self.norms = norm_modules(model)
        self.dtype = dtype
        self._warned = False

    def point(self) -> dict[str, Tensor]:
        """A copy of the current trainable parameters in the evaluation dtype."""
        return {
            n: p.detach().to(self.dtype or p.dtype, copy=True) for n, p in self.trainable.items()
        }

    def _call(
        self, point: Mapping[str, Tensor], batch: Any, index: int, tiny_eps: bool, check: bool
    ) -> Tensor:
        """``loss_fn(model, batch)`` with the parameters ``point`` (``check``: a finite,
        differentiable scalar, else a clear error)."""
        state = {f"model.{n}": t for n, t in point.items()}
        for n, t in (*self.frozen.items(), *self.buffers.items()):
            dtype = self.dtype if t.is_floating_point() and self.dtype else t.dtype
            state[f"model.{n}"] = t.detach().to(dtype, copy=True)
        with _norm_eps(self.norms, TINY_EPS if tiny_eps else None):
            try:
                loss = functional_call(self.module, state, (cast(batch, self.dtype),))
            except Exception as exc:
                raise CallFailedError(exc) from exc
        if check:
            _check_loss(loss, index)
        return loss

    def loss(self, point: Mapping[str, Tensor], batch: Any, index: int) -> Tensor:
        """The loss at ``point`` on ``batch``, without gradients (the norms' eps set to ~0); may
        be inf or nan."""
        with torch.no_grad():
            return self._call(point, batch, index, tiny_eps=True, check=False).detach()

    def grad(
        self, point: Mapping[str, Tensor], batch: Any, index: int, *, tiny_eps: bool
    ) -> dict[str, Tensor]:
        """The gradient at ``point`` on ``batch`` (``tiny_eps``: the norms' eps set to ~0)."""
        leaves = {n: t.detach().requires_grad_() for n, t in point.items()}
        with torch.enable_grad():
            loss = self._call(leaves, batch, index, tiny_eps, check=True)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(f"loss_fn(model, batches[{index}]): no parameter gets a gradient")
        if self.dtype is not None and loss.dtype != self.dtype and not self._warned:
            self._warned = True
            warnings.warn(
                f"find_symmetries: loss_fn returned a {loss.dtype} loss from a {self.dtype}"
                " evaluation: part of it is computed in another precision (e.g. a loss that"
                " upcasts logits to float32), so true symmetries may show residuals of that"
                " precision's round-off (~1e-7 in float32)",
                stacklevel=5,
            )
        return {  # sparse gradients (nn.Embedding(sparse=True)) as dense tensors
            n: torch.zeros_like(leaves[n]) if g is None else g.to_dense() if g.is_sparse else g
            for n, g in zip(leaves, grads, strict=True)
        }


def perturbed(
    point: Mapping[str, Tensor], scale: float, seed: int, fixed: Mapping[str, int] | None = None
) -> dict[str, Tensor]:
    """``x + scale * rms(x) * N(0, 1)`` per tensor (a zero tensor: the rms of all parameters),
    except the rows ``fixed`` names (``{tensor: row}``: an embedding's ``padding_idx`` row,
    whose gradient autograd masks, so that where it is not zero the loss depends on entries
    whose gradient reads zero).

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_verify import perturbed
        >>> moved = perturbed({"b": torch.zeros(3, dtype=torch.float64)}, 0.1, seed=0)
        >>> bool(moved["b"].abs().min() > 0)  # a zero bias is moved too (by 0.1 * 1)
        True
        >>> moved = perturbed({"e": torch.zeros(3, 2)}, 0.1, seed=0, fixed={"e": 0})
        >>> moved["e"][0].tolist()  # the padding row stays
        [0.0, 0.0]
    """
    gen = torch.Generator().manual_seed(seed)
    total = sum(float(t.double().pow(2).sum()) for t in point.values())
    count = sum(t.numel() for t in point.values())
    overall = math.sqrt(total / max(count, 1)) or 1.0
    out = {}
    for n, t in point.items():
        rms = float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)
        out[n] = t + scale * (rms or overall) * noise
        if fixed and n in fixed:
            out[n][fixed[n]] = t[fixed[n]]
    return out


def padding_rows(model: nn.Module) -> dict[str, int]:
    """``{weight name: padding_idx}`` of the model's embeddings that have one (their padding row
    gets no gradient: autograd masks it)."""
    rows = {}
    for name, module in model.named_modules():
        index = getattr(module, "padding_idx", None)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and index is not None:
            rows[f"{name}.weight" if name else "weight"] = int(index)
    return rows


class _Layout:
    """Index vectors from per-index sums of every parameter to every unit of every candidate.

    For each ``(param, dim)`` a part uses, the sums over all other dimensions of ``g*x``, ``g*g``,
    ``g`` and ``x*x`` per index along ``dim`` (one number for ``dim`` None) are concatenated
    into one vector; ``src``/``dst`` map its entries to the candidates' units (a unit sums the
    indices of its block), so one ``index_add`` per quantity serves all candidates.
    """

    def __init__(self, proposals: list[Proposal], shapes: Mapping[str, torch.Size]) -> None:
        self.bases: dict[tuple[str, int | None], int] = {}  # (param, dim) -> offset
        counts: list[Tensor] = []
        src, dst, sign, quad, owner = [], [], [], [], []
        first_unit, size = 0, 0
        for c, proposal in enumerate(proposals):
            for part in proposal.parts:
                shape = shapes[part.param]
                length = 1 if part.dim is None else shape[part.dim]
                if (part.param, part.dim) not in self.bases:
                    self.bases[(part.param, part.dim)] = size
                    counts.append(torch.full((length,), math.prod(shape) / length))
                    size += length
                block = 1 if part.dim is None else part.block
                n = 1 if part.dim is None else part.length
                index = torch.arange(n) + self.bases[(part.param, part.dim)] + part.start
                src.append(index)
                dst.append(first_unit + part.unit_offset + torch.arange(n) // block)
                sign.append(torch.full((n,), part.sign))
                quad.append(torch.full((n,), proposal.kind in QUADRATIC))
            owner.append(torch.full((proposal.units,), c))
            first_unit += proposal.units
        self.units, self.candidates = first_unit, len(proposals)

        def cat(pieces: list[Tensor]) -> Tensor:
            return torch.cat(pieces) if pieces else torch.zeros(0)

        self.host = (cat(counts), cat(src), cat(dst), cat(sign), cat(quad), cat(owner))
        self.device: torch.device | None = None

    def to(self, device: torch.device) -> None:
        counts, src, dst, sign, quad, owner = (t.to(device) for t in self.host)
        self.src, self.dst, self.owner = src.long(), dst.long(), owner.long()
        self.count = counts.double()[self.src]
        self.sign, self.quad = sign.double(), quad.bool()
        self.device = device

    def sums(self, fn: Callable[[str], Tensor]) -> Tensor:
        """``fn(param)`` (shape ``(k, *param.shape)``) summed per index, all bases concatenated."""
        pieces = []
        values: dict[str, Tensor] = {}
        for param, dim in self.bases:
            t = values.get(param)
            if t is None:
                t = values[param] = fn(param).to(torch.float64)
            if dim is None:
                pieces.append(t.flatten(1).sum(1, keepdim=True))
            else:
                pieces.append(
                    t.movedim(dim + 1, 1).reshape(t.shape[0], t.shape[dim + 1], -1).sum(2)
                )
        return torch.cat(pieces, 1)

    def residuals(self, g: Tensor, xx: Tensor) -> Tensor:
        """Per candidate, ``max_u |<g, xi_u>| / (||g_u|| ||xi_u||)`` (0 where g or xi is 0).

        ``g``: the sums of ``g*x``, ``g*g`` and ``g`` (rows); ``xx``: the sums of ``x*x``.
        """
        zeros = torch.zeros(self.units, dtype=torch.float64, device=self.device)
        gx, gg, gs = g[:, self.src]
        quad = self.quad
        dot = zeros.index_add(0, self.dst, self.sign * torch.where(quad, gx, gs))
        g2 = zeros.index_add(0, self.dst, gg)
        xi2 = zeros.index_add(0, self.dst, torch.where(quad, xx[0, self.src], self.count))
        scale = g2.sqrt() * xi2.sqrt()
        ratio = torch.where(scale > 0, dot.abs() / scale.clamp_min(1e-300), 0.0)
        out = torch.zeros(self.candidates, dtype=torch.float64, device=self.device)
        return out.scatter_reduce(0, self.owner, ratio, "amax")


class Verifier:
    """The largest residual of every candidate and zero-gradient slice over the evaluations.

    ``tiny`` (per candidate): over the evaluations with the norms' eps ~ 0; ``real``: over those
    with the real eps (-1 where there were none); ``zero`` (per slice): the largest gradient norm
    of the slice relative to the rest of its layer's gradient.
    """

    def __init__(
        self, model: nn.Module, proposals: list[Proposal], slices: list[ZeroSlice], rtol: float
    ) -> None:
        self.slices, self.rtol = slices, rtol
        self.owners: dict[str, list[str]] = {}
        trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        for module in model.modules():
            names = [trainable[id(p)] for p in module.parameters(False) if id(p) in trainable]
            for name in names:
                self.owners.setdefault(name, names)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        self.layout = _Layout(proposals, shapes)
        self.tiny = torch.zeros(len(proposals), dtype=torch.float64)
        self.real = torch.full((len(proposals),), -1.0, dtype=torch.float64)
        self.zero = [0.0] * len(slices)
        self._xx: dict[int, Tensor] = {}

    def add(self, grads: dict[str, Tensor], point: Mapping[str, Tensor], tiny_eps: bool) -> None:
        """Fold in one gradient (at ``point``); ``tiny_eps``: evaluated with the norms' eps ~ 0."""
        self._zero_slices(grads)
        layout = self.layout
        if not layout.candidates:
            return
        if layout.device is None:
            layout.to(next(iter(grads.values())).device)
        if id(point) not in self._xx:
            self._xx[id(point)] = layout.sums(lambda n: (point[n] * point[n]).unsqueeze(0))
        sums = layout.sums(lambda n: torch.stack([grads[n] * point[n], grads[n] ** 2, grads[n]]))
        r = layout.residuals(sums, self._xx[id(point)]).cpu()
        if tiny_eps:
            torch.maximum(self.tiny, r, out=self.tiny)
        else:
            torch.maximum(self.real, r, out=self.real)

    def _zero_slices(self, grads: dict[str, Tensor]) -> None:
        """Measure each slice's gradient against the rest of its layer's; zero it where tiny.

        A slice below ``rtol`` is set to exactly zero in this gradient, so that a unit made only
        of such entries counts as trivially symmetric rather than as round-off noise.
        """
        names = list(grads)
        norms = torch.stack([grads[n].double().pow(2).sum() for n in names]).tolist()
        squares = dict(zip(names, norms, strict=True))
        total = sum(squares.values())
        for i, s in enumerate(self.slices):
            g = grads[s.param]
            part = g if s.dim is None else g.narrow(s.dim, s.start, s.length)
            own = squares[s.param] if s.dim is None else float(part.double().pow(2).sum())
            layer = sum(squares[n] for n in self.owners.get(s.param, [s.param]))
            rest = layer - own if layer - own > 1e-12 * layer else total - own
            ratio = 0.0 if own == 0.0 else (math.sqrt(own / rest) if rest > 0 else math.inf)
            self.zero[i] = max(self.zero[i], ratio)
            if ratio <= self.rtol:
                part.zero_()
