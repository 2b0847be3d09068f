"""The notebooks as files: paired (.py and .ipynb hold the same cells), committed without outputs,
numbered in teaching order, free of autograd frameworks.

Executing them is nbmake's job (``python -m pytest --nbmake notebooks/``); these checks are fast
and need no kernel. The ``.py`` files (jupytext percent format) are the ones people edit; after an
edit, ``jupytext --sync notebooks/NN_name.py`` updates the ``.ipynb``.
"""

import json
import pathlib
import re

import pytest

jupytext = pytest.importorskip("jupytext", reason="jupytext is not installed (pip install -e '.[notebooks]')")
from jupytext.compare import compare_notebooks  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
FOLDERS = (NOTEBOOKS, NOTEBOOKS / "labs")
NAME = re.compile(r"^(\d\d)_[a-z0-9_]+$")
FORBIDDEN_IMPORT = re.compile(r"^\s*(import|from)\s+(torch|jax|autograd|tensorflow)\b", re.M)


def notebook_files(suffix):
    return sorted(path for folder in FOLDERS for path in folder.glob(f"*{suffix}") if NAME.match(path.stem))


IPYNB = notebook_files(".ipynb")
PY = notebook_files(".py")


def label(path):
    return str(path.relative_to(ROOT))


def test_there_are_notebooks():
    assert len([path for path in IPYNB if path.parent == NOTEBOOKS]) >= 10


@pytest.mark.parametrize("path", IPYNB + PY, ids=label)
def test_every_notebook_has_its_pair(path):
    partner = path.with_suffix(".py" if path.suffix == ".ipynb" else ".ipynb")
    assert partner.exists(), f"{label(path)} has no paired {partner.name}; run: jupytext --sync {label(path)}"


@pytest.mark.parametrize("path", IPYNB, ids=label)
def test_pair_holds_the_same_cells(path):
    """The .ipynb and its .py have the same cells, in the same order, with the same sources."""
    python = path.with_suffix(".py")
    if not python.exists():
        pytest.skip("no pair (reported by test_every_notebook_has_its_pair)")
    try:
        compare_notebooks(jupytext.read(path), jupytext.read(python), fmt="py:percent")
    except Exception as error:
        pytest.fail(f"{label(path)} and {python.name} differ: {error}\n"
                    f"Edit the .py, then run: jupytext --sync {label(python)}")


@pytest.mark.parametrize("path", IPYNB, ids=label)
def test_committed_without_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    dirty = [number for number, cell in enumerate(notebook["cells"], start=1)
             if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{label(path)}: code cells {dirty} have outputs or execution counts; clear them "
                       f"(jupyter nbconvert --clear-output --inplace {label(path)}, or jupytext --sync from the .py)")


@pytest.mark.parametrize("path", IPYNB, ids=label)
def test_paired_in_percent_format(path):
    metadata = json.loads(path.read_text(encoding="utf-8"))["metadata"]
    assert metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", \
        f"{label(path)}: not paired as ipynb,py:percent; run: jupytext --set-formats ipynb,py:percent {label(path)}"
    assert metadata.get("kernelspec", {}).get("name") == "python3", f"{label(path)}: kernel is not python3"


def test_numbered_in_teaching_order():
    numbers = sorted(int(path.stem[:2]) for path in IPYNB if path.parent == NOTEBOOKS)
    assert numbers == list(range(len(numbers))), f"the notebooks are numbered {numbers}: no gaps, no repeats"


@pytest.mark.parametrize("path", PY, ids=label)
def test_no_autograd_framework(path):
    match = FORBIDDEN_IMPORT.search(path.read_text(encoding="utf-8"))
    assert match is None, f"{label(path)} imports {match.group(2)}: minirnng's notebooks derive every gradient by hand"
