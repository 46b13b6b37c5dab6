"""The smaller tools' command lines (python -m t2t_ref, t2t_ref.summary, t2t_ref.data.digits):
a mistake is one line, exit code 2, no traceback, and nothing written."""

import importlib
import os

import pytest

from reliability import tried

from t2t_ref import atomic
from t2t_ref import __main__ as check
from t2t_ref.data import digits

summary = importlib.import_module("t2t_ref.summary")  # the package names a function summary

CLIS = {"python -m t2t_ref": check.main, "summary": summary.main, "digits": digits.main}


def case(cli, args, says, area="command line"):
    """One bad command line: `cli args` must end with exit 2 and one line containing says."""
    return pytest.param(cli, args, says, id=f"{cli} {' '.join(args)}", marks=tried(
        area, f"`{cli} {' '.join(a or repr(a) for a in args)}`", f"exit 2: `error: {says}`"))


def one_error_line(cli, args, capsys):
    try:
        code = CLIS[cli](args)
    except SystemExit as stop:  # argparse's own exit, one line through cli.Parser
        code = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


BAD = [
    case("python -m t2t_ref", ["--batch-size", "-1"],
         "argument --batch-size: -1 is out of range: give a number >= 1"),
    case("python -m t2t_ref", ["--batch-size", "0"],
         "argument --batch-size: 0 is out of range: give a number >= 1"),
    case("python -m t2t_ref", ["--img-size", "8"],
         "argument --img-size: 8 is out of range: give a number >= 16"),
    case("python -m t2t_ref", ["--img-size", "40"], "--img-size 40 is not a multiple of 16"),
    case("python -m t2t_ref", ["--num-classes", "0"], "argument --num-classes: 0 is out of range"),
    case("python -m t2t_ref", ["--batch-size", "10000000"],
         "out of memory: batch 10000000 of 224x224 images (--num-classes 1000) needs more than "
         "this machine has: lower --batch-size or --img-size"),
    case("summary", ["t2t_vit_7", "--all"],
         "--all lists every model: give either t2t_vit_7 or --all, not both"),
    case("summary", ["--all", "--img-size", "40"], "--img-size 40 is not a multiple of 16"),
    case("digits", [""], "argument DIR: an empty path"),
    case("digits", ["out", "--val-fraction", "0.999"], "--val-fraction 0.999 leaves 0 training "
         "scans and 1797 validation scans", area="data"),
    case("digits", ["out", "--val-fraction", "0.001"], "--val-fraction 0.001 leaves 1797 "
         "training scans and 0 validation scans", area="data"),
    case("digits", ["a_file/digits"], "lies under", area="data"),
    case("digits", ["dangling"], "dangling is a symbolic link to nowhere, which does not exist",
         area="data"),
]


@pytest.mark.parametrize("cli, args, says", BAD)
def test_a_bad_tool_command_line_is_one_line_and_exit_2(cli, args, says, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    os.symlink("nowhere", tmp_path / "dangling")
    line = one_error_line(cli, args, capsys)
    assert says in line, line
    assert sorted(os.listdir(tmp_path)) == ["a_file", "dangling"], "nothing is written"


@tried("data", "`digits DIR` with DIR in a folder that cannot be written",
       "exit 2: `error: DIR: cannot write in FOLDER (Permission denied): choose a folder you "
       "can write to`")
def test_digits_refuses_a_folder_it_cannot_write(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the probe say what it would
        monkeypatch.setattr(atomic, "cannot_write_in", lambda folder: "Permission denied")
    try:
        line = one_error_line("digits", [str(locked / "digits")], capsys)
    finally:
        locked.chmod(0o755)
    assert f"cannot write in {locked} (Permission denied)" in line, line
    assert os.listdir(locked) == []


@tried("command line", "`summary --all --img-size 32 --num-classes 10`",
       "every model at 32x32 with 10 classes, the header saying so, no official column")
def test_summary_all_honours_the_size_and_names_it(capsys):
    assert summary.main(["--all", "--img-size", "32", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("every model at 32x32, 10 classes")
    assert "official" not in out.splitlines()[1] and "issue #47" not in out
    assert f"{summary.count('t2t_vit_7', 32, 10)[0]:,}" in out
    assert summary.main(["--all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("every model at 224x224, 1000 classes") and "issue #47" in out
