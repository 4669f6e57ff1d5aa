r"""Find the symmetries of a model's loss, verify each numerically, and compute their charges.

A *symmetry* of the loss is a one-parameter family of parameter moves that leaves every minibatch
loss unchanged. Its generator :math:`\xi(x)` satisfies :math:`\langle \nabla \ell(x), \xi(x)
\rangle = 0` for every batch (the homogeneity lemma with degree 0, so it holds for Clarke
subgradients too), and gradient flow :math:`\dot x = -\nabla \ell` conserves its *charge*
(Kunin, Sagastuy-Brena, Ganguli, Yamins & Tanaka, "Neural Mechanics", ICLR 2021):

=============  ========================  ===================================  ======================
kind           generator :math:`\xi`     charge :math:`Q`                     where
=============  ========================  ===================================  ======================
scale          :math:`x_A`               :math:`\|x_A\|^2`                    weights (and bias)
                                                                              right before a norm
rescale        :math:`(x_A, -x_B)`       :math:`\|x_A\|^2 - \|x_B\|^2`        a ReLU unit's in/out
                                                                              weights; q/k and v/o
translation    :math:`1_A`               :math:`\langle 1, x_A \rangle`       softmax cross-entropy
                                                                              head; before a
                                                                              LayerNorm
=============  ========================  ===================================  ======================

Each symmetry comes in *units* (one channel, one hidden unit, one attention dimension, one input
column of a classifier...), each with its own generator :math:`\xi_u` and charge :math:`Q_u`; the
:class:`SymmetryPart` s of a :class:`Symmetry` say exactly which entries form each unit.
Quadratic charges (scale, rescale) change under one step :math:`x \to x - \eta g` by
:math:`-2\eta\langle g, \xi_u\rangle + \eta^2(\|g_{A_u}\|^2 - \|g_{B_u}\|^2)`, i.e. by the
second-order term only while the symmetry holds; linear charges (translation) change by
:math:`-\eta\langle g, \xi_u\rangle`, i.e. not at all under gradient descent.

:func:`find_symmetries` proposes candidates from the module structure (see
``torch_momentum.balance._symmetry_candidates``) and reports only those that pass the
verification: for every unit :math:`u`, :math:`|\langle \nabla\ell, \xi_u\rangle| \le
\mathrm{rtol}\, \|\nabla\ell_{A_u}\|\,\|\xi_u\|` on every batch given, at the current
parameters and at a random perturbation of them, with gradients computed in float64.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_momentum.balance._parts import SymmetryPart, part_values, signed_sum
from torch_momentum.balance._symmetry_candidates import display_prefix, propose
from torch_momentum.balance._symmetry_moves import confirm
from torch_momentum.balance._symmetry_proposal import (
    PartsKey,
    PartSpec,
    Proposal,
    ZeroSlice,
    parts_key,
)
from torch_momentum.balance._symmetry_trace import CallRecorder
from torch_momentum.balance._symmetry_verify import (
    QUADRATIC,
    CallFailedError,
    Evaluator,
    Verifier,
    padding_rows,
    perturbed,
)

__all__ = ["KINDS", "ZERO_GRADIENT", "Symmetry", "SymmetryList", "find_symmetries"]

#: The kinds :func:`find_symmetries` looks for (its ``kinds`` argument is a subset).
KINDS = ("scale", "rescale", "translation")
#: The kind of a parameter, or slice of one, whose gradient is zero on every evaluation.
ZERO_GRADIENT = "zero_gradient"


@dataclass(frozen=True)
class Symmetry:
    r"""A verified symmetry of a model's loss, with one conserved charge per unit.

    Attributes:
        kind: ``"scale"``, ``"rescale"``, ``"translation"``, or ``"zero_gradient"`` (a parameter,
            or a slice of one such as the key bias of a packed attention projection, whose
            gradient is zero on every evaluation: every entry is then conserved; its charge is
            the linear one, the sum of the entries).
        name: short and readable, e.g. ``layer1.0.conv1 (per channel)`` or ``blocks.0.attn q/k``
            (module names without wrapper prefixes such as ``model.`` or ``module.``).
        params: the parameter names it touches, as in ``model.named_parameters()``.
        units: the number of per-unit charges.
        parts: which entries form each unit (:class:`SymmetryPart`).
        residual: the largest :math:`|\langle\nabla\ell, \xi_u\rangle| / (\|\nabla\ell_{A_u}\|
            \|\xi_u\|)` seen over units, batches and both points (for ``zero_gradient``: the
            largest gradient norm of the slice relative to the rest of its layer's gradient),
            computed with the norm layers' eps set to ~0.
        eps_residual: the same at the current parameters on the first batch with the norm
            layers' own eps, where that exceeds the tolerance (the symmetry then holds only as
            eps -> 0 and the norm's eps is what breaks it); otherwise None.

    Example:
        >>> import torch
        >>> from torch_momentum.balance.symmetry import Symmetry, SymmetryPart
        >>> head = torch.nn.Linear(4, 3)
        >>> translation = Symmetry(
        ...     kind="translation", name="head (columns + bias)", params=("weight", "bias"),
        ...     units=5, residual=0.0, eps_residual=None,
        ...     parts=(SymmetryPart("weight", 1, 0, 4, 1, 1.0, 0),
        ...            SymmetryPart("bias", None, 0, 0, 1, 1.0, 4)))
        >>> charge = translation.charge(dict(head.named_parameters()))
        >>> charge.shape, charge.dtype
        (torch.Size([5]), torch.float64)
        >>> torch.allclose(charge[:4], head.weight.double().sum(0))
        True
    """

    kind: str
    name: str
    params: tuple[str, ...]
    units: int
    parts: tuple[SymmetryPart, ...]
    residual: float
    eps_residual: float | None = None

    @property
    def quadratic(self) -> bool:
        """Whether the charge is quadratic (scale, rescale) or linear (translation, zero)."""
        return self.kind in QUADRATIC

    def inner(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor] | None = None) -> Tensor:
        r"""Per-unit signed sums over the symmetry's entries, float64, shape ``(units,)``.

        Quadratic kinds: :math:`\sum_{\text{parts}} \mathrm{sign} \sum_{\text{unit}} a \cdot b`
        (``b`` defaults to ``a``), e.g. ``inner(x)`` is the charge and ``inner(g, x)`` is
        :math:`\langle g, \xi_u\rangle`. Linear kinds: :math:`\sum_{\text{parts}} \mathrm{sign}
        \sum_{\text{unit}} a` (``b`` must be None).
        """
        if b is not None and not self.quadratic:
            raise ValueError(f"b: the {self.kind} charge of {self.name!r} is linear: pass b=None")

        def value(part: SymmetryPart) -> Tensor:
            ea = _lookup(a, part.param, self.name, "a")
            eb = None if b is None else _lookup(b, part.param, self.name, "b")
            return part_values(ea, part, not self.quadratic, eb)

        return signed_sum(self.parts, self.units, value)

    def sq_norms(self, a: Mapping[str, Tensor]) -> Tensor:
        """Per-unit squared norms :math:`\\|a_u\\|^2` over all the unit's entries (both sides).

        E.g. ``sq_norms(grads)`` is :math:`\\|\\nabla\\ell_{A_u}\\|^2` of the verification and
        ``sq_norms(generator(params))`` is :math:`\\|\\xi_u\\|^2`. Float64, shape ``(units,)``.
        """
        return signed_sum(
            self.parts,
            self.units,
            lambda part: part_values(_lookup(a, part.param, self.name, "a"), part, False),
            signed=False,
        )

    def to_state(self) -> dict[str, Any]:
        """The symmetry as plain Python data (for checkpoints); :meth:`from_state` rebuilds it.

        Example:
            >>> from torch_momentum.balance.symmetry import Symmetry, SymmetryPart
            >>> s = Symmetry("scale", "fc", ("fc.weight",), 1,
            ...              (SymmetryPart("fc.weight", None, 0, 0, 1, 1.0, 0),), 0.0)
            >>> Symmetry.from_state(s.to_state()) == s
            True
        """
        state = dataclasses.asdict(self)
        state["params"] = list(self.params)
        state["parts"] = [dataclasses.asdict(p) for p in self.parts]
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Symmetry:
        """The symmetry saved by :meth:`to_state`."""
        fields = dict(state)
        fields["params"] = tuple(fields["params"])
        fields["parts"] = tuple(SymmetryPart(**p) for p in fields["parts"])
        return cls(**fields)

    def charge(self, named_params: Mapping[str, Tensor]) -> Tensor:
        """The conserved charge per unit, float64, shape ``(units,)``.

        ``named_params`` maps parameter names to tensors, e.g. ``dict(model.named_parameters())``.
        """
        return self.inner(named_params)

    def generator(self, named_params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The generator at a point, summed over units: ``{name: xi}`` (float64).

        ``xi`` is ``sign * x`` on the symmetry's entries for quadratic kinds and ``sign * 1`` for
        linear ones, zero elsewhere; unit ``u``'s own generator is its restriction to the
        entries of unit ``u`` (see :attr:`parts`).
        """
        xi: dict[str, Tensor] = {}
        for part in self.parts:
            x = _lookup(named_params, part.param, self.name, "named_params").detach()
            full = xi.setdefault(part.param, torch.zeros_like(x, dtype=torch.float64))
            view = full if part.dim is None else full.narrow(part.dim, part.start, part.length)
            src = x if part.dim is None else x.narrow(part.dim, part.start, part.length)
            view += part.sign * (src.to(torch.float64) if self.quadratic else 1.0)
        return xi


def _lookup(named: Mapping[str, Tensor], name: str, symmetry: str, arg: str) -> Tensor:
    try:
        return named[name]
    except KeyError:
        raise ValueError(
            f"{arg} has no parameter {name!r}, which the symmetry {symmetry!r} touches"
        ) from None


class SymmetryList(list[Symmetry]):
    """The list :func:`find_symmetries` returns, with the candidates it rejected.

    ``rejected`` holds every candidate that failed the verification, with the residual it showed
    (useful to see why a layer has no symmetry: a BatchNorm after it, a residual add, GELU).

    Example:
        >>> from torch_momentum.balance.symmetry import SymmetryList
        >>> found = SymmetryList([], rejected=())
        >>> found, found.rejected
        ([], ())
    """

    def __init__(self, found: Iterable[Symmetry], rejected: Iterable[Symmetry] = ()) -> None:
        super().__init__(found)
        self.rejected: tuple[Symmetry, ...] = tuple(rejected)

    def summary(self) -> str:
        """One line per symmetry found, then per candidate rejected: kind, units, residual, name."""
        lines = []
        for title, items in (("found", list(self)), ("rejected", list(self.rejected))):
            lines.append(f"{title}: {len(items)}")
            for s in items:
                eps = "" if s.eps_residual is None else f" (eps residual {s.eps_residual:.1e})"
                lines.append(f"  {s.kind:<13} {s.units:>6}  {s.residual:8.1e}  {s.name}{eps}")
        return "\n".join(lines)


def checked_symmetries(symmetries: Any) -> list[Symmetry]:
    """``symmetries`` (None: none) as a list, checked: every item a :class:`Symmetry` or an
    object with its ``name``, ``kind``, ``units`` and ``parts``, the names distinct (charges are
    read by name).

    Raises:
        TypeError: not an iterable of such objects (e.g. one symmetry, or names).
        ValueError: two symmetries of one name.
    """
    if symmetries is None:
        return []
    if isinstance(symmetries, (Symmetry, str)) or not isinstance(symmetries, Iterable):
        raise TypeError(
            "symmetries must be a list of Symmetry (from find_symmetries), got a"
            f" {type(symmetries).__name__}"
        )
    out = list(symmetries)
    for k, s in enumerate(out):
        if not all(hasattr(s, a) for a in ("name", "kind", "units", "parts")):
            raise TypeError(f"symmetries[{k}] must be a Symmetry, got {type(s).__name__}: {s!r}")
    names = [s.name for s in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"symmetries: the names must be distinct, {twice} stand more than once")
    return out


def _only_zero(proposal: Proposal, zero: list[ZeroSlice]) -> bool:
    """Whether every entry of the candidate lies in a zero-gradient slice."""

    def covered(p: PartSpec) -> bool:
        return any(
            z.param == p.param
            and (
                z.dim is None
                or (
                    p.dim == z.dim
                    and z.start <= p.start
                    and p.start + p.length <= z.start + z.length
                )
            )
            for z in zero
        )

    return all(covered(p) for p in proposal.parts)


def _result(
    verifier: Verifier,
    proposals: list[Proposal],
    kinds: tuple[str, ...],
    order: list[str],
    prefix: str,
) -> SymmetryList:
    """The zero-gradient slices and the verified candidates, in parameter order; the rest."""
    rtol = verifier.rtol
    zero = [(s, r) for s, r in zip(verifier.slices, verifier.zero, strict=True) if r <= rtol]
    whole = {s.param for s, _ in zero if s.dim is None}
    zero = [(s, r) for s, r in zero if s.dim is None or s.param not in whole]
    found: list[Symmetry] = [_zero_symmetry(s, r, prefix) for s, r in zero]
    rejected: list[Symmetry] = []
    tiny, real = verifier.tiny.tolist(), verifier.real.tolist()
    for proposal, residual, eps in zip(proposals, tiny, real, strict=True):
        if proposal.kind not in kinds or _only_zero(proposal, [s for s, _ in zero]):
            continue
        symmetry = _symmetry(proposal, residual, eps if eps > rtol else None, prefix)
        (found if residual <= rtol else rejected).append(symmetry)
    rank = {prefix + n: i for i, n in enumerate(order)}
    kind_rank = {k: i for i, k in enumerate((ZERO_GRADIENT, *KINDS))}

    def key(s: Symmetry) -> tuple[int, int, str]:
        return (min(rank.get(p, len(rank)) for p in s.params), kind_rank[s.kind], s.name)

    return SymmetryList(sorted(found, key=key), sorted(rejected, key=key))


def _symmetry(proposal: Proposal, residual: float, eps: float | None, prefix: str) -> Symmetry:
    parts = tuple(SymmetryPart(*p._replace(param=prefix + p.param)) for p in proposal.parts)
    params = tuple(dict.fromkeys(p.param for p in parts))
    return Symmetry(proposal.kind, proposal.name, params, proposal.units, parts, residual, eps)


def _zero_symmetry(s: ZeroSlice, residual: float, prefix: str) -> Symmetry:
    block = s.length if s.dim is not None else 1
    part = SymmetryPart(prefix + s.param, s.dim, s.start, s.length, block, 1.0, 0)
    return Symmetry(ZERO_GRADIENT, s.name, (part.param,), 1, (part,), residual, None)


@dataclass(frozen=True)
class _Settings:
    kinds: tuple[str, ...]
    rtol: float
    perturbation: float
    perturbed_batches: int | None
    seed: int
    dtype: torch.dtype | None


def _check_number(arg: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and 0 < value < 1):
        raise ValueError(f"{arg} must be a number in (0, 1), got {value!r}")


def _check_args(model: Any, loss_fn: Any, kinds: Any, settings: dict[str, Any]) -> _Settings:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    if isinstance(kinds, str) or not isinstance(kinds, Iterable):
        raise TypeError(f"kinds must be a sequence of kind names such as ('scale',), got {kinds!r}")
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown kind(s) {unknown}; the kinds are {KINDS}")
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _check_number("rtol", settings["rtol"])
    _check_number("perturbation", settings["perturbation"])
    count = settings["perturbed_batches"]
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"perturbed_batches must be None or an int >= 1, got {count!r}")
    dtype = settings["dtype"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: there is nothing to find")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
        raise ValueError("model has uninitialised (lazy) parameters: run one forward pass first")
    return _Settings(kinds=kinds, **settings)


def _check_batches(batches: Any) -> list[Any]:
    if isinstance(batches, (Tensor, Mapping, str, bytes)):
        raise TypeError(
            f"batches must be an iterable of batches (e.g. a list), got a {type(batches).__name__}"
            ": pass [batch] for a single batch"
        )
    try:
        found = list(batches)
    except TypeError:
        raise TypeError(
            f"batches must be an iterable of batches (e.g. a list), got {type(batches).__name__}"
        ) from None
    if not found:
        raise ValueError("batches is empty: give at least one batch to verify the symmetries on")
    return found


def _batch_error(exc: BaseException, index: int) -> Exception:
    """``loss_fn`` failed on a batch: the error names the batch (TypeError for a wrong type)."""
    cls = (
        TypeError
        if isinstance(exc, (TypeError, AttributeError, KeyError, IndexError))
        else ValueError
    )
    return cls(f"batches[{index}]: loss_fn(model, batch) raised {type(exc).__name__}: {exc}")


def _unwrap_compiled(model: nn.Module) -> tuple[nn.Module, str]:
    """``torch.compile(model)`` holds the original module as ``_orig_mod``: verify that one."""
    children = dict(model.named_children())
    inner = children.get("_orig_mod")
    return (inner, "_orig_mod.") if inner is not None and len(children) == 1 else (model, "")


def _grad(
    evaluator: Evaluator,
    point: Mapping[str, Tensor],
    batch: Any,
    index: int,
    seed: int,
    tiny_eps: bool = True,
) -> dict[str, Tensor]:
    torch.manual_seed(seed + index)  # the same dropout masks at every point of one batch
    try:
        return evaluator.grad(point, batch, index, tiny_eps=tiny_eps)
    except CallFailedError as exc:
        raise _batch_error(exc.__cause__ or exc, index) from exc.__cause__


def _recorded(
    evaluator: Evaluator, model: nn.Module, batch: Any, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[Any]]:
    x = evaluator.point()
    torch.manual_seed(seed)
    with CallRecorder(model) as recorder:
        grads = evaluator.grad(x, batch, 0, tiny_eps=True)
    return x, grads, recorder.calls


def _first(
    evaluator: Evaluator, model: nn.Module, batch: Any, settings: _Settings
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[Any]]:
    """The first gradient, with the module calls recorded; float64, else the model's dtype."""
    try:
        return _recorded(evaluator, model, batch, settings.seed)
    except CallFailedError as exc:
        if evaluator.dtype is None:
            raise _batch_error(exc.__cause__ or exc, 0) from exc.__cause__
        failure = exc.__cause__ or exc
    evaluator.dtype = None
    try:
        result = _recorded(evaluator, model, batch, settings.seed)
    except CallFailedError as exc:
        raise _batch_error(exc.__cause__ or exc, 0) from exc.__cause__
    warnings.warn(
        f"find_symmetries: the {settings.dtype} evaluation of loss_fn failed"
        f" ({type(failure).__name__}: {failure}); verifying in the model's dtype instead, where"
        " the residuals of true symmetries are round-off of that dtype (~1e-7 to 1e-5 in"
        f" float32): with rtol={settings.rtol} some may be rejected",
        stacklevel=3,
    )
    return result


def _verify(
    evaluator: Evaluator, model: nn.Module, batches: list[Any], settings: _Settings
) -> tuple[Verifier, list[Proposal]]:
    """Propose candidates from the first forward pass, then fold in every gradient."""
    x, first, calls = _first(evaluator, model, batches[0], settings)
    moved = perturbed(x, settings.perturbation, settings.seed, padding_rows(model))
    prefix = display_prefix(list(evaluator.trainable))
    proposals, slices = propose(model, calls, settings.kinds, prefix)
    del calls  # the recorded tensors
    verifier = Verifier(model, proposals, slices, settings.rtol)
    verifier.add(first, x, tiny_eps=True)
    last = len(batches) if settings.perturbed_batches is None else settings.perturbed_batches
    for index, batch in enumerate(batches):
        points = ((x,) if index else ()) + ((moved,) if index < last else ())
        for point in points:
            grads = _grad(evaluator, point, batch, index, settings.seed)
            verifier.add(grads, point, tiny_eps=True)
        if index == 0 and evaluator.norms:
            real = _grad(evaluator, x, batch, 0, settings.seed, tiny_eps=False)
            verifier.add(real, x, tiny_eps=False)
    return verifier, proposals


def find_symmetries(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable[Any],
    *,
    kinds: Iterable[str] = KINDS,
    rtol: float = 1e-6,
    perturbation: float = 0.1,
    perturbed_batches: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
) -> SymmetryList:
    r"""Find the scale, rescale and translation symmetries of a model's loss, each verified.

    Candidates come from the module structure and one recorded forward pass (norm layers after a
    layer, producers and the modules consuming their output, pairs of equal size inside one
    parent module such as query/key, every Linear as a classifier...). A candidate is reported
    only if, for every unit :math:`u` and on **every** batch, at the current parameters
    :math:`x` **and** at a perturbed point :math:`x' = x + \mathrm{perturbation} \cdot
    \mathrm{rms}(x) \cdot N(0, 1)` (per tensor, an embedding's ``padding_idx`` row kept, its
    gradient being masked by autograd; a symmetry that holds only at a special point, e.g.
    zero biases, is not one):

    .. math::
        |\langle \nabla \ell, \xi_u \rangle| \le \mathrm{rtol}\,\|\nabla \ell_{A_u}\|\,\|\xi_u\|,

    where :math:`A_u` is the unit's entries. Gradients are computed in float64 (a true symmetry
    then shows ~1e-15, a false one >= 1e-3; in float32 round-off alone is ~1e-7 to 1e-6), with
    the norm layers' eps set to ~0: their scale symmetry is exact only as eps -> 0, and the
    residual with the real eps (current parameters, first batch) is reported as
    ``eps_residual`` where it exceeds ``rtol``.

    A symmetry is a group action, so the candidates that pass are then moved far along their
    groups, all at once, on the first batch: each unit scaled by a factor between 10 and 1000
    (either way; a rescale's B side divided), shifted by 10 to 100 times the parameters' rms
    (translation), or given noise of 10 times its rms (zero gradient); once with a random
    direction per unit, once with all units moved the same way. The loss must stay
    within round-off (relative ``max(1e-3 * rtol, 1000 * eps)`` of the evaluation and loss
    dtypes); otherwise each is moved alone and the ones that change it are rejected, with the
    relative change as residual. This catches functions homogeneous only where they do not
    clamp (ReLU6, Hardtanh, clamped logits, tanh at tiny weights) and parameters whose gradient
    is merely tiny, which the gradient test passes wherever no unit reaches the clamp.

    Cost: two float64 forward and backward passes per batch (one with ``perturbed_batches=1``
    beyond the first batch), one more if the model has norm layers, three forward passes for the
    finite moves (the loss, then every unit moved in a random direction, and all units the same
    way; two more per symmetry where they fail), and inner products (a few
    tensor operations per parameter). On a CPU a float64 pass costs 1.5x (small transformers)
    to 3x (convolutions, which have no fast float64 kernel) a float32 training step: see
    ``benchmarks/symmetry_discovery.py`` for measured ratios. ``dtype=torch.float32`` with
    ``rtol=1e-4`` is cheaper and still separates true symmetries (round-off ~1e-6) from false
    ones (>= 1e-3) on the reference models of :mod:`torch_momentum.demos`.

    Parameters whose gradient is zero on every evaluation (a conv bias right before BatchNorm,
    the key bias of attention, a module the loss never uses), and thirds of packed q/k/v
    parameters with zero gradient, are reported once each as kind ``"zero_gradient"`` whatever
    ``kinds`` says; candidates made only of such entries are dropped.

    The model is not modified: the parameters are swapped by :func:`torch.func.functional_call`
    for float64 copies, the buffers (BatchNorm's running statistics) for copies, the norm layers'
    eps is restored, and the RNG is forked (dropout masks are seeded by ``seed``, the same for
    every evaluation of one batch). The model's training/eval mode is used as it is: BatchNorm in
    eval mode has no scale symmetry.

    Args:
        model: the model; its trainable parameters are searched.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss tensor. Compute it in the
            parameters' dtype: a loss that upcasts to float32 loses the float64 precision.
        batches: an iterable of batches, all of which are used (each is passed to ``loss_fn``
            with its floating tensors cast to ``dtype``; tuples, lists and mappings are walked).
            A few are enough: pass e.g. ``itertools.islice(loader, 4)``, not a whole loader.
        kinds: a subset of ``("scale", "rescale", "translation")``.
        rtol: the relative tolerance of the verification, in (0, 1).
        perturbation: relative size of the random perturbation, in (0, 1).
        perturbed_batches: how many of the batches (the first ones) are verified at the
            perturbed point too; None (default): all of them. The perturbation guards against
            special parameter values (zero biases, equal weights), which do not depend on the
            batch, so ``1`` is nearly as strict at half the cost per further batch.
        seed: seeds the perturbation and the dropout masks.
        dtype: the dtype of the verification (None: the model's own). If the model cannot run
            in it, verification falls back to the model's dtype with a warning.

    Returns:
        A :class:`SymmetryList` of :class:`Symmetry`: the zero-gradient parameters and the
        verified symmetries, in parameter order; its ``rejected`` attribute holds the candidates
        that failed, with their residuals.

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` is not callable, ``kinds`` is not a
            sequence, ``batches`` is not an iterable of batches, a batch has the wrong type
            (the message names ``batches[i]``), or the loss is not a tensor.
        ValueError: an unknown kind, ``rtol`` or ``perturbation`` outside (0, 1), a bad
            ``perturbed_batches`` or ``dtype``, no batches, a model without trainable
            parameters, a loss that is not a finite scalar or not differentiable in them.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch_momentum.demos import ReluMLP
        >>> from torch_momentum.balance.symmetry import find_symmetries
        >>> model = ReluMLP(8, (6,), 3)
        >>> batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> def loss_fn(model, batch):
        ...     inputs, targets = batch
        ...     return F.cross_entropy(model(inputs), targets)
        >>> found = find_symmetries(model, loss_fn, batches)
        >>> [(s.kind, s.name, s.units) for s in found]
        [('rescale', '0/2', 6), ('translation', '2 (columns + bias)', 7)]
        >>> max(s.residual for s in found) < 1e-12
        True
        >>> found[0].charge(dict(model.named_parameters())).shape
        torch.Size([6])
    """
    settings = _check_args(
        model,
        loss_fn,
        kinds,
        {
            "rtol": rtol,
            "perturbation": perturbation,
            "perturbed_batches": perturbed_batches,
            "seed": seed,
            "dtype": dtype,
        },
    )
    batch_list = _check_batches(batches)
    inner, prefix = _unwrap_compiled(model)
    evaluator = Evaluator(inner, loss_fn, dtype)
    devices = sorted({p.device.index or 0 for p in inner.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        verifier, proposals = _verify(evaluator, inner, batch_list, settings)
        found = _result(verifier, proposals, settings.kinds, list(evaluator.trainable), prefix)
        found = _moved_far(found, evaluator, batch_list[0], settings, prefix)
        return _finest(found, proposals, prefix)


def _finest(found: SymmetryList, proposals: list[Proposal], prefix: str) -> SymmetryList:
    """``found`` without the symmetries that coarsen another found one (a rotary pair ties two
    units of the per-dimension q/k rescale: :attr:`Proposal.unless`): the finer is reported,
    the coarser neither found nor rejected. Applied after the finite moves, so that where they
    reject the finer candidate the coarser one stays. ``prefix``: the wrapper prefix the
    symmetries' parameter names carry and the proposals' do not."""

    def key(s: Symmetry) -> PartsKey:
        return parts_key(
            PartSpec(p.param[len(prefix) :], p.dim, p.start, p.length, p.block, 1.0, p.unit_offset)
            for p in s.parts
        )

    held = {key(s) for s in found}
    coarser = {parts_key(p.parts) for p in proposals if p.unless is not None and p.unless in held}
    kept = [s for s in found if key(s) not in coarser]
    return found if len(kept) == len(found) else SymmetryList(kept, found.rejected)


def _moved_far(
    found: SymmetryList, evaluator: Evaluator, batch: Any, settings: _Settings, prefix: str
) -> SymmetryList:
    """The found symmetries that also keep the loss on the first batch under a large move
    along them (:func:`~torch_momentum.balance._symmetry_moves.confirm`); the others join the
    rejected, with the relative change of the loss as their residual."""

    def loss(point: Mapping[str, Tensor]) -> Tensor:
        torch.manual_seed(settings.seed)  # the first batch's dropout masks, as verified
        try:
            return evaluator.loss(point, batch, 0)
        except CallFailedError as exc:
            raise _batch_error(exc.__cause__ or exc, 0) from exc.__cause__

    kept, rejected = confirm(
        found, evaluator.point(), loss, lambda n: n[len(prefix) :], settings.rtol, settings.seed
    )
    return SymmetryList(kept, (*found.rejected, *rejected))
