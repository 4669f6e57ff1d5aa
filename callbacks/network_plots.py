r"""Figures of a real network's balance (LayerBalanceMonitor's default mode).

A ResNet or a GPT has tens of weight matrices and symmetries: one line each would be unreadable.
:func:`plot_network` draws them as heatmaps (group x step) once there are more than ten, with the
per-kind summaries and the angular update as lines; :func:`plot_network_ledger` draws the ledger
of the ``top_k`` symmetries whose charges moved most, beside a summary panel. Every figure is at
most 15 x 16 inches (1800 x 1920 pixels at the monitor's 120 dpi), built with
:class:`matplotlib.figure.Figure` directly (no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch_momentum.balance.rules import LEDGER_TERMS
from torch_momentum.balance.symmetry import KINDS
from torch_momentum.callbacks._ledger_panel import draw_ledger_terms, figure_legend, marker

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_network", "plot_network_ledger"]

#: above this many rows a panel is a heatmap instead of lines
HEATMAP_ABOVE = 10
_KIND_COLOURS = {"scale": "tab:blue", "rescale": "tab:orange", "translation": "tab:green"}
#: the label of the measured change of a charge in the ledger panels
_CHANGE = r"$\sum_u Q_u(t)-Q_u(0)$"


def _source(source: Any) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """``(history, details)`` of a monitor in the default mode, or the pair itself."""
    if hasattr(source, "history") and hasattr(source, "details"):
        return list(source.history), list(source.details)
    if isinstance(source, tuple) and len(source) == 2:
        return list(source[0]), list(source[1])
    raise TypeError(
        "`source` must be a LayerBalanceMonitor that ran without `layers=` (its history and"
        f" details), or a (history, details) pair; got {type(source).__name__}"
    )


def _matrix(details: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[str], list]:
    """``(steps, row names in first-seen order, rows x steps values)`` of ``details[key]``."""
    steps = [int(d["step"]) for d in details]
    names: list[str] = []
    for d in details:
        names += [n for n in d[key] if n not in names]
    values = [[float(d[key].get(n, math.nan)) for d in details] for n in names]
    return steps, names, values


def _rows(
    ax: Axes, steps: list[int], names: list[str], values: list, log: bool, label: str
) -> None:
    """Lines for few rows, a heatmap for many (named rows, a colour bar)."""
    import numpy as np
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    if len(names) <= HEATMAP_ABOVE:
        for name, row in zip(names, values, strict=True):
            ax.plot(steps, row, linewidth=1.2, label=name, marker=marker(steps), markersize=3)
        if log and any(v > 0 for row in values for v in row):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return
    data = np.asarray(values, dtype=float)
    finite = data[np.isfinite(data)]
    if log:
        positive = finite[finite > 0]
        low = float(np.percentile(positive, 5)) if positive.size else 1e-12
        high = float(positive.max()) if positive.size else 1.0
        norm: Any = LogNorm(vmin=low, vmax=max(high, low * 10))
        data = np.where(data > 0, data, low)
    else:
        bound = float(np.percentile(np.abs(finite), 98)) if finite.size else 1.0
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound or -1.0, vmax=bound or 1.0)
    # one column per logging step, its edges half-way to the neighbouring steps
    edges = np.asarray(steps, dtype=float)
    if len(edges) > 1:
        middle = (edges[1:] + edges[:-1]) / 2
        edges = np.concatenate([[2 * edges[0] - middle[0]], middle, [2 * edges[-1] - middle[-1]]])
    else:
        edges = np.asarray([edges[0] - 0.5, edges[0] + 0.5])
    image = ax.pcolormesh(
        edges, np.arange(len(names) + 1) - 0.5, data, norm=norm, cmap="viridis" if log else "RdBu_r"
    )
    ax.set_ylim(len(names) - 0.5, -0.5)
    every = max(1, math.ceil(len(names) / 40))
    ax.set_yticks(range(0, len(names), every))
    ax.set_yticklabels(names[::every], fontsize=max(4, 8 - len(names) // 20))
    ax.figure.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.01)


def plot_network(source: Any, *, title: str | None = None) -> Figure:
    r"""The balance of a real network in four panels and return the figure.

    (a) per weight matrix, the relative change of its squared norm
    :math:`\|W(t)\|^2 / \|W(0)\|^2 - 1`; (b) per symmetry, the largest change of a unit's charge
    :math:`\max_u |Q_u(t) - Q_u(0)|` (conserved under gradient flow); (c) per kind, the largest
    (solid) and median (dashed) change, and the layer-balance drift; (d) the angular update of
    the scale-invariant groups against its equilibrium :math:`\sqrt{2\eta\lambda/(1+\mu)}` (or
    the gradient norm where the model has none). Panels (a) and (b) are heatmaps (row x step)
    above ten rows, lines otherwise.

    Args:
        source: a :class:`~torch_momentum.callbacks.LayerBalanceMonitor` that ran without
            ``layers=`` (it keeps the per-group values for this figure in ``details``), or a
            ``(history, details)`` pair.
        title: figure title.

    Raises:
        TypeError: ``source`` is neither.
        ValueError: nothing was recorded.

    Example:

        >>> from torch_momentum.callbacks.network_plots import plot_network
        >>> details = [{"step": t, "groups": {"fc": 0.1 * t}, "charges": {"fc (softmax)": 0.0},
        ...             "kinds": {"fc (softmax)": "translation"}, "ledger": {}} for t in range(3)]
        >>> history = [{"step": t, "grad_norm/total": 1.0} for t in range(3)]
        >>> fig = plot_network((history, details))
        >>> [round(float(y), 2) for y in fig.axes[0].lines[0].get_ydata()]
        [0.0, 0.1, 0.2]
    """
    from matplotlib.figure import Figure

    history, details = _source(source)
    if not details:
        raise ValueError("`source` recorded nothing (no logging step with the default mode)")
    rows = max(len(_matrix(details, key)[1]) for key in ("groups", "charges"))
    # taller for many rows, so that every other row keeps a readable label (at most 16 inches)
    fig = Figure(figsize=(15, min(16.0, 9.0 + 0.05 * max(rows - 40, 0))), layout="constrained")
    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    steps, names, values = _matrix(details, "groups")
    _rows(ax_a, steps, names, values, False, r"$\|W(t)\|^2/\|W(0)\|^2-1$")
    ax_a.set_title(f"(a) weight matrices ({len(names)}): change of the squared norm", fontsize=10)
    steps, names, values = _matrix(details, "charges")
    if names:
        _rows(ax_b, steps, names, values, True, r"$\max_u|Q_u(t)-Q_u(0)|$")
    else:
        ax_b.text(0.5, 0.5, "no symmetry found", ha="center", va="center", transform=ax_b.transAxes)
    ax_b.set_title(f"(b) symmetries ({len(names)}): largest change of a unit's charge", fontsize=10)
    _kinds(ax_c, history)
    _angles(ax_d, history)
    for ax in (ax_a, ax_b, ax_c, ax_d):
        ax.set_xlabel("step")
    fig.suptitle(title or "Balance of the network: weight matrices and conserved charges")
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list, list]:
    rows = [r for r in history if key in r and isinstance(r[key], (int, float))]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def _kinds(ax: Axes, history: Sequence[Mapping[str, Any]]) -> None:
    drawn = False
    for kind in KINDS:
        for stat, style in (("max", "-"), ("median", "--")):
            steps, values = _series(history, f"charge/{kind}/{stat}")
            if steps:
                label = f"{kind} ({stat})"
                ax.plot(
                    steps,
                    values,
                    style,
                    color=_KIND_COLOURS[kind],
                    label=label,
                    lw=1.3,
                    marker=marker(steps),
                    markersize=3,
                )
                drawn = True
    steps, values = _series(history, "balance/drift")
    if steps:
        ax.plot(
            steps,
            values,
            ":",
            color="black",
            label="layer-balance drift",
            lw=1.3,
            marker=marker(steps),
            markersize=3,
        )
        drawn = True
    ax.set_title("(c) per kind: largest and median change of a charge", fontsize=10)
    if drawn:
        if any(
            v > 0
            for s in ("max", "median")
            for k in KINDS
            for v in _series(history, f"charge/{k}/{s}")[1]
        ):
            ax.set_yscale("log")
        ax.set_ylabel(r"$|Q(t)-Q(0)|$")
        # inside the axes: outside, it widened the column and moved (a)'s colour bar away
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no symmetry found", ha="center", va="center", transform=ax.transAxes)


def _angles(ax: Axes, history: Sequence[Mapping[str, Any]]) -> None:
    steps, values = _series(history, "angle/mean")
    if steps:
        ax.plot(
            steps,
            values,
            color="tab:blue",
            lw=1.3,
            label="angle between $x_t$ and $x_{t+1}$",
            marker=marker(steps),
            markersize=3,
        )
        p_steps, predicted = _series(history, "angle/prediction")
        if p_steps:
            ax.plot(
                p_steps,
                predicted,
                "--",
                color="black",
                lw=1.0,
                label=r"equilibrium $\sqrt{2\eta\lambda/(1+\mu)}$",
            )
        ax.set_ylabel("angle (rad)")
        ax.set_title("(d) angular update of the scale-invariant groups", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        return
    steps, values = _series(history, "grad_norm/total")
    ax.plot(steps, values, color="black", lw=1.3)
    ax.set_ylabel(r"$\|\nabla\ell\|$")
    ax.set_title("(d) gradient norm (no scale-invariant group)", fontsize=10)


#: the most characters of a panel title at fontsize 9 across a 5-inch panel
_TITLE_CHARS = 64


def _fit(name: str, width: int = _TITLE_CHARS) -> str:
    """``name`` cut in the middle to ``width`` characters (its start says where, its end which
    symmetry), so that a panel title stays within its panel.

    Example:
        >>> from torch_momentum.callbacks.network_plots import _fit
        >>> _fit("layers.0 input_layernorm/self_attn.q_proj+self_attn.k_proj", 30)
        'layers.0 input…elf_attn.k_proj'
    """
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return f"{name[:head]}…{name[len(name) - (width - 1 - head) :]}"


def plot_network_ledger(source: Any, *, top_k: int = 5, title: str | None = None) -> Figure:
    r"""The ledger of the ``top_k`` symmetries whose charges moved most, and a summary panel.

    Each symmetry's panel shows each term of the ledger summed over units (cumulative) and
    :math:`\sum_u Q_u(t) - Q_u(0)` dashed black on top; the terms add up to it (closure). The
    summary panel shows the terms summed over all quadratic charges, as logged
    (``ledger/{term}``). The panels are drawn as :func:`~torch_momentum.callbacks.plot_ledger`
    draws a pair's: one colour per term, terms near 0 dashed on top and named in a note with
    their size, terms that are 0 throughout named, not drawn.

    Args:
        source: as :func:`plot_network`; the monitor ran with ``ledger=True``.
        top_k: how many symmetries (1 to 11).
        title: figure title.

    Raises:
        ValueError: no ledger was recorded, or ``top_k`` out of range.

    Example:

        >>> from torch_momentum.callbacks.network_plots import plot_network_ledger
        >>> terms = {"momentum": 0.2, "weight_decay": -0.1, "symmetry": 0.0,
        ...          "discretisation": 0.05, "other": 0.0, "rounding": 0.0}
        >>> def ledger(t):
        ...     return {"q/k": {"change": 0.15 * t, **{k: v * t for k, v in terms.items()}}}
        >>> details = [{"step": t, "groups": {}, "charges": {}, "kinds": {}, "ledger": ledger(t)}
        ...            for t in range(3)]
        >>> history = [{"step": t, "ledger/momentum": 0.2 * t} for t in range(3)]
        >>> fig = plot_network_ledger((history, details))
        >>> ax = fig.axes[1]  # q/k: the terms that are not always 0, then the change, dashed
        >>> [line.get_label() for line in ax.lines][:4]
        ['momentum', 'weight_decay', 'discretisation', '$\\sum_u Q_u(t)-Q_u(0)$']
        >>> [round(float(y), 2) for y in ax.lines[3].get_ydata()]
        [0.0, 0.15, 0.3]
    """
    from matplotlib.figure import Figure

    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 11:
        raise ValueError(f"`top_k` must be an int in [1, 11], got {top_k!r}")
    history, details = _source(source)
    rows = [d for d in details if d.get("ledger")]
    if not rows:
        raise ValueError("`source` recorded no ledger: run the monitor with ledger=True")
    last = rows[-1]["ledger"]
    worst = sorted(last, key=lambda n: -abs(last[n]["change"]))[:top_k]
    n_panels = 1 + len(worst)
    cols = min(3, n_panels)
    n_rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(5 * cols, 3.6 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, cols, squeeze=False).reshape(-1)
    steps = [int(d["step"]) for d in rows]
    summary = {t: _series(history, f"ledger/{t}") for t in LEDGER_TERMS}
    draw_ledger_terms(axes[0], {t: series for t, series in summary.items() if series[0]})
    closure = _series(history, "ledger/closure")[1]
    note = f" (largest relative closure {max(closure):.1e})" if closure else ""
    axes[0].set_title(f"all quadratic charges: cumulative terms{note}", fontsize=9)
    for ax, name in zip(axes[1:], worst, strict=False):
        terms = {t: (steps, [d["ledger"][name][t] for d in rows]) for t in LEDGER_TERMS}
        change = (steps, [d["ledger"][name]["change"] for d in rows])
        draw_ledger_terms(ax, terms, change, change_label=_CHANGE)
        ax.set_title(_fit(name), fontsize=9)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    for ax in axes[:n_panels]:
        ax.set_xlabel("step")
        ax.axhline(0.0, color="0.6", lw=0.6)
    figure_legend(fig, _CHANGE)
    fig.suptitle(title or f"Ledger of the {len(worst)} charges that moved most")
    return fig
