"""Check an installed (non-editable) torch-momentum wheel; run by `make dist-check`.

Usage: <fresh venv>/bin/python -I .ci/check_installed.py DISTDIR

``-I`` keeps the current directory (the source tree) off ``sys.path``, so the imports below can
only find the installed wheel. Exits non-zero with a message on the first failed check.
"""

from __future__ import annotations

import importlib.metadata
import sys
import sysconfig
import tempfile
from pathlib import Path


def fail(message: str) -> None:
    sys.exit(f"dist-check: {message}")


def main() -> None:
    dist_dir = Path(sys.argv[1])
    site = Path(sysconfig.get_paths()["purelib"]).resolve()

    import torch_momentum

    leaked = [m for m in ("lightning", "torchmetrics", "matplotlib") if m in sys.modules]
    if leaked:
        fail(f"`import torch_momentum` imported {leaked}")

    import torch_momentum.callbacks

    for module in (torch_momentum, torch_momentum.callbacks):
        where = Path(module.__file__).resolve()
        if site not in where.parents:
            fail(f"{module.__name__} imported from {where}, not from the venv's {site}")
    # every source module is installed (a package missing from pyproject's list still imports
    # from an editable tree, so only the wheel shows it)
    source = Path(__file__).resolve().parents[1]
    installed = Path(torch_momentum.__file__).parent
    expected = {
        p.relative_to(source / "torch_momentum") for p in (source / "torch_momentum").rglob("*.py")
    }
    expected |= {
        Path("callbacks") / p.relative_to(source / "callbacks")
        for p in (source / "callbacks").rglob("*.py")
    }
    missing = sorted(str(p) for p in expected if not (installed / p).is_file())
    if missing:
        fail(f"modules missing from the wheel: {missing}")
    if not (Path(torch_momentum.__file__).parent / "py.typed").is_file():
        fail("torch_momentum/py.typed is missing from the wheel")
    # the ledger's C kernel: its source ships, and where a compiler is, it builds and loads
    # (from the installed source, into a fresh cache)
    from torch_momentum.balance import _native

    if not _native.SOURCE.is_file() or site not in _native.SOURCE.resolve().parents:
        fail(f"the C kernel's source {_native.SOURCE} is missing from the wheel")
    cc = _native.compiler()
    if cc is not None:
        with tempfile.TemporaryDirectory() as cache:
            _native.load(_native.build(cc, Path(cache)))

    version = importlib.metadata.version("torch-momentum")
    if version != torch_momentum.__version__:
        fail(
            f"metadata version {version} != torch_momentum.__version__ {torch_momentum.__version__}"
        )
    wheels = sorted(p.name for p in dist_dir.glob("*.whl"))
    sdists = sorted(p.name for p in dist_dir.glob("*.tar.gz"))
    if wheels != [f"torch_momentum-{version}-py3-none-any.whl"] or sdists != [
        f"torch_momentum-{version}.tar.gz"
    ]:
        fail(f"unexpected distributions in {dist_dir}: {wheels + sdists}")

    meta = importlib.metadata.metadata("torch-momentum")
    if meta.get("License-Expression") != "BSD-3-Clause":
        fail(f"License-Expression is {meta.get('License-Expression')!r}")
    files = [str(f) for f in importlib.metadata.files("torch-momentum") or []]
    if not any(f.endswith("licenses/LICENSE") for f in files):
        fail("LICENSE is not in the wheel's .dist-info/licenses/")

    print(
        f"dist-check: torch-momentum {version} from {site}: torch_momentum and"
        f" torch_momentum.callbacks ({len(torch_momentum.callbacks.__all__)} names) import; OK"
    )


if __name__ == "__main__":
    main()
