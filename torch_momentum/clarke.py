r"""Clarke subgradients of nonsmooth functions by gradient sampling.

Mathematics
-----------
Let :math:`f:\mathbb{R}^d\to\mathbb{R}` be locally Lipschitz. By Rademacher's theorem it is
differentiable almost everywhere, and its **Clarke subdifferential** at :math:`x` is

.. math::
    \partial f(x) = \operatorname{conv}\{\, s : \exists\, x_i \to x,\ x_i \in D_f,\
    \nabla f(x_i) \to s \,\},

the convex hull of the limits of gradients taken at nearby points of differentiability
:math:`D_f`. ``x`` is *Clarke stationary* when :math:`0\in\partial f(x)`.

Autograd does not compute this set. At a kink it applies the chain rule with a fixed
convention (``relu'(0) = 0``), and the result need not be a subgradient at all: for
:math:`f(x) = \mathrm{relu}(x) - \mathrm{relu}(-x) = x`, autograd returns 0 at 0 although
:math:`\partial f(0) = \{1\}` (Kakade & Lee, *Provably correct automatic subdifferentiation for
qualified programs*, NeurIPS 2018).

Gradients at random points are safe: a point drawn from a ball lies in :math:`D_f` with
probability one, and there autograd returns the true gradient (for the programs autograd can
differentiate at all). The **Goldstein ε-subdifferential**

.. math::
    \partial_\varepsilon f(x) = \operatorname{conv} \bigcup_{\|y-x\|\le\varepsilon} \partial f(y)

contains the convex hull of the gradients sampled in the ball :math:`B(x,\varepsilon)`, and it
shrinks to :math:`\partial f(x)` as :math:`\varepsilon\to0` (outer semicontinuity of the Clarke
subdifferential). The **minimum-norm element** of the sampled hull,

.. math::
    g^\star = \operatorname*{arg\,min}_{g \in \operatorname{conv}\{s_1,\dots,s_k\}} \|g\|_2,

is the search direction of the gradient sampling method of Burke, Lewis & Overton (*A robust
gradient sampling algorithm for nonsmooth, nonconvex optimization*, SIAM J. Optim. 2005):
:math:`-g^\star` is a descent direction of :math:`f` whenever :math:`g^\star \neq 0`, and
:math:`g^\star = 0` certifies approximate (Goldstein) stationarity. :func:`min_norm_element`
computes it exactly with Wolfe's active-set algorithm (Wolfe, *Finding the nearest point in a
polytope*, Math. Programming 1976).

The estimate is of the Goldstein set, not of the Clarke set: at a point closer than the radius
to a kink, gradients from the other side of the kink are sampled too (see the tests).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from torch_momentum._sampling import (
    GradientSampler,
    TensorOrDict,
    check_common,
    check_num_samples,
    check_radius,
    check_sample_memory,
    check_x,
    default_radius,
    grad_at,
    scalar_output,
    unflatten,
)
from torch_momentum.minnorm import count_nonfinite_rows, min_norm_element, min_norm_of_rows

__all__ = ["ClarkeSubgradient", "clarke_subgradient", "min_norm_element"]


@dataclass(frozen=True)
class ClarkeSubgradient:
    """Result of :func:`clarke_subgradient`.

    Attributes:
        samples: gradients at the sample points, leading dimension ``k`` (a dict of such
            tensors when ``x`` was a dict).
        points: the sample points, leading dimension ``k``, same structure as ``samples``.
        weights: ``k`` convex weights (non-negative, summing to one) with
            ``min_norm = sum_i weights[i] * samples[i]``.
        min_norm: the minimum-norm element of the convex hull of the samples, shaped like
            ``x`` (a dict when ``x`` was a dict). Zero certifies (Goldstein) stationarity;
            otherwise ``-min_norm`` is the gradient-sampling descent direction.
        radius: the radius of the sampling ball that was used.

    Example:

        >>> import torch
        >>> from torch_momentum import clarke_subgradient
        >>> res = clarke_subgradient(torch.abs, torch.zeros((), dtype=torch.float64))
        >>> res.samples.shape, float(res.min_norm), float(res.weights.sum())
        (torch.Size([64]), 0.0, 1.0)

    """

    samples: TensorOrDict
    points: TensorOrDict
    weights: Tensor
    min_norm: TensorOrDict
    radius: float


def clarke_subgradient(
    f: Callable[[TensorOrDict], Tensor],
    x: TensorOrDict,
    *,
    radius: float | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
) -> ClarkeSubgradient:
    r"""Estimate the Clarke subdifferential of ``f`` at ``x`` by gradient sampling.

    Draws ``k = num_samples`` points :math:`x_i` uniformly from the Euclidean ball
    :math:`B(x, \varepsilon)` (over all entries of ``x`` together), takes the gradients
    :math:`s_i = \nabla f(x_i)` there with autograd, and returns them with the minimum-norm
    element :math:`g^\star` of :math:`\operatorname{conv}\{s_1, \dots, s_k\}`. The hull is an
    inner approximation of the Goldstein ε-subdifferential
    :math:`\partial_\varepsilon f(x) = \operatorname{conv}\bigcup_{\|y-x\|\le\varepsilon}
    \partial f(y)`, which decreases to the Clarke subdifferential :math:`\partial f(x)` as
    :math:`\varepsilon \to 0`; :math:`-g^\star` is the descent direction of the gradient sampling
    method (Burke, Lewis & Overton 2005). Unlike autograd at a kink (Kakade & Lee 2018), every
    :math:`s_i` is a true gradient: the sample points are almost surely points of
    differentiability.

    Sampling: a direction :math:`u_i/\|u_i\|` with :math:`u_i \sim N(0, I_d)` and a radius
    :math:`\varepsilon\, U_i^{1/d}` with :math:`U_i` uniform on :math:`(0, 1]`, which makes
    :math:`x_i` uniform in the ball. All randomness comes from ``generator`` (or torch's global
    generator), so a seeded generator reproduces the result.

    Args:
        f: maps a point shaped like ``x`` (a tensor, or a dict with the same keys and shapes) to
            a real scalar tensor. For a module, use ``torch.func.functional_call``:
            ``f = lambda p: loss(functional_call(model, p, (data,)), target)`` with
            ``x = dict(model.named_parameters())``. ``f`` is called ``k + 1`` times (once at
            ``x``, with autograd, to check that its output is a scalar that depends on ``x``
            through autograd), so side effects such as BatchNorm running statistics in
            training mode happen ``k + 1`` times.
        x: the point, a floating-point tensor or a dict ``name -> tensor`` (one dtype and
            device). It is detached and never modified; it need not require grad.
        radius: :math:`\varepsilon > 0` (a Python or numpy number). Default
            ``sqrt(eps) * max(1, ||x||_2)`` with ``eps`` the machine epsilon of ``x``'s dtype:
            about ``1.5e-8 * max(1, ||x||)`` in float64,
            ``3.5e-4 * max(1, ||x||)`` in float32. The radius is both the bias of the estimate
            (the Goldstein set sees kinks up to ``radius`` away; quantities such as
            ``<g*, x>`` are off by ``O(radius * Lip f)``) and the resolution at which rounding
            stops mattering: a perturbation of ``sqrt(eps) * |x|`` is ``1/sqrt(eps)`` ulps of
            ``|x|`` (6.7e7 ulps in float64, 2.9e3 in float32), so each coordinate of a sample
            point (typical move ``radius / sqrt(d)``) really differs from ``x`` for
            parameter-like ``x`` whose entries are of comparable size. A smaller radius would
            let ``x + delta`` round back to ``x``, so that the "samples" would be autograd at
            the kink itself; a warning is raised when the typical move per coordinate is below
            16 ulps of ``max|x|``.
        num_samples: ``k >= 1`` (a Python or numpy integer). Default ``2 (d + 1)`` clamped to
            ``[64, 256]`` for ``d`` entries. Burke-Lewis-Overton's convergence theory takes
            ``k >= d + 1`` (by
            Carathéodory, ``d + 1`` points suffice to represent any point of a hull in
            :math:`\mathbb{R}^d`); ``2 (d + 1)`` leaves room for round kinks (for ``||x||_2`` at 0,
            ``k`` random gradients surround 0 only when ``k > d``, with probability 1/2 at
            ``k = 2d`` by Wendel's theorem, and almost surely for ``k >> d``). The floor of 64
            makes missing one side of a two-piece kink a ``2**-63`` event; the cap of 256 bounds
            the cost for parameter vectors, where ``k >= d + 1`` gradients are unaffordable and
            the hull is a coarser inner approximation (pass ``num_samples`` to trade accuracy
            for time and ``2 * k * d`` numbers of memory).
        generator: a ``torch.Generator`` for the sample points.
        vectorize: batch the ``k`` gradients with ``torch.func.vmap(torch.func.grad(f))``
            (in chunks if memory runs out). If ``f`` cannot be vmapped (in-place updates of
            tensors that are not batched, ``.item()`` or other data-dependent Python control
            flow, BatchNorm in training mode, random operations), fall back to a Python loop of
            ``torch.autograd.grad`` calls with one warning that says why. ``False`` uses the loop
            directly.

    Returns:
        A :class:`ClarkeSubgradient`: ``samples`` and ``points`` (leading dimension ``k``),
        ``weights`` (``k`` convex weights) and ``min_norm`` (shaped like ``x``), dicts when
        ``x`` is a dict, in ``x``'s dtype and on its device, plus the ``radius`` used.

    Precision: compute in float64 where kinks matter. In float32, besides the coarser default
    radius (the estimate is of a visibly larger Goldstein set), rounding inside ``f`` can hide
    or move a kink: an intermediate such as ``(x + 1) - 1`` loses the perturbation below
    ``eps * |x + 1|``, and a pre-activation ``w . z`` carries an error of order ``eps |w| |z|``,
    so sample points closer to a kink than that may get the gradient of the wrong side or of a
    flat, rounded-away piece. Use ``x.double()`` (and ``model.double()``) for checks like the
    ones in the tests, which hold to float64 precision.

    Raises:
        TypeError: ``f`` is not callable or does not return a real floating-point tensor;
            ``x`` is not a (dict of) real floating-point tensor(s); bad argument types.
        ValueError: ``f`` returns more than one number; ``f(x)`` does not depend on ``x``
            through autograd (e.g. ``torch.tensor(max(z.tolist()))`` or ``z.detach()``: every
            sampled gradient would be 0, a false certificate); ``radius <= 0`` or not finite;
            ``num_samples < 1``; ``x`` is empty.
        RuntimeError: some sampled gradients contain NaN or inf (the message says how many);
            the ``num_samples x d`` sample arrays would not fit in the memory available on
            ``x``'s device (checked before they are allocated).

    Example:

        >>> import torch
        >>> from torch_momentum import clarke_subgradient
        >>> x = torch.zeros((), dtype=torch.float64)
        >>> f = lambda z: torch.relu(z) - torch.relu(-z)  # = z, autograd says 0 at 0
        >>> float(clarke_subgradient(f, x).min_norm)
        1.0

    """
    check_common(f, generator, vectorize)
    spec, flat = check_x(x)
    d = flat.numel()
    radius = default_radius(flat) if radius is None else check_radius(radius)
    k = check_num_samples(num_samples, d)

    dtype, device = flat.dtype, flat.device
    ulp_scale = float(flat.abs().max()) * torch.finfo(dtype).eps
    if radius / math.sqrt(d) < 16.0 * ulp_scale:
        warnings.warn(
            f"clarke_subgradient: radius={radius:.3g} moves each of the {d} entries of x by "
            f"about {radius / math.sqrt(d):.3g}, fewer than 16 ulps of max|x| in {dtype}; sample "
            "points may round back onto x and rounding may hide a kink. Use a larger radius or "
            "float64",
            UserWarning,
            stacklevel=2,
        )

    # Evaluate f once at x with autograd: a real scalar that depends on x through autograd
    # (else ValueError), so that vmap failures below are about vmap.
    value, _ = grad_at(f, flat, spec)
    f_scalar = f if value.dim() == 0 else scalar_output(f)  # one-element tensors: reshape

    # Uniform points in the ball B(x, radius): the directions, the points and the gradients are
    # three k x d arrays, then the min-norm solve (checked together, before any allocation).
    check_sample_memory(k, d, dtype, device, "clarke_subgradient")
    gen_device = generator.device if generator is not None else device
    direction = torch.randn(k, d, generator=generator, dtype=dtype, device=gen_device)
    u = 1.0 - torch.rand(k, 1, generator=generator, dtype=dtype, device=gen_device)  # (0, 1]
    norm = direction.norm(dim=1, keepdim=True).clamp_min_(torch.finfo(dtype).tiny)
    length = u.pow(1.0 / d).mul_(radius).div_(norm)
    points = flat + direction.mul_(length).to(device)

    samples = GradientSampler(f_scalar, spec, vectorize, "clarke_subgradient")(points)
    samples = samples.to(dtype)

    bad = count_nonfinite_rows(samples)
    if bad:
        raise RuntimeError(
            f"clarke_subgradient: {bad} of {k} sampled gradients contain NaN or inf; f must be "
            f"locally Lipschitz and finite in the ball of radius={radius:.3g} around x"
        )

    min_norm64, weights64 = min_norm_of_rows(samples)
    min_norm = min_norm64.to(dtype)
    return ClarkeSubgradient(
        samples=unflatten(samples, spec, (k,)),
        points=unflatten(points, spec, (k,)),
        weights=weights64.to(dtype),
        min_norm=unflatten(min_norm, spec),
        radius=radius,
    )
