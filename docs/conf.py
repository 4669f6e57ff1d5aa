"""Sphinx configuration of the torch-momentum guide and API reference (`make docs` builds it into
site/).

Sphinx rather than MkDocs: the docstrings are reStructuredText (``:math:`` roles, ``.. math::``
blocks) with Google-style sections, which autodoc + napoleon render as written; mkdocstrings
expects Markdown docstrings and would show the RST maths verbatim.

The built site loads nothing from the network: MathJax is bundled (``sphinx-mathjax-offline``
copies it into ``_static/mathjax``), and the theme (Furo) and the copy buttons ship their own
files. ``tests/test_docs_site.py`` checks that no page loads a script or stylesheet from
elsewhere.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import torch_momentum

project = "torch-momentum"
author = "torch-momentum contributors"
copyright = "torch-momentum contributors"
release = version = torch_momentum.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args:/Returns:/Raises:/Example: sections
    "sphinx.ext.mathjax",  # :math: and .. math::, rendered by MathJax in the browser ...
    "sphinx-mathjax-offline",  # ... from the copy bundled into the site, not from a CDN
    "sphinx_copybutton",  # a copy button on every code block
]

exclude_patterns = ["_build"]
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
# Annotations go into the signature as written: torch and Lightning types are not cross-referenced
# (no network for intersphinx, and not nitpicky: an unresolved torch type is no warning).
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
python_use_unqualified_type_names = True

# Copy buttons copy the code only: no ">>> " / "... " prompts, no "$ " shell prompts.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

html_theme = "furo"  # long code lines scroll inside their block instead of running off the page
html_title = f"torch-momentum {release}"
html_static_path: list[str] = []
html_theme_options = {"navigation_with_keys": True}


def _lightning_hooks() -> frozenset[str]:
    """Names a Lightning ``Callback`` defines: hooks the Trainer calls and its checkpoint
    protocol (``setup``, ``on_train_start``, ``state_dict``, ``state_key``, ...)."""
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # the reference of the core alone can be built without Lightning
        return frozenset()
    return frozenset(name for name in dir(Callback) if not name.startswith("__"))


_HOOKS = _lightning_hooks()


def _owner(obj: Any) -> type | None:
    """The class that defines a method or property (from its ``__qualname__``)."""
    function = inspect.unwrap(getattr(obj, "fget", None) or obj)
    module = sys.modules.get(getattr(function, "__module__", None) or "")
    owner: Any = module
    for part in getattr(function, "__qualname__", "").split(".")[:-1]:
        owner = getattr(owner, part, None)
    return owner if isinstance(owner, type) else None


def skip_lightning_hooks(app: Any, what: str, name: str, obj: Any, skip: bool, options: Any):
    """The API reference lists what a user calls: the Trainer's hooks of our callbacks
    (``on_train_start``, ``setup``, ``state_dict``, ...) are Lightning's protocol, not user API."""
    if what == "class" and name in _HOOKS:
        owner = _owner(obj)
        if owner is not None and any(
            base.__module__.startswith("lightning.") and base.__name__ == "Callback"
            for base in owner.__mro__
        ):
            return True
    return None  # autodoc decides


def setup(app: Any) -> None:
    app.connect("autodoc-skip-member", skip_lightning_hooks)


sys.dont_write_bytecode = True
