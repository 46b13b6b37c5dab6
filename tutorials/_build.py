"""Build the tutorial notebooks from their sources, and run them so they are committed with outputs.

The source of each notebook is a plain Python file, tutorials/src/NN_name.py, in the "percent"
format that Jupytext and VS Code also read:

    # %% [markdown]
    # # A title
    # Text, with $\\LaTeX$.

    # %%
    x = 1 + 1        # a code cell

Review and edit the sources, never the .ipynb files: the .ipynb are generated (and
tests/test_tutorials.py checks that they still match their sources).

    python tutorials/_build.py                 # rebuild every notebook and execute it in place
    python tutorials/_build.py 03 06           # only the notebooks whose names start so
    python tutorials/_build.py --no-execute    # rebuild the cells only (outputs are dropped)
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
KERNEL = "python3"


def parse_source(text):
    """Percent-format text -> [(cell_type, source)], cell_type 'markdown' or 'code'."""
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind is not None and body.strip():
            cells.append((kind, body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind == "markdown":
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def make_notebook(source_path):
    """A fresh nbformat notebook (no outputs) from one source file."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, body in parse_source(source_path.read_text()):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(body))
    # stable cell ids, so that rebuilding an unchanged notebook changes nothing in git
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{source_path.stem[:2]}-{i:03d}"
    return nb


def execute(nb, workdir, timeout=600):
    """Run every cell of nb (in place) with workdir as the kernel's working directory."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def main(argv=None):
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="name prefixes, e.g. 03")
    parser.add_argument("--no-execute", action="store_true", help="do not run the notebooks")
    args = parser.parse_args(argv)
    sources = sorted(SOURCES.glob("[0-9][0-9]_*.py"))
    if args.only:
        sources = [s for s in sources if any(s.stem.startswith(p) for p in args.only)]
    for source in sources:
        nb = make_notebook(source)
        target = HERE / (source.stem + ".ipynb")
        if not args.no_execute:
            started = time.perf_counter()
            execute(nb, HERE)
            print(f"{target.name}: executed in {time.perf_counter() - started:.1f} s",
                  flush=True)
        nbformat.write(nb, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
