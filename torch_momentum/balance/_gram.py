"""The ledger's arithmetic on the rows of one step: flat vectors, dot products, the step matrix.

Private module: the names here are shared by the ledger's modules, not user API.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from torch_momentum.balance.rules import GRAM_ENTRIES, LEDGER_TERMS, Maps

# the upper triangle of the Gram matrix of a tensor's three post-step rows
UPPER = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
GRAM_AB = tuple(divmod(e, 4) for e in GRAM_ENTRIES)


def acc_dtype(t: Tensor) -> torch.dtype:
    """The accumulation dtype of the ledger's dot products for a tensor of ``t``'s dtype."""
    return torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32


def sums_of_squares(tensors: list[Tensor]) -> list[Tensor]:
    """``[sum |t|^2 for t in tensors]`` (real view of complex; half precision summed in float32),
    one multi-tensor reduction per dtype run."""
    out: list[Tensor] = []
    start = 0
    while start < len(tensors):
        dtype = tensors[start].dtype
        stop = start + 1
        while stop < len(tensors) and tensors[stop].dtype is dtype:
            stop += 1
        low = dtype in (torch.float16, torch.bfloat16)
        chunk = tensors[start:stop]
        out.extend(torch._foreach_powsum(chunk, 2, dtype=torch.float32 if low else None))
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
    """One updated tensor of a step: its post-step rows and how they split into terms."""

    tracked: int
    parts: tuple[Tensor, Tensor | None, Tensor]  # (first, second, gradient); second None: no v
    maps: Maps
    plain: bool  # no velocity (plain gradient descent)


class StepMatrix(NamedTuple):
    """The cached map of a step (see :meth:`BalanceLedger._step_matrix`)."""

    matrix: Tensor
    entries: list[tuple[frozenset[int], list[tuple[int, int]]]]
    squares: list[list[int]]
    buffer: Tensor


def step_matrix(
    rows: list[Row], sign: Tensor, weights: list[float], device: torch.device, split: bool
) -> StepMatrix:
    """The map from the needed Gram entries of every tensor's rows to the per-pair sums.

    For tensor ``t`` with rows ``r`` (Gram matrix ``G``), map ``C`` (rows to
    ``(x_t, v_t, g_t, dx)``) and term coefficients ``R`` (terms from the entries
    :data:`~torch_momentum.balance.rules.GRAM_ENTRIES` of ``C G C^T``), the terms are
    ``R Q vec(G)`` with ``Q[e] = C[a_e] (x) C[b_e]``; symmetric entries are folded onto the
    upper triangle and the columns that are zero are dropped (their products are not
    computed).

    The matrix's columns are first the entries computed as dot products (off the diagonal; on
    the CPU all of them), tensor by tensor: ``entries[t] = (rows needed, [(a, b), ...])``.
    Then the diagonal entries, row by row: ``squares[a]`` lists the positions in ``rows``
    whose ``G[a, a]`` is needed, one multi-tensor sum of squares for all of them. ``buffer``
    receives the values (float64).
    """
    n_pairs, n_terms = sign.shape[0], len(LEDGER_TERMS)
    off, entries = [], []
    diag: list[list[Tensor]] = [[], [], []]
    squares: list[list[int]] = [[], [], []]
    for pos, row in enumerate(rows):
        full = _entry_coefficients(row)  # (terms, 9)
        scale = sign[:, row.tracked].cpu()[:, None] * weights[row.tracked]
        pairs = []
        for a, b in UPPER:
            if row.plain and 1 in (a, b):
                continue  # no velocity: its coefficients are zero
            col = full[:, 3 * a + b] + (full[:, 3 * b + a] if a != b else 0.0)
            if not bool((col != 0).any()):
                continue
            column = (scale * col[None]).reshape(-1)  # (pairs * terms,)
            if a == b and split:
                diag[a].append(column)
                squares[a].append(pos)
            else:
                off.append(column)
                pairs.append((a, b))
        entries.append((frozenset(k for ab in pairs for k in ab), pairs))
    columns = off + diag[0] + diag[1] + diag[2]
    if columns:
        matrix = torch.stack(columns, 1)
    else:
        matrix = torch.zeros(n_pairs * n_terms, 0, dtype=torch.float64)
    buffer = torch.zeros(matrix.shape[1], dtype=torch.float64, device=device)
    return StepMatrix(_to_device(matrix, device), entries, squares, buffer)


def _entry_coefficients(row: Row) -> Tensor:
    """``R Q``: the terms (rows) as combinations of the 9 entries of the rows' Gram matrix."""
    c = torch.tensor(row.maps.plain if row.plain else row.maps.with_velocity, dtype=torch.float64)
    if row.maps.negate_velocity:
        c[:, 1] = -c[:, 1]  # the rows hold the buffer = -v
    q = torch.stack([torch.outer(c[a], c[b]).reshape(-1) for a, b in GRAM_AB])
    return torch.tensor(row.maps.terms, dtype=torch.float64) @ q


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
