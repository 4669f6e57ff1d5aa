"""Smoke tests of the examples and benchmarks: each runs in a subprocess (as a user runs it) with
``--quick`` (examples: ``--out`` in a temporary folder) and the assertions read what it wrote
or printed. No timing is asserted (absolute times mean nothing on a shared machine). The
balanced initialisation of examples/layer_balance.py is also checked in-process.
"""

from __future__ import annotations

import csv
import importlib
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.processes import ROOT, run_python

EXAMPLES = ROOT / "examples"
BENCHMARKS = [
    "optim_step.py",
    "callback_overhead.py",
    "clarke.py",
    "symmetry_discovery.py",
    "figures.py",
    "ledger_floor.py",
]
TERMS = ("momentum", "weight_decay", "symmetry", "discretisation", "other")
PUBLISHED = ("layer_balance*.png", "ledger*.png", "unit_drift*.png")


def run_example(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<script> --quick --out <out>`` from the repository root."""
    proc = run_python(
        [str(EXAMPLES / script), "--quick", "--out", str(out), *extra],
        timeout=600,  # a hang guard, not a timing assertion
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def docs_state(*patterns: str) -> dict[Path, int]:
    """Modification times of the files under docs/ matching ``patterns``: --quick never writes
    the published figures."""
    return {p: p.stat().st_mtime_ns for g in patterns for p in (ROOT / "docs").glob(g)}


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# examples/getting_started.py: the program the guide's first page shows
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # example subprocess (one short Lightning fit)
def test_getting_started(tmp_path: Path) -> None:
    proc = run_python(
        [str(EXAMPLES / "getting_started.py"), str(tmp_path)],
        env={"MPLBACKEND": "Agg"},
        timeout=600,  # a hang guard, not a timing assertion
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "getting_started" / "version_0"
    for name in ("balance.png", "ledger.png", "balance_from_csv.png"):
        assert is_png(run / name), name
    rows = read_csv(run / "metrics.csv")
    pairs = ("net.0-net.2", "net.2-net.4")
    last = [r for r in rows if r.get(f"ledger/closure/{pairs[0]}")][-1]
    assert int(last["step"]) == 159  # 20 epochs of 8 batches: the last optimiser step is logged
    for pair in pairs:
        terms = {t: float(last[f"ledger/{t}/{pair}"]) for t in (*TERMS, "closure")}
        drift = sum(terms.values())
        # what the page says to look at: the drift is momentum, a small discretisation term,
        # and float32 round-off (squared norms ~20-30, whose ulp is ~2e-6; 1e-4 is 50 ulps)
        assert terms["momentum"] > 10 * abs(terms["discretisation"]) > 0, terms
        assert abs(terms["closure"]) < 1e-4, terms
        assert abs(terms["symmetry"]) < 1e-4 and terms["weight_decay"] == 0.0, terms
        assert drift == pytest.approx(terms["momentum"] + terms["discretisation"], rel=0.05)
    # the printed ledger is the logged one
    assert f"{pairs[0]} {{'momentum': " in proc.stdout, proc.stdout[-2000:]


# ------------------------------------------------------------------------------------------------
# examples/quadratic.py and examples/compare_sgd.py
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # example subprocess
def test_quadratic_quick(tmp_path: Path) -> None:
    before = docs_state("quadratic.png")
    proc = run_example("quadratic.py", tmp_path, "--steps", "300")
    assert docs_state("quadratic.png") == before, "--quick must not touch docs/"
    assert (tmp_path / "quadratic.png").stat().st_size > 10_000
    rows = read_csv(tmp_path / "summary.csv")
    assert rows and all(r["holds"] == "True" for r in rows), proc.stdout

    rates = {(r["problem"], r["method"]): r for r in rows if r["check"].startswith("rate")}
    for kappa in ("100", "1000"):
        for method in ("GD", "heavy ball", "Nesterov"):
            row = rates[(f"quadratic κ={kappa}", method)]
            # the printed theory is the classical rate formula for this κ
            k, theory = float(kappa), float(row["theory"])
            expected = {
                "GD": 1 - 1 / k,
                "heavy ball": (k**0.5 - 1) / (k**0.5 + 1),
                "Nesterov": 1 - 1 / k**0.5,
            }[method]
            assert theory == pytest.approx(expected, rel=1e-6)  # A's eigvalsh vs exact 1 and κ
            # every trajectory matches the independent velocity-form loop (float64)
            assert float(row["ref_diff"]) < 1e-9
    # the stationarity bound was checked on the nonconvex problem, at T = 10, 100 and 300
    stationarity = [r for r in rows if r["check"].startswith("min_(t<")]
    assert len(stationarity) == 3
    assert all(float(r["measured"]) <= float(r["theory"]) for r in stationarity)


@pytest.mark.slow  # example subprocess (four Lightning runs)
def test_compare_sgd_quick(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    before = docs_state("compare_sgd.png")
    proc = run_example("compare_sgd.py", tmp_path)
    assert docs_state("compare_sgd.png") == before, "--quick must not touch docs/"
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000

    diffs = read_csv(tmp_path / "differences.csv")
    assert {(d["pair"], d["compared"]) for d in diffs} == {
        ("PolyakSGD vs SGD(momentum)", "parameters"),
        ("NesterovSGD vs SGD(nesterov)", "parameters (= y_t)"),
        ("NesterovSGD vs SGD(nesterov)", "iterates x_t"),
    }
    for d in diffs:
        assert int(d["steps"]) == 46  # 2 epochs x 23 batches of 64 out of 1437
        # float32 rounding only: eps = 1.2e-7 per operation, growing over 46 steps to a few 1e-7
        # (measured ~3e-7); a wrong update rule differs at ~lr * |grad| ~ 1e-2 after one step.
        assert float(d["max_rel_diff"]) < 1e-5, proc.stdout

    runs = {r["run"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert set(runs) == {"SGD(momentum)", "PolyakSGD", "SGD(nesterov)", "NesterovSGD"}
    for ours, builtin in (("PolyakSGD", "SGD(momentum)"), ("NesterovSGD", "SGD(nesterov)")):
        # same trajectory and same evaluation point: same validation numbers (loss to float32
        # rounding; accuracy may flip at most one of the 360 validation images on a near-tie)
        a, b = runs[ours], runs[builtin]
        assert float(a["val_loss_x"]) == pytest.approx(float(b["val_loss_x"]), rel=1e-4)
        assert abs(float(a["val_acc_x"]) - float(b["val_acc_x"])) <= 1 / 360 + 1e-9
        assert float(a["val_acc_x"]) > 0.5  # it trains: chance is 0.1
    # the Nesterov runs also report the look-ahead point, the others do not have one
    assert runs["NesterovSGD"]["val_acc_y"] != "nan"
    assert runs["PolyakSGD"]["val_acc_y"] == "nan"

    for name in ("SGD_momentum", "PolyakSGD", "SGD_nesterov", "NesterovSGD"):
        metrics = read_csv(tmp_path / "logs" / name / "metrics.csv")
        assert any(m.get("train_loss") for m in metrics)
        assert any(m.get("val_acc") for m in metrics)


# ------------------------------------------------------------------------------------------------
# examples/layer_balance.py (the main job) and examples/layer_balance_cnn.py
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    """examples/layer_balance.py imported as a module. It imports its sibling helpers
    (``_common``), so examples/ is on ``sys.path`` while the module loads, restored after."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES))
        yield importlib.import_module("layer_balance")


@pytest.mark.parametrize("dim", [100, 1000])
def test_balanced_initialisation_is_balanced_at_every_input_dimension(example, dim) -> None:
    # Regression: --quick (dim 100) used to draw W1 with the variance meant for dim 1000, so its
    # "balanced" run started at ‖W1‖² = 0.010 against ‖W2‖² = ‖W3‖² = 0.10.
    model = example.ReLUNet((dim, 100, 100, 10), balanced=True, make_optimizer=None)
    sq = [getattr(model, n).weight.detach().pow(2).sum().item() for n in ("W1", "W2", "W3")]
    # each ‖W_h‖² is a sum of >= 1000 squared Gaussians of mean 0.1/numel: within 15 % of 0.1
    # (4.5 standard deviations for the smallest layer, 1000 entries)
    assert all(abs(s - 0.1) < 0.015 for s in sq), sq
    unbalanced = example.ReLUNet((dim, 100, 100, 10), balanced=False, make_optimizer=None)
    assert unbalanced.W1.weight.pow(2).sum().item() > 5 * sq[0]


@pytest.mark.slow  # example subprocess
def test_layer_balance_help_lists_the_optimizer_names(example) -> None:
    proc = run_python([str(EXAMPLES / "layer_balance.py"), "--help"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())  # argparse wraps the help text
    for name in example.OPTIMIZERS:
        assert f"{name} ({example.LABELS[name]})" in text, text


@pytest.mark.slow
def test_layer_balance_quick(tmp_path: Path) -> None:
    before = docs_state(*PUBLISHED)
    result = run_example("layer_balance.py", tmp_path, "--no-progress")
    rows = read_csv(tmp_path / "summary.csv")
    assert {(r["init"], r["optimizer"]) for r in rows} == {
        (init, opt)
        for init in ("balanced", "unbalanced")
        for opt in (
            "gradient descent",
            "PolyakSGD(0.9)",
            "NesterovSGD(0.9)",
            "torch.optim.SGD(0.9)",
        )
    }
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("loss_0", "loss_final", "drift_final"))
        assert float(r["loss_final"]) <= float(r["loss_0"])
        norms = [float(r[f"sq_{n}"]) for n in ("W1", "W2", "W3")]
        assert min(norms) > 0
        if r["init"] == "balanced":  # the label is honest: D(0) ≈ 0 for both pairs
            assert all(abs(float(d)) < 0.02 for d in r["diff_0"].split("/")), r["diff_0"]
        for pair in ("W1-W2", "W2-W3"):
            terms = [float(r[f"{t}_{pair}"]) for t in TERMS]
            drift, closure = float(r[f"drift_{pair}"]), float(r[f"closure_{pair}"])
            # the ledger closes: float32 weights, so round-off relative to the squared norms
            # (~0.1-1 here); 1e-5 allows ~100 float32 ulps accumulated over 30 steps
            assert abs(closure) <= 1e-5 * max(norms), (pair, r)
            assert drift == pytest.approx(sum(terms) + closure, rel=1e-9, abs=1e-12)
            if r["optimizer"] == "gradient descent":  # no momentum, no weight decay
                assert float(r[f"momentum_{pair}"]) == 0.0
            assert float(r[f"weight_decay_{pair}"]) == 0.0
            assert float(r[f"drift_ratio_to_gd_{pair}"]) > 0
        for layer in ("W1", "W2"):
            assert (
                0 <= float(r[f"unit_drift_median_{layer}"]) <= float(r[f"unit_drift_max_{layer}"])
            )
    # PolyakSGD and the built-in run the same float32 arithmetic: the printed difference is
    # rounding at most (relative 1e-5 allows ~100 float32 ulps over 30 steps).
    diffs = re.findall(r"max parameter difference \S+ \(relative (\S+);", result.stdout)
    assert len(diffs) == 2 and all(float(d) < 1e-5 for d in diffs)
    assert "heuristic (1+μ)/(1−μ) = 19" in result.stdout
    # bias variant: the symmetry term is the wrongly counted output bias, and 0 when grouped right
    default, grouped = read_csv(tmp_path / "bias_variant.csv")
    assert (default["grouping"], grouped["grouping"]) == ("default layers", "dict grouping")
    b2 = float(default["b2_sq_norm_change"])
    assert b2 > 0.1  # the output bias moved (targets shifted by +1)
    # first order of −Δ‖b2‖²; the rest is the bias's discretisation η²Σ‖g_b2‖² (<= 50 %)
    assert -1.01 * b2 < float(default["symmetry"]) < -0.5 * b2
    assert abs(float(grouped["symmetry"])) < 1e-4 * b2  # homogeneous grouping: round-off only
    for name in ("figure.png", "optimizers.png", "ledger.png", "unit_drift.png"):
        assert is_png(tmp_path / name), name
    # one CSVLogger directory per run (8 runs + 2 bias variants); the script draws the figures
    # itself, the monitor saves none (save_figure=False)
    assert len(list((tmp_path / "logs").glob("*/version_0/metrics.csv"))) == 10
    assert not list((tmp_path / "logs").glob("*/version_0/*.png"))
    assert docs_state(*PUBLISHED) == before  # --quick never touches docs/


@pytest.mark.slow
def test_layer_balance_cnn_quick(tmp_path: Path) -> None:
    before = docs_state(*PUBLISHED)
    run_example("layer_balance_cnn.py", tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert [r["optimizer"] for r in rows] == [
        "gradient descent",
        "PolyakSGD(0.9)",
        "NesterovSGD(0.9)",
    ]
    pairs = sorted({k.split("_", 1)[1] for k in rows[0] if k.startswith("closure_")})
    assert pairs == ["net.conv1-net.conv2", "net.conv2-net.fc"]
    for r in rows:
        assert 0.0 <= float(r["train_accuracy"]) <= 1.0
        for pair in pairs:
            terms = [float(r[f"{t}_{pair}"]) for t in TERMS]
            # bias-free ReLU CNN: the symmetry term is round-off, the ledger closes (float32
            # weights of squared norm ~3-11: 1e-4 absolute is ~100 float32 ulps at 10)
            assert abs(float(r[f"symmetry_{pair}"])) < 1e-5
            assert abs(float(r[f"closure_{pair}"])) < 1e-4
            assert float(r[f"drift_{pair}"]) == pytest.approx(
                sum(terms) + float(r[f"closure_{pair}"]), rel=1e-9, abs=1e-12
            )
        for layer in ("net.conv1", "net.conv2"):  # per-channel units of both hidden convs
            assert float(r[f"unit_drift_max_{layer}"]) >= float(r[f"unit_drift_median_{layer}"])
    for name in ("ledger_cnn.png", "unit_drift_cnn.png"):
        assert is_png(tmp_path / name), name
    assert docs_state(*PUBLISHED) == before


@pytest.mark.slow  # example subprocess
def test_symmetries_example_quick(tmp_path: Path) -> None:
    """The ResNet's charges under four optimisers: each charge's change equals its ledger, the
    translation charge is kept to round-off by gradient descent and heavy ball (no weight
    decay), moved by weight decay and by Adam, and every closure is float64 round-off."""
    before = docs_state("symmetries.png")
    run_example("symmetries.py", tmp_path)
    rows = {(r["optimizer"], r["kind"]): r for r in read_csv(tmp_path / "summary.csv")}
    assert {o for o, _ in rows} == {"gd", "heavy", "heavy_wd", "adam"}
    for (optimizer, kind), r in rows.items():
        change, booked = float(r["max |dQ_u|"]), float(r["its ledger"])
        # the csv holds 3 significant digits; float64 closure ~1e-15 (relative)
        assert booked == pytest.approx(change, rel=2e-3, abs=1e-14), (optimizer, kind)
        assert float(r["closure"]) < 1e-12
    for optimizer in ("gd", "heavy"):
        assert abs(float(rows[(optimizer, "translation")]["max |dQ_u|"])) < 1e-12
    for optimizer in ("heavy_wd", "adam"):
        assert abs(float(rows[(optimizer, "translation")]["max |dQ_u|"])) > 1e-6
    assert is_png(tmp_path / "symmetries.png")
    assert docs_state("symmetries.png") == before


# ------------------------------------------------------------------------------------------------
# examples/clarke.py and examples/stationarity.py
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_clarke_example_quick(tmp_path: Path) -> None:
    proc = run_example("clarke.py", tmp_path)
    assert "Part 1" in proc.stdout and "Part 2" in proc.stdout
    with (tmp_path / "table.csv").open(newline="") as fh:
        rows = {r["check"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 12
    assert all(r["holds"] == "True" for r in rows.values()), rows
    assert all(float(r["error"]) <= float(r["tolerance"]) for r in rows.values())

    def vec(text: str) -> list[float]:
        return [float(v) for v in text.split()]

    # Kakade & Lee's example: autograd says 0, the derivative of relu(x) - relu(-x) = x is 1.
    row = rows["relu(x) - relu(-x) at 0"]
    assert vec(row["autograd at x"]) == [0.0] and vec(row["clarke min_norm"]) == [1.0]
    # The table's numbers are the hand-computed answers (printed to 6 decimals).
    expected = {
        "|x| at 0": [0.0],
        "relu(x) at 0 (hull [0, 1])": [0.0],
        "max(x1, x2) at (1, 1)": [0.5, 0.5],
        "||x||_2 at 0 in R^5": [0.0] * 5,
        "|x1| - |x2| at 0": [0.0, 0.0],
        "max(x1 + x2, -x1 + x2) at 0": [0.0, 1.0],
        "||x||_inf at (1, -1, 0.5)": [0.5, -0.5, 0.0],
        "lasso 1/2||Aw-b||^2 + ||w||_1 at 0": [3.75, -3.25],
        "|x| at 1e-6, radius 2e-6 (Goldstein set; Clarke: 1)": [0.0],
    }
    for check, value in expected.items():
        assert vec(rows[check]["exact"]) == value, check
        assert vec(rows[check]["clarke min_norm"]) == value, check
    # Autograd at the lasso's kink takes sign(0) = 0: -A^T b = (4.75, -4.25), not a minimum-norm
    # subgradient.
    assert vec(rows["lasso 1/2||Aw-b||^2 + ||w||_1 at 0"]["autograd at x"]) == [4.75, -4.25]
    # Homogeneity lemma, L = 3: <min_norm, θ> = 3 F(θ) up to the O(radius) tolerance, plus 1e-6
    # for printing both to 6 decimals. Plain autograd satisfies it too (relu(z) = relu'(z) z).
    lemma = rows["<g, θ> = L F(θ) at the kink"]
    slack = 1e-6 + float(lemma["tolerance"])
    assert abs(float(lemma["clarke min_norm"]) - float(lemma["exact"])) <= slack
    assert abs(float(lemma["autograd at x"]) - float(lemma["exact"])) <= slack
    euler = rows["Euler <s_i, θ_i> = L F(θ_i) at all samples (relative)"]
    assert float(euler["error"]) <= 1e-13  # float64 rounding of sums of ~100 products


@pytest.mark.slow
def test_stationarity_example_quick(tmp_path: Path) -> None:
    run_example("stationarity.py", tmp_path)
    assert (tmp_path / "stationarity.png").is_file()
    with (tmp_path / "profiles.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 3 optimisers x 2 checkpoints x 2 radii in the quick run
    assert len(rows) == 12
    assert {r["optimizer"] for r in rows} == {"GD", "PolyakSGD", "NesterovSGD"}
    for r in rows:
        eps, grad = float(r["eps_hat"]), float(r["grad_norm"])
        assert 0 <= eps and grad > 0
        if float(r["delta"]) == 1e-3:
            # at a small radius the loss is smooth at the scale of the ball: the hull's min-norm
            # is within Lip(grad f) * delta of ||grad f|| (a few percent here)
            assert abs(eps - grad) <= 0.05 * grad
    # all three optimisers start at the same point with the same certificate
    start = [r for r in rows if r["step"] == "0" and float(r["delta"]) == 1e-3]
    assert len({r["grad_norm"] for r in start}) == 1 and len({r["eps_hat"] for r in start}) == 1


# ------------------------------------------------------------------------------------------------
# benchmarks/ --quick: none can rot
# ------------------------------------------------------------------------------------------------


def test_every_benchmark_is_smoke_tested() -> None:
    found = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert found == sorted(BENCHMARKS)


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_quick(script: str, tmp_path: Path) -> None:
    proc = run_python(
        [str(ROOT / "benchmarks" / script), "--quick"],
        cwd=tmp_path,  # whatever a benchmark writes lands here, not in the tree
        env={"MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"},
        timeout=180,  # a hang guard, not a timing assertion
    )
    assert proc.returncode == 0, (
        f"{script} --quick exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    )
    # a results table: several lines, at least one with a ratio against the built-in reference
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) >= 3, proc.stdout
    assert any(ch.isdigit() for line in lines for ch in line), proc.stdout
