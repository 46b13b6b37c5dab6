"""RELIABILITY.md, the table of bad inputs and faults the tests try and what each gets, is
written from the tests themselves, so that it cannot drift from them.

A test says what it tries with a marker, on the test or on one case of a parametrised test:

    @tried("command line", "`train --workers -1`", "exit 2: `argument --workers: -1 is ...`")
    def test_...

    pytest.param(..., marks=tried("data", "a one-class dataset", "exit 2: ..."))

and asserts exactly what the third argument says. This script collects the markers of the
whole suite (pytest --collect-only, nothing runs) in the suite's order and writes the table;
tests/test_reliability.py checks that the committed RELIABILITY.md is what it writes now.

    python tests/reliability.py            # rewrite RELIABILITY.md after changing a test
"""

import contextlib
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "RELIABILITY.md")
HEADER = """# Reliability: what a run does with bad input and faults

Every row is a case the test suite tries, and says what the test asserts; the table is
generated from the tests' `tried` markers by `python tests/reliability.py` (do not edit it by
hand: `tests/test_reliability.py` fails when it differs from what the tests say). A user
mistake ends with one line, `error: ...`, naming the problem and the fix, and exit code 2; a
run that diverges stops with exit code 3; Ctrl-C, SIGTERM and SIGUSR1 stop a run with a save
and exit with 130, 143 and 138.
"""


AREAS = ("command line", "data", "checkpoints", "faults", "evaluation", "prediction")


def tried(area, what, gets):
    """The marker: area (one of AREAS, the table's headings), what was tried, what it gets."""
    return pytest.mark.reliability(area, what, gets)


class _Collector:
    def __init__(self):
        self.rows = []

    def pytest_collection_finish(self, session):
        for item in session.items:
            for mark in item.iter_markers("reliability"):
                test = item.nodeid.split("[")[0]
                row = (*mark.args, test)
                if row not in self.rows:
                    self.rows.append(row)


def collect():
    """[(area, what, gets, test)] of the whole suite, in its order."""
    collector = _Collector()
    with contextlib.redirect_stdout(io.StringIO()) as log:
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", ROOT,
                            os.path.join(ROOT, "tests")], plugins=[collector])
    if code != 0:
        raise RuntimeError(f"collecting the tests failed:\n{log.getvalue()}")
    return collector.rows


def render(rows):
    """The markdown of RELIABILITY.md: one table per area, in the order of AREAS."""
    def cell(text):
        return text.replace("|", "\\|").replace("\n", " ")

    unknown = sorted({area for area, *_ in rows} - set(AREAS))
    if unknown:
        raise ValueError(f"areas {unknown} are not in reliability.AREAS")
    areas = [area for area in AREAS if any(row[0] == area for row in rows)]
    parts = [HEADER]
    for area in areas:
        parts.append(f"\n## {area}\n\n| what was tried | what it gets | test |\n|---|---|---|\n")
        parts.extend(f"| {cell(what)} | {cell(gets)} | `{test.split('::')[-1]}` "
                     f"({test.split('::')[0].removeprefix('tests/')}) |\n"
                     for a, what, gets, test in rows if a == area)
    return "".join(parts)


if __name__ == "__main__":
    text = render(collect())
    with open(DOC, "w") as f:
        f.write(text)
    print(f"wrote {DOC}: {text.count(chr(10) + '| ') - text.count('| what was tried')} rows",
          file=sys.stderr)
