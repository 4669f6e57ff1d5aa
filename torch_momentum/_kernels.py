"""The update paths behind :func:`torch_momentum.functional.momentum_sgd` (the mathematics is in
that module's docstring): which path a list of tensors takes, and the three kernels.

* ``_single_tensor_momentum_sgd`` (``"forloop"``): the reference, one tensor at a time in the
  rounding order of the built-in's for-loop; the only path for ``differentiable=True`` and for
  sparse gradients.
* ``_multi_tensor_momentum_sgd`` (``"foreach"``): ``torch._foreach_*`` over tensors grouped by
  device and dtype, in the rounding order of the built-in's foreach path.
* ``_fused_momentum_sgd`` (``"fused"``): ``torch._fused_sgd_`` through an exact sign mapping.

A private module: :class:`~torch_momentum.PolyakSGD`, :class:`~torch_momentum.NesterovSGD` and
:mod:`torch_momentum.functional` share these names.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Literal, cast

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer
from torch.optim.optimizer import Optimizer
from torch.utils._foreach_utils import (
    _get_foreach_kernels_supported_devices,
    _get_fused_kernels_supported_devices,
)

#: The update path: the reference for-loop, the multi-tensor ``torch._foreach_*`` path, or the
#: fused kernel (see :mod:`torch_momentum.functional`).
Implementation = Literal["forloop", "foreach", "fused"]

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
    """Whether the ``torch._foreach_*`` kernels can update ``t`` on request (``foreach=True``):
    the tensor types the built-in optimisers run foreach on (plain tensors, and ``DTensor`` once
    ``torch.distributed.tensor`` is imported) on the CPU or a device with foreach kernels.

    CPU counts: its foreach ops loop in C++, still cheaper than the Python loop of the reference.
    """
    return (
        type(t) in _optimizer._foreach_supported_types
        and t.layout is torch.strided
        and _on(t, _get_foreach_kernels_supported_devices())
    )


def default_implementation(params: list[Tensor], differentiable: bool) -> Implementation:
    """The path ``torch.optim.SGD`` takes by default on these tensors, by torch's own rule
    (``_default_to_fused_or_foreach`` with ``use_fused=False``): ``"foreach"`` when every tensor
    is a plain tensor or ``DTensor`` on a device with foreach kernels (CUDA, XPU, ...), else
    ``"forloop"`` (the CPU, the meta device, ``differentiable=True``, TorchScript)."""
    _, foreach = _optimizer._default_to_fused_or_foreach(params, differentiable, use_fused=False)
    return "foreach" if foreach else "forloop"


def _fused_error(t: Tensor, detail: str) -> RuntimeError:
    """The built-in's words for a tensor the fused kernel cannot take (code written against
    ``torch.optim.SGD(fused=True)`` matches on them), then which tensor it is."""
    return RuntimeError(
        "`fused=True` requires all the params to be floating point Tensors of supported devices: "
        f"{_get_fused_kernels_supported_devices()} but {t.dtype} and {t.device.type} ({detail}; "
        "complex Tensors are accepted too, through their real view)"
    )


def check_fused(params: list[Tensor], where: str = "") -> None:
    """Raise a clear ``RuntimeError`` unless the fused kernel can update every tensor (``where``
    says which parameter list, e.g. ``"param group 0, "``)."""
    for i, p in enumerate(params):
        if not fused_supported(p):
            layout = "" if p.layout is torch.strided else f", layout {p.layout}"
            raise _fused_error(p, f"{where}parameter {i} is a {type(p).__name__}{layout}")


def _neg(x: float | Tensor) -> float | Tensor:
    return -x


def check_sparse_grads(grads: list[Tensor], weight_decay: float, where: str = "") -> bool:
    """Whether one of ``grads`` is sparse; a ``RuntimeError`` naming ``weight_decay`` if one is
    and ``weight_decay != 0`` (``where`` says which parameter list, e.g. ``"param group 0: "``).

    The decay term ``weight_decay * p`` is dense, so the step would be dense: the built-in fails
    here too."""
    sparse = any(g.is_sparse for g in grads)
    if sparse and weight_decay != 0:
        raise RuntimeError(
            f"{where}weight_decay={weight_decay} is not supported with sparse gradients: the "
            "decay term weight_decay * p is dense (torch.optim.SGD fails here too, with "
            "'add(sparse, dense) is not supported'); use weight_decay=0 for parameters with "
            "sparse gradients (a param group of their own) or dense gradients"
        )
    return sparse


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """A 1-element Tensor lr as a 0-dim Tensor (foreach ops and the fused kernel want 0-dim)."""
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.dim() != 0 else lr


def resolve_implementation(
    params: list[Tensor],
    foreach: bool | None,
    fused: bool | None,
    differentiable: bool,
    where: str = "",
) -> Implementation:
    """The path for these tensors: the built-in's default (:func:`default_implementation`) when
    both flags are ``None``, else the request, checked for ``fused=True``."""
    if foreach is None and fused is None:
        return default_implementation(params, differentiable)
    if fused:
        check_fused(params, where)
        return "fused"
    return "foreach" if foreach else "forloop"


def run_kernel(
    implementation: Implementation,
    params: list[Tensor],
    grads: list[Tensor],
    velocities: list[Tensor],
    *,
    lr: float | Tensor,
    has_sparse_grad: bool = False,
    differentiable: bool = False,
    **hyper: Any,
) -> None:
    """Run the chosen path. Tensors with a sparse gradient or velocity go through the reference
    path whatever the choice (``has_sparse_grad`` says whether to look for them). The fused path
    (only ever chosen by an explicit ``fused=True``) checks the layouts, devices and dtypes of
    this step itself: a device or dtype without fused support is a ``RuntimeError``; the tensors
    it can update but not correctly (or not in their layout) go through foreach or the loop.

    ``lr`` is a number or a (1-element) Tensor; it is read once here: the fused kernel takes the
    Tensor as is, the for-loop and foreach kernels take :func:`host_lr` of it."""
    lr = scalar_lr(lr)
    alpha = host_lr(lr)
    if has_sparse_grad and implementation != "forloop":
        sparse, dense = _split_sparse(params, grads, velocities)
        _single_tensor_momentum_sgd(*sparse, lr=alpha, **hyper)
        params, grads, velocities = dense
    if implementation == "fused":
        rest = _fused_momentum_sgd(params, grads, velocities, lr=lr, **hyper)
        if rest[0]:  # foreach for the tensors it can update, the loop for the others
            foreach, loop = split([foreach_supported(p) for p in rest[0]], *rest)
            _multi_tensor_momentum_sgd(*foreach, lr=alpha, **hyper)
            _single_tensor_momentum_sgd(*loop, lr=alpha, **hyper)
    elif implementation == "foreach":
        _multi_tensor_momentum_sgd(params, grads, velocities, lr=alpha, **hyper)
    else:
        _single_tensor_momentum_sgd(
            params, grads, velocities, lr=alpha, differentiable=differentiable, **hyper
        )


def split(mask: list[bool], *lists: list[Tensor]) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """``(chosen, others)``: the entries of each list where ``mask`` is true, and the rest, in
    order. An empty list (no velocities: ``momentum == 0``) stays empty in both."""
    chosen: list[list[Tensor]] = [[] for _ in lists]
    others: list[list[Tensor]] = [[] for _ in lists]
    if all(mask):  # the common cases: no copies
        return list(lists), others
    if not any(mask):
        return chosen, list(lists)
    for i, keep in enumerate(mask):
        for ts, c, o in zip(lists, chosen, others, strict=True):
            if ts:
                (c if keep else o).append(ts[i])
    return chosen, others


def _split_sparse(
    params: list[Tensor], grads: list[Tensor], velocities: list[Tensor]
) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """``(sparse, dense)``: the tensors whose gradient or velocity is sparse, and the others."""
    sparse_v = [v.is_sparse for v in velocities] or [False] * len(grads)  # no velocities: dense
    mask = [g.is_sparse or v for g, v in zip(grads, sparse_v, strict=True)]
    return split(mask, params, grads, velocities)


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
    r"""Reference path: one tensor at a time, written like the velocity-form formulas.

    Nesterov updates the look-ahead directly, :math:`y \leftarrow y - \eta(d - \mu v_{t+1})`,
    which rounds exactly like the built-in's for-loop (its ``grad + momentum * buf`` is
    :math:`d - \mu v`). Temporaries, as in the built-in: ``-g`` (maximize), ``g + λp`` (weight
    decay) and, for Nesterov, ``d - μv``. With ``differentiable`` the velocity is replaced by a new
    tensor instead of being updated in place (autograd may have saved the old one). A host Tensor
    lr arrives read as a number (:func:`host_lr`, in :func:`run_kernel`), as the built-in reads
    it. Sparse gradients (and velocities) take the same operations, which ATen runs on sparse
    tensors as it does for the built-in's buffer.
    """
    for i, p in enumerate(params):
        d = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            d = d.add(p, alpha=weight_decay)  # d = grad + weight_decay * p
        if momentum == 0:
            # v = -d;  x <- x + lr * v   (Nesterov's look-ahead coincides with x)
            axpy(p, d, _neg(lr))
            continue
        v = velocities[i]
        if differentiable:
            v = velocities[i] = v.mul(momentum).sub(d)  # v <- -d + momentum * v (new tensor)
        else:
            v.mul_(momentum).sub_(d)  # v <- -d + momentum * v
        if nesterov:
            axpy(p, d.add(v, alpha=-momentum), _neg(lr))  # y <- y - lr * (d - momentum * v)
        else:
            axpy(p, v, lr)  # x <- x + lr * v


def axpy(x: Tensor, y: Tensor, alpha: float | Tensor) -> None:
    """In place ``x += alpha * y`` without a temporary, for a float or 0-dim Tensor ``alpha``."""
    if isinstance(alpha, Tensor):
        if y.is_sparse:  # no sparse addcmul_: a sparse temporary of y's stored values
            x.add_(y * alpha.reshape(()))
        else:
            x.addcmul_(y, alpha.reshape(()))
    else:
        x.add_(y, alpha=alpha)


def host_lr(lr: float | Tensor) -> float | Tensor:
    """``lr`` as an ``alpha``: a Python number when reading it costs no device synchronisation
    (a host Tensor that autograd does not track, outside ``torch.compile``). The built-in reads a
    Tensor lr on the host the same way (``add_(..., alpha=-lr)``), so this is also its rounding:
    ``alpha`` goes to the kernels in the compute precision, where a Tensor factor would be cast
    to the parameters' dtype first (bfloat16: 0.05 becomes 0.0500488...)."""
    if (
        isinstance(lr, Tensor)
        and lr.device.type == "cpu"
        and not lr.requires_grad
        and not torch.compiler.is_compiling()
    ):
        return lr.item()
    return lr


def foreach_axpy(
    xs: list[Tensor], ys: list[Tensor] | tuple[Tensor, ...], alpha: float | Tensor
) -> None:
    """``xs += alpha * ys`` for a float or a (device) Tensor ``alpha``."""
    if isinstance(alpha, Tensor):
        torch._foreach_add_(xs, torch._foreach_mul(ys, alpha))
    else:
        torch._foreach_add_(xs, ys, alpha=alpha)


def _grouped(
    params: list[Tensor], grads: list[Tensor], velocities: list[Tensor], momentum: float
) -> list[tuple[tuple[torch.device, torch.dtype], list[list[Tensor]]]]:
    """``[((device, dtype), [params, grads(, velocities)])]``: the lists a multi-tensor kernel takes
    (no velocities when ``momentum == 0``). While ``torch.compile`` traces, torch does not group
    (Inductor does) and the key is that of the first tensor."""
    tensor_lists: list[list[Tensor | None]] = [list(params), list(grads)]
    if momentum != 0:
        tensor_lists.append(list(velocities))
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensor_lists)
    out = []
    for (device, dtype), (lists, _) in grouped.items():
        tensors = cast(list[list[Tensor]], lists)
        if device is None or dtype is None:  # compiling: one group
            device, dtype = tensors[0][0].device, tensors[0][0].dtype
        out.append(((device, dtype), tensors))
    return out


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
    parameters separately instead (one more rounding). ``lr`` is a number where the caller could
    read it on the host for free (:func:`host_lr`), else a 0-dim Tensor."""
    if not params:
        return
    for _, lists in _grouped(params, grads, velocities, momentum):
        device_params = cast(list[Tensor], lists[0])
        device_grads = cast(list[Tensor], lists[1])
        fresh = maximize or weight_decay != 0  # d is a temporary of ours, not the gradients
        if maximize:
            device_grads = list(torch._foreach_neg(device_grads))
            if weight_decay != 0:
                torch._foreach_add_(device_grads, device_params, alpha=weight_decay)
        elif weight_decay != 0:
            device_grads = list(torch._foreach_add(device_grads, device_params, alpha=weight_decay))
        d = device_grads  # the descent direction d
        if momentum == 0:
            foreach_axpy(device_params, d, _neg(lr))
            continue
        v = cast(list[Tensor], lists[2])
        torch._foreach_mul_(v, momentum)
        torch._foreach_sub_(v, d)  # v <- -d + momentum * v
        if nesterov and fresh:  # y <- y - lr * (d - momentum * v), d - momentum * v rounded once
            torch._foreach_add_(d, v, alpha=-momentum)  # as the built-in (d is our temporary)
            foreach_axpy(device_params, d, _neg(lr))
        elif nesterov and type(d[0]) not in _PLAIN_TENSOR_TYPES:
            # DTensor: a temporary costs a new wrapper per tensor (4-5x the step), so no
            # temporary and one more rounding of the parameters than the built-in
            foreach_axpy(device_params, v, lr * momentum)
            foreach_axpy(device_params, d, _neg(lr))
        elif nesterov:  # d is the gradient, which we do not overwrite (the built-in does)
            for lo, hi in _chunks(d):
                tmp = torch._foreach_add(d[lo:hi], v[lo:hi], alpha=-momentum)
                foreach_axpy(device_params[lo:hi], tmp, _neg(lr))
                del tmp  # peak temporary: one chunk
        else:  # x <- x + lr * v
            foreach_axpy(device_params, v, lr)


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
) -> list[list[Tensor]]:
    """Fused path: ``torch._fused_sgd_`` through the exact sign mapping of the module docstring,
    for the tensors it can update correctly; returns the others (``[params, grads, velocities]``,
    which :func:`run_kernel` sends through foreach or the reference).

    Raises a ``RuntimeError`` (in the built-in's words) for a device or dtype that the fused
    kernel does not support at all, e.g. a parameter moved to the meta device since the path was
    resolved."""
    rest: list[list[Tensor]] = [[], [], []]
    if not params:
        return rest
    neg_lr = _neg(lr)
    for (device, dtype), lists in _grouped(params, grads, velocities, momentum):
        if not _fused_device_dtype(device, dtype):
            raise _fused_error(lists[0][0], "a parameter of this step")
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
    return rest
