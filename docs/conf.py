"""Sphinx configuration for the torch-momentum API reference (`make docs` builds it into site/).

Sphinx rather than MkDocs: the docstrings are reStructuredText (``:math:`` roles, ``.. math::``
blocks) with Google-style sections, which autodoc + napoleon render as written; mkdocstrings
expects Markdown docstrings and would show the RST maths verbatim.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MPLBACKEND", "Agg")

import torch_momentum

project = "torch-momentum"
author = "torch-momentum contributors"
copyright = "torch-momentum contributors"
release = version = torch_momentum.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args:/Returns:/Raises:/Example: sections
    "sphinx.ext.mathjax",  # :math: and .. math:: (MathJax is loaded by the browser)
]

# The figures next to these sources belong to the README; the pages include some of them.
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

html_theme = "alabaster"
html_title = f"torch-momentum {release}"
html_static_path: list[str] = []
html_theme_options = {"description": "Momentum, layer balance and Clarke subgradients for PyTorch"}

sys.dont_write_bytecode = True
