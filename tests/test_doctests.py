"""Every ``Example:`` block of the installed package runs, and every public name has one.

The modules are found from the installed packages ``torch_momentum`` and
``torch_momentum.callbacks`` (the ``callbacks/`` directory is mapped to the latter by the
package-dir setting, so pytest's ``--doctest-modules`` on the source tree would import it under
the wrong name). Each docstring with ``>>>`` lines is one test, run by :mod:`doctest` in a fresh
namespace after ``torch.manual_seed(0)`` (conftest's autouse fixture).
"""

from __future__ import annotations

import doctest
import inspect
import re

import pytest

import torch_momentum
from tests.helpers.api import package_modules, public_objects

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests: list[doctest.DocTest] = []
    seen: set[tuple[str | None, int | None, str]] = set()
    for module in package_modules():
        for test in finder.find(module, module.__name__):
            key = (test.filename, test.lineno, test.docstring or "")
            if test.examples and key not in seen:  # a re-exported object is found once
                seen.add(key)
                tests.append(test)
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()


def test_modules_are_found() -> None:
    names = {m.__name__ for m in package_modules()}
    # the walk really covers both packages, the callbacks included (under their installed name)
    assert {"torch_momentum.optim", "torch_momentum.callbacks.monitor"} <= names
    assert DOCTESTS, "no docstring with >>> lines found"


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples_run(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    output: list[str] = []
    test.globs = {"__name__": test.name.rsplit(".", 1)[0]}
    result = runner.run(test, out=output.append)
    assert result.failed == 0, (
        "".join(output) + "\n(examples run in a fresh namespace, as for a user who copies them:"
        " each imports what it uses)"
    )


_EXAMPLE = re.compile(r"^\s*Examples?:\s*$", re.MULTILINE)


def test_every_public_name_has_an_example() -> None:
    objects = public_objects()
    assert "torch_momentum.optim.PolyakSGD" in objects  # the scan sees the public API
    missing = sorted(
        name
        for name, obj in objects.items()
        if not (_EXAMPLE.search(inspect.getdoc(obj) or "") and ">>>" in (obj.__doc__ or ""))
    )
    assert not missing, (
        f"{len(missing)} public classes/functions without an `Example:` section with >>> lines"
        " (add one that runs as a doctest):\n  " + "\n  ".join(missing)
    )


def test_version_is_single_sourced() -> None:
    import importlib.metadata

    assert importlib.metadata.version("torch-momentum") == torch_momentum.__version__
