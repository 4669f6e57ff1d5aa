r"""Stationarity certificates: the (δ, ε)-Goldstein profile of a function at a point.

For locally Lipschitz :math:`f`, ``x`` is :math:`(\delta, \varepsilon)`-Goldstein stationary when

.. math::
    \min\{\|g\| : g \in \partial_\delta f(x)\} \le \varepsilon, \qquad
    \partial_\delta f(x) = \operatorname{conv} \bigcup_{\|y - x\| \le \delta} \partial f(y)

(Goldstein 1977; Zhang, Lin, Jegelka, Sra & Jadbabaie 2020). It is the honest analogue of
:math:`\|\nabla f(x)\| \le \varepsilon` for nonsmooth losses such as a ReLU network's, whose
gradient norm need not become small near a minimiser. Gradient sampling certifies it ONE-SIDEDLY:
the convex hull of ``k`` gradients :math:`\nabla f(x_i)` at points :math:`x_i` drawn uniformly
from the ball :math:`B(x, \delta)` lies inside :math:`\partial_\delta f(x)`, so its minimum-norm
element :math:`\hat\varepsilon(\delta)` proves that ``x`` is :math:`(\delta, \hat\varepsilon)`-
stationary. A large :math:`\hat\varepsilon` proves nothing: more samples might find a shorter
combination.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from torch_momentum._sampling import (
    MEMORY_MODES,
    GradientSampler,
    TensorOrDict,
    check_common,
    check_num_samples,
    check_radii,
    check_x,
    grad_at,
    scalar_output,
)
from torch_momentum.minnorm import (
    count_nonfinite_rows,
    pow2_exponent,
    scale_pow2,
    scaled_norm,
    weights_from_gram,
)

__all__ = ["StationarityProfile", "stationarity_profile"]

#: ``progress(done, total)``: gradients sampled so far and in all; a true return value stops
#: the sampling (see :func:`stationarity_profile`).
Progress = Callable[[int, int], "bool | None"]
# Column slice of the float64 Gram products: at most this many float64 numbers per operand.
_GRAM_SLICE_NUMBERS = 1 << 22


@dataclass(frozen=True)
class StationarityProfile:
    r"""Result of :func:`stationarity_profile`.

    Attributes:
        radii: the radii :math:`\delta_j`, as given.
        eps_hat: :math:`\hat\varepsilon(\delta_j)`, the norm of the minimum-norm element of the
            convex hull of the ``k`` gradients sampled in :math:`B(x, \delta_j)`: ``x`` is
            :math:`(\delta_j, \hat\varepsilon(\delta_j))`-Goldstein stationary.
        grad_norm: :math:`\|\nabla f(x)\|` as autograd computes it at ``x`` itself.
        active: per radius, the number of samples with positive weight in the minimum-norm
            element (1 at a point where ``f`` is smooth at the scale :math:`\delta_j`).
        num_samples: ``k``, the samples per radius actually drawn (fewer than asked for when a
            ``progress`` callback stopped the sampling).
        vectorized: whether the gradients were batched with ``torch.func.vmap`` to the end
            (``False``: the loop of ``torch.autograd.grad`` calls, asked for or chosen).

    Example:

        >>> import torch
        >>> from torch_momentum import stationarity_profile
        >>> x = torch.tensor([0.05, 0.0], dtype=torch.float64)
        >>> prof = stationarity_profile(lambda z: z.abs().sum(), x, [0.01, 0.1])
        >>> [round(e, 6) for e in prof.eps_hat], prof.num_samples
        ([1.0, 0.0], 64)

    """

    radii: tuple[float, ...]
    eps_hat: tuple[float, ...]
    grad_norm: float
    active: tuple[int, ...]
    num_samples: int
    vectorized: bool = True


def _check_chunk_size(chunk_size: object, memory: object, k: int) -> int:
    if not isinstance(memory, str) or memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got memory={memory!r}")
    if chunk_size is None:
        return k if memory == "device" else min(k, 8)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    chunk = operator.index(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk}")
    return min(chunk, k)


def _scaled_gram(a: Tensor, b: Tensor, ea: int, eb: int) -> Tensor:
    """``(a 2^-ea)(b 2^-eb)^T`` in float64 on the host, over column slices of the operands (so that
    the float64 copies stay small whatever the number of parameters)."""
    width = max(1, _GRAM_SLICE_NUMBERS // max(a.shape[0], b.shape[0]))
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], width):
        sa = scale_pow2(a[:, start : start + width].to(torch.float64), -ea)
        sb = scale_pow2(b[:, start : start + width].to(torch.float64), -eb)
        out += sa @ sb.T
    return out.cpu()


def _weighted_sum(w: Tensor, s: Tensor, out: Tensor) -> None:
    """``out += w @ s`` in float64, over column slices of ``s``."""
    width = max(1, _GRAM_SLICE_NUMBERS // s.shape[0])
    w = w.to(device=s.device, dtype=torch.float64)
    for start in range(0, s.shape[1], width):
        out[start : start + width] += w @ s[:, start : start + width].to(torch.float64)


class _Sampler:
    """Gradients at the sample points of one block of sample indices and one radius.

    Directions are shared by all radii (common random numbers): sample ``i`` is
    ``x + delta * r_i * u_i`` with the same unit direction ``u_i`` and radial fraction ``r_i``
    for every ``delta``. Each direction is drawn from its own seed, so a block of directions can
    be regenerated at any time without holding the ``k x d`` matrix.
    """

    def __init__(
        self,
        flat: Tensor,
        k: int,
        generator: torch.Generator | None,
        grads: Callable[[Tensor], Tensor],
        reduce_grads: Callable[[Tensor], Tensor] | None,
    ) -> None:
        self.flat, self.grads, self.reduce_grads = flat, grads, reduce_grads
        d = flat.numel()
        gen_device = generator.device if generator is not None else flat.device
        self.seeds = torch.randint(
            0, 2**62, (k,), generator=generator, device=gen_device, dtype=torch.int64
        ).tolist()
        u = 1.0 - torch.rand(k, generator=generator, dtype=torch.float64, device=gen_device)
        self.fractions = u.pow(1.0 / d).tolist()  # r_i = U_i^(1/d): uniform in the ball

    def directions(self, block: range) -> Tensor:
        """Unit directions of the samples in ``block``, ``(len(block), d)``."""
        flat = self.flat
        u = torch.empty(len(block), flat.numel(), dtype=flat.dtype, device=flat.device)
        for row, i in zip(u, block, strict=True):
            g = torch.Generator(device=flat.device).manual_seed(self.seeds[i])
            torch.randn(flat.numel(), generator=g, dtype=flat.dtype, device=flat.device, out=row)
        return u.div_(u.norm(dim=1, keepdim=True).clamp_min_(torch.finfo(flat.dtype).tiny))

    def __call__(self, block: range, delta: float) -> Tensor:
        lengths = torch.tensor(
            [delta * self.fractions[i] for i in block],
            dtype=self.flat.dtype,
            device=self.flat.device,
        )
        points = self.directions(block).mul_(lengths[:, None]).add_(self.flat)  # one (c, d) buffer
        samples = self.grads(points).to(self.flat.dtype)
        if self.reduce_grads is not None:
            samples = self.reduce_grads(samples)
        bad = count_nonfinite_rows(samples)
        if bad:
            raise RuntimeError(
                f"stationarity_profile: {bad} of {len(block)} sampled gradients at radius "
                f"{delta:g} contain NaN or inf; f must be locally Lipschitz and finite there"
            )
        return samples


class _Blocks:
    """The sampled gradients of one radius, block by block, and their scaled Gram products.

    Each block gets its own power-of-two scale ``2**exps[b]`` (exact, no overflow or underflow
    whatever the scale of the gradients); block ``b`` is kept on the device, on the host, or
    recomputed from its seeds when it is needed again (``memory``).
    """

    def __init__(self, sample: _Sampler, delta: float, memory: str) -> None:
        self.sample, self.delta, self.memory = sample, delta, memory
        self.rows: list[range] = []
        self.stored: list[Tensor] = []
        self.exps: list[int] = []
        self.grams: dict[tuple[int, int], Tensor] = {}

    def get(self, b: int) -> Tensor:
        if self.memory == "recompute":
            return self.sample(self.rows[b], self.delta)
        return self.stored[b].to(self.sample.flat.device, non_blocking=True)

    def add(self, rows: range) -> None:
        """Sample the block ``rows`` and its Gram products with every earlier block."""
        a = len(self.rows)
        self.rows.append(rows)
        s_a = self.sample(rows, self.delta)
        self.exps.append(pow2_exponent(s_a))
        self.grams[a, a] = _scaled_gram(s_a, s_a, self.exps[a], self.exps[a])
        for b in range(a):
            self.grams[a, b] = _scaled_gram(s_a, self.get(b), self.exps[a], self.exps[b])
        if self.memory == "device":
            self.stored.append(s_a)
        elif self.memory == "host":
            self.stored.append(s_a.to("cpu"))

    def gram(self) -> Tensor:
        """The Gram matrix of all samples so far, scaled by ``2**(-2 max(exps))``."""
        k = self.rows[-1].stop
        top = max(self.exps)
        gram = torch.empty(k, k, dtype=torch.float64)
        for (a, b), g in self.grams.items():
            g = scale_pow2(g, self.exps[a] + self.exps[b] - 2 * top)
            ra, rb = self.rows[a], self.rows[b]
            gram[ra.start : ra.stop, rb.start : rb.stop] = g
            gram[rb.start : rb.stop, ra.start : ra.stop] = g.T
        return gram

    def min_norm(self) -> tuple[float, int]:
        """``eps_hat`` and the number of samples with positive weight."""
        weights = weights_from_gram(self.gram())
        device = self.sample.flat.device
        point = torch.zeros(self.sample.flat.numel(), dtype=torch.float64, device=device)
        for b, rows in enumerate(self.rows):
            w = weights[rows.start : rows.stop]
            if bool((w > 0).any()):
                _weighted_sum(w, self.get(b), point)
        # the norm by a power-of-two scale: gradients of 1e-200 (1e160) do not square to 0 (inf)
        return scaled_norm(point), int((weights > 0).sum())


def _min_norm_at_radius(
    sample: _Sampler,
    k: int,
    delta: float,
    chunk: int,
    memory: str,
    after_block: Callable[[int], bool],
) -> tuple[float, int, int]:
    """``eps_hat``, the active-set size and the samples drawn at one radius, ``chunk`` samples
    at a time.

    Pass 1 builds the Gram matrix block by block (a pair of blocks on the device at a time;
    earlier blocks come from the device, the host, or are recomputed), the solver runs on it, and
    pass 2 assembles the min-norm element from the blocks with positive weight. After each block
    ``after_block(samples in it)`` may stop the sampling: the hull of the samples so far is still
    inside the Goldstein set, so the certificate holds with fewer samples.
    """
    blocks = _Blocks(sample, delta, memory)
    for start in range(0, k, chunk):
        blocks.add(range(start, min(start + chunk, k)))
        if after_block(len(blocks.rows[-1])):
            break
    eps, active = blocks.min_norm()
    return eps, active, blocks.rows[-1].stop


def stationarity_profile(
    f: Callable[[TensorOrDict], Tensor],
    x: TensorOrDict,
    radii: Sequence[float] | Tensor,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    memory: str = "device",
    chunk_size: int | None = None,
    reduce_grads: Callable[[Tensor], Tensor] | None = None,
    progress: Progress | None = None,
) -> StationarityProfile:
    r"""The (δ, ε)-Goldstein stationarity profile :math:`\hat\varepsilon(\delta)` of ``f`` at ``x``.

    For each radius :math:`\delta` in ``radii``: ``k`` points :math:`x_i` uniform in the ball
    :math:`B(x, \delta)` (over all entries of ``x`` together), their gradients
    :math:`s_i = \nabla f(x_i)` by autograd, and

    .. math::
        \hat\varepsilon(\delta) = \min_{w \in \Delta_k} \Big\|\sum_i w_i s_i\Big\|_2,

    the norm of the minimum-norm element of their convex hull (Wolfe's algorithm on the Gram
    matrix). ``x`` is then :math:`(\delta, \hat\varepsilon(\delta))`-Goldstein stationary: a
    one-sided certificate (a large value proves nothing). Alongside: :math:`\|\nabla f(x)\|` by
    autograd at ``x``. For smooth ``f``, :math:`\hat\varepsilon(\delta) \to \|\nabla f(x)\|` as
    :math:`\delta \to 0`; near kinks it can be far smaller than :math:`\|\nabla f(x)\|`.

    All radii share the sample directions and radial fractions
    (:math:`x_i(\delta) = x + \delta r_i u_i`): the differences between radii are then those of
    ``f``, not of fresh random draws, so the profile is smooth in :math:`\delta` and
    reproducible; the cost is ``k`` gradients per radius.

    Args:
        f: maps a point shaped like ``x`` to a real scalar tensor that depends on it through
            autograd (as for :func:`~torch_momentum.clarke_subgradient`).
        x: a floating-point tensor or a dict ``name -> tensor`` (a model's parameters); never
            modified.
        radii: the radii :math:`\delta > 0`: a sequence, a tensor or a numpy array, or one
            number (also a 0-d array).
        num_samples: ``k`` per radius. Default ``2 (d + 1)`` clamped to ``[64, 256]``.
        generator: a ``torch.Generator`` for the sample points (default: torch's global one).
        vectorize: batch the gradients with ``torch.func.vmap`` (default ``True``). The first
            block decides, with one warning when it chooses the loop of ``torch.autograd.grad``
            calls instead: when ``f`` cannot be vmapped, when torch has no batching rule for an
            operation of ``f`` (vmap then runs it one sample at a time, e.g. the LSTM kernel,
            slower than the loop: see ``benchmarks/clarke.py``), or when the loop is faster
            by 1.5x (the loop timed on the block's first 4 points against the whole block
            vectorised, and, to discount vmap's one-time start-up cost, those 4 points again
            both ways; only when the first block took 50 ms or more). The two ways give the
            same gradients up to floating-point rounding.
        memory: where the ``k x d`` sample matrix lives. ``"device"`` (default): on ``x``'s
            device, one radius at a time (peak ``k d`` numbers). ``"host"``: gradients are
            computed ``chunk_size`` samples at a time and kept in host memory; the Gram matrix
            is built from pairs of blocks. ``"recompute"``: nothing is kept, blocks are
            recomputed from their seeds (about ``(k / chunk_size + 1) / 2`` times the gradient
            work). In both chunked modes the peak device memory beyond the model is
            ``O(chunk_size x d)`` (two blocks of gradients, their float64 column slices of at
            most 4M numbers, and ``vmap``'s work for one block), and the result equals the
            ``"device"`` mode's up to float64 rounding of the Gram sums. Measured on the CPU
            (11.1M float32 parameters, ``k = 64``, ``chunk_size=8``): 1.82 GiB above the process
            in ``"recompute"`` mode (about ``5 x chunk_size x d`` numbers) against 10.8 GiB in
            ``"device"`` mode (about ``4 k d``), 2.8x the time.
        chunk_size: samples per block: default ``k`` for ``"device"``, 8 otherwise.
        reduce_grads: applied to every block of sampled gradients ``(c, d)`` and to the
            gradient at ``x`` ``(d,)`` before they are used, e.g. a sum over data-parallel
            ranks (``f`` each rank's share of the loss). Default: none.
        progress: ``progress(done, total)``, called with ``(0, total)`` before sampling and
            after every block of sampled gradients, ``total = len(radii) * k``: for a progress
            bar, a time budget or a stop request. A true return value during the first radius
            stops its sampling after that block (at least one block is drawn); every radius then
            uses the samples drawn so far, and ``total`` shrinks accordingly. The hull of fewer
            samples is still inside the Goldstein set, so the certificate holds (it is weaker).
            An exception it raises propagates (nothing of ``x`` is changed). With ``reduce_grads``
            (several processes) it must return the same value on every process.

    Returns:
        A :class:`StationarityProfile`.

    Scale: norms and Gram products are taken after exact power-of-two rescalings, so gradients
    of any size in float64 (1e-200 or 1e160, where plain squares underflow to 0 or overflow)
    give the right profile.

    Raises:
        TypeError / ValueError: bad arguments (naming them), ``f`` not a real scalar, or
            ``f(x)`` not depending on ``x`` through autograd.
        RuntimeError: the gradient at ``x`` (checked before any sampling) or sampled gradients
            with NaN or inf.

    Example:

        >>> import torch
        >>> from torch_momentum import stationarity_profile
        >>> f = lambda z: (z**2).sum() / 2  # smooth: eps_hat(delta) -> ||x|| as delta -> 0
        >>> x = torch.tensor([3.0, 4.0], dtype=torch.float64)
        >>> gen = torch.Generator().manual_seed(0)
        >>> prof = stationarity_profile(f, x, [1e-6, 1.0], generator=gen)
        >>> round(prof.grad_norm, 6), round(prof.eps_hat[0], 4), prof.eps_hat[1] < 4.5
        (5.0, 5.0, True)

    """
    check_common(f, generator, vectorize)
    spec, flat = check_x(x)
    deltas = check_radii(radii)
    k = check_num_samples(num_samples, flat.numel())
    chunk = _check_chunk_size(chunk_size, memory, k)
    if reduce_grads is not None and not callable(reduce_grads):
        raise TypeError(f"reduce_grads must be callable or None, got {type(reduce_grads).__name__}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")

    value, grad0 = grad_at(f, flat, spec)  # ValueError if f(x) does not depend on x
    if reduce_grads is not None:
        grad0 = reduce_grads(grad0)
    if count_nonfinite_rows(grad0.reshape(1, -1)):  # before sampling: no wasted work
        raise RuntimeError(
            "stationarity_profile: the gradient at x is not finite (it has NaN or inf entries)"
        )
    grad_norm = scaled_norm(grad0)
    f_scalar = f if value.dim() == 0 else scalar_output(f)
    grads = GradientSampler(f_scalar, spec, vectorize, "stationarity_profile")
    sample = _Sampler(flat, k, generator, grads, reduce_grads)

    counter = _Counter(progress, len(deltas) * k)
    eps_hat, active = [], []
    for j, delta in enumerate(deltas):
        e, n, drawn = _min_norm_at_radius(sample, k, delta, chunk, memory, counter.after_block)
        if j == 0 and drawn < k:  # stopped: the other radii take as many samples
            k = drawn
            counter.total = len(deltas) * k
        counter.may_stop = False
        eps_hat.append(e)
        active.append(n)
    return StationarityProfile(
        radii=deltas,
        eps_hat=tuple(eps_hat),
        grad_norm=grad_norm,
        active=tuple(active),
        num_samples=k,
        vectorized=grads.vectorize,
    )


class _Counter:
    """Counts the sampled gradients for ``progress``; only the first radius may be stopped."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done, self.may_stop = progress, total, 0, True
        if progress is not None:
            progress(0, total)

    def after_block(self, n: int) -> bool:
        self.done += n
        if self.progress is None:
            return False
        stop = bool(self.progress(self.done, self.total))
        return stop and self.may_stop
