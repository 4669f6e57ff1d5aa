"""The public API as the tests see it: every module of the installed packages and the public
classes and functions their ``__all__`` lists (used by tests/test_doctests.py and
tests/test_docs.py)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

PACKAGES = ("torch_momentum", "torch_momentum.callbacks")


def package_modules() -> list[ModuleType]:
    """Every module of both packages under its installed name, sorted by name."""
    found: dict[str, ModuleType] = {}
    for name in PACKAGES:
        package = importlib.import_module(name)
        found[name] = package
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            found[info.name] = importlib.import_module(info.name)
    return [found[name] for name in sorted(found)]


def public_objects() -> dict[str, object]:
    """Public names: ``__all__`` of every module of both packages, objects defined in them."""
    objects: dict[str, object] = {}
    for module in package_modules():
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # constants (e.g. LEDGER_TERMS) are documented where they are used
            home = getattr(obj, "__module__", "") or ""
            if home.split(".")[0] != "torch_momentum":
                continue
            objects.setdefault(f"{home}.{obj.__qualname__}", obj)
    return objects
