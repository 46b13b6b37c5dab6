"""bench's command line: a --json path that cannot be written is refused before any timing
(one line, exit 2), the file is written atomically, a write that fails at the end still exits
with one line, and --loader honours --workers. No benchmark runs here: the timing functions
are replaced by ones that fail the test if called, or return at once."""

import errno
import json
import os
import subprocess
import sys

import pytest

from reliability import tried

pytest.importorskip("threadpoolctl", reason="t2t_ref.bench needs threadpoolctl: "
                                            "pip install threadpoolctl")

from t2t_ref import atomic, bench, bench_loader  # noqa: E402  (after the skip)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADER_RESULT = {"batch": 64, "size": 224, "cores": 2, "workers": {0: 100.0},
                 "consumer_ms": 1.0}


@pytest.fixture
def no_timing(monkeypatch):
    """Any benchmark run fails the test: the checks must come first."""
    def ran(*args, **kwargs):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(bench, "run", ran)
    monkeypatch.setattr(bench_loader, "run", ran)


def refused(argv, capsys):
    """bench.main(argv) -> (exit code, the lines on stderr), argparse's own exits included."""
    try:
        code = bench.main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_line(code, lines, says):
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert says in lines[0], lines[0]


@tried("command line", "`bench --quick --json PATH`, PATH a folder, under a file, in a "
       "missing folder, in a folder that cannot be written, or empty (`--json \"\"`); "
       "the same with --loader", "exit 2 before any timing: `error: --json P is a folder: "
       "give a file path ...`, `... lies under F, which is a file, or give another path`, `... "
       "folder F does not exist: create it, or give another path`, `... cannot write in F "
       "(Permission denied), ...`, `--json is empty ...`")
def test_json_paths_that_cannot_be_written_are_refused_before_timing(tmp_path, capsys,
                                                                     monkeypatch, no_timing):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases = [(str(tmp_path), f"--json {tmp_path} is a folder: give a file path"),
             (str(a_file / "b.json"), f"lies under {a_file}, which is a file"),
             (str(tmp_path / "no" / "b.json"),
              f"folder {tmp_path / 'no'} does not exist: create it, or give another path"),
             ("", "--json is empty: give a file path"),
             (str(locked / "b.json"), f"cannot write in {locked} (Permission denied)")]
    for mode in (["--quick"], ["--loader"]):
        for path, says in cases:
            if path.startswith(str(locked)) and os.geteuid() == 0:
                # root writes anywhere: make the probe fail as it would for a user
                def refuse(*args, **kwargs):
                    raise PermissionError(13, "Permission denied")
                monkeypatch.setattr(atomic.tempfile, "TemporaryFile", refuse)
            code, lines = refused(mode + ["--json", path], capsys)
            assert_one_line(code, lines, says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "locked"]  # nothing made
    assert a_file.read_text() == "x" and list(locked.iterdir()) == []


@tried("command line", "`python -m t2t_ref.bench --quick --json FOLDER` (the process, as a "
       "user runs it)", "exit 2 in seconds, one line `error: --json FOLDER is a folder: give a "
       "file path ...`, no traceback")
def test_a_folder_as_json_is_one_line_from_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "t2t_ref.bench", "--quick", "--json",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert_one_line(done.returncode, lines, f"--json {tmp_path} is a folder: give a file path")
    assert "Traceback" not in done.stderr and done.stdout == ""


@tried("faults", "`bench --json PATH` when writing PATH fails at the end (disk full)",
       "the numbers printed, exit 2 with one line `error: cannot write --json PATH (No space "
       "left on device): the results are printed above ...`, the old file whole, no "
       "temporary file left")
def test_a_json_write_that_fails_at_the_end_is_one_line(tmp_path, capsys, monkeypatch):
    def fake_run(batch=64, size=224, batches=6, worker_counts=None, out=print):
        out("  1 worker process  :   100.0 images/s")
        return LOADER_RESULT
    monkeypatch.setattr(bench_loader, "run", fake_run)
    path = tmp_path / "bench.json"
    path.write_text("{\"old\": 1}")
    real_fsync = os.fsync

    def disk_full(fd):  # write_atomic's flush to disk, as on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", disk_full)
    try:
        code = bench.main(["--loader", "--json", str(path)])
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert_one_line(code, lines, f"cannot write --json {path} (No space left on device): the "
                                 "results are printed above")
    assert "100.0 images/s" in captured.out and "wrote" not in captured.out
    assert path.read_text() == "{\"old\": 1}" and os.listdir(tmp_path) == ["bench.json"]

    assert bench.main(["--loader", "--json", str(path)]) == 0  # and when it can: atomically
    assert json.loads(path.read_text())["workers"] == {"0": 100.0}
    assert os.listdir(tmp_path) == ["bench.json"] and f"wrote {path}" in capsys.readouterr().out


@tried("command line", "`bench --loader --workers N` (0, 3; and -1)",
       "only that worker count is measured (0: in the training process, printed without a "
       "per-worker rate); -1: exit 2 `error: --workers -1: give 0 ... or more worker "
       "processes`")
def test_loader_mode_measures_the_workers_given(monkeypatch, capsys):
    asked = []

    def fake_run(batch=64, size=224, batches=6, worker_counts=None, out=print):
        asked.append(worker_counts)
        return LOADER_RESULT
    monkeypatch.setattr(bench_loader, "run", fake_run)
    assert bench.main(["--loader", "--workers", "0"]) == 0
    assert bench.main(["--loader", "--workers", "3"]) == 0
    assert bench.main(["--loader"]) == 0
    assert asked == [[0], [3], None]  # None: bench_loader's 1, 2 and all cores
    code, lines = refused(["--loader", "--workers", "-1"], capsys)
    assert_one_line(code, lines, "--workers -1: give 0 (loading in the training process) or "
                                 "more worker processes")
    assert asked == [[0], [3], None]
    assert bench_loader.rate_line(0, 80.0).strip() == \
        "0 workers (in the training process):    80.0 images/s"
    assert bench_loader.rate_line(2, 80.0).strip().endswith("(40.0 per worker)")
