"""The tutorial notebooks run top to bottom, as a reader would run them, so none can rot.

Each notebook in tutorials/ is executed with nbclient in a fresh kernel, from a copy in a
temporary folder (the committed file and its stored outputs are left alone). A failing cell
fails its test with the notebook's name, the cell's number and source, and the error.

Without running anything, the tests also check that every notebook is generated from its
source in tutorials/src/ (edit the source, then `python tutorials/_build.py`), and that it is
committed with its outputs, every figure followed by a Markdown takeaway.

Skipped, with the reason, where nbclient, nbformat, ipykernel or scikit-image is missing:
pip install -e ".[test]" installs them.
"""

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
SOURCES = sorted((TUTORIALS / "src").glob("[0-9][0-9]_*.py"))
# Each cell may run this long before the test fails (a hang, not a slow machine, is the target;
# each notebook is meant to take well under 3 minutes on 2 CPU cores).
CELL_TIMEOUT = int(os.environ.get("T2T_TUTORIAL_CELL_TIMEOUT", "600"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colours of IPython's tracebacks


def _needs(module):
    return pytest.importorskip(module, reason=f"the tutorial tests need {module}: "
                                              "pip install -e '.[test]'")


def _build_module():
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorials_exist_and_are_numbered_in_order():
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS}"
    assert [p.stem for p in NOTEBOOKS] == [p.stem for p in SOURCES], \
        "tutorials/*.ipynb and tutorials/src/*.py must correspond one to one"
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, len(NOTEBOOKS) + 1)), f"numbering has gaps: {numbers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_source(path):
    nbformat = _needs("nbformat")
    committed = nbformat.read(path, as_version=4)
    built = _build_module().make_notebook(TUTORIALS / "src" / (path.stem + ".py"))
    got = [(c.cell_type, c.source) for c in committed.cells]
    want = [(c.cell_type, c.source) for c in built.cells]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, (f"{path.name}, cell {i}: differs from tutorials/src/{path.stem}.py; edit the "
                        f"source and run `python tutorials/_build.py {path.name[:2]}`\n"
                        f"--- notebook:\n{g[1][:500]}\n--- source:\n{w[1][:500]}")
    assert len(got) == len(want), (f"{path.name} has {len(got)} cells, its source {len(want)}: "
                                   f"run `python tutorials/_build.py {path.name[:2]}`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_outputs(path):
    nbformat = _needs("nbformat")
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, \
            f"{path.name}, cell {i} was not executed: run `python tutorials/_build.py {path.name[:2]}`"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}, cell {i} is committed with an error: {errors[0].get('evalue')}"
        has_figure = any("image/png" in o.get("data", {}) for o in cell.outputs)
        if has_figure:
            following = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
            assert following is not None and following.cell_type == "markdown" \
                and "takeaway" in following.source.lower(), \
                f"{path.name}, cell {i} draws a figure with no Markdown takeaway right under it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nbformat = _needs("nbformat")
    _needs("nbclient")
    _needs("ipykernel")
    _needs("skimage")  # the photograph of notebooks 1, 3 and 5 comes from scikit-image's data
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:  # start from a clean slate: nothing of the stored run survives
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as err:
        failing, message = None, str(err)
        for i, cell in enumerate(nb.cells):
            errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
            if cell.cell_type == "code" and errors:
                failing = i
                traceback = "\n".join(ANSI.sub("", line) for line in errors[0].get("traceback", []))
                message = f"{errors[0].ename}: {errors[0].evalue}\n{traceback}"
                break
        if failing is None:  # a timeout leaves no error output: the last cell that started
            failing = max((i for i, c in enumerate(nb.cells)
                           if c.cell_type == "code" and c.execution_count is not None), default=0)
        pytest.fail(f"{path.name}, cell {failing} (0-based, Markdown cells counted) failed:\n--- source:\n{nb.cells[failing].source}\n"
                    f"--- error:\n{message}", pytrace=False)
