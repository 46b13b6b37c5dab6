"""Checkpoint files: written whole through one temporary file of our own, with the usual
permissions, never with NaN or inf in them; and what interrupted writes leave is cleaned up."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from reliability import tried
from t2t_ref import atomic
from t2t_ref.checkpoint import NonFiniteError, load_checkpoint, save_checkpoint

WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def test_the_writer_goes_through_one_temporary_file_of_its_own(tmp_path, monkeypatch):
    """safetensors' save_file would write a temporary file of its own first (.tmpXXXXXX): at
    the moment of the rename the folder must hold our temporary file and nothing else."""
    seen = []
    replace = os.replace

    def spy(src, dst):
        seen.append(sorted(os.listdir(tmp_path)))
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", spy)
    save_checkpoint(tmp_path / "last.safetensors", WEIGHTS, {"model": "x"})
    assert len(seen) == 1 and len(seen[0]) == 1, seen
    assert seen[0][0].startswith(atomic.PREFIX) and seen[0][0].endswith("-last.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors"]
    assert np.array_equal(load_file(tmp_path / "last.safetensors")["w"], WEIGHTS["w"])
    assert load_checkpoint(tmp_path / "last.safetensors")[1]["model"] == "x"


@tried("checkpoints", "checkpoint file permissions",
       "the umask's, as the run's other outputs (usually 0644), not mkstemp's 0600")
def test_checkpoints_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.safetensors", WEIGHTS, {})
        (tmp_path / "other").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "other").stat().st_mode & 0o777 == 0o644


@tried("checkpoints", "saving weights with a NaN or inf in them",
       "refused (NonFiniteError naming the tensor); no file, no temporary file")
def test_a_checkpoint_is_never_written_non_finite(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    for bad in (np.nan, np.inf):
        weights = dict(WEIGHTS, b=np.array([1.0, bad, 0.0], dtype=np.float32))
        with pytest.raises(NonFiniteError, match="b holds NaN or inf"):
            save_checkpoint(path, weights, {"model": "x"})
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, WEIGHTS, {"n": 1})
    before = path.read_bytes()

    def fail(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, dict(WEIGHTS, b=np.ones(3, np.float32)), {"n": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.safetensors"]


def test_remove_leftovers_takes_only_temporary_files_of_writes(tmp_path):
    leftovers = [f"{atomic.PREFIX}123-0a1b2c3d-last.safetensors",  # ours
                 ".tmp-k2j3h4g5.safetensors",                       # older t2t_ref's (mkstemp)
                 ".tmpA1b2C3"]                                      # the safetensors library's
    kept = ["last.safetensors", ".tmp-notes.txt", ".tmpfolder-x", "metrics.jsonl"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    assert atomic.remove_leftovers(tmp_path) == sorted(leftovers)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert atomic.remove_leftovers(tmp_path / "missing") == []
