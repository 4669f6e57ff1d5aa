"""The ledger's arithmetic on the slots of one step: flat vectors, dot products, the step matrix.

Private module: the names here are shared by the ledger's modules, not user API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple, cast

import torch
from torch import Tensor

from torch_momentum.balance._dtensor import local
from torch_momentum.balance.rules import (
    GRAM_ENTRIES,
    LEDGER_TERMS,
    SLOTS,
    Maps,
    is_low_precision,
)

#: The slot holding the gradient (scaled by a GradScaler that lets the optimiser unscale).
GRAD_SLOT = 2
#: The velocity slots (before and after the step): they hold the buffer where it is -v.
VELOCITY_SLOTS = (1, 4)
# the upper triangle of the slots' Gram matrix
UPPER = tuple((a, b) for a in range(SLOTS) for b in range(a, SLOTS))

Slots = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def acc_dtype(t: Tensor) -> torch.dtype:
    """The accumulation dtype of the ledger's dot products for a tensor of ``t``'s dtype: float32
    for float32 (the sums are not more accurate than the entries, and float32 keeps the kernels
    fast), float64 otherwise (bfloat16/float16 too: their rounding is measured, so the
    accumulation must not add more)."""
    return torch.float32 if t.dtype in (torch.float32, torch.complex64) else torch.float64


def sums_of_squares(tensors: list[Tensor]) -> list[Tensor]:
    """``[sum |t|^2 for t in tensors]`` (real view of complex; half precision summed in
    float64), one multi-tensor reduction per dtype run."""
    out: list[Tensor] = []
    start = 0
    while start < len(tensors):
        dtype = tensors[start].dtype
        stop = start + 1
        while stop < len(tensors) and tensors[stop].dtype is dtype:
            stop += 1
        chunk = tensors[start:stop]
        acc = torch.float64 if is_low_precision(chunk[0]) else None
        out.extend(torch._foreach_powsum(chunk, 2, dtype=acc))
        start = stop
    return out


def as_vector(t: Tensor, acc: torch.dtype) -> Tensor:
    """``t`` as a real vector of dtype ``acc`` (a view when it already is one; no autograd: the
    ledger's hooks run under ``torch.no_grad``)."""
    if t.dtype is not acc:
        if t.dtype.is_complex:
            t = torch.view_as_real(t)
        if t.dtype is not acc:
            t = t.to(acc)
    return t.reshape(-1)


class Row(NamedTuple):
    """One updated tensor of a step: its slots and how they map to the canonical vectors."""

    tracked: int
    slots: Slots  # see rules.SLOTS; None: absent
    maps: Maps
    plain: bool  # no velocity (plain gradient descent)
    low: bool  # low precision: slots (p_t, v_t, g_t, p_{t+1}, v_{t+1})
    mask: int  # bit k set: slot k is present

    def slot_map(self) -> Tensor:
        """The map (5 canonical x 5 slots) as a float64 tensor, in the sign of the stored
        velocity (the buffer's sign folded in)."""
        c = torch.tensor(self.maps.slots(self.plain, self.low), dtype=torch.float64)
        if self.maps.negate_velocity:
            for k in VELOCITY_SLOTS:
                c[:, k] = -c[:, k]  # the slot holds the buffer = -v
        return c


class FlatViews:
    """The slots of rows as flat vectors of the accumulation dtype (:func:`as_vector`).

    Parameters and velocities persist across steps: their flat views are reused while they
    still view the same memory (a copy, e.g. a dtype conversion, never does); gradients and
    copies are viewed afresh.
    """

    def __init__(self) -> None:
        self._views: dict[tuple[int, int], tuple[int, int, Tensor]] = {}

    def __call__(self, row: Row, needed: frozenset[int]) -> dict[int, Tensor]:
        """The row's slots ``needed`` (all present) by slot index."""
        i, slots = row.tracked, row.slots
        acc = acc_dtype(cast(Tensor, slots[0]))
        vecs: dict[int, Tensor] = {}
        for k in needed:
            t = cast(Tensor, slots[k])
            if k == GRAD_SLOT or (k == 0 and not isinstance(t, torch.nn.Parameter)):
                vecs[k] = as_vector(t, acc)
                continue
            hit = self._views.get((i, k))
            if hit is None or hit[0] != t.data_ptr() or hit[1] != t.numel():
                vec = as_vector(t, acc)
                n = vec.numel() // (2 if t.is_complex() else 1)
                self._views[(i, k)] = hit = (vec.data_ptr(), n, vec)
            vecs[k] = hit[2]
        return vecs


class StepMatrix(NamedTuple):
    """The cached map of a step (see :func:`step_matrix`)."""

    matrix: Tensor
    entries: list[tuple[frozenset[int], list[tuple[int, int]]]]
    squares: list[list[int]]
    buffer: Tensor
    grad_powers: Tensor  # per column: how many gradient slots its product has (0, 1, 2)


def step_matrix(
    rows: list[Row], sign: Tensor, weights: list[float], device: torch.device, split: bool
) -> StepMatrix:
    """The map from the needed Gram entries of every tensor's slots to the per-pair sums.

    For tensor ``t`` with slots ``r`` (Gram matrix ``G``), map ``C`` (slots to the canonical
    vectors) and term coefficients ``R`` (terms from the entries
    :data:`~torch_momentum.balance.rules.GRAM_ENTRIES` of ``C G C^T``), the terms are
    ``R Q vec(G)`` with ``Q[e] = C[a_e] (x) C[b_e]``; symmetric entries are folded onto the
    upper triangle and the columns that are zero are dropped (their products are not
    computed).

    The matrix's columns are first the entries computed as dot products (off the diagonal; on
    the CPU all of them), tensor by tensor: ``entries[t] = (slots needed, [(a, b), ...])``.
    Then the diagonal entries, slot by slot: ``squares[a]`` lists the positions in ``rows``
    whose ``G[a, a]`` is needed, one multi-tensor sum of squares for all of them. ``buffer``
    receives the values (float64).
    """
    n_pairs, n_terms = sign.shape[0], len(LEDGER_TERMS)
    off, entries, off_powers = [], [], []
    diag: list[list[Tensor]] = [[] for _ in range(SLOTS)]
    squares: list[list[int]] = [[] for _ in range(SLOTS)]
    for pos, row in enumerate(rows):
        full = entry_coefficients(row)  # (terms, SLOTS * SLOTS)
        scale = sign[:, row.tracked].cpu()[:, None] * weights[row.tracked]
        pairs = []
        for a, b in UPPER:
            if row.slots[a] is None or row.slots[b] is None:
                continue  # an absent slot: its coefficients are zero
            col = full[:, SLOTS * a + b] + (full[:, SLOTS * b + a] if a != b else 0.0)
            if not bool((col != 0).any()):
                continue
            column = (scale * col[None]).reshape(-1)  # (pairs * terms,)
            if a == b and split:
                diag[a].append(column)
                squares[a].append(pos)
            else:
                off.append(column)
                off_powers.append((a == GRAD_SLOT) + (b == GRAD_SLOT))
                pairs.append((a, b))
        entries.append((frozenset(k for ab in pairs for k in ab), pairs))
    columns = off + [c for cols in diag for c in cols]
    powers = off_powers + [2 * (a == GRAD_SLOT) for a in range(SLOTS) for _ in diag[a]]
    if columns:
        matrix = torch.stack(columns, 1)
    else:
        matrix = torch.zeros(n_pairs * n_terms, 0, dtype=torch.float64)
    buffer = torch.zeros(matrix.shape[1], dtype=torch.float64, device=device)
    grad_powers = torch.tensor(powers, dtype=torch.float64).to(device)
    return StepMatrix(to_device(matrix, device), entries, squares, buffer, grad_powers)


def entry_coefficients(row: Row) -> Tensor:
    """``R Q``: the terms (rows) as combinations of the entries of the slots' Gram matrix
    (``SLOTS * SLOTS`` columns, row-major)."""
    c = row.slot_map()
    q = torch.stack([torch.outer(c[a], c[b]).reshape(-1) for a, b in GRAM_ENTRIES])
    return torch.tensor(row.maps.terms, dtype=torch.float64) @ q


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` (pinned and asynchronous on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def entry_values(
    rows: list[Row], cached: StepMatrix, vectors: Callable[[Row, frozenset[int]], dict[int, Tensor]]
) -> list[Tensor]:
    """The Gram entries of a step that ``cached`` (:func:`step_matrix`) needs, in its column
    order: one dot product per off-diagonal entry, then one multi-tensor sum of squares per
    slot. ``vectors(row, needed)``: the row's slots as flat vectors (:class:`FlatViews`)."""
    dots = []
    for row, (needed, pairs) in zip(rows, cached.entries, strict=True):
        vecs = vectors(row, needed)
        dots += [torch.dot(vecs[a], vecs[b]) for a, b in pairs]
    for k, positions in enumerate(cached.squares):
        if positions:
            dots += sums_of_squares([cast(Tensor, rows[pos].slots[k]) for pos in positions])
    return dots


def grad_marks(tensors: Iterable[Tensor]) -> Tensor | None:
    """The norms of the dense gradients of ``tensors`` (None: there are none), compared before
    and after an optimiser step by :func:`inverse_scale`."""
    grads = [local(p.grad) for p in tensors if p.grad is not None and not p.grad.is_sparse]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    return torch.stack([n.to(grads[0].device, torch.float64) for n in norms])


def inverse_scale(grad_scale: Tensor, before: Tensor | None, tensors: Iterable[Tensor]) -> Tensor:
    """The factor that unscales the gradients of ``tensors`` read after a step that a GradScaler
    handed to an optimiser unscaling itself (``_step_supports_amp_scaling``): :math:`1/s`, or 1
    where the step changed the gradients (their :func:`grad_marks` ``before`` it and now), i.e.
    unscaled them in place, as torch's fused SGD and Adam do on the CPU. Without marks:
    :math:`1/s`."""
    inv = torch.reciprocal(grad_scale.to(torch.float64))
    after = grad_marks(tensors) if before is not None else None
    if before is None or after is None or before.shape != after.shape:
        return inv
    changed = (before != after.to(before.device)).any().to(inv.device)
    return torch.where(changed, torch.ones_like(inv), inv)
