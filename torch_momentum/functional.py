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
  above (Nesterov goes through :math:`x` explicitly). It is the only path for
  ``differentiable=True``.
* ``_multi_tensor_momentum_sgd``: ``torch._foreach_*`` over tensors grouped by device and dtype.
* ``_fused_momentum_sgd``: PyTorch's own fused SGD kernel (``torch._fused_sgd_``, one pass that
  reads ``p, g, v`` and writes ``p, v``), driven through an exact sign mapping. That kernel
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

from typing import Any, cast

import torch
from torch import Tensor
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


def fused_supported(t: Tensor) -> bool:
    """Whether the fused kernel can update ``t``: a plain strided floating point or complex tensor
    on a device with fused optimiser kernels (CPU, CUDA, XPU, MPS, ...)."""
    return (
        type(t) in _PLAIN_TENSOR_TYPES
        and t.layout is torch.strided
        and (t.is_floating_point() or t.is_complex())
        and _on(t, _get_fused_kernels_supported_devices())
    )


def foreach_supported(t: Tensor) -> bool:
    """Whether the ``torch._foreach_*`` kernels can update ``t``.

    CPU counts: its foreach ops loop in C++, still cheaper than the Python loop of the reference.
    """
    return (
        type(t) in _PLAIN_TENSOR_TYPES
        and t.layout is torch.strided
        and _on(t, _get_foreach_kernels_supported_devices())
    )


def default_implementation(params: list[Tensor], differentiable: bool) -> tuple[bool, bool]:
    """The path used when neither ``foreach`` nor ``fused`` is given: ``(fused, foreach)``.

    Rule: the fused kernel (fastest: one memory pass) whenever every tensor is a plain strided
    floating or complex tensor on a device with fused optimiser kernels (CPU, CUDA, XPU, MPS, ...);
    otherwise the multi-tensor ``foreach`` path when all tensors are plain tensors on the CPU or a
    device with foreach kernels; otherwise (tensor subclasses such as DTensor) the single-tensor
    reference. ``differentiable=True`` and TorchScript always use the reference (the only path
    autograd can see through).
    """
    if differentiable or torch.jit.is_scripting():
        return False, False
    if all(fused_supported(p) for p in params):
        return True, False
    return False, all(foreach_supported(p) for p in params)


def check_fused(params: list[Tensor]) -> None:
    """Raise a clear ``RuntimeError`` unless the fused kernel can update every tensor."""
    for i, p in enumerate(params):
        if not fused_supported(p):
            raise RuntimeError(
                "fused=True requires every parameter to be a strided floating point or complex "
                f"Tensor on one of {_get_fused_kernels_supported_devices()}, but parameter {i} "
                f"is {type(p).__name__} of dtype {p.dtype} on {p.device.type}"
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

    ``velocities`` holds :math:`v` in the slide sign convention and is updated in place; it must be
    empty when ``momentum == 0`` and otherwise hold one tensor per parameter (zeros before the
    first step). For Nesterov the parameters must hold :math:`y = x + \eta\mu v` with the current
    ``lr`` and ``momentum`` (see :func:`lookahead_shift`). See the module docstring for the
    mathematics of each path.
    """
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
    )


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """A 1-element Tensor lr as a 0-dim Tensor (foreach ops and the fused kernel want 0-dim)."""
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.dim() != 0 else lr


def resolve_implementation(
    params: list[Tensor], foreach: bool | None, fused: bool | None, differentiable: bool
) -> tuple[bool, bool]:
    """``(fused, foreach)`` for these tensors: the default rule of :func:`default_implementation`
    when both are ``None`` (foreach instead of fused while ``torch.compile`` traces, so that
    Inductor generates its own fused kernel), else the request, checked for ``fused=True``."""
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
    **hyper: Any,
) -> None:
    """Run the chosen path without further checks (see :func:`resolve_implementation`)."""
    if fused:
        impl = _fused_momentum_sgd
    elif foreach:
        impl = _multi_tensor_momentum_sgd
    else:
        impl = _single_tensor_momentum_sgd
    impl(params, grads, velocities, **hyper)


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
) -> None:
    """Reference path: one tensor at a time, written like the slide formulas.

    Temporaries: ``-g`` (maximize) and ``g + λp`` (weight decay) as in the built-in for-loop, and
    for Nesterov one copy of the parameter to hold the iterate ``x``.
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
        if not nesterov:
            v.mul_(momentum).sub_(d)  # v <- -d + momentum * v
            _axpy(p, v, lr)  # x <- x + lr * v
        else:
            x = p.clone()
            _axpy(x, v, _neg(lr * momentum))  # x = y - lr * momentum * v, the iterate
            v.mul_(momentum).sub_(d)  # v <- -d(y) + momentum * v
            _axpy(x, v, lr)  # x <- x + lr * v
            p.copy_(x)
            _axpy(p, v, lr * momentum)  # y <- x + lr * momentum * v
            del x  # free the copy before the next tensor's (peak = one tensor, as the built-in)


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
    """Multi-tensor path: ``torch._foreach_*`` over tensors grouped by device and dtype."""
    if not params:
        return
    for (device, _), lists in _grouped(params, grads, velocities, momentum):
        device_params = cast(list[Tensor], lists[0])
        device_grads = cast(list[Tensor], lists[1])
        alpha = _scalar(lr, device)
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
        if nesterov:  # y <- y + lr * (momentum * v - d)
            _axpy_(device_params, v, alpha * momentum)
            _axpy_(device_params, d, _neg(alpha))
        else:  # x <- x + lr * v
            _axpy_(device_params, v, alpha)


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
) -> None:
    """Fused path: ``torch._fused_sgd_`` through the exact sign mapping of the module docstring."""
    if not params:
        return
    neg_lr = _neg(lr)
    for (device, dtype), lists in _grouped(params, grads, velocities, momentum):
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
