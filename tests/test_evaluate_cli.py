"""evaluate and predict as a user runs them on a checkpoint: the data it was trained on found
by itself, flags that contradict the checkpoint refused, damaged weights ending with exit 2, and
nothing to classify being a user mistake. Each test: one line on stderr, exit code 2."""

import json
import struct

import pytest

from reliability import tried
from t2t_ref import evaluate, predict, train
from test_train import TINY, write_image_folder

FOLDER_RUN = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--val-fraction",
              "0.34", "--epochs", "1"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """(data folder, run folder) of a 1-epoch t2t_vit_7 run at 32x32 on 2 classes of 6 images
    (8 training, 4 validation)."""
    root = tmp_path_factory.mktemp("folder_run")
    data, out = root / "data", root / "run"
    write_image_folder(data, ["cat", "dog"], per_class=6)
    assert train.main(["--data", str(data), *FOLDER_RUN, "--out", str(out)]) == 0
    return data, out


def scores(capsys, argv):
    """evaluate.main(argv) that must succeed -> (its JSON result, its stderr)."""
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def one_error_line(code, captured):
    """The single stderr line of a refused command (exit 2)."""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@tried("evaluation", "`evaluate --checkpoint` of a run trained on a dataset folder, without "
       "--data; then with that folder moved", "scored on that folder's validation split (the "
       "same result as with `--data DIR`), saying `data: DIR (from the checkpoint)`; moved: "
       "exit 2, `error: the checkpoint was trained on DIR, which is not there (moved, or another "
       "machine): give its place with --data`")
def test_evaluate_finds_the_data_folder_stored_in_the_checkpoint(folder_run, tmp_path, capsys,
                                                                 monkeypatch):
    data, out = folder_run
    capsys.readouterr()
    checkpoint = ["--checkpoint", str(out / "best.safetensors"), "--workers", "0"]
    stored, err = scores(capsys, checkpoint)
    assert f"data: {data} (from the checkpoint)" in err.splitlines()
    given, err = scores(capsys, checkpoint + ["--data", str(data)])
    assert "(from the checkpoint)" not in err
    assert stored["images"] == given["images"] == 4
    for key in ("loss", "top1", "crop_pct", "interpolation"):
        assert stored[key] == given[key], key

    moved = tmp_path / "moved"
    data.rename(moved)
    try:
        line = one_error_line(evaluate.main(checkpoint), capsys.readouterr())
        assert line == (f"error: the checkpoint was trained on {data}, which is not there "
                        "(moved, or another machine): give its place with --data"), line
        assert scores(capsys, checkpoint + ["--data", str(moved)])[0]["top1"] == stored["top1"]
    finally:
        moved.rename(data)


@tried("evaluation", "`evaluate --checkpoint` of a t2t_vit_7 run with `--model t2t_vit_10`",
       "exit 2: `error: --model t2t_vit_10 contradicts the checkpoint, which holds t2t_vit_7: "
       "drop --model (a checkpoint is evaluated as its own model)`; `--model t2t_vit_7`: scored")
def test_evaluate_refuses_a_model_the_checkpoint_does_not_hold(folder_run, capsys):
    _, out = folder_run
    capsys.readouterr()
    checkpoint = ["--checkpoint", str(out / "best.safetensors"), "--workers", "0"]
    line = one_error_line(evaluate.main(checkpoint + ["--model", "t2t_vit_10"]),
                          capsys.readouterr())
    assert line == ("error: --model t2t_vit_10 contradicts the checkpoint, which holds "
                    "t2t_vit_7: drop --model (a checkpoint is evaluated as its own model)"), line
    assert scores(capsys, checkpoint + ["--model", "t2t_vit_7"])[0]["model"] == "t2t_vit_7"


@tried("evaluation", "`evaluate --checkpoint` of a 32x32 run (a dataset folder's, and the "
       "built-in shapes') with `--img-size 64`, and `--img-size 50`", "evaluated at 64x64, the "
       "position table resized (`note: evaluating at 64x64, trained at 32x32: position table "
       "resized bicubically from 2x2 to 4x4`, `\"img_size\": 64` in the JSON, other scores "
       "than at 32); 50: exit 2, `error: --img-size 50 is not a multiple of 16: give e.g. 48`")
def test_evaluate_at_another_image_size_resizes_the_position_table(folder_run, tmp_path,
                                                                   capsys):
    _, out = folder_run
    shapes = tmp_path / "shapes"
    assert train.main(TINY + ["--epochs", "1", "--out", str(shapes)]) == 0
    capsys.readouterr()
    for run, images in ((out, 4), (shapes, 40)):
        checkpoint = ["--checkpoint", str(run / "last.safetensors"), "--workers", "0"]
        at_32, _ = scores(capsys, checkpoint)
        at_64, err = scores(capsys, checkpoint + ["--img-size", "64"])
        assert at_32["img_size"] == 32 and at_64["img_size"] == 64
        assert at_64["images"] == at_32["images"] == images
        assert at_64["loss"] != at_32["loss"]  # other pixels through another table
        assert ("note: evaluating at 64x64, trained at 32x32: position table resized "
                "bicubically from 2x2 to 4x4") in err.splitlines()
        assert at_64["crop_pct"] is not None  # the built-in shapes too: resized, not as drawn
    line = one_error_line(evaluate.main(checkpoint + ["--img-size", "50"]), capsys.readouterr())
    assert line == "error: --img-size 50 is not a multiple of 16: give e.g. 48", line


def overwrite_tensor(path, key, byte):
    """Fill the bytes of tensor key in safetensors file path with byte, the header intact."""
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + length])[key]["data_offsets"]
    start = 8 + length
    raw[start + begin:start + end] = bytes([byte]) * (end - begin)
    path.write_bytes(bytes(raw))


def rewrite_tensor(path, key, value):
    """Set every value of tensor key in checkpoint path, written back as t2t_ref writes
    checkpoints (its checksums made anew: the file is intact, its weights are what they are)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from t2t_ref.checkpoint import CRC_KEY, atomic_save
    tensors = load_file(path)
    tensors[key][...] = value
    with safe_open(str(path), framework="numpy") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != CRC_KEY}
    atomic_save(tensors, path, metadata)


@tried("evaluation", "a checkpoint whose weights make every output overflow (head.weight all "
       "3.4e38: a diverged run's, checksums intact), and one whose weight bytes were damaged "
       "after writing (header intact)", "overflow: the scores printed (`nonfinite` = every "
       "image), then exit 2, `error: FILE is damaged: 4 of 4 images gave NaN or inf outputs "
       "(...): evaluate another checkpoint`; damaged bytes: exit 2, one `error:` line naming "
       "the file, nothing scored")
def test_evaluate_on_damaged_weights_exits_2(folder_run, tmp_path, capsys):
    _, out = folder_run
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((out / "best.safetensors").read_bytes())
    rewrite_tensor(huge, "head.weight", 3.4e38)  # finite: the outputs overflow
    capsys.readouterr()
    code = evaluate.main(["--checkpoint", str(huge), "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and captured.err.rstrip().endswith(errors[0]), captured.err
    line = errors[0][errors[0].index("error:"):]  # (after the progress bar's last refresh)
    assert line.startswith(f"error: {huge} is damaged: 4 of 4 images gave NaN or inf outputs")
    assert line.endswith(": evaluate another checkpoint"), line
    assert json.loads(captured.out.strip().splitlines()[-1])["nonfinite"] == 4

    nan = tmp_path / "nan.safetensors"
    nan.write_bytes((out / "best.safetensors").read_bytes())
    overwrite_tensor(nan, "blocks.0.mlp.fc1.weight", 0xFF)  # NaN, behind the checksum's back
    code = evaluate.main(["--checkpoint", str(nan), "--workers", "0"])
    captured = capsys.readouterr()
    assert str(nan) in one_error_line(code, captured)
    assert captured.out == ""  # refused before scoring


@tried("prediction", "`predict` on a folder without image files (nothing else named)",
       "exit 2: `error: no image files in folder 'empty' (.jpg, ..., any case, sub-folders "
       "included): name image files, or a folder that holds some`, nothing on stdout")
def test_predict_on_an_empty_folder_is_a_user_error(folder_run, tmp_path, capsys):
    _, out = folder_run
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    capsys.readouterr()
    code = predict.main([str(empty), "--checkpoint", str(out / "best.safetensors")])
    captured = capsys.readouterr()
    line = one_error_line(code, captured)
    assert line.startswith(f"error: no image files in folder {str(empty)!r} (.jpg, "), line
    assert line.endswith("any case, sub-folders included): name image files, or a folder that "
                         "holds some"), line
    assert captured.out == ""


@tried("prediction", "`predict` on a folder with a sub-folder that cannot be listed "
       "(permissions), beside images", "the other images classified; `error: cannot read "
       "folder '...' (Permission denied)`; exit 1 (it was a PermissionError traceback, and "
       "nothing classified)")
def test_predict_goes_on_past_a_folder_it_cannot_list(folder_run, tmp_path, capsys,
                                                      monkeypatch):
    import os
    from t2t_ref.data import folder as folder_module
    data, out = folder_run
    locked = data / "train" / "cat" / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path):  # as for a folder of mode 000 (root here reads anything)
        if os.path.realpath(path) == os.path.realpath(locked):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(folder_module.os, "scandir", scandir)
    capsys.readouterr()
    code = predict.main([str(data / "train" / "cat"), "--checkpoint",
                         str(out / "best.safetensors")])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert f"error: cannot read folder {str(locked)!r} (Permission denied)" in captured.err
    assert captured.out.count(".png") + captured.out.count(".jpg") >= 1, captured.out
    # the same folder read as training data: one line naming it
    from t2t_ref.data.folder import DataError, images_under
    with pytest.raises(DataError, match="cannot read folder .*locked.* fix its permissions"):
        images_under(data / "train" / "cat")
    locked.rmdir()  # (the module's data folder, as the other tests found it)


@tried("prediction", "`predict` whose model or batch does not fit in memory (a huge "
       "--img-size)", "exit 2: `error: not enough memory for ...: give a smaller --img-size` "
       "(it was a numpy MemoryError traceback)")
def test_predict_out_of_memory_is_one_line(folder_run, capsys, monkeypatch):
    data, out = folder_run

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 74.5 GiB")

    monkeypatch.setattr(predict, "model_from_weights", no_memory)
    capsys.readouterr()
    code = predict.main([str(data / "train" / "cat"), "--checkpoint",
                         str(out / "best.safetensors"), "--img-size", "100000"])
    line = one_error_line(code, capsys.readouterr())
    assert line == ("error: not enough memory for the model at --img-size 100000: give a "
                    "smaller --img-size"), line
    monkeypatch.undo()
    monkeypatch.setattr(predict, "predict", no_memory)
    code = predict.main([str(data / "train" / "cat"), "--checkpoint",
                         str(out / "best.safetensors")])
    line = one_error_line(code, capsys.readouterr())
    assert line.startswith("error: not enough memory for a batch of ") and \
        line.endswith(": give a smaller --batch-size or --img-size"), line
