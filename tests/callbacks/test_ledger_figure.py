"""plot_ledger draws a readable figure: the note never covers a curve, terms near zero stay
visible beside one another, every ledger term (``rounding`` included) has a style, one legend.

Regression tests of the published ledger.png: its "max |closure|" note sat on the zero lines, and
the round-off "symmetry" line was hidden under the "other" line drawn after it.
"""

from __future__ import annotations

import numpy as np
import pytest

from torch_momentum.callbacks import LEDGER_TERMS, plot_ledger


def history(steps: int = 40, rounding: bool = False) -> list[dict[str, float]]:
    """A heavy-ball-like ledger: a large momentum term, a small discretisation term, and two
    terms at round-off level (symmetry ~1e-8, other ~1e-16) that start, like all, at 0."""
    rows = []
    for t in range(steps):
        terms = {
            "momentum": 0.1 * t,
            "weight_decay": 0.0,
            "symmetry": 1e-8 * np.sin(t),
            "discretisation": -0.002 * t,
            "other": 1e-16 * t,
            "rounding": 1e-3 * t if rounding else 0.0,
        }
        row = {"step": t, **{f"ledger/{k}/a-b": v for k, v in terms.items()}}
        row["ledger/closure/a-b"] = 1e-12
        rows.append(row)
    return rows


def _draw(fig):
    fig.canvas.draw()  # an Agg canvas: lays out the figure (constrained layout) and the texts
    return fig.canvas.get_renderer()


def test_the_note_covers_no_curve() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot_ledger({"heavy ball": history()})
    FigureCanvasAgg(fig)
    renderer = _draw(fig)
    (ax,) = fig.axes
    (note,) = [t for t in ax.texts if "max |closure|" in t.get_text()]
    box = note.get_window_extent(renderer)
    for line in ax.lines:
        points = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
        inside = (
            (points[:, 0] >= box.x0)
            & (points[:, 0] <= box.x1)
            & (points[:, 1] >= box.y0)
            & (points[:, 1] <= box.y1)
        )
        assert not inside.any(), f"the note covers {line.get_label()!r}"


def test_terms_near_zero_are_dashed_on_top_and_named_with_their_size() -> None:
    fig = plot_ledger(history())
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    small = [lines["symmetry"], lines["other"]]
    # both drawn, above the large terms, each with its own dash pattern (solid would hide one)
    assert all(line.get_zorder() > lines["momentum"].get_zorder() for line in small)
    assert all(line.get_linestyle() != "-" for line in small)
    # matplotlib has no public getter of a line's dash sequence (get_linestyle() says "--" for
    # every one): its private (offset, pattern) is read to tell the two patterns apart
    dashes = [line._dash_pattern for line in small]
    assert dashes[0] != dashes[1], dashes
    (note,) = [t.get_text() for t in ax.texts if "max |closure|" in t.get_text()]
    assert "≈ 0: symmetry (≤ 1e-08), other (≤ 4e-15)" in note, note
    assert "= 0: weight_decay, rounding" in note, note


def test_every_ledger_term_has_a_style_and_one_legend_names_them() -> None:
    fig = plot_ledger({"bf16": history(rounding=True), "fp32": history()})
    drawn = {line.get_label() for ax in fig.axes for line in ax.lines}
    assert "rounding" in drawn  # a bf16 run's rounding term is drawn (it raised KeyError before)
    assert set(LEDGER_TERMS) - {"weight_decay"} <= drawn
    assert not any(ax.get_legend() for ax in fig.axes)  # no legend over any panel's curves
    (legend,) = fig.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == [t for t in LEDGER_TERMS if t != "weight_decay"] + ["D(t) − D(0)"]


@pytest.mark.parametrize("steps", [1, 3])
def test_short_histories_still_draw(steps: int) -> None:
    fig = plot_ledger(history(steps))
    assert fig.axes[0].texts


def test_a_summed_ledger_is_refused_with_a_pointer_to_the_network_figure() -> None:
    """The monitor without layers= logs ledger/{term} (summed over the model's symmetries, no
    pair): ledger_series raised IndexError on such a history."""
    from torch_momentum.callbacks import ledger_series

    rows = [{"step": 0, "ledger/momentum": 0.0, "ledger/closure": 0.0}]
    for draw in (ledger_series, plot_ledger):
        with pytest.raises(ValueError, match="plot_network_ledger"):
            draw(rows)


def test_the_network_ledger_draws_its_panels_as_the_pair_ledger() -> None:
    """plot_network_ledger had its own copy of the panel: its terms took matplotlib's colour
    cycle (momentum blue there, red in plot_ledger), terms near 0 were drawn under the others
    and named as "zero". One panel function now draws both figures."""
    from matplotlib.colors import to_hex

    from torch_momentum.callbacks import plot_network_ledger

    rows = history()
    terms = [{k: r[f"ledger/{k}/a-b"] for k in LEDGER_TERMS} for r in rows]
    details = [
        {
            "step": r["step"],
            "groups": {},
            "charges": {},
            "kinds": {},
            "ledger": {"q/k": {"change": sum(t.values()) + 1e-12, **t}},
        }
        for r, t in zip(rows, terms, strict=True)
    ]
    summary = [
        {"step": r["step"], **{f"ledger/{k}": v for k, v in t.items()}}
        for r, t in zip(rows, terms, strict=True)
    ]
    pair_ax = plot_ledger(rows).axes[0]
    summary_ax, charge_ax = plot_network_ledger((summary, details), top_k=1).axes[:2]

    def colours(ax) -> dict[str, str]:
        return {line.get_label(): to_hex(line.get_color()) for line in ax.lines}

    expected = {t: c for t, c in colours(pair_ax).items() if t in LEDGER_TERMS}
    assert set(expected) == set(LEDGER_TERMS) - {"weight_decay", "rounding"}
    for ax in (summary_ax, charge_ax):
        assert {t: c for t, c in colours(ax).items() if t in LEDGER_TERMS} == expected
        (note,) = [t.get_text() for t in ax.texts]
        assert "≈ 0: symmetry (≤ 1e-08), other (≤ 4e-15)" in note, note
        assert "= 0: weight_decay, rounding" in note, note
        lines = {line.get_label(): line for line in ax.lines}
        assert lines["other"].get_zorder() > lines["momentum"].get_zorder()
    # the charge's change is drawn as the pair's D(t) - D(0): dashed black, on top
    change = charge_ax.lines[len(expected)]
    assert to_hex(change.get_color()) == "#000000" and change.get_linestyle() == "--"


def test_long_symmetry_names_stay_inside_the_network_ledger_figure() -> None:
    """A Llama block's norm/q+k+v rescale is named with 77 characters: as a panel title at the
    right edge of the grid it ran past the figure. Titles are cut in the middle to fit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from torch_momentum.callbacks import plot_network_ledger

    name = "model.layers.{} input_layernorm/self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"
    terms = {t: 0.0 for t in LEDGER_TERMS}
    details = [
        {
            "step": step,
            "groups": {},
            "charges": {},
            "kinds": {},
            "ledger": {name.format(i): {**terms, "change": step * (i + 1.0)} for i in range(5)},
        }
        for step in range(3)
    ]
    summary = [{"step": step, **{f"ledger/{t}": 0.0 for t in LEDGER_TERMS}} for step in range(3)]
    fig = plot_network_ledger((summary, details), top_k=5)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    titles = [ax.title for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(titles) == 6
    for title in titles:
        box = title.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (title.get_text(), box)
    assert any("…" in t.get_text() for t in titles)
