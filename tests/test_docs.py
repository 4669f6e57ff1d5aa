"""The API reference covers the public API: every public class and function is on a page.

The pages (``docs/*.rst``) document modules with ``.. automodule::`` (members from the module's
``__all__``). A public name that no page reaches fails here with its name; the build itself
(``make docs``, warnings as errors) runs in ``make test``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from tests.helpers.api import public_objects

DOCS = Path(__file__).resolve().parents[1] / "docs"
_AUTOMODULE = re.compile(r"^\.\. automodule:: ([\w.]+)\s*$", re.MULTILINE)


def _documented_modules() -> list[str]:
    return sorted({m for page in DOCS.glob("*.rst") for m in _AUTOMODULE.findall(page.read_text())})


def test_pages_exist() -> None:
    pages = {p.stem for p in DOCS.glob("*.rst")}
    assert {"index", "optimizers", "callbacks", "balance", "clarke"} <= pages
    index = (DOCS / "index.rst").read_text()
    for page in ("optimizers", "callbacks", "balance", "clarke"):
        assert re.search(rf"^\s+{page}$", index, re.MULTILINE), f"{page} is not in the toctree"


def test_every_public_name_is_documented() -> None:
    documented: set[int] = set()
    for name in _documented_modules():
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__: autodoc would guess members"
        documented |= {id(getattr(module, member)) for member in module.__all__}
    missing = sorted(name for name, obj in public_objects().items() if id(obj) not in documented)
    assert not missing, (
        f"{len(missing)} public classes/functions on no page of docs/ (add their module with"
        " `.. automodule::` to the matching page):\n  " + "\n  ".join(missing)
    )
