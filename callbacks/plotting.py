r"""Figures of the layer-balance series.

- :func:`plot_balance`: the four panels of Du, Hu & Lee (2018), figures (a)-(d); with
  ``view="ledger"`` or ``view="units"`` the two figures below.
- :func:`plot_ledger`: the balance ledger, where each adjacent pair's drift
  :math:`D(t) - D(0)` comes from, term by term, with the measured drift on top.
- :func:`plot_unit_drift`: the distribution over hidden units of :math:`|D_i(T) - D_i(0)|`.

matplotlib is imported inside the plotting functions only, and every figure is built with
:class:`matplotlib.figure.Figure` directly (no pyplot state), so it works with any backend,
headless included, and never leaks figures.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch_momentum.balance.rules import LEDGER_TERMS
from torch_momentum.callbacks._ledger_panel import draw_ledger_terms, figure_legend

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "LEDGER_TERMS",
    "ledger_series",
    "load_history",
    "plot_balance",
    "plot_ledger",
    "plot_unit_drift",
    "series",
]

_PREFIXES = ("balance/", "grad_norm/", "ledger/")


def load_history(source: Any) -> list[dict[str, float]]:
    """Normalise ``source`` to a list of ``{"step": t, key: value}`` rows, sorted by step.

    ``source``: a :class:`~torch_momentum.callbacks.LayerBalanceMonitor` (its ``history``), such a
    history (a sequence of dicts), or the path of a CSVLogger ``metrics.csv`` (rows of the same
    step are merged; keys other than ``balance/...``, ``ledger/...`` and ``grad_norm/...`` and
    empty cells are ignored).

    Example:

        >>> from torch_momentum.callbacks import load_history
        >>> load_history([{"step": 2, "balance/drift": 0.5, "loss": 1.0}, {"step": 1}])
        [{'step': 2, 'balance/drift': 0.5}]
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


def series(history: Sequence[Mapping[str, float]], prefix: str) -> dict[str, tuple[list, list]]:
    """``{suffix: (steps, values)}`` for the keys ``prefix + suffix`` of a history.

    Suffixes are in first-seen order; a key absent from a row is skipped for that row.

    Args:
        history: rows ``{"step": t, key: value, ...}`` (see :func:`load_history`).
        prefix: the key prefix, e.g. ``"balance/sq_norm_diff/"``; a full key selects one series
            under the suffix ``""``.

    Returns:
        ``{suffix: (steps, values)}``.

    Example:

        >>> from torch_momentum.callbacks import series
        >>> rows = [{"step": 0, "balance/sq_norm/a": 1.0}, {"step": 5, "balance/sq_norm/a": 2.0}]
        >>> series(rows, "balance/sq_norm/")
        {'a': ([0, 5], [1.0, 2.0])}
    """
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


def plot_balance(source: Any, *, view: str = "balance", title: str | None = None) -> Figure:
    r"""Plot the layer-balance series in four panels (or the ledger or per-unit view) and return
    the figure.

    ``view="balance"`` (default): (a) :math:`\|W_L\|^2 - \|W_M\|^2` for adjacent layers,
    (b) their ratios :math:`\|W_L\|^2 / \|W_M\|^2` (log scale when they and 1 span a decade or
    more), (c) :math:`\|W_L(t)\|^2 - \|W_L(0)\|^2` per layer (equal for all layers under
    gradient flow for a layer-wise 1-homogeneous network), (d) :math:`\|\nabla_{W_L}\ell\|` per
    layer (log scale when spanning decades). The x axis is the optimizer step.

    ``view="ledger"``: :func:`plot_ledger`, the cumulative ledger terms of every adjacent pair
    against the step with the measured :math:`D(t) - D(0)` on top (``source`` as there, also a
    dict of runs). ``view="units"``: :func:`plot_unit_drift`, the distribution over hidden units
    of :math:`|D_i(T) - D_i(0)|` per hidden layer at the end of training (``source`` a monitor
    that ran with ``neurons=True``, its ``unit_drift``, or a dict of either per run).

    Args:
        source: a :class:`~torch_momentum.callbacks.LayerBalanceMonitor`, its ``history``, or
            the path of a CSVLogger ``metrics.csv`` (for the other views see above).
        view: ``"balance"`` (default), ``"ledger"`` or ``"units"``.
        title: figure title.

    Returns:
        The figure; for the default view ``fig.axes`` are the panels (a)-(d).

    Raises:
        ValueError: ``source`` holds no balance metrics (no ledger metrics, no per-unit drift for
            the other views), or an unknown ``view``.

    Example:

        >>> from torch_momentum.callbacks import plot_balance
        >>> rows = [{"step": t, "balance/sq_norm_diff/a-b": 0.5, "balance/sq_norm_ratio/a-b": 2.0}
        ...         for t in range(3)]
        >>> fig = plot_balance(rows)
        >>> [float(y) for y in fig.axes[0].lines[0].get_ydata()]
        [0.5, 0.5, 0.5]
        >>> fig = plot_balance({"h1": [1e-3, -2e-3, 5e-4]}, view="units")  # per-unit drift
        >>> [float(y) for y in fig.axes[0].lines[0].get_ydata()]  # |values|, largest first
        [0.002, 0.001, 0.0005]
    """
    if view == "ledger":
        return plot_ledger(source, title=title)
    if view == "units":
        return plot_unit_drift(_unit_drift_of(source), title=title)
    if view != "balance":
        raise ValueError(f"`view` must be 'balance', 'ledger' or 'units', got {view!r}")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if isinstance(source, Mapping):
        raise TypeError(
            "the balance view draws one run: pass a LayerBalanceMonitor, its history or a"
            " metrics.csv path (a dict of runs works with view='ledger' or view='units')"
        )
    history = load_history(source)
    if not any(k.startswith("balance/") for row in history for k in row):
        raise ValueError("`source` holds no balance metrics (keys 'balance/...')")

    diffs = series(history, "balance/sq_norm_diff/")
    ratios = series(history, "balance/sq_norm_ratio/")
    changes = series(history, "balance/sq_norm_change/")
    grads = series(history, "grad_norm/")
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


def _unit_drift_of(source: Any) -> Any:
    """The per-unit drift of a monitor (its ``unit_drift``), of a dict of monitors per run, or
    ``source`` itself (already ``{layer: values}`` or ``{run: {layer: values}}``).

    Histories and ``metrics.csv`` files hold only the per-layer summaries
    (``balance/unit_drift_max/...``), and ``monitor.unit_ledger`` holds ledger terms per unit, not
    the drift: all three are refused with an error that names where the value came from."""

    def drift(item: Any, where: str) -> Any:
        if hasattr(item, "unit_drift") and hasattr(item, "history"):  # a LayerBalanceMonitor
            if not item.unit_drift:
                raise ValueError(
                    f"{where} holds no per-unit drift: run the monitor with neurons=True and train"
                    " (its unit_drift is not kept in checkpoints)"
                )
            return item.unit_drift
        if isinstance(item, (str, os.PathLike)) or (
            isinstance(item, Sequence) and item and all(isinstance(r, Mapping) for r in item)
        ):
            raise TypeError(
                f"{where} is a history or a metrics.csv path: they hold only the per-layer"
                " summaries balance/unit_drift_max and _mean; the units view needs a"
                " LayerBalanceMonitor trained with neurons=True or its unit_drift {layer: values}"
            )
        if isinstance(item, Mapping) and any(
            isinstance(v, Mapping) and set(v) & set(LEDGER_TERMS) for v in item.values()
        ):
            raise ValueError(
                f"{where} holds per-unit ledger terms (monitor.unit_ledger), not the drift: pass"
                " the monitor or its unit_drift"
            )
        return item

    if isinstance(source, Mapping):
        checked = drift(source, "`source`")  # refuses unit_ledger at the top level
        return {key: drift(value, f"`source[{key!r}]`") for key, value in checked.items()}
    return drift(source, "`source`")


def _is_run_mapping(source: Any) -> bool:
    """Whether ``source`` is ``{label: source}`` (several runs; labels may contain "/"); one
    history row (numbers as values) is refused with a clear error instead."""
    if not isinstance(source, Mapping):
        return False
    if source and all(isinstance(v, (int, float)) for v in source.values()):
        raise TypeError(
            "`source` is a single history row: pass the whole history (a list of dicts), the"
            " monitor, a metrics.csv path, or a dict {label: run} of several runs"
        )
    return True


def ledger_series(source: Any) -> dict[str, dict[str, tuple[list, list]]]:
    r"""The ledger of one run, per adjacent pair: ``{pair: {term: (steps, values)}}``.

    For each pair ``"L-M"`` logged with ``ledger/{term}/L-M`` keys, the cumulative terms of
    :data:`LEDGER_TERMS`, ``"closure"``, and ``"drift"``: the measured
    :math:`D(t) - D(0) = \text{momentum} + \text{weight decay} + \text{symmetry} +
    \text{discretisation} + \text{other} + \text{rounding} + \text{closure}` (the monitor defines
    the closure as the measured drift minus the terms, so adding it back recovers the measured
    drift; the drift is taken where the ledger reads :math:`D`, at the iterate for look-ahead
    optimisers). Steps
    where a pair lacks one of its keys are skipped; a term never logged counts as 0.

    Args:
        source: a monitor, its history, or the path of a CSVLogger ``metrics.csv``
            (see :func:`load_history`).

    Returns:
        ``{pair: {term: (steps, values)}}`` with keys ``*LEDGER_TERMS, "closure", "drift"``.

    Raises:
        ValueError: ``source`` holds no ``ledger/...`` keys.

    Example:

        >>> from torch_momentum.callbacks import ledger_series
        >>> row = {"step": 3, "ledger/momentum/a-b": 0.25, "ledger/discretisation/a-b": 0.5,
        ...        "ledger/closure/a-b": 1e-9}
        >>> ledger_series([row])["a-b"]["drift"]
        ([3], [0.750000001])
    """
    history = load_history(source)
    pairs: list[str] = []
    summed = False  # ledger/{term} without a pair: the monitor's default mode
    for row in history:
        for key in row:
            if key.startswith("ledger/"):
                parts = key.split("/", 2)
                if len(parts) < 3:
                    summed = True
                elif parts[2] not in pairs:
                    pairs.append(parts[2])
    if not pairs and summed:
        raise ValueError(
            "`source` holds the ledger summed over the model's symmetries (keys 'ledger/{term}',"
            " LayerBalanceMonitor without layers=), not per layer pair: draw it with"
            " plot_network_ledger(monitor), or monitor layer pairs with layers=[...]"
        )
    if not pairs:
        raise ValueError(
            "`source` holds no ledger metrics (keys 'ledger/...'); log them with"
            " `LayerBalanceMonitor(ledger=True)`"
        )
    names = (*LEDGER_TERMS, "closure")
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for pair in pairs:
        cols: dict[str, tuple[list, list]] = {name: ([], []) for name in (*names, "drift")}
        for row in history:
            keys = [f"ledger/{name}/{pair}" for name in names]
            if "ledger/closure/" + pair not in row or not any(k in row for k in keys[:-1]):
                continue
            values = [float(row.get(k, 0.0)) for k in keys]
            for name, value in zip((*names, "drift"), (*values, math.fsum(values)), strict=True):
                cols[name][0].append(row["step"])
                cols[name][1].append(value)
        out[pair] = cols
    return out


def plot_ledger(source: Any, *, title: str | None = None) -> Figure:
    r"""Plot where each adjacent pair's balance drift comes from, and return the figure.

    For a pair L-M, with :math:`D = \|W_L\|^2 - \|W_M\|^2` (summed over units, biases grouped
    as the monitor groups them), the ledger splits :math:`D(t) - D(0)` exactly into cumulative
    terms: momentum, weight decay, symmetry (:math:`-2\eta\sum R`, 0 for a homogeneous grouping),
    discretisation (:math:`\sum\|\Delta x\|^2_\pm`), other (first-order part of unknown update
    rules) and rounding (low-precision rounding of the applied update). One panel per pair
    (columns) and run (rows): each term against the step, and the measured :math:`D(t) - D(0)`
    dashed black on top; the terms add up to it. One legend below the panels. A note in a band
    below each panel's curves gives the largest :math:`|\text{closure}|`, the terms that stay
    below 1e-3 of the panel's largest value with their size (drawn dashed, on top of the others,
    so that two of them near 0 stay visible) and the terms that are exactly 0 throughout (not
    drawn).

    Args:
        source: one run (a monitor, its history, or a CSVLogger ``metrics.csv`` path, see
            :func:`load_history`) or a dict ``{label: run}`` of several runs, one row each.
        title: figure title.

    Returns:
        The figure; ``fig.axes`` are the panels row by row.

    Raises:
        ValueError: a run holds no ledger metrics, or the dict of runs is empty.

    Example:

        >>> from torch_momentum.callbacks import plot_ledger
        >>> rows = [{"step": t, "ledger/momentum/a-b": 0.1 * t, "ledger/closure/a-b": 0.0}
        ...         for t in range(4)]
        >>> fig = plot_ledger({"heavy ball": rows})
        >>> [line.get_label() for line in fig.axes[0].lines]
        ['momentum', 'D(t) − D(0)']
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = dict(source) if _is_run_mapping(source) else {"": source}
    if not runs:
        raise ValueError("`source` is an empty dict of runs")
    ledgers = {label: ledger_series(run) for label, run in runs.items()}
    pairs: list[str] = []
    for ledger in ledgers.values():
        pairs += [p for p in ledger if p not in pairs]
    n_rows, n_cols = len(ledgers), len(pairs)
    fig = Figure(figsize=(5.2 * n_cols + 0.6, 3.4 * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True)
    for r, (label, ledger) in enumerate(ledgers.items()):
        for c, pair in enumerate(pairs):
            ax = axes[r, c]
            cols = ledger.get(pair)
            head = f"{label}: {pair}" if label else pair
            ax.set_title(head, fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if cols is None or not cols["drift"][0]:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
                continue
            closure = max(abs(v) for v in cols["closure"][1])
            draw_ledger_terms(ax, cols, cols["drift"], closure=closure)
            if r == n_rows - 1:
                ax.set_xlabel("step")
            if c == 0:
                ax.set_ylabel("cumulative change of D")
    figure_legend(fig, "D(t) − D(0)")
    fig.suptitle(title or "Balance ledger: D(t) − D(0) = sum of the terms")
    return fig


def _abs_floats(values: Any, name: str) -> list[float]:
    if hasattr(values, "detach"):
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    try:
        out = [abs(float(v)) for v in values]
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`drift[{name!r}]` must be a 1-D tensor, array or sequence of numbers, got"
            f" {type(values).__name__}"
        ) from err
    if not out:
        raise ValueError(f"`drift[{name!r}]` is empty")
    return out


def plot_unit_drift(drift: Mapping[str, Any], *, title: str | None = None) -> Figure:
    r"""Plot the distribution over hidden units of :math:`|D_i(T) - D_i(0)|`, and return it.

    :math:`D_i = \|\text{in}_i\|^2 - \|\text{out}_i\|^2` is the balance of hidden unit (or conv
    channel) :math:`i`: incoming weights and bias against outgoing weights. Gradient flow keeps
    every :math:`D_i` (Du, Hu & Lee 2018, per unit). One panel per hidden layer: the values
    sorted in decreasing order against the unit's rank (a complementary cumulative
    distribution), one curve per run, log scale when they span a decade or more (exact zeros are
    then drawn at the smallest positive value of the panel).

    Args:
        drift: ``{layer: values}`` for one run, or ``{run label: {layer: values}}`` for several
            runs overlaid; ``values`` are the per-unit :math:`D_i(T) - D_i(0)` at one step
            :math:`T` (the monitor's ``unit_drift``: its last logging step; 1-D tensor, array or
            sequence; their absolute values are plotted).
        title: figure title.

    Returns:
        The figure; ``fig.axes`` holds one panel per layer, in first-seen order.

    Raises:
        TypeError: values that are not numbers.
        ValueError: no layers, or an empty set of values.

    Example:

        >>> import torch
        >>> from torch_momentum.callbacks import plot_unit_drift
        >>> fig = plot_unit_drift({"GD": {"h1": torch.tensor([1e-3, -2e-3])},
        ...                        "heavy ball": {"h1": [0.5, 0.1]}})
        >>> [[round(float(y), 4) for y in line.get_ydata()] for line in fig.axes[0].lines]
        [[0.002, 0.001], [0.5, 0.1]]
    """
    from matplotlib.figure import Figure

    if not isinstance(drift, Mapping):
        raise TypeError(
            "`drift` must be a non-empty dict {layer: values} or {run: {layer: values}}, got"
            f" {type(drift).__name__}"
        )
    if not drift:
        raise ValueError("`drift` must be a non-empty dict {layer: values}, got {}")
    several = all(isinstance(v, Mapping) for v in drift.values())
    runs: dict[str, Mapping[str, Any]] = dict(drift) if several else {"": drift}
    layers: list[str] = []
    for label, per_layer in runs.items():
        if not per_layer:
            raise ValueError(
                "every run of `drift` must be a non-empty dict {layer: values};"
                f" `drift[{label!r}]` is empty"
            )
        layers += [name for name in per_layer if name not in layers]
    data = {
        label: {name: sorted(_abs_floats(v, name), reverse=True) for name, v in per_layer.items()}
        for label, per_layer in runs.items()
    }
    fig = Figure(figsize=(5.0 * len(layers) + 0.6, 3.8), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, name in zip(axes, layers, strict=True):
        curves = {label: d[name] for label, d in data.items() if name in d}
        positive = [v for vs in curves.values() for v in vs if v > 0]
        log = bool(positive) and max(positive) / min(positive) >= 10.0
        for label, values in curves.items():
            ys = [max(v, min(positive)) for v in values] if log else values
            text = f"{label}: " if label else ""
            ax.plot(
                range(1, len(ys) + 1),
                ys,
                label=f"{text}median {statistics.median(values):.2g}, max {values[0]:.2g}",
                linewidth=1.5,
            )
        if log:
            ax.set_yscale("log")
        ax.set_title(f"hidden layer {name}", fontsize=10)
        ax.set_xlabel("unit rank (largest first)")
        ax.set_ylabel(r"$|D_i(T) - D_i(0)|$")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or "Per-unit balance drift |D_i(T) − D_i(0)| at the last step T")
    return fig


def save_figures(figures: Mapping[str, Figure], directory: str, dpi: int = 120) -> dict[str, str]:
    """Save each figure as ``{directory}/{name}.png`` (the directory is created); returns the
    paths by name."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, figure in figures.items():
        paths[name] = os.path.join(directory, f"{name}.png")
        figure.savefig(paths[name], dpi=dpi)
    return paths


def log_figure(logger: Any, figure: Any, step: int, name: str = "balance") -> None:
    """Log a matplotlib figure to loggers that take figures (TensorBoard, MLflow); skip others."""
    try:
        experiment = logger.experiment
    except Exception:  # a logger whose experiment cannot be created here
        return
    if callable(getattr(experiment, "add_figure", None)):  # TensorBoard (and tensorboardX)
        experiment.add_figure(name, figure, global_step=step, close=False)
    elif callable(getattr(experiment, "log_figure", None)) and hasattr(logger, "run_id"):
        experiment.log_figure(logger.run_id, figure, f"{name}.png")  # MLflow
