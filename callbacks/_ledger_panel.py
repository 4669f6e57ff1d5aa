r"""One panel of a ledger figure, drawn the same way in every figure that shows a ledger.

The ledger splits the change of a quantity that gradient flow conserves exactly into cumulative
terms (:data:`~torch_momentum.balance.LEDGER_TERMS`): for a pair of layers
:math:`D(t) - D(0)` with :math:`D = \|W_L\|^2 - \|W_M\|^2`
(:func:`~torch_momentum.callbacks.plot_ledger`), for a symmetry's charge
:math:`\sum_u Q_u(t) - Q_u(0)` (:func:`~torch_momentum.callbacks.plot_network_ledger`). A panel
draws each term against the step, one colour per term in every figure, the measured change
dashed black on top (the terms add up to it), and a note, in a band below the curves, with the
largest :math:`|\text{closure}|` and the terms that are (nearly) 0.

Private module: the names here are shared by the plotting modules, not user API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch_momentum.balance.rules import LEDGER_TERMS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: one colour per ledger term, the same in every figure
TERM_STYLE: dict[str, dict[str, Any]] = {
    "momentum": {"color": "tab:red"},
    "weight_decay": {"color": "tab:purple"},
    "symmetry": {"color": "tab:green"},
    "discretisation": {"color": "tab:blue"},
    "other": {"color": "tab:orange"},
    "rounding": {"color": "tab:brown"},
}
# Terms that stay within this fraction of the panel's largest value look like the zero line:
# they are drawn on top of the larger ones, each with its own dash pattern (so that two of them,
# e.g. a round-off symmetry term and an "other" of 1e-16, do not hide one another), and their
# largest magnitude is written in the panel's note.
NEGLIGIBLE = 1e-3
_NEGLIGIBLE_DASHES = [(0, (6, 3)), (3, (2, 4)), (0, (1, 2)), (0, (8, 2, 1, 2))]
# The note sits in a band added below the data (this fraction of the data's range), so that it
# never covers a curve, however the terms move.
_NOTE_BAND = 0.24
#: series of at most this many steps get a marker at every point (one point draws no line)
MARKERS_BELOW = 30


def marker(steps: Sequence[Any]) -> str | None:
    """``"o"`` for a short series (at most :data:`MARKERS_BELOW` steps), else no marker."""
    return "o" if len(steps) <= MARKERS_BELOW else None


def draw_ledger_terms(
    ax: Axes,
    terms: Mapping[str, tuple[Sequence[Any], Sequence[float]]],
    change: tuple[Sequence[Any], Sequence[float]] | None = None,
    *,
    change_label: str = "D(t) − D(0)",
    closure: float | None = None,
) -> None:
    """Draw one ledger panel on ``ax``.

    Args:
        ax: the axes.
        terms: ``{term: (steps, cumulative values)}`` for terms of
            :data:`~torch_momentum.balance.LEDGER_TERMS` (others are ignored). Terms that are
            exactly 0 throughout are not drawn but named in the note; terms within
            :data:`NEGLIGIBLE` of the panel's largest value are drawn dashed, on top, and named
            with their size.
        change: ``(steps, values)`` of the measured change the terms add up to, drawn dashed
            black on top; None: none.
        change_label: its legend label.
        closure: the largest :math:`|\\text{closure}|`, written first in the note; None: not
            written.
    """
    drawn = {t: terms[t] for t in LEDGER_TERMS if t in terms and any(v != 0.0 for v in terms[t][1])}
    zero = [t for t in LEDGER_TERMS if t in terms and t not in drawn]
    size = {t: max(abs(v) for v in values) for t, (_, values) in drawn.items()}
    measured = change[1] if change is not None else []
    scale = max([*size.values(), *(abs(v) for v in measured)], default=0.0)
    negligible = [t for t in drawn if size[t] <= NEGLIGIBLE * scale]
    dashes = iter(_NEGLIGIBLE_DASHES * 2)
    for term, (steps, values) in drawn.items():
        style: dict[str, Any] = {"linewidth": 1.5, "zorder": 2, **TERM_STYLE[term]}
        if term in negligible:  # drawn last and dashed: visible beside another one near 0
            style.update(linewidth=1.6, zorder=3, linestyle=next(dashes))
        ax.plot(steps, values, label=term, marker=marker(steps), markersize=2, **style)
    if change is not None:
        ax.plot(
            *change,
            label=change_label,
            color="black",
            linestyle="--",
            linewidth=1.2,
            zorder=4,
            marker=marker(change[0]),
            markersize=3,
        )
    lines = [] if closure is None else [f"max |closure| = {closure:.1e}"]
    if negligible:
        lines.append("≈ 0: " + ", ".join(f"{t} (≤ {size[t]:.0e})" for t in negligible))
    if zero:
        lines.append("= 0: " + ", ".join(zero))
    if not lines:
        return
    low, high = ax.get_ylim()
    ax.set_ylim(low - _NOTE_BAND * (high - low), high)
    ax.text(0.02, 0.02, "\n".join(lines), fontsize=7, transform=ax.transAxes, va="bottom")


def figure_legend(fig: Figure, change_label: str) -> None:
    """One legend for every panel of ``fig``, below them (no panel's curves are covered): the
    terms drawn in any panel, in :data:`~torch_momentum.balance.LEDGER_TERMS` order, then the
    measured change ``change_label``."""
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for line in ax.lines:
            handles.setdefault(str(line.get_label()), line)
    labels = [label for label in (*LEDGER_TERMS, change_label) if label in handles]
    if labels:
        fig.legend(
            [handles[label] for label in labels],
            labels,
            loc="outside lower center",
            ncol=len(labels),
            fontsize=8,
            frameon=False,
        )
