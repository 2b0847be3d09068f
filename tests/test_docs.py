"""The documentation site: it builds with ``mkdocs build --strict`` (every page in the navigation,
every link between pages and every anchor resolves), the docstring lines a page quotes are still in
the code, and every ``minirnng.*`` name the docs and notebooks mention exists."""

import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
QUOTE = re.compile(r"<!-- docstring: ([\w.]+) -->\s*```text\n(.*?)```", re.S)
NAME = re.compile(r"`(minirnng(?:\.\w+)+)")


def resolve(dotted):
    """The module, class or function a dotted name refers to (import the longest module prefix)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(dotted)


def squeeze(text):
    return " ".join(text.split())


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("pymdownx", reason="pymdown-extensions is not installed (pip install -e '.[docs]')")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda path: str(path.relative_to(DOCS)))
def test_quoted_docstrings_match_the_code(page):
    """A page's ``<!-- docstring: minirnng.x -->`` block quotes lines that are in that docstring."""
    for dotted, block in QUOTE.findall(page.read_text(encoding="utf-8")):
        docstring = squeeze(inspect.getdoc(resolve(dotted)) or "")
        for line in block.splitlines():
            if line.strip():
                assert squeeze(line) in docstring, (f"{page.relative_to(ROOT)} quotes a line that is no longer in "
                                                    f"the docstring of {dotted}:\n  {line.strip()}\n"
                                                    "update the page's equations and the quote together")


def mentioned_names():
    files = sorted(DOCS.rglob("*.md")) + sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    names = set()
    for path in files:
        for name in NAME.findall(path.read_text(encoding="utf-8")):
            names.add((name.rstrip("."), path.relative_to(ROOT)))
    return sorted(names)


@pytest.mark.parametrize("name, where", mentioned_names(), ids=lambda value: str(value))
def test_mentioned_minirnng_names_exist(name, where):
    try:
        resolve(name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{where} mentions `{name}`, which does not exist ({error})")


def test_every_page_is_in_the_navigation():
    yaml_text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        relative = str(page.relative_to(DOCS))
        assert relative in yaml_text, f"docs/{relative} is not in mkdocs.yml's nav"
