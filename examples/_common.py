"""Small helpers shared by the example scripts: common flags, output folders, figure copies."""

from __future__ import annotations

import argparse
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = REPO_ROOT / "docs"


def base_parser(description: str | None, default_out: str) -> argparse.ArgumentParser:
    """A parser with the flags every example has: ``--quick`` and ``--out``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny run for smoke tests; does not touch docs/"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(default_out), help=f"output folder (default {default_out})"
    )
    return parser


def quiet_lightning() -> None:
    """Hide Lightning's per-run banners and its warnings that do not apply to the examples
    (single-process data loading of in-memory tensors)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def prepare_out(out: Path) -> Path:
    """Create the output folder (and parents) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    return out


def publish_figure(src: Path, name: str, quick: bool) -> Path | None:
    """Copy a figure to ``docs/<name>`` for the README, but only for full (non ``--quick``) runs."""
    if quick:
        return None
    DOCS_DIR.mkdir(exist_ok=True)
    dst = DOCS_DIR / name
    shutil.copyfile(src, dst)
    return dst


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns (floats are printed as given)."""
    cells = [[str(h) for h in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
