"""Every Python snippet of the README and of the guide's pages runs, and prints what it says.

The ```` ```python ```` blocks of README.md and the ``.. code-block:: python`` blocks of
``docs/*.rst`` are extracted and each is executed as one test, in a fresh namespace, in a
temporary working directory (what a snippet writes, e.g. ``runs/``, lands there). The README's
snippets may use two names a reader supplies, ``model`` (a small ``LightningModule`` classifier
20 -> 32 -> 32 -> 3 with a ``forward``, float32) and ``loader`` (its training ``DataLoader``);
the guide's snippets are complete programs.

A snippet's stated output is checked: a top-level ``print(...)`` followed on the same line, or
on the next line alone, by a comment that looks like a value (``True``, ``tensor(...)``, a tuple
or a number) must print exactly that.

Warnings: every warning a snippet raises must be one of :data:`EXPECTED_WARNINGS` (Lightning's
advice about data-loader workers and logging intervals on tiny data sets), so that a new warning
in a documented use fails here as it would anywhere in the suite.
"""

from __future__ import annotations

import re
import sys
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.processes import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200

#: (category, message regex, why it is expected in a snippet)
EXPECTED_WARNINGS: list[tuple[type[Warning], str, str]] = [
    # Lightning's advice for in-memory tensors on a CPU: the snippets keep loaders minimal
    (UserWarning, r"does not have many workers", "single-process loading of a few tensors"),
    (UserWarning, r"smaller than the logging interval", "tiny data sets, short fits"),
    # torch 2.13 deprecates a pytree check that Lightning's data loading uses (pyproject.toml
    # ignores it suite-wide for the same reason: Lightning's code, not ours)
    (FutureWarning, r"isinstance\(treespec, LeafSpec\)` is deprecated", "Lightning's code"),
    # the monitor's default mode names, once, the weight matrices no balance law covers: the
    # ResNet page shows and explains it
    (RuntimeWarning, r"the layer-balance law .* does not apply to", "documented on the page"),
]

_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. code-block:: python[ \t]*\n", re.MULTILINE)
_VALUE = re.compile(r"^(True|False|None|tensor\(.*\)|\(.*\)|\[.*\]|[-+]?\d[\w.+-]*)$")


@dataclass(frozen=True)
class Snippet:
    source: Path
    line: int  # 1-based line of the snippet's first code line in its source
    code: str

    @property
    def id(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.line}"

    @property
    def fits(self) -> bool:
        """Whether it trains with Lightning (slow: Trainer start-up, discovery, figures)."""
        return "Trainer(" in self.code and ".fit(" in self.code


def readme_snippets() -> list[Snippet]:
    text = README.read_text()
    return [
        Snippet(README, text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for m in _FENCE.finditer(text)
    ]


def _rst_block(text: str, start: int, indent: str) -> tuple[int, str]:
    """The body of the directive whose options end at ``start``: the following lines indented
    deeper than the directive (blank lines included), dedented."""
    lines = text[start:].split("\n")
    body: list[str] = []
    first: int | None = None
    for k, line in enumerate(lines):
        if line.strip() and not line.startswith(indent + " "):
            break
        if line.strip() and first is None:
            first = k
        body.append(line)
    assert first is not None, "an empty code-block"
    offset = text.count("\n", 0, start) + 1 + first
    return offset, textwrap.dedent("\n".join(body[first:])).strip("\n") + "\n"


def guide_snippets() -> list[Snippet]:
    out = []
    for page in sorted(DOCS.glob("*.rst")):
        text = page.read_text()
        for m in _DIRECTIVE.finditer(text):
            line, code = _rst_block(text, m.end(), m.group("indent"))
            out.append(Snippet(page, line, code))
    return out


SNIPPETS = readme_snippets() + guide_snippets()


def _params() -> Iterator[Any]:
    for snippet in SNIPPETS:
        marks = [pytest.mark.slow] if snippet.fits else []
        yield pytest.param(snippet, id=snippet.id, marks=marks)


def expected_prints(code: str) -> dict[int, str]:
    """``{line: text}`` for the top-level print calls whose comment states their output."""
    lines = code.split("\n")
    out = {}
    for k, line in enumerate(lines):
        if not line.startswith("print("):
            continue
        comment = line.split("  # ", 1)[1] if "  # " in line else None
        if comment is None and k + 1 < len(lines) and lines[k + 1].startswith("# "):
            comment = lines[k + 1][2:]
        if comment is not None and _VALUE.match(comment.strip()):
            out[k + 1] = comment.strip()
    return out


def _reader_names() -> dict[str, Any]:
    """The README's ``model`` and ``loader``: what a reader has before pasting a snippet."""
    import lightning.pytorch as L
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from torch_momentum import PolyakSGD

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return PolyakSGD(self.parameters(), lr=0.05, momentum=0.9)

    data = TensorDataset(torch.randn(128, 20), torch.randint(0, 3, (128,)))
    return {"model": Classifier(), "loader": DataLoader(data, batch_size=32)}


@pytest.mark.parametrize("snippet", list(_params()))
def test_snippet_runs(snippet: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__snippet__"}
    if snippet.source == README:
        namespace.update(_reader_names())
    filename = f"<{snippet.id}>"
    printed: dict[int, list[str]] = {}

    def record(*args: Any, **kwargs: Any) -> None:
        frame = sys._getframe(1)
        if frame.f_code.co_filename == filename:
            printed.setdefault(frame.f_lineno, []).append(
                kwargs.get("sep", " ").join(str(a) for a in args)
            )
        print(*args, **kwargs)

    namespace["print"] = record
    code = compile(snippet.code, filename, "exec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(code, namespace)
    unexpected = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not any(
            issubclass(w.category, category) and re.search(pattern, str(w.message))
            for category, pattern, _ in EXPECTED_WARNINGS
        )
    ]
    assert not unexpected, f"{snippet.id} warned:\n" + "\n".join(unexpected)
    for line, expected in expected_prints(snippet.code).items():
        assert printed.get(line) == [expected], (
            f"{snippet.id}: line {line} says it prints {expected!r}, it printed"
            f" {printed.get(line)!r}"
        )


# ------------------------------------------------------------------------------------------------
# the README as a front page
# ------------------------------------------------------------------------------------------------


def test_snippets_are_found() -> None:
    readme = readme_snippets()
    assert len(readme) >= 3, "the README shows swapping, the monitor and a certificate"
    assert any("PolyakSGD(" in s.code for s in readme)
    assert any("LayerBalanceMonitor(" in s.code for s in readme)
    assert any("stationarity_profile(" in s.code for s in readme)
    pages = {s.source.stem for s in guide_snippets()}
    assert {"howto_swap_sgd", "howto_ledger", "howto_certify"} <= pages, pages
    # the parser keeps a block's indented lines and stops at the text after it
    first = next(s for s in guide_snippets() if s.source.stem == "howto_swap_sgd")
    assert first.code.startswith("import torch\n") and "opt = NesterovSGD(" in first.code


def test_expected_prints_are_read_from_comments() -> None:
    code = "x = 1\nprint(x == 1)  # True\nprint(x)\n# tensor(1.)\nprint(x)  # a remark\n"
    assert expected_prints(code) == {2: "True", 3: "tensor(1.)"}


def test_readme_is_a_front_page() -> None:
    text = README.read_text()
    lines = text.count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"
    # no vocabulary of a course the reader never took
    for phrase in ("slide form", "the lecture", "lecture's"):
        assert phrase not in text.lower(), phrase


def test_readme_links_resolve() -> None:
    """Relative links work on a code host and in a clone: they name files of the repository."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") and link.endswith(".rst") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def test_guide_pages_use_no_course_vocabulary() -> None:
    """Neither the guide nor the docstrings it renders, the examples, the tests or the package
    metadata speak of a course the reader never took."""
    sources = [*DOCS.glob("*.rst"), ROOT / "pyproject.toml"]
    for folder in ("torch_momentum", "callbacks", "examples", "benchmarks", "tests"):
        sources += [p for p in (ROOT / folder).rglob("*.py") if p.name != "test_readme.py"]
    for page in sources:
        text = page.read_text().lower()
        for phrase in ("slide form", "the lecture", "lecture's"):
            assert phrase not in text, (str(page.relative_to(ROOT)), phrase)
