"""Packaging contract: the core imports torch only; public names resolve; metadata is consistent."""

from __future__ import annotations

import importlib
import re
import subprocess

import pytest
import torch
import yaml

import torch_momentum
from tests.helpers.processes import ROOT, run_python

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


# The modules of the core package: each must import with torch alone.
CORE_MODULES = (
    "torch_momentum",
    "torch_momentum.optim",
    "torch_momentum.functional",
    "torch_momentum.balance",
    "torch_momentum.clarke",
    "torch_momentum.minnorm",
    "torch_momentum.stationarity",
)


@pytest.mark.slow  # a fresh interpreter importing torch: ~3-5 s
def test_core_does_not_import_lightning_or_plotting():
    """``import torch_momentum`` and every core module (``torch_momentum.balance`` included,
    which the package does not import itself) load none of Lightning, torchmetrics, matplotlib."""
    code = (
        f"import sys; import {', '.join(CORE_MODULES)}\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'torchmetrics', 'matplotlib')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = run_python(["-c", code], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ""


def test_public_names_resolve():
    import torch_momentum.callbacks as callbacks

    for package in (torch_momentum, callbacks):
        assert package.__all__ == sorted(set(package.__all__), key=package.__all__.index)
        missing = [name for name in package.__all__ if not hasattr(package, name)]
        assert not missing, f"{package.__name__}.__all__ names that do not exist: {missing}"
    # the optimisers and the callbacks are the classes users subclass and pass around
    assert issubclass(torch_momentum.PolyakSGD, torch.optim.Optimizer)
    assert issubclass(torch_momentum.NesterovSGD, torch.optim.Optimizer)
    from lightning.pytorch.callbacks import Callback

    assert issubclass(callbacks.LayerBalanceMonitor, Callback)
    assert issubclass(callbacks.OptimizerModeSwitch, Callback)


# Every name of every public module's ``__all__`` (main at ae6b782, after the restructure of issue
# 17), by the module path users import it from. A name that leaves one of these lists must leave
# on purpose (with a CHANGELOG entry), deleted from here in the same change.
PUBLIC_NAMES: dict[str, list[str]] = {
    "torch_momentum": [
        "ClarkeSubgradient",
        "NesterovSGD",
        "PolyakSGD",
        "StationarityProfile",
        "clarke_subgradient",
        "stationarity_profile",
        "to_sgd_state_dict",
    ],
    "torch_momentum.optim": ["NesterovSGD", "PolyakSGD", "to_sgd_state_dict"],
    "torch_momentum.functional": ["lookahead_shift", "momentum_sgd"],
    "torch_momentum.balance": [
        "LEDGER_TERMS",
        "ROOT_LAYER_NAME",
        "BalanceLedger",
        "Symmetry",
        "SymmetryList",
        "SymmetryPart",
        "UnitLayer",
        "adjacent_pairs",
        "balance_metrics",
        "check_layers_spec",
        "discover_layers",
        "find_symmetries",
        "layer_grad_sq_norms",
        "layer_sq_norms",
        "layer_sq_norms_host",
        "layer_sq_norms_many",
        "pair_units",
        "unit_balance",
        "unit_symmetry",
    ],
    "torch_momentum.clarke": ["ClarkeSubgradient", "clarke_subgradient", "min_norm_element"],
    "torch_momentum.stationarity": ["StationarityProfile", "stationarity_profile"],
    "torch_momentum.minnorm": ["min_norm_element"],
    "torch_momentum.callbacks": [
        "LEDGER_TERMS",
        "LayerBalanceMonitor",
        "OptimizerModeSwitch",
        "StationarityMonitor",
        "adjacent_pairs",
        "balance_metrics",
        "check_layers_spec",
        "discover_layers",
        "has_train_eval",
        "layer_grad_sq_norms",
        "layer_sq_norms",
        "layer_sq_norms_host",
        "layer_sq_norms_many",
        "ledger_series",
        "load_history",
        "plot_balance",
        "plot_ledger",
        "plot_unit_drift",
        "series",
        "training_step_loss",
    ],
    "torch_momentum.callbacks.monitor": ["LayerBalanceMonitor"],
    "torch_momentum.callbacks.plotting": [
        "LEDGER_TERMS",
        "ledger_series",
        "load_history",
        "plot_balance",
        "plot_ledger",
        "plot_unit_drift",
        "series",
    ],
    "torch_momentum.callbacks.mode_switch": ["OptimizerModeSwitch", "has_train_eval"],
    "torch_momentum.callbacks.stationarity": [
        "StationarityMonitor",
        "certificate_sizes",
        "training_step_loss",
    ],
}


@pytest.mark.parametrize("module", list(PUBLIC_NAMES))
def test_public_import_paths(module: str) -> None:
    """``from <module> import <name>`` works for every public name, and the module still lists
    them in ``__all__`` (a restructure that drops or moves a name fails here, never silently)."""
    imported = importlib.import_module(module)
    names = PUBLIC_NAMES[module]
    missing = [n for n in names if not hasattr(imported, n)]
    assert not missing, f"cannot import {missing} from {module}"
    unlisted = [name for name in names if name not in imported.__all__]
    assert not unlisted, f"{module}.__all__ no longer lists {unlisted}"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_is_in_the_distribution():
    """The wheel's package list names every source directory with an ``__init__.py`` (a package
    left out installs as a wheel whose imports fail, while the editable tree still works)."""
    setuptools = _pyproject()["tool"]["setuptools"]
    where = {
        name: ROOT / setuptools["package-dir"].get(name, name.replace(".", "/"))
        for name in setuptools["packages"]
    }
    found = {
        "torch_momentum." + ".".join(init.parent.relative_to(ROOT / "torch_momentum").parts)
        for init in (ROOT / "torch_momentum").rglob("__init__.py")
        if init.parent != ROOT / "torch_momentum"
    } | {"torch_momentum"}
    found |= {
        "torch_momentum.callbacks"
        + "".join("." + part for part in init.parent.relative_to(ROOT / "callbacks").parts)
        for init in (ROOT / "callbacks").rglob("__init__.py")
    }
    assert set(where) == found
    assert all((path / "__init__.py").is_file() for path in where.values())


def test_version_and_license_are_declared_once():
    project = _pyproject()["project"]
    # the version lives in torch_momentum/__init__.py only
    assert "version" not in project and project["dynamic"] == ["version"]
    attr = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "torch_momentum.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", torch_momentum.__version__)
    assert "version" not in yaml.safe_load((ROOT / "CITATION.cff").read_text())
    # SPDX license expression (PEP 639), the same licence in LICENSE and CITATION.cff
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert "torch-momentum contributors" in (ROOT / "LICENSE").read_text()
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["license"] == "BSD-3-Clause"


def _readme_references() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## References\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## References' section"
    return match.group(1)


def test_citation_references_match_readme():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert citation["authors"] == [{"name": "torch-momentum contributors"}]
    section = _readme_references()
    # one entry per "- " item, its continuation lines joined
    entries = [" ".join(item.split()) for item in re.split(r"^- ", section, flags=re.M)[1:]]
    refs = citation["references"]
    assert len(entries) == len(refs)
    for ref in refs:
        family = ref["authors"][0]["family-names"]
        hits = [e for e in entries if ref["title"] in e]
        assert len(hits) == 1, f"README references: no single entry titled {ref['title']!r}"
        assert family in hits[0] and f"({ref['year']})" in hits[0], hits[0]
    # the papers the methods come from, by first author and year
    cited = {(r["authors"][0]["family-names"], r["year"]) for r in refs}
    assert {
        ("Polyak", 1964),
        ("Nesterov", 1983),
        ("Du", 2018),
        ("Burke", 2005),
        ("Clarke", 1983),
        ("Goldstein", 1977),
        ("Zhang", 2020),
        ("Ghosh", 2023),
        ("Marcotte", 2024),
    } <= cited


def test_changelog_follows_keep_a_changelog():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "## [Unreleased]" in text
    headings = re.findall(r"^### (\w+)$", text, re.MULTILINE)
    assert headings and set(headings) <= {
        "Added",
        "Changed",
        "Deprecated",
        "Removed",
        "Fixed",
        "Security",
    }


def test_no_reference_to_files_outside_the_repository():
    # written in pieces so that this file does not match itself
    needles = ["DESIGN" + ".md", "../" + "shared", "beyond-" + "the-lecture", "lecture-" + "notes"]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    hits = []
    for name in listed.stdout.splitlines():
        path = ROOT / name
        if path.suffix in {".png", ".jpg", ".pdf"} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(n.lower() in line.lower() for n in needles):
                hits.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
