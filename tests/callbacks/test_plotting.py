"""plot_ledger, plot_unit_drift, ledger_series and series on synthetic histories.

The histories carry the monitor's key names (``ledger/{term}/{L}-{M}``, ``balance/...``); the
assertions read back what was drawn (line data, labels, scales), not only that a figure exists.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_momentum.callbacks import (
    LEDGER_TERMS,
    ledger_series,
    load_history,
    plot_balance,
    plot_ledger,
    plot_unit_drift,
    series,
)

PAIRS = ("W1-W2", "W2-W3")


def synthetic_ledger(steps: int = 6, weight_decay: bool = False) -> tuple[list[dict], dict]:
    """A history whose terms and measured drift D(t) - D(0) are known independently.

    Returns the rows and ``{pair: drift values}``; the closure is the measured drift minus the
    five terms, as the monitor defines it (here a few 1e-12 of "round-off").
    """
    rows, drifts = [], {pair: [] for pair in PAIRS}
    for t in range(steps):
        row: dict[str, float] = {"step": 10 * t, "balance/drift": 0.1 * t}
        for k, pair in enumerate(PAIRS):
            terms = {
                "momentum": 0.3 * t * (k + 1),
                "weight_decay": -0.05 * t if weight_decay else 0.0,
                "symmetry": 1e-9 * math.sin(t),
                "discretisation": 0.01 * t * t,
                "other": 0.0,
            }
            drift = sum(terms.values()) + 3e-12 * t
            drifts[pair].append(drift)
            for term, value in terms.items():
                row[f"ledger/{term}/{pair}"] = value
            row[f"ledger/closure/{pair}"] = drift - math.fsum(terms.values())
        rows.append(row)
    return rows, drifts


def lines_by_label(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.lines}


def test_series_returns_steps_and_values_in_first_seen_order() -> None:
    rows = [
        {"step": 0, "balance/sq_norm/b": 1.0},
        {"step": 4, "balance/sq_norm/a": 3.0, "balance/sq_norm/b": 2.0},
    ]
    assert series(rows, "balance/sq_norm/") == {"b": ([0, 4], [1.0, 2.0]), "a": ([4], [3.0])}
    assert series(rows, "grad_norm/") == {}


def test_load_history_keeps_ledger_keys_and_merges_csv_rows(tmp_path: Path) -> None:
    rows, _ = synthetic_ledger(3)
    path = tmp_path / "metrics.csv"
    keys = ["step", "train_loss", *sorted({k for r in rows for k in r if k != "step"})]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:  # CSVLogger writes the monitor's metrics and the loss on separate rows
            writer.writerow({"step": row["step"], "train_loss": 1.0})
            writer.writerow(row)
    loaded = load_history(path)
    assert [r["step"] for r in loaded] == [0, 10, 20]
    for got, want in zip(loaded, rows, strict=True):
        assert got.keys() == want.keys()  # train_loss dropped, ledger kept
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-15, abs=0)  # CSV round-trips repr


def test_ledger_series_drift_is_the_terms_plus_the_closure() -> None:
    rows, drifts = synthetic_ledger()
    ledger = ledger_series(rows)
    assert list(ledger) == list(PAIRS)
    for pair in PAIRS:
        assert set(ledger[pair]) == {*LEDGER_TERMS, "closure", "drift"}
        steps, drift = ledger[pair]["drift"]
        assert steps == [r["step"] for r in rows]
        # fsum of six doubles: exact up to one rounding of the result (values <= 10)
        np.testing.assert_allclose(drift, drifts[pair], rtol=0, atol=1e-14)
        assert ledger[pair]["momentum"][1] == [r[f"ledger/momentum/{pair}"] for r in rows]


def test_ledger_series_counts_missing_terms_as_zero_and_skips_rows_without_ledger() -> None:
    rows = [
        {"step": 0, "balance/drift": 0.0},  # a row logged before the ledger existed
        {"step": 5, "ledger/discretisation/a-b": 0.5, "ledger/closure/a-b": 0.25},
    ]
    ledger = ledger_series(rows)["a-b"]
    assert ledger["drift"] == ([5], [0.75])
    assert ledger["momentum"] == ([5], [0.0])


def test_ledger_series_without_ledger_keys_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no ledger metrics"):
        ledger_series([{"step": 0, "balance/drift": 0.0}])


def test_plot_ledger_draws_every_term_and_the_measured_drift() -> None:
    rows, drifts = synthetic_ledger(weight_decay=True)
    fig = plot_ledger(rows, title="t")
    assert len(fig.axes) == len(PAIRS)
    for ax, pair in zip(fig.axes, PAIRS, strict=True):
        assert ax.get_title() == pair
        lines = lines_by_label(ax)
        # "other" is exactly 0 throughout: not drawn, named in the panel's note
        assert set(lines) == {
            "momentum",
            "weight_decay",
            "symmetry",
            "discretisation",
            "D(t) − D(0)",
        }
        for term in ("momentum", "weight_decay", "symmetry", "discretisation"):
            np.testing.assert_array_equal(lines[term].get_xdata(), [r["step"] for r in rows])
            np.testing.assert_array_equal(
                lines[term].get_ydata(), [r[f"ledger/{term}/{pair}"] for r in rows]
            )
        closure_line = lines["D(t) − D(0)"]
        assert closure_line.get_linestyle() == "--"
        # the dashed line is the measured drift (terms + closure), to one rounding of the sum
        np.testing.assert_allclose(closure_line.get_ydata(), drifts[pair], rtol=0, atol=1e-14)
        notes = [text.get_text() for text in ax.texts]
        assert any("= 0: other" in n for n in notes), notes
        # the largest |closure| of the synthetic history is 3e-12 * 5 (plus rounding)
        assert any("max |closure| = 1.5e-11" in n for n in notes), notes


def test_plot_ledger_rows_are_runs_and_columns_are_pairs() -> None:
    rows, _ = synthetic_ledger()
    only_first = [{k: v for k, v in r.items() if not k.endswith("W2-W3")} for r in rows]
    fig = plot_ledger({"GD": rows, "PolyakSGD": only_first})
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["GD: W1-W2", "GD: W2-W3", "PolyakSGD: W1-W2", "PolyakSGD: W2-W3"]
    # a pair the second run does not log is marked, not silently drawn empty
    assert [t.get_text() for t in fig.axes[3].texts] == ["not logged"]
    assert len(fig.axes[3].lines) == 0


def test_plot_ledger_bad_sources() -> None:
    with pytest.raises(ValueError, match="empty dict"):
        plot_ledger({})
    with pytest.raises(ValueError, match="no ledger metrics"):
        plot_ledger([{"step": 0, "balance/drift": 1.0}])
    with pytest.raises(TypeError, match="`source` must be"):
        plot_ledger(42)


def test_plot_unit_drift_sorted_curves_per_layer_and_run() -> None:
    gd = {"h1": torch.tensor([1e-4, -3e-4, 2e-4]), "h2": np.array([5e-5, 1e-5])}
    hb = {"h1": [0.2, -0.5, 0.1], "h2": [0.3, 0.05]}
    fig = plot_unit_drift({"GD": gd, "heavy ball": hb})
    assert [ax.get_title() for ax in fig.axes] == ["hidden layer h1", "hidden layer h2"]
    ax1, ax2 = fig.axes
    gd_line, hb_line = ax1.lines
    # absolute values, largest first, against ranks 1..n (tensor input is float32: 1e-7 rel)
    np.testing.assert_allclose(gd_line.get_ydata(), [3e-4, 2e-4, 1e-4], rtol=1e-7)
    np.testing.assert_array_equal(hb_line.get_ydata(), [0.5, 0.2, 0.1])
    np.testing.assert_array_equal(gd_line.get_xdata(), [1, 2, 3])
    assert gd_line.get_label().startswith("GD: median 0.0002, max 0.0003")
    assert ax1.get_yscale() == "log" and ax2.get_yscale() == "log"  # spans > 10x
    np.testing.assert_array_equal(ax2.lines[1].get_ydata(), [0.3, 0.05])


def test_plot_unit_drift_single_run_linear_scale_and_zero_floor() -> None:
    fig = plot_unit_drift({"h": [1.0, 2.0, 1.5]})
    assert fig.axes[0].get_yscale() == "linear"
    assert fig.axes[0].lines[0].get_label() == "median 1.5, max 2"
    # exact zeros on a log panel are drawn at the smallest positive value, not dropped
    fig = plot_unit_drift({"h": [0.0, 1e-3, 1.0]})
    assert fig.axes[0].get_yscale() == "log"
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [1.0, 1e-3, 1e-3])


def test_plot_unit_drift_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_unit_drift({})
    # a list was a ValueError that named neither its type nor the value
    with pytest.raises(TypeError, match=r"non-empty dict .*, got list"):
        plot_unit_drift([1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`drift\['h'\]` is empty"):
        plot_unit_drift({"h": []})
    with pytest.raises(TypeError, match=r"`drift\['h'\]` must be"):
        plot_unit_drift({"h": ["a"]})
    with pytest.raises(ValueError, match=r"every run .*`drift\['HB'\]` is empty"):
        plot_unit_drift({"GD": {"h": [1.0]}, "HB": {}})


def test_plot_balance_ignores_ledger_keys() -> None:
    rows, _ = synthetic_ledger(3)
    for row in rows:
        row["balance/sq_norm_diff/W1-W2"] = 0.5 + row["step"]
    fig = plot_balance(rows)
    line = fig.axes[0].lines[0]
    np.testing.assert_array_equal(line.get_ydata(), [0.5, 10.5, 20.5])


def test_plot_balance_views_dispatch_and_reject_unknown_views() -> None:
    rows, _ = synthetic_ledger()
    ledger_view = plot_balance(rows, view="ledger", title="t")
    assert [ax.get_title() for ax in ledger_view.axes] == list(PAIRS)
    assert ledger_view.get_suptitle() == "t"
    units = plot_balance({"GD": {"h1": [1e-3, -4e-3]}, "HB": {"h1": [0.5, 0.25]}}, view="units")
    np.testing.assert_array_equal(units.axes[0].lines[1].get_ydata(), [0.5, 0.25])
    with pytest.raises(ValueError, match="`view` must be 'balance', 'ledger' or 'units', got 'x'"):
        plot_balance(rows, view="x")


def test_plot_views_refuse_sources_that_cannot_hold_what_they_draw(tmp_path: Path) -> None:
    """Each wrong source is refused with an error naming it, never drawn as something else."""
    rows, _ = synthetic_ledger()
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,balance/drift\n0,0.0\n")
    # histories and metrics.csv hold only per-layer summaries of the per-unit drift
    cases = [(rows, r"`source`"), (str(csv_path), r"`source`"), ({"r": rows}, r"`source\['r'\]`")]
    for source, where in cases:
        with pytest.raises(TypeError, match=f"{where} is a history or a metrics.csv path"):
            plot_balance(source, view="units")
    # monitor.unit_ledger ({layer: {term: values}}) is not the drift: refused, not misdrawn
    unit_ledger = {"h1": {"momentum": torch.ones(3), "symmetry": torch.zeros(3)}}
    for source in (unit_ledger, {"GD": unit_ledger}):
        with pytest.raises(ValueError, match="per-unit ledger terms"):
            plot_balance(source, view="units")
    # the balance view draws one run; the ledger view takes labels with "/" as run labels
    with pytest.raises(TypeError, match="the balance view draws one run"):
        plot_balance({"GD": rows})
    fig = plot_balance({"lr=0.1/m=0.9": rows}, view="ledger")
    assert fig.axes[0].get_title() == "lr=0.1/m=0.9: W1-W2"
    # a single history row is not a dict of runs
    with pytest.raises(TypeError, match="single history row"):
        plot_ledger(rows[0])
