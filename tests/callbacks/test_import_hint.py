"""``import torch_momentum.callbacks`` without the ``[lightning]`` extra says what to install.

Each case runs in a fresh interpreter with one module of the extra hidden by a meta-path finder
that refuses it (as Python does for a module that is not installed); the core package must still
import, and the callbacks must fail with a ``ModuleNotFoundError`` naming the module and the
extra, not a bare ``No module named 'lightning'`` from inside a callback module.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.helpers.processes import run_python

SCRIPT = textwrap.dedent(
    """
    import sys

    HIDDEN = sys.argv[1]

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name == HIDDEN or name.startswith(HIDDEN + "."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    import torch_momentum  # the core needs torch only

    try:
        import torch_momentum.callbacks
    except ModuleNotFoundError as err:
        print("NAME", err.name)
        print("MESSAGE", err)
    else:
        print("IMPORTED")
    """
)


@pytest.mark.slow  # a subprocess that imports torch
@pytest.mark.parametrize("hidden", ["lightning", "matplotlib", "torchmetrics"])
def test_callbacks_without_the_extra_name_the_extra(hidden: str) -> None:
    proc = run_python(["-c", SCRIPT, hidden], timeout=300)  # a hang guard, not a timing
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "IMPORTED" not in out, f"torch_momentum.callbacks imported without {hidden}"
    assert f"NAME {hidden}" in out, out
    message = out.split("MESSAGE ", 1)[1]
    assert hidden in message and "[lightning]" in message, message
    assert 'pip install "torch-momentum[lightning]"' in message, message
