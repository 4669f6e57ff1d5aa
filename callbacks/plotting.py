r"""Four-panel figure of the layer-balance series (Du, Hu & Lee 2018, figures (a)-(d)).

matplotlib is imported inside :func:`plot_balance` only, and the figure is built with
:class:`matplotlib.figure.Figure` directly (no pyplot state), so it works with any backend,
headless included, and never leaks figures.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["load_history", "plot_balance"]

_PREFIXES = ("balance/", "grad_norm/")


def load_history(source: Any) -> list[dict[str, float]]:
    """Normalise ``source`` to a list of ``{"step": t, key: value}`` rows, sorted by step.

    ``source``: a :class:`~torch_momentum.callbacks.LayerBalanceMonitor` (its ``history``), such a
    history (a sequence of dicts), or the path of a CSVLogger ``metrics.csv`` (rows of the same
    step are merged; other metrics and empty cells are ignored).
    """
    if isinstance(source, (str, os.PathLike)):
        rows = _read_csv(os.fspath(source))
    elif hasattr(source, "history") and not isinstance(source, Mapping):
        rows = list(source.history)
    elif isinstance(source, Sequence) and all(isinstance(r, Mapping) for r in source):
        rows = [dict(r) for r in source]
    else:
        raise TypeError(
            "`source` must be a LayerBalanceMonitor, its history (a list of dicts) or the path of"
            f" a CSVLogger metrics.csv, got {type(source).__name__}"
        )
    merged: dict[int, dict[str, float]] = {}
    for row in rows:
        if "step" not in row:
            continue
        step = int(float(row["step"]))
        entry = merged.setdefault(step, {"step": step})
        for key, value in row.items():
            if key.startswith(_PREFIXES) and value is not None and value != "":
                entry[key] = float(value)
    return [merged[s] for s in sorted(merged) if len(merged[s]) > 1]


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(history: list[dict[str, float]], prefix: str) -> dict[str, tuple[list, list]]:
    """``{suffix: (steps, values)}`` for the keys ``prefix + suffix``, in first-seen order."""
    out: dict[str, tuple[list, list]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith(prefix):
                steps, values = out.setdefault(key[len(prefix) :], ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def _spans_decades(series: dict[str, tuple[list, list]], reference: float | None = None) -> bool:
    """Whether the positive values (and ``reference``) span a factor of 10 or more."""
    values = [v for _, vs in series.values() for v in vs if math.isfinite(v)]
    if values and reference is not None:
        values.append(reference)
    if not values or min(values) <= 0:
        return False
    return max(values) / min(values) >= 10.0


def _draw(ax: Axes, series: dict[str, tuple[list, list]], title: str, ylabel: str) -> None:
    for label, (steps, values) in series.items():
        ax.plot(steps, values, label=label, linewidth=1.4)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1, loc="best")
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def plot_balance(source: Any, *, title: str | None = None) -> Figure:
    r"""Plot the layer-balance series in four panels and return the figure.

    (a) :math:`\|W_L\|^2 - \|W_M\|^2` for adjacent layers, (b) their ratios
    :math:`\|W_L\|^2 / \|W_M\|^2` (log scale when they and 1 span a decade or more), (c)
    :math:`\|W_L(t)\|^2 - \|W_L(0)\|^2` per layer (equal for all layers under gradient flow for a
    layer-wise 1-homogeneous network), (d) :math:`\|\nabla_{W_L}\ell\|` per layer (log scale when
    spanning decades). The x axis is the optimizer step.

    Args:
        source: a :class:`~torch_momentum.callbacks.LayerBalanceMonitor`, its ``history``, or
            the path of a CSVLogger ``metrics.csv``.
        title: figure title.

    Raises:
        ValueError: ``source`` holds no balance metrics.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    history = load_history(source)
    if not any(k.startswith("balance/") for row in history for k in row):
        raise ValueError("`source` holds no balance metrics (keys 'balance/...')")

    diffs = _series(history, "balance/sq_norm_diff/")
    ratios = _series(history, "balance/sq_norm_ratio/")
    changes = _series(history, "balance/sq_norm_change/")
    grads = _series(history, "grad_norm/")
    total = grads.pop("total", None)

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    (ax_a, ax_b), (ax_c, ax_d) = axes
    _draw(ax_a, diffs, "(a) squared-norm differences of adjacent layers", r"$\|W_L\|^2-\|W_M\|^2$")
    ax_a.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":")
    _draw(ax_b, ratios, "(b) squared-norm ratios of adjacent layers", r"$\|W_L\|^2/\|W_M\|^2$")
    ax_b.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
    if _spans_decades(ratios, reference=1.0):
        ax_b.set_yscale("log")
    _draw(ax_c, changes, "(c) change since initialisation", r"$\|W_L(t)\|^2-\|W_L(0)\|^2$")
    _draw(ax_d, grads, "(d) gradient norms per layer", r"$\|\nabla_{W_L}\,\ell\|$")
    if total is not None:
        ax_d.plot(*total, label="total", color="black", linestyle="--", linewidth=1.0)
        ax_d.legend(fontsize=7, ncol=2 if len(grads) > 5 else 1, loc="best")
    if _spans_decades({**grads, **({"total": total} if total else {})}):
        ax_d.set_yscale("log")
    for ax in (ax_a, ax_b, ax_c, ax_d):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or "Layer balance (Du, Hu & Lee 2018)")
    return fig
