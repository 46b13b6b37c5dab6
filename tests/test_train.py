"""The training workflow end to end: outputs, exact resume, evaluation and bad input."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from t2t_ref import evaluate, train
from t2t_ref.backend import BackendError, get_namespace
from t2t_ref.checkpoint import load_checkpoint

# A tiny built-in run: 96 training images, batch 32 -> 3 steps per epoch.
TINY = ["--synthetic-train", "96", "--synthetic-val", "40", "--batch-size", "32",
        "--img-size", "32", "--workers", "0", "--warmup-epochs", "0.5"]


def run_train(args, capsys=None):
    code = train.main(args)
    out = capsys.readouterr() if capsys else None
    return code, out


def write_image_folder(root, classes, per_class=6, size=40, split="train", seed=0):
    """root/split/<class>/<i>.png with a class-dependent pattern, so it is learnable."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            pixels[:, label * 6:label * 6 + 6] = 255
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    # each option's entry: from its name at the start of a line to the next option
    entries = {}
    for block in ("\n" + options).split("\n  -")[1:]:
        entries[block.split()[0].rstrip(",")] = " ".join(block.split())
    for flag in ("--data", "--model", "--img-size", "--epochs", "--batch-size", "--lr",
                 "--weight-decay", "--warmup-epochs", "--min-lr", "--label-smoothing",
                 "--drop-path", "--workers", "--backend", "--dtype", "--seed", "--out",
                 "--resume", "--mixup", "--cutmix", "--ema-decay", "--clip-grad"):
        name = flag[1:]  # the split above ate one dash
        assert name in entries, f"{flag} missing from --help"
        assert "(default:" in entries[name], f"{flag} shows no default: {entries[name]}"
    assert entries["-lr"].endswith("(default: 0.0005)")


def test_builtin_run_writes_metrics_plot_config_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = run_train(TINY + ["--epochs", "2", "--out", str(out)], capsys)
    assert code == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    for key in ("epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5",
                "images_per_sec", "seconds"):
        assert all(key in r for r in records), key
    assert [r["step"] for r in records] == [3, 6]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 100 for r in records)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["img_size"] == 32 and config["epochs"] == 2 and config["data"] is None

    weights, meta, optimizer, _ = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == 6 and meta["epoch"] == 2 and meta["config"] == config
    assert meta["class_names"][:3] == ["disc", "ring", "square"] or len(meta["class_names"]) == 10
    assert optimizer["step"] == 6
    # the weights are an ordinary safetensors state dict with the official keys
    plain = load_file(out / "last.safetensors")
    assert "blocks.0.attn.qkv.weight" in plain and "tokens_to_token.attention1.w" in plain

    # evaluate reproduces the best epoch's validation numbers
    best = max(records, key=lambda r: r["val_top1"])
    assert evaluate.main(["--checkpoint", str(out / "best.safetensors"), "--workers", "0"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    assert result["top1"] == pytest.approx(best["val_top1"])
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def final_state(out):
    weights, meta, optimizer, ema = load_checkpoint(out / "last.safetensors")
    return weights, meta, optimizer, ema


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, capsys):
    """Mixup, cutmix, EMA, clipping, dropout and drop path on: every random number must be
    reproduced after the interruption. The resumed half also uses background workers."""
    extra = ["--epochs", "2", "--mixup", "0.8", "--cutmix", "1.0", "--ema-decay", "0.9",
             "--clip-grad", "1.0", "--drop", "0.1", "--drop-path", "0.2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_train(TINY + extra + ["--out", str(whole)], capsys)[0] == 0

    code, out = run_train(TINY + extra + ["--out", str(parts), "--stop-after", "4"], capsys)
    assert code == 130, "an interrupted run exits with 130"
    assert "continue with --resume" in out.err
    _, meta, _, _ = final_state(parts)
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 1, 4)  # mid-epoch 2

    code, _ = run_train(["--resume", str(parts / "last.safetensors"), "--workers", "2"], capsys)
    assert code == 0
    w1, m1, o1, e1 = final_state(whole)
    w2, m2, o2, e2 = final_state(parts)
    assert m2["step"] == m1["step"] == 6
    for key in w1:
        assert np.array_equal(w1[key], w2[key]), f"weights differ after resume: {key}"
    for key in e1:
        assert np.array_equal(e1[key], e2[key]), f"EMA weights differ after resume: {key}"
    for key in o1["exp_avg"]:
        assert np.array_equal(o1["exp_avg_sq"][key], o2["exp_avg_sq"][key]), key
    h1 = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(h1, h2, strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "val_top1_ema", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_resume_with_another_thread_count_says_the_masks_will_differ(tmp_path, capsys):
    """The checkpoint records how many shard threads cut the batches; resuming under another
    count works, and says that dropout masks from there on differ from the uninterrupted run's."""
    from threadpoolctl import threadpool_limits

    from t2t_ref.shards import blas_threads
    out = tmp_path / "run"
    with threadpool_limits(2):
        if blas_threads() != 2:
            pytest.skip("NumPy's BLAS cannot run 2 threads here")
        code, _ = run_train(TINY + ["--epochs", "2", "--out", str(out), "--stop-after", "2"],
                            capsys)
    assert code == 130
    assert final_state(out)[1]["shard_threads"] == 2
    with threadpool_limits(1):
        code, captured = run_train(["--resume", str(out / "last.safetensors")], capsys)
    assert code == 0
    assert "2 shard thread(s), this machine into 1" in captured.err, captured.err
    assert final_state(out)[1]["shard_threads"] == 1


def test_ctrl_c_saves_last_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "t2t_ref.train", *TINY, "--synthetic-train", "640",
            "--epochs", "50", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:  # training started
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "continue with --resume" in stderr
    _, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert meta["epoch"] < 50


def test_trains_on_an_image_folder_with_held_out_validation(tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folder(data, ["cat", "dog", "eel"], per_class=8)
    (data / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    code, captured = run_train(["--data", str(data), "--img-size", "32", "--batch-size", "8",
                                "--epochs", "1", "--workers", "0", "--val-fraction", "0.25",
                                "--out", str(out)], capsys)
    assert code == 0, captured.err
    assert captured.err.count("broken.jpg") == 2  # the warning once, and the count at the end
    assert "skipped 1 unreadable training images" in captured.err
    _, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert meta["class_names"] == ["cat", "dog", "eel"]
    assert evaluate.main(["--checkpoint", str(out / "last.safetensors"), "--data", str(data),
                          "--workers", "0"]) == 0
    assert '"images": 6' in capsys.readouterr().out  # 2 of 8 (or 9) per class held out


# ---- bad input: one line on stderr, exit code 2, no traceback ------------------------------


def assert_user_error(code, captured, *needles):
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("make, needles", [
    (lambda root: None, ["does not exist"]),
    (lambda root: root.mkdir(), ["no train/ folder"]),
    (lambda root: (root / "train").mkdir(parents=True), ["class"]),
])
def test_missing_or_empty_data_folder(tmp_path, capsys, make, needles):
    root = tmp_path / "data"
    make(root)
    code, captured = run_train(["--data", str(root), "--out", str(tmp_path / "o")], capsys)
    assert_user_error(code, captured, *needles)


def test_train_and_val_with_different_classes(tmp_path, capsys):
    write_image_folder(tmp_path / "d", ["a", "b"], split="train")
    write_image_folder(tmp_path / "d", ["a", "c"], split="val")
    code, captured = run_train(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")],
                               capsys)
    assert_user_error(code, captured, "b", "c")


def test_cupy_without_cupy_or_gpu(tmp_path, capsys):
    try:
        get_namespace("cupy")
        pytest.skip("CuPy and a GPU are present")
    except BackendError:
        pass
    code, captured = run_train(TINY + ["--backend", "cupy", "--out", str(tmp_path / "o")],
                               capsys)
    assert_user_error(code, captured, "cupy")


def test_image_size_not_divisible_by_16(tmp_path, capsys):
    code, captured = run_train(["--img-size", "50", "--out", str(tmp_path / "o")], capsys)
    assert_user_error(code, captured, "--img-size 50", "multiple of 16")


def test_resume_refuses_another_model_and_another_class_count(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    last = str(out / "last.safetensors")
    code, captured = run_train(["--resume", last, "--model", "t2t_vit_10"], capsys)
    assert_user_error(code, captured, "--model t2t_vit_10", "t2t_vit_7")
    code, captured = run_train(["--resume", last, "--synthetic-classes", "4"], capsys)
    assert_user_error(code, captured, "--synthetic-classes 4")
    # evaluating on data with other classes
    write_image_folder(tmp_path / "d", ["a", "b"], split="train")
    write_image_folder(tmp_path / "d", ["a", "b"], split="val")
    code = evaluate.main(["--checkpoint", last, "--data", str(tmp_path / "d"), "--workers", "0"])
    assert_user_error(code, capsys.readouterr(), "classes differ")


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    before = (out / "last.safetensors").read_bytes()
    code, captured = run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)
    assert_user_error(code, captured, "already holds a run", "--resume")
    assert (out / "last.safetensors").read_bytes() == before


@pytest.mark.parametrize("content, needle", [(None, "does not exist"),
                                             (b"garbage" * 10, "not a readable")])
def test_bad_checkpoint_paths(tmp_path, capsys, content, needle):
    path = tmp_path / "ckpt.safetensors"
    if content is not None:
        path.write_bytes(content)
    code, captured = run_train(["--resume", str(path)], capsys)
    assert_user_error(code, captured, needle)
    code = evaluate.main(["--checkpoint", str(path)])
    assert_user_error(code, capsys.readouterr(), needle)
