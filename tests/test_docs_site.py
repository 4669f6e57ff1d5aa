"""The built docs site: self-contained (it renders offline), the guide's pages are there, the
API reference lists user API only.

The site is built once for this module with Sphinx, as ``make docs`` builds it (warnings are
errors), into a temporary folder, and its HTML is read back:

* no page loads a script, a stylesheet, an image or a frame from outside the site, and no
  stylesheet imports one: MathJax is bundled (``sphinx-mathjax-offline``), so the formulas render
  without the network;
* every page of the guide exists, and the getting-started page shows the example program;
* the Lightning hooks of the callbacks (``setup``, ``on_train_start``, ``state_dict``, ...) are
  not documented as user API, while their user methods are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.helpers.processes import ROOT, run_python

pytestmark = pytest.mark.slow  # one Sphinx build of the whole site (autodoc imports everything)

GUIDE = [
    "index",
    "getting_started",
    "howto_swap_sgd",
    "howto_nesterov",
    "howto_ledger",
    "howto_symmetries",
    "howto_certify",
    "howto_real_networks",
    "background",
    "performance",
]
API = ["optimizers", "callbacks", "balance", "clarke", "demos"]
CALLBACKS = ("LayerBalanceMonitor", "OptimizerModeSwitch", "StationarityMonitor")
HOOKS = ("setup", "teardown", "on_train_start", "on_train_end", "state_dict", "load_state_dict")
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # a scheme, or //host


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = run_python(
        ["-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", "-E", "docs", str(out)],
        env={"MPLBACKEND": "Agg"},
        timeout=900,  # a hang guard, not a timing assertion
    )
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


class _Loads(HTMLParser):
    """The resources a page loads: (tag, attribute, value) of scripts, stylesheets and other
    linked resources, images, frames, media."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag in ("script", "img", "iframe", "audio", "video", "source", "embed") and values.get(
            "src"
        ):
            self.loads.append((tag, "src", values["src"]))
        if tag == "link" and values.get("href"):
            rel = values.get("rel", "").lower().split()
            if {"stylesheet", "preload", "icon", "modulepreload", "prefetch"} & set(rel):
                self.loads.append((tag, "href", values["href"]))
        if tag == "object" and values.get("data"):
            self.loads.append((tag, "data", values["data"]))


def _pages(site: Path) -> Iterator[Path]:
    yield from sorted(site.rglob("*.html"))


def loads_of(page: Path) -> list[tuple[str, str, str]]:
    parser = _Loads()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.loads


def test_the_parser_sees_external_loads() -> None:
    """The check below can fail: a page with a CDN script and stylesheet is caught."""
    parser = _Loads()
    parser.feed(
        '<script src="https://cdn.example.org/mathjax.js"></script>'
        '<link rel="stylesheet" href="//fonts.example.org/a.css">'
        '<link rel="next" href="https://example.org/page.html"><img src="_images/a.png">'
    )
    external = [value for _, _, value in parser.loads if _EXTERNAL.match(value)]
    assert external == ["https://cdn.example.org/mathjax.js", "//fonts.example.org/a.css"]


def test_no_page_loads_anything_from_outside_the_site(site: Path) -> None:
    pages = list(_pages(site))
    assert len(pages) >= len(GUIDE) + len(API)
    external = [
        f"{page.relative_to(site)}: <{tag} {attr}={value!r}>"
        for page in pages
        for tag, attr, value in loads_of(page)
        if _EXTERNAL.match(value)
    ]
    assert not external, "\n".join(external)
    # and every local resource a page loads is in the site
    missing = sorted(
        {
            value
            for page in pages
            for _, _, value in loads_of(page)
            if not (page.parent / value.split("?", 1)[0].split("#", 1)[0]).exists()
        }
    )
    assert not missing, missing


def test_no_stylesheet_imports_from_outside_the_site(site: Path) -> None:
    remote = re.compile(r"(?:@import\s+|url\()\s*['\"]?(?:https?:)?//", re.IGNORECASE)
    bad = [
        str(css.relative_to(site))
        for css in site.rglob("*.css")
        if remote.search(css.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not bad, bad


def test_math_is_rendered_by_the_bundled_mathjax(site: Path) -> None:
    page = site / "background.html"
    scripts = [value for tag, _, value in loads_of(page) if tag == "script"]
    mathjax = [s for s in scripts if "mathjax" in s.lower()]
    assert mathjax and all(s.startswith("_static/mathjax/") for s in mathjax), scripts
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    fonts = site / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
    assert any(fonts.glob("*.woff")), "MathJax's fonts are bundled too"
    assert r"\(\eta\)" in page.read_text(encoding="utf-8")  # inline math, for MathJax


def test_code_blocks_have_copy_buttons(site: Path) -> None:
    scripts = [value for tag, _, value in loads_of(site / "getting_started.html")]
    assert any("copybutton" in s for s in scripts), scripts


def test_every_page_of_the_guide_is_built(site: Path) -> None:
    missing = [name for name in GUIDE + API if not (site / f"{name}.html").is_file()]
    assert not missing, missing
    index = (site / "index.html").read_text(encoding="utf-8")
    for name in GUIDE[1:] + API:
        assert f'href="{name}.html"' in index, f"{name} is not linked from the front page"


def test_getting_started_shows_the_example_program(site: Path) -> None:
    html = (site / "getting_started.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", html)
    program = (ROOT / "examples" / "getting_started.py").read_text()
    for line in ("trainer.fit(Classifier(), loader)", "class Classifier(L.LightningModule):"):
        assert line in program
        assert line.replace("(", "").replace(")", "") in text.replace("(", "").replace(")", "")


def test_callbacks_document_user_api_not_lightning_hooks(site: Path) -> None:
    html = (site / "callbacks.html").read_text(encoding="utf-8")
    documented = set(re.findall(r'id="torch_momentum\.callbacks\.[\w.]+"', html))
    hooks = [
        ident
        for ident in documented
        for cls in CALLBACKS
        for hook in HOOKS
        if ident.endswith(f'.{cls}.{hook}"')
    ]
    assert not hooks, hooks
    # the user API of the same classes is still there
    for ident in ("LayerBalanceMonitor.reset", "LayerBalanceMonitor.history"):
        assert f'id="torch_momentum.callbacks.monitor.{ident}"' in html, ident
    assert 'id="torch_momentum.callbacks.stationarity.StationarityMonitor"' in html
