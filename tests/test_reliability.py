"""RELIABILITY.md is the table tests/reliability.py writes from the tests' `tried` markers:
committed as generated, so that it says what the tests assert, no more and no less."""

import subprocess
import sys

import reliability


def test_the_committed_reliability_table_is_the_generated_one():
    # collected in a fresh process: this session may have collected only some test files
    generated = subprocess.run(
        [sys.executable, "-c", "import reliability; print(reliability.render("
         "reliability.collect()), end='')"], cwd=reliability.ROOT + "/tests",
        capture_output=True, text=True, check=True).stdout
    with open(reliability.DOC) as f:
        committed = f.read()
    assert committed == generated, ("RELIABILITY.md differs from what the tests say: run "
                                    "python tests/reliability.py and commit the result")
    assert generated.count("\n| ") > 60  # every area has its rows
