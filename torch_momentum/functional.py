r"""The one update kernel shared by :class:`~torch_momentum.PolyakSGD` and
:class:`~torch_momentum.NesterovSGD`, in three interchangeable implementations.

Notation (slide form, velocity first). With the descent direction

.. math::
    d_t = \nabla f(p_t) + \lambda p_t \qquad (\text{or } -\nabla f(p_t) + \lambda p_t
    \text{ when maximising}),

heavy ball (Polyak 1964) is

.. math::
    v_{t+1} = -d_t + \mu v_t, \qquad x_{t+1} = x_t + \eta v_{t+1},

with the parameters :math:`p_t = x_t`. Nesterov (1983) takes the gradient at the look-ahead point
:math:`y_t = x_t + \eta\mu v_t`, which is what the parameters hold during training
(:math:`p_t = y_t`):

.. math::
    v_{t+1} = -d(y_t) + \mu v_t, \qquad x_{t+1} = x_t + \eta v_{t+1}, \qquad
    y_{t+1} = x_{t+1} + \eta\mu v_{t+1} = y_t + \eta(\mu v_{t+1} - d_t).

The last identity (when the look-ahead :math:`y_t` was built with the same :math:`\eta\mu`) is the
update that ``torch.optim.SGD(nesterov=True)`` applies to its parameters, with its momentum buffer
equal to :math:`-v`. When :math:`\eta\mu` changed since the look-ahead was built (an LR or momentum
scheduler), the optimiser first moves the parameters with :func:`lookahead_shift` so that
:math:`p = x + \eta\mu v` holds for the new coefficient; the kernels below then assume it does.

Paths, as in ``torch/optim/sgd.py``:

* ``_single_tensor_momentum_sgd``: the reference. One tensor at a time, written like the formulas
  above (Nesterov through the last identity, in the rounding order of the built-in). It is the
  only path for ``differentiable=True``.
* ``_multi_tensor_momentum_sgd``: ``torch._foreach_*`` over tensors grouped by device and dtype.
* ``_fused_momentum_sgd``: PyTorch's own fused SGD kernel (``torch._fused_sgd_``, one pass that
  reads ``p, g, v`` and writes ``p, v`` as flat arrays), driven through an exact sign mapping. It
  only takes tensors whose parameter, gradient and velocity are dense, non-overlapping and share
  strides, and whose device and dtype it supports (not bfloat16/float16 on the CPU, where that
  kernel computes wrong values); this is checked at every step (gradients can change layout
  between steps) and every other tensor goes through the foreach path (or the reference where
  foreach is not available). That kernel
  computes, with buffer :math:`b`, weight decay :math:`\lambda'`, rate :math:`\eta'`,
  :math:`d' = \pm g + \lambda' p`, :math:`b \leftarrow \mu b + d'`,
  :math:`p \leftarrow p - \eta' b` (or :math:`p - \eta'(d' + \mu b)` for Nesterov). Passing
  :math:`b = v`, :math:`\lambda' = -\lambda`, the opposite ``maximize`` flag and
  :math:`\eta' = -\eta` gives :math:`d' = -d`, hence
  :math:`v \leftarrow \mu v - d` and :math:`p \leftarrow p + \eta v` (Nesterov:
  :math:`p + \eta(\mu v - d)`), i.e. exactly the slide-form update with ``v`` stored in the slide
  sign convention. Complex tensors go through :func:`torch.view_as_real`, which is exact because
  every operation of the update is real-linear.

With ``momentum == 0`` no velocity is kept (:math:`v_{t+1} = -d_t` carries no memory) and the
update is plain gradient descent :math:`p \leftarrow p - \eta d_t`.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer
from torch.optim.optimizer import Optimizer
from torch.utils._foreach_utils import (
    _get_foreach_kernels_supported_devices,
    _get_fused_kernels_supported_devices,
)

__all__ = [
    "default_implementation",
    "lookahead_shift",
    "momentum_sgd",
    "resolve_implementation",
    "run_kernel",
]

_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _on(t: Tensor, devices: list[str]) -> bool:
    # t.is_cpu / t.is_cuda are plain flags; t.device.type builds a device object (slow per step).
    return t.is_cpu or t.is_cuda or t.device.type in devices


def _fused_device_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel runs on this device for this dtype (floating point or complex)."""
    return (dtype.is_floating_point or dtype.is_complex) and (
        device.type in _get_fused_kernels_supported_devices()
    )


# torch._fused_sgd_ on the CPU returns wrong values for bfloat16 and float16 (measured with torch
# 2.13: parameters off by thousands of ulps, garbage momentum buffers), so those tensors take the
# foreach path there. float32/float64 (and complex via real views) are exact.
_CPU_FUSED_BROKEN = (torch.bfloat16, torch.float16)


def _fused_correct(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel computes the right values for this device and dtype."""
    return not (device.type == "cpu" and dtype in _CPU_FUSED_BROKEN)


def _foreach_device(device: torch.device) -> bool:
    return device.type == "cpu" or device.type in _get_foreach_kernels_supported_devices()


def fused_supported(t: Tensor) -> bool:
    """Whether the fused kernel can update ``t``: a plain strided floating point or complex tensor
    on a device with fused optimiser kernels (CPU, CUDA, XPU, MPS, ...). The layout of its
    gradient and velocity is checked separately at every step."""
    return (
        type(t) in _PLAIN_TENSOR_TYPES
        and t.layout is torch.strided
        and (t.is_floating_point() or t.is_complex())
        and _on(t, _get_fused_kernels_supported_devices())
    )


def foreach_supported(t: Tensor) -> bool:
    """Whether the ``torch._foreach_*`` kernels can update ``t``: the tensor types the built-in
    optimisers run foreach on (plain tensors, and ``DTensor`` once ``torch.distributed.tensor`` is
    imported) on the CPU or a device with foreach kernels.

    CPU counts: its foreach ops loop in C++, still cheaper than the Python loop of the reference.
    """
    return (
        type(t) in _optimizer._foreach_supported_types
        and t.layout is torch.strided
        and _on(t, _get_foreach_kernels_supported_devices())
    )


def default_implementation(params: list[Tensor], differentiable: bool) -> tuple[bool, bool]:
    """The path used when neither ``foreach`` nor ``fused`` is given: ``(fused, foreach)``.

    Rule: the fused kernel (fastest: one memory pass) whenever every tensor is a plain strided
    floating or complex tensor on a device with fused optimiser kernels (CPU, CUDA, XPU, MPS, ...);
    at each step it still sends any tensor whose gradient or velocity layout differs from the
    parameter's (or whose device or dtype changed to one without fused support) through foreach.
    Otherwise the multi-tensor ``foreach`` path when all tensors are of a type the built-in runs
    foreach on (plain tensors, ``DTensor``) on the CPU or a device with foreach kernels; otherwise
    the single-tensor reference. ``differentiable=True`` and TorchScript always use the reference
    (the only path autograd can see through).

    Example:
        >>> import torch
        >>> from torch_momentum.functional import default_implementation
        >>> default_implementation([torch.zeros(3)], differentiable=False)
        (True, False)
        >>> default_implementation([torch.zeros(3)], differentiable=True)
        (False, False)
    """
    if differentiable or torch.jit.is_scripting():
        return False, False
    if all(fused_supported(p) for p in params):
        return True, False
    return False, all(foreach_supported(p) for p in params)


def _fused_error(detail: str) -> RuntimeError:
    return RuntimeError(
        "fused=True requires every parameter to be a strided floating point or complex Tensor on "
        f"one of {_get_fused_kernels_supported_devices()}, but {detail}"
    )


def check_fused(params: list[Tensor]) -> None:
    """Raise a clear ``RuntimeError`` unless the fused kernel can update every tensor."""
    for i, p in enumerate(params):
        if not fused_supported(p):
            raise _fused_error(
                f"parameter {i} is {type(p).__name__} of dtype {p.dtype} on {p.device.type}"
            )


def _neg(x: float | Tensor) -> float | Tensor:
    return -x


def lookahead_shift(
    params: list[Tensor], velocities: list[Tensor], alpha: float | Tensor, *, foreach: bool = True
) -> None:
    r"""In place, :math:`p \leftarrow p + \alpha v` for every pair.

    NesterovSGD uses it to move between the iterate :math:`x` and the look-ahead
    :math:`y = x + \eta\mu v` (``alpha = ±ημ``), and to re-base the look-ahead when
    :math:`\eta\mu` changed between steps (``alpha = η_new μ_new − η_old μ_old``).
    A Tensor ``alpha`` is used without reading it on the host (no device synchronisation).

    Example:
        >>> import torch
        >>> from torch_momentum.functional import lookahead_shift
        >>> p, v = torch.tensor([1.0]), torch.tensor([2.0])
        >>> lookahead_shift([p], [v], 0.5)
        >>> p
        tensor([2.])
    """
    if not params:
        return
    if isinstance(alpha, Tensor) and alpha.device.type == "cpu" and not alpha.requires_grad:
        alpha = alpha.item()  # free on the host, and no full-size temporary below
    if isinstance(alpha, Tensor):
        if foreach:
            torch._foreach_add_(params, torch._foreach_mul(velocities, alpha))
        else:
            for p, v in zip(params, velocities, strict=True):
                p.add_(v * alpha)
        return
    if alpha == 0:
        return
    if foreach:
        torch._foreach_add_(params, velocities, alpha=alpha)
    else:
        for p, v in zip(params, velocities, strict=True):
            p.add_(v, alpha=alpha)


def momentum_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    velocities: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    nesterov: bool,
    foreach: bool | None = None,
    fused: bool | None = None,
    differentiable: bool = False,
) -> None:
    r"""Functional form of one PolyakSGD (``nesterov=False``) or NesterovSGD step.

    ``velocities`` holds :math:`v` in the slide sign convention and is updated in place (with
    ``differentiable=True`` its entries are replaced by new tensors, so that a velocity saved for
    the backward pass is never modified); it must be empty when ``momentum == 0`` and otherwise
    hold one tensor per parameter (zeros before the first step). For Nesterov the parameters must
    hold :math:`y = x + \eta\mu v` with the current ``lr`` and ``momentum`` (see
    :func:`lookahead_shift`). See the module docstring for the mathematics of each path.

    Example:
        >>> import torch
        >>> from torch_momentum.functional import momentum_sgd
        >>> p, g, v = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5])
        >>> momentum_sgd([p], [g], [v], lr=0.1, momentum=0.9, weight_decay=0.0,
        ...              maximize=False, nesterov=False)
        >>> v, p  # v = -2 + 0.9 * 0.5, p = 1 + 0.1 * v
        (tensor([-1.5500]), tensor([0.8450]))
    """
    strict = bool(fused)
    fused, foreach = resolve_implementation(params, foreach, fused, differentiable)
    run_kernel(
        fused,
        foreach,
        params,
        grads,
        velocities,
        lr=scalar_lr(lr),
        momentum=momentum,
        weight_decay=weight_decay,
        maximize=maximize,
        nesterov=nesterov,
        strict=strict,
        differentiable=differentiable,
    )


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """A 1-element Tensor lr as a 0-dim Tensor (foreach ops and the fused kernel want 0-dim)."""
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.dim() != 0 else lr


def resolve_implementation(
    params: list[Tensor], foreach: bool | None, fused: bool | None, differentiable: bool
) -> tuple[bool, bool]:
    """``(fused, foreach)`` for these tensors: the default rule of :func:`default_implementation`
    when both are ``None`` (foreach instead of fused while ``torch.compile`` traces, so that
    Inductor generates its own fused kernel), else the request, checked for ``fused=True``.

    Example:
        >>> import torch
        >>> from torch_momentum.functional import resolve_implementation
        >>> resolve_implementation([torch.zeros(2)], foreach=None, fused=None, differentiable=False)
        (True, False)
        >>> resolve_implementation([torch.zeros(2)], foreach=True, fused=None, differentiable=False)
        (False, True)
    """
    if foreach is None and fused is None:
        fused, foreach = default_implementation(params, differentiable)
        if fused and torch.compiler.is_compiling():
            fused, foreach = False, True
    elif fused:
        check_fused(params)
    return bool(fused), bool(foreach)


def run_kernel(
    fused: bool,
    foreach: bool,
    params: list[Tensor],
    grads: list[Tensor],
    velocities: list[Tensor],
    *,
    strict: bool = False,
    differentiable: bool = False,
    **hyper: Any,
) -> None:
    """Run the chosen path (see :func:`resolve_implementation`). The fused path checks the
    layouts, devices and dtypes of this step itself; with ``strict`` (an explicit ``fused=True``)
    a device or dtype without fused support is a ``RuntimeError`` instead of a fallback.

    Example:
        >>> import torch
        >>> from torch_momentum.functional import run_kernel
        >>> p, g = torch.tensor([1.0]), torch.tensor([2.0])
        >>> run_kernel(True, False, [p], [g], [], lr=0.5, momentum=0.0, weight_decay=0.0,
        ...            maximize=False, nesterov=False)
        >>> p  # 1 - 0.5 * 2
        tensor([0.])
    """
    if fused:
        _fused_momentum_sgd(params, grads, velocities, strict=strict, **hyper)
    elif foreach:
        _multi_tensor_momentum_sgd(params, grads, velocities, **hyper)
    else:
        _single_tensor_momentum_sgd(
            params, grads, velocities, differentiable=differentiable, **hyper
        )


def _single_tensor_momentum_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    velocities: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    nesterov: bool,
    differentiable: bool = False,
) -> None:
    r"""Reference path: one tensor at a time, written like the slide formulas.

    Nesterov updates the look-ahead directly, :math:`y \leftarrow y - \eta(d - \mu v_{t+1})`,
    which rounds exactly like the built-in's for-loop (its ``grad + momentum * buf`` is
    :math:`d - \mu v`). Temporaries, as in the built-in: ``-g`` (maximize), ``g + λp`` (weight
    decay) and, for Nesterov, ``d - μv``. With ``differentiable`` the velocity is replaced by a new
    tensor instead of being updated in place (autograd may have saved the old one).
    """
    for i, p in enumerate(params):
        d = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            d = d.add(p, alpha=weight_decay)  # d = grad + weight_decay * p
        if momentum == 0:
            # v = -d;  x <- x + lr * v   (Nesterov's look-ahead coincides with x)
            _axpy(p, d, _neg(lr))
            continue
        v = velocities[i]
        if differentiable:
            v = velocities[i] = v.mul(momentum).sub(d)  # v <- -d + momentum * v (new tensor)
        else:
            v.mul_(momentum).sub_(d)  # v <- -d + momentum * v
        if nesterov:
            _axpy(p, d.add(v, alpha=-momentum), _neg(lr))  # y <- y - lr * (d - momentum * v)
        else:
            _axpy(p, v, lr)  # x <- x + lr * v


def _axpy(x: Tensor, y: Tensor, alpha: float | Tensor) -> None:
    """In place ``x += alpha * y`` without a temporary, for a float or 0-dim Tensor ``alpha``."""
    if isinstance(alpha, Tensor):
        x.addcmul_(y, alpha.reshape(()))
    else:
        x.add_(y, alpha=alpha)


def _scalar(lr: float | Tensor, device: torch.device) -> float | Tensor:
    """``lr`` as an ``alpha``: a Python number when reading it costs no device synchronisation."""
    if isinstance(lr, Tensor) and device.type == "cpu" and not torch.compiler.is_compiling():
        return lr.item()
    return lr


def _axpy_(xs: list[Tensor], ys: list[Tensor], alpha: float | Tensor) -> None:
    """``xs += alpha * ys`` for a float or a (device) Tensor ``alpha``."""
    if isinstance(alpha, Tensor):
        torch._foreach_add_(xs, torch._foreach_mul(ys, alpha))
    else:
        torch._foreach_add_(xs, ys, alpha=alpha)


def _grouped(
    params: list[Tensor], grads: list[Tensor], velocities: list[Tensor], momentum: float
) -> list[tuple[tuple[torch.device, torch.dtype], list[list[Tensor]]]]:
    """``[((device, dtype), [params, grads(, velocities)])]``: the lists a multi-tensor kernel takes
    (no velocities when ``momentum == 0``)."""
    tensor_lists: list[list[Tensor]] = [params, grads]
    if momentum != 0:
        tensor_lists.append(velocities)
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensor_lists)  # type: ignore[arg-type]
    return [(key, cast(list[list[Tensor]], lists)) for key, (lists, _) in grouped.items()]


def _multi_tensor_momentum_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    velocities: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    nesterov: bool,
) -> None:
    """Multi-tensor path: ``torch._foreach_*`` over tensors grouped by device and dtype. Any
    layouts (ATen's foreach kernels take a per-tensor route when strides differ).

    Rounding exactly as the built-in's foreach path. For Nesterov without weight decay or
    maximize the built-in adds ``momentum * buf`` into the gradients in place; we leave the
    gradients alone and compute ``d - momentum * v`` in chunks of at most the largest tensor or
    2**20 elements, whichever is more (the built-in's for-loop needs the largest tensor); for
    DTensor, where temporaries are expensive, we add ``lr * momentum * v`` and ``-lr * d`` to the
    parameters separately instead (one more rounding)."""
    if not params:
        return
    for (device, _), lists in _grouped(params, grads, velocities, momentum):
        device_params = cast(list[Tensor], lists[0])
        device_grads = cast(list[Tensor], lists[1])
        alpha = _scalar(lr, device)
        fresh = maximize or weight_decay != 0  # d is a temporary of ours, not the gradients
        if maximize:
            device_grads = list(torch._foreach_neg(device_grads))
            if weight_decay != 0:
                torch._foreach_add_(device_grads, device_params, alpha=weight_decay)
        elif weight_decay != 0:
            device_grads = list(torch._foreach_add(device_grads, device_params, alpha=weight_decay))
        d = device_grads  # the descent direction d
        if momentum == 0:
            _axpy_(device_params, d, _neg(alpha))
            continue
        v = cast(list[Tensor], lists[2])
        torch._foreach_mul_(v, momentum)
        torch._foreach_sub_(v, d)  # v <- -d + momentum * v
        if nesterov and fresh:  # y <- y - lr * (d - momentum * v), d - momentum * v rounded once
            torch._foreach_add_(d, v, alpha=-momentum)  # as the built-in (d is our temporary)
            _axpy_(device_params, d, _neg(alpha))
        elif nesterov and type(d[0]) not in _PLAIN_TENSOR_TYPES:
            # DTensor: a temporary costs a new wrapper per tensor (4-5x the step), so no
            # temporary and one more rounding of the parameters than the built-in
            _axpy_(device_params, v, alpha * momentum)
            _axpy_(device_params, d, _neg(alpha))
        elif nesterov:  # d is the gradient, which we do not overwrite (the built-in does)
            for lo, hi in _chunks(d):
                tmp = torch._foreach_add(d[lo:hi], v[lo:hi], alpha=-momentum)
                _axpy_(device_params[lo:hi], tmp, _neg(alpha))
                del tmp  # peak temporary: one chunk
        else:  # x <- x + lr * v
            _axpy_(device_params, v, alpha)


_CHUNK_ELEMENTS = 2**20  # smallest chunk bound: few calls for many small tensors (DTensor shards)


def _chunks(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """Consecutive index ranges whose tensors hold at most ``max(largest tensor, 2**20)``
    elements."""
    sizes = [t.numel() for t in tensors]
    limit = max(max(sizes, default=0), _CHUNK_ELEMENTS)
    ranges, lo, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > lo and total + size > limit:
            ranges.append((lo, i))
            lo, total = i, 0
        total += size
    if lo < len(sizes):
        ranges.append((lo, len(sizes)))
    return ranges


def _non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements (in some order of its dims)."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_dense_layout(tensors: tuple[Tensor, ...]) -> bool:
    """Whether the fused kernel, which walks each tensor as one flat block from its first
    element, sees matching elements: all dense and non-overlapping with the same strides."""
    first = tensors[0]
    if first.is_contiguous():
        return all(t.is_contiguous() for t in tensors[1:])
    stride = first.stride()
    return all(t.stride() == stride for t in tensors[1:]) and _non_overlapping_and_dense(first)


def _split_by_layout(lists: list[list[Tensor]], rest: list[list[Tensor]]) -> list[list[Tensor]]:
    """The tensors of ``lists`` that the fused kernel can update; the others go to ``rest``.

    The common case (everything contiguous) costs one ``is_contiguous`` call per tensor."""
    if all(map(Tensor.is_contiguous, chain.from_iterable(lists))):
        return lists
    keep: list[list[Tensor]] = [[] for _ in lists]
    for tensors in zip(*lists, strict=True):
        target = keep if _same_dense_layout(tensors) else rest
        for out, t in zip(target, tensors, strict=False):  # rest has 3 lists
            out.append(t)
    return keep


def _fused_momentum_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    velocities: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    nesterov: bool,
    strict: bool = False,
) -> None:
    """Fused path: ``torch._fused_sgd_`` through the exact sign mapping of the module docstring,
    for the tensors it can update correctly; the others through foreach (or the reference)."""
    if not params:
        return
    neg_lr = _neg(lr)
    rest: list[list[Tensor]] = [[], [], []]
    for (device, dtype), lists in _grouped(params, grads, velocities, momentum):
        if not _fused_device_dtype(device, dtype):
            if strict:
                raise _fused_error(f"this step has parameters of dtype {dtype} on {device.type}")
            for out, ts in zip(rest, lists, strict=False):  # rest has 3 lists
                out += ts
            continue
        if not _fused_correct(device, dtype):
            for out, ts in zip(rest, lists, strict=False):  # rest has 3 lists
                out += ts
            continue
        lists = _split_by_layout(lists, rest)
        if not lists[0]:
            continue
        if dtype.is_complex:  # view only this group's tensors: no per-tensor test for real ones
            lists = [[torch.view_as_real(t) for t in ts] for ts in lists]
        device_lr = neg_lr
        if isinstance(neg_lr, Tensor) and neg_lr.device.type != "cpu" and neg_lr.device != device:
            # a CPU scalar goes to the kernel as is (as the built-in does): no host sync
            device_lr = neg_lr.to(device, non_blocking=True)
        torch._fused_sgd_(
            cast(list[Tensor], lists[0]),
            cast(list[Tensor], lists[1]),
            cast(list[Tensor], lists[2]) if momentum != 0 else [],
            weight_decay=-weight_decay,
            momentum=momentum,
            lr=device_lr,
            dampening=0.0,
            nesterov=nesterov,
            maximize=not maximize,
            is_first_step=False,
        )
    if rest[0]:
        _fallback(
            rest,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            maximize=maximize,
            nesterov=nesterov,
        )


def _fallback(rest: list[list[Tensor]], **hyper: Any) -> None:
    """Tensors the fused kernel cannot take: foreach where the device has it, else the loop."""
    params, grads, velocities = rest
    for (device, _), lists in _grouped(params, grads, velocities, hyper["momentum"]):
        vs = lists[2] if len(lists) > 2 else []
        if _foreach_device(device) and all(foreach_supported(p) for p in lists[0]):
            _multi_tensor_momentum_sgd(lists[0], lists[1], vs, **hyper)
        else:
            _single_tensor_momentum_sgd(lists[0], lists[1], vs, **hyper)
