"""`python -m t2t_ref.convert IN OUT`: what it keeps (the EMA of a timm / DeiT file, a run's
evaluation transform) and what it refuses (an existing OUT, an OUT it cannot write, a missing or
empty IN), each a user mistake of one line that leaves the user's files as they were."""

import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import t2t_ref
from t2t_ref import atomic, convert
from t2t_ref.checkpoint import load_checkpoint, save_checkpoint
from t2t_ref.pretrained import read_weights
from t2t_ref.recipe import eval_transform_of
from reliability import tried
from test_pretrained import SIZE, assert_user_error, official_pair, oracle_weights


def tiny_run_checkpoint(path, crop_pct=None, interpolation=None):
    """A t2t_ref training checkpoint (3 classes, with optimizer state), as a run's
    last.safetensors; its config holds the evaluation transform given."""
    model = t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=SIZE, seed=3)
    config = {"img_size": SIZE, "dtype": "float32"}
    if crop_pct is not None:
        config.update(crop_pct=crop_pct, interpolation=interpolation)
    save_checkpoint(path, model.state_dict(),
                    {"model": "t2t_vit_7", "class_names": ["a", "b", "c"], "step": 6,
                     "config": config},
                    optimizer={"step": 6, "exp_avg": {"cls_token": np.ones((1, 1, 256))}})
    return path


# ---- what a conversion keeps -------------------------------------------------------------------


def test_a_runs_evaluation_transform_survives_conversion(tmp_path, capsys):
    run = tiny_run_checkpoint(tmp_path / "best.safetensors", crop_pct=0.95,
                              interpolation="bilinear")
    out = tmp_path / "w.safetensors"
    assert convert.main([str(run), str(out)]) == 0
    capsys.readouterr()
    meta = read_weights(out).meta
    assert meta["weights_only"]
    transform = eval_transform_of(meta["config"])
    assert (transform.crop_pct, transform.interpolation) == (0.95, "bilinear")
    # and an official file, which has none, gets the official transform
    official, _, _ = official_pair(tmp_path, "t2t_vit_7")
    out2 = tmp_path / "official.safetensors"
    assert convert.main([str(official), str(out2)]) == 0
    transform = eval_transform_of(read_weights(out2).meta["config"])
    assert (transform.crop_pct, transform.interpolation) == (0.9, "bicubic")


@pytest.mark.parametrize("flags, want, which", [([], "ema", "model_ema"),
                                                (["--no-ema"], "raw", "model")])
def test_a_timm_model_and_model_ema_file_gives_the_ema_unless_no_ema(tmp_path, capsys, flags,
                                                                     want, which):
    raw, ema = oracle_weights("t2t_vit_7", 10, SIZE, 1.0)
    path = tmp_path / "deit.pth"
    torch.save({"model": raw, "model_ema": ema, "epoch": 3}, path)
    out = tmp_path / "w.safetensors"
    assert convert.main([str(path), str(out), *flags]) == 0
    assert f"from {which} of" in capsys.readouterr().out
    written = load_file(out)
    expected = ema if want == "ema" else raw
    for key, value in expected.items():
        assert np.array_equal(written[key], value.numpy()), key


def test_an_upper_case_extension_is_accepted(tmp_path, capsys):
    path, _, ema = official_pair(tmp_path, "t2t_vit_7")
    out = tmp_path / "W.SAFETENSORS"
    assert convert.main([str(path), str(out)]) == 0
    capsys.readouterr()
    _, meta, _, _ = load_checkpoint(out)  # a t2t_ref weight file, not a .pth
    assert meta["model"] == "t2t_vit_7"
    back = tmp_path / "BACK.PTH"
    assert convert.main([str(out), str(back)]) == 0
    state = torch.load(back, weights_only=True)
    assert torch.equal(state["cls_token"], ema["cls_token"])


# ---- an existing output --------------------------------------------------------------------


@tried("checkpoints", "`convert IN OUT` where OUT exists (e.g. a run's last.safetensors)",
       "exit 2: `error: output ... already exists: pass --force to replace it, or choose "
       "another path`; OUT unchanged")
def test_an_existing_output_is_refused_without_force(tmp_path, capsys):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    last = tiny_run_checkpoint(tmp_path / "last.safetensors")
    before = last.read_bytes()
    code = convert.main([str(path), str(last)])
    assert_user_error(code, capsys.readouterr(), str(last), "already exists", "--force")
    assert last.read_bytes() == before
    _, _, optimizer, _ = load_checkpoint(last)
    assert optimizer["step"] == 6


def test_force_replaces_an_existing_output(tmp_path, capsys):
    path, _, ema = official_pair(tmp_path, "t2t_vit_7")
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old")
    assert convert.main([str(path), str(out), "--force"]) == 0
    capsys.readouterr()
    assert np.array_equal(load_file(out)["cls_token"], ema["cls_token"].numpy())


@tried("checkpoints", "`convert IN IN --force` (the output is the input itself)",
       "exit 2: `error: ... is the input file itself: choose another output`; IN unchanged")
def test_force_never_overwrites_the_input(tmp_path, capsys):
    last = tiny_run_checkpoint(tmp_path / "last.safetensors")
    before = last.read_bytes()
    code = convert.main([str(last), str(last), "--force"])
    assert_user_error(code, capsys.readouterr(), str(last), "is the input file itself")
    assert last.read_bytes() == before


# ---- an output that cannot be written ------------------------------------------------------


def output_cases(tmp_path):
    """(OUT, what the error says) for outputs that cannot be written."""
    folder = tmp_path / "afolder.safetensors"
    folder.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    return [(folder, "is a folder"),
            (a_file / "w.safetensors", f"lies under {a_file}, which is a file"),
            (tmp_path / "missing" / "deeper" / "w.safetensors",
             "does not exist: create it, or choose another path")]


@tried("command line", "`convert IN OUT` with OUT a folder, a path under a file, or in a missing "
       "folder", "exit 2: one line naming OUT and the problem; no folder created, no temporary "
       "file named")
def test_outputs_that_cannot_be_written_are_refused_up_front(tmp_path, capsys):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    for out, needle in output_cases(tmp_path):
        code = convert.main([str(path), str(out)])
        captured = capsys.readouterr()
        assert_user_error(code, captured, str(out), needle)
        assert ".tmp" not in captured.err and "Errno" not in captured.err
    assert not (tmp_path / "missing").exists()
    assert os.listdir(tmp_path / "afolder.safetensors") == []


@tried("command line", "`convert IN OUT` in a folder that cannot be written in",
       "exit 2: `error: output OUT: cannot write in ... (Permission denied), or choose another "
       "path`")
def test_an_unwritable_output_folder_is_refused(tmp_path, capsys, monkeypatch):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")

    def refuse(dir=None):  # a read-only folder (chmod does not stop root, who runs the CI)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "TemporaryFile", refuse)
    out = tmp_path / "w.safetensors"
    code = convert.main([str(path), str(out)])
    assert_user_error(code, capsys.readouterr(), str(out), "cannot write in",
                      "(Permission denied), or choose another path")
    assert not out.exists()


# ---- a missing or empty input ----------------------------------------------------------------


@tried("checkpoints", "`convert missing.pth.tar existing.safetensors`",
       "exit 2: `error: weights file ... does not exist: check the path`; OUT unchanged")
def test_a_missing_input_is_named_before_the_output_is_looked_at(tmp_path, capsys):
    out = tmp_path / "existing.safetensors"
    out.write_bytes(b"keep me")
    missing = tmp_path / "nonexist.pth.tar"
    code = convert.main([str(missing), str(out)])
    captured = capsys.readouterr()
    assert_user_error(code, captured, f"weights file {missing} does not exist: check the path")
    assert "Errno" not in captured.err
    assert out.read_bytes() == b"keep me"


@tried("command line", "`convert \"\" OUT`, `convert IN \"\"` (empty paths)",
       "exit 2: `error: argument IN: an empty path: give the weights file to convert ...`")
def test_empty_paths_are_refused(tmp_path, capsys):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    for argv, needles in [(["", str(tmp_path / "w.safetensors")],
                           ("argument IN: an empty path", "the weights file to convert")),
                          ([str(path), " "], ("argument OUT: an empty path", "the file to write"))]:
        with pytest.raises(SystemExit) as stop:
            convert.main(argv)
        assert_user_error(stop.value.code, capsys.readouterr(), *needles)
    assert not (tmp_path / "w.safetensors").exists()
