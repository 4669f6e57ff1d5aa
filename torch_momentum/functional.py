r"""The one update kernel shared by :class:`~torch_momentum.PolyakSGD` and
:class:`~torch_momentum.NesterovSGD`, in three interchangeable implementations.

Notation (velocity form, velocity first). With the descent direction

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
:math:`p = x + \eta\mu v` holds for the new coefficient; the kernels then assume it does.

Paths, as in ``torch/optim/sgd.py`` (their code is in the private module
``torch_momentum._kernels``), each named by an ``Implementation``
(``Literal["forloop", "foreach", "fused"]``):

* ``"forloop"``: the reference. One tensor at a time, written
  like the formulas above (Nesterov through the last identity, in the rounding order of the
  built-in, so that it gives the built-in's for-loop results bit for bit). It is the only path
  for ``differentiable=True`` and for sparse gradients, which the other two paths send to it.
* ``"foreach"``: ``torch._foreach_*`` over tensors grouped by
  device and dtype.
* ``"fused"``: PyTorch's own fused SGD kernel (``torch._fused_sgd_``, one pass that reads
  ``p, g, v`` and writes ``p, v`` as flat arrays), driven through an exact sign mapping. It only
  takes tensors whose parameter, gradient and velocity are dense, non-overlapping and share
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
  :math:`p + \eta(\mu v - d)`), i.e. exactly the velocity-form update with ``v`` stored in that
  sign convention. Complex tensors go through :func:`torch.view_as_real`, which is exact because
  every operation of the update is real-linear.

With ``momentum == 0`` no velocity is kept (:math:`v_{t+1} = -d_t` carries no memory) and the
update is plain gradient descent :math:`p \leftarrow p - \eta d_t`.

**Default path.** Without ``foreach=`` or ``fused=`` the path is the one ``torch.optim.SGD``
takes by default on the same tensors, so that a swapped optimiser follows the built-in's
trajectory bit for bit: ``"foreach"`` when every tensor is of a type the built-in runs foreach
on (plain tensors, ``DTensor``) on a device with foreach kernels (CUDA, XPU, ...), otherwise
``"forloop"``, which is the built-in's default on the CPU. The fused kernel (one memory pass, the
fastest on large models) rounds differently (it may contract to FMAs) and the CPU foreach
kernels round reduced-precision scalar products differently from the for-loop, so both are
available on request only.

**Sparse gradients** (``nn.Embedding(sparse=True)``) are handled as ``torch.optim.SGD`` handles
them: the reference path on sparse tensors, whose velocity is then a sparse tensor like the
built-in's momentum buffer (``velocity == -momentum_buffer`` index for index); weight decay with
a sparse gradient is not supported (the built-in fails too, ``add(sparse, dense)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_momentum import _kernels

__all__ = ["lookahead_shift", "momentum_sgd"]


def lookahead_shift(
    params: list[Tensor], velocities: list[Tensor], alpha: float | Tensor, *, foreach: bool = True
) -> None:
    r"""In place, :math:`p \leftarrow p + \alpha v` for every pair.

    NesterovSGD uses it to move between the iterate :math:`x` and the look-ahead
    :math:`y = x + \eta\mu v` (``alpha = ±ημ``), and to re-base the look-ahead when
    :math:`\eta\mu` changed between steps (``alpha = η_new μ_new − η_old μ_old``).
    A Tensor ``alpha`` is used without reading it on the host (no device synchronisation).
    Sparse velocities (from sparse gradients) are added one at a time whatever ``foreach`` says.

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
    alpha = _kernels.host_lr(alpha)  # free on the host, and no full-size temporary below
    if not isinstance(alpha, Tensor) and alpha == 0:
        return
    if foreach and all(v.layout is torch.strided for v in velocities):  # strided only
        _kernels.foreach_axpy(params, velocities, alpha)
    else:
        for p, v in zip(params, velocities, strict=True):
            _kernels.axpy(p, v, alpha)


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

    ``velocities`` holds :math:`v` in the velocity-form sign convention, updated in place (with
    ``differentiable=True`` its entries are replaced by new tensors, so that a velocity saved for
    the backward pass is never modified); it must be empty when ``momentum == 0`` and otherwise
    hold one tensor per parameter (zeros before the first step: ``torch.zeros_like(grad)`` for a
    sparse gradient, so that the velocity stays sparse as the built-in's buffer does). For
    Nesterov the parameters must hold :math:`y = x + \eta\mu v` with the current ``lr`` and
    ``momentum`` (see :func:`lookahead_shift`). Without ``foreach``/``fused`` the path is the
    built-in's default for these tensors. See the module docstring for the mathematics of each
    path.

    Raises:
        RuntimeError: ``fused=True`` with a tensor the fused kernel cannot update; a sparse
            gradient with ``weight_decay != 0``.

    Example:
        >>> import torch
        >>> from torch_momentum.functional import momentum_sgd
        >>> p, g, v = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5])
        >>> momentum_sgd([p], [g], [v], lr=0.1, momentum=0.9, weight_decay=0.0,
        ...              maximize=False, nesterov=False)
        >>> v, p  # v = -2 + 0.9 * 0.5, p = 1 + 0.1 * v
        (tensor([-1.5500]), tensor([0.8450]))
    """
    implementation = _kernels.resolve_implementation(params, foreach, fused, differentiable)
    has_sparse_grad = _kernels.check_sparse_grads(grads, weight_decay)
    _kernels.run_kernel(
        implementation,
        params,
        grads,
        velocities,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        maximize=maximize,
        nesterov=nesterov,
        has_sparse_grad=has_sparse_grad,
        differentiable=differentiable,
    )
