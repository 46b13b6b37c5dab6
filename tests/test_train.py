"""The training workflow end to end: outputs, exact resume, evaluation and bad input."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from reliability import tried
from t2t_ref import atomic, evaluate, train
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
                 "--resume", "--mixup", "--cutmix", "--ema-decay", "--clip-grad",
                 *OFFICIAL_VALUES, "--no-aug", "--crop-ratio", "--cooldown-epochs",
                 "--recipe"):
        name = flag[1:]  # the split above ate one dash
        assert name in entries, f"{flag} missing from --help"
        assert "(default:" in entries[name], f"{flag} shows no default: {entries[name]}"
    assert entries["-lr"].endswith("(default: 0.0005)")
    for flag, official in OFFICIAL_VALUES.items():  # timm's flags say the recipe's value
        entry = entries[flag[1:]]
        assert f"(official: {official}" in entry or f"{official}, the official" in entry, entry
    assert entries["-crop-scale"].startswith("-crop-scale MIN MAX, --scale MIN MAX")
    assert entries["-crop-ratio"].startswith("-crop-ratio MIN MAX, --ratio MIN MAX")


# timm's augmentation flags and the official recipe's value each --help entry names
OFFICIAL_VALUES = {"--hflip": "0.5", "--vflip": "0", "--crop-pct": "0.9",
                   "--crop-scale": "0.08 1.0", "--color-jitter": "0.4",
                   "--aa": "rand-m9-mstd0.5-inc1", "--reprob": "0.25", "--remode": "pixel",
                   "--recount": "1", "--train-interpolation": "random",
                   "--interpolation": "bicubic", "--drop-path": "0.1", "--mixup": "0.8",
                   "--cutmix": "1.0", "--ema-decay": "0.99996"}


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
    # the built-in shapes are drawn at the model's size and scored as drawn: no crop to report
    assert (result["crop_pct"], result["interpolation"]) == (None, None)


def test_the_run_says_where_its_time_went(tmp_path, capsys, monkeypatch):
    """Each epoch records how long the loop waited for batches, and the run's last line splits
    its time: a loader made slow on purpose (0.2 s before each training batch, 0.3 s before
    each validation batch) must show in the data wait and in the validation time, and
    nowhere else."""
    from t2t_ref.data import Loader
    make = Loader.epoch_batches
    slept = {True: 0.0, False: 0.0}  # loader.train -> seconds slept

    def slow(self, epoch, start_batch=0):
        for batch in make(self, epoch, start_batch):
            pause = 0.2 if self.train else 0.3
            time.sleep(pause)
            slept[self.train] += pause
            yield batch
    monkeypatch.setattr(Loader, "epoch_batches", slow)
    out = tmp_path / "run"
    code, printed = run_train(TINY + ["--epochs", "2", "--out", str(out)], capsys)
    assert code == 0, printed.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:  # 3 training batches an epoch: 0.6 s of waiting and the making of the
        # batches (2 validation batches, 0.6 s more, would show if counted)
        assert 0.6 <= r["data_seconds"] < 1.0, r
        assert r["data_seconds"] < r["train_seconds"] < r["seconds"], r
    assert "waiting for data" in printed.out.splitlines()[-3]  # epoch 2's line
    last = printed.out.strip().splitlines()[-1]
    numbers = re.fullmatch(r"time: ([\d.]+) s in all: ([\d.]+) s starting, ([\d.]+) s training "
                           r"\(([\d.]+) s of it waiting for data\), ([\d.]+) s validating, "
                           r"([\d.]+) s writing checkpoints and plots", last)
    assert numbers, last
    total, starting, training, data, validating, writing = map(float, numbers.groups())
    assert slept[True] == pytest.approx(1.2) and slept[False] >= 0.6, slept
    assert 1.2 <= data < 2.0 and data < training, last
    assert validating >= slept[False] - 0.1, last
    assert training + validating >= slept[True] + slept[False] - 0.1, last
    assert abs(starting + training + validating + writing - total) <= 0.25, last


def final_state(out):
    weights, meta, optimizer, ema = load_checkpoint(out / "last.safetensors")
    return weights, meta, optimizer, ema


@tried("faults", "Ctrl-C mid-epoch (with RandAugment, random erasing, flips, random "
       "interpolation, mixup, cutmix, EMA, clipping, dropout, drop path), then `--resume`",
       "exit 130 and `last` saved between two steps; the resumed run (2 worker processes) "
       "says `resuming at epoch 2 of 2, step 4` and ends bit-identical to an uninterrupted one")
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, capsys):
    """The whole augmentation recipe, mixup, cutmix, EMA, clipping, dropout and drop path on:
    every random number must be reproduced after the interruption. The resumed half uses
    background worker processes."""
    extra = ["--epochs", "2", "--mixup", "0.8", "--cutmix", "1.0", "--ema-decay", "0.9",
             "--clip-grad", "1.0", "--drop", "0.1", "--drop-path", "0.2",
             "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.5", "--recount", "2",
             "--train-interpolation", "random", "--scale", "0.5", "1", "--hflip", "0.3",
             "--vflip", "0.2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_train(TINY + extra + ["--out", str(whole)], capsys)[0] == 0

    code, out = run_train(TINY + extra + ["--out", str(parts), "--stop-after", "4"], capsys)
    assert code == 130, "an interrupted run exits with 130"
    assert "continue with --resume" in out.err
    _, meta, _, _ = final_state(parts)
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 1, 4)  # mid-epoch 2

    code, out = run_train(["--resume", str(parts / "last.safetensors"), "--workers", "2"],
                          capsys)
    assert code == 0
    assert "resuming at epoch 2 of 2, step 4 (batch 1 of 3)" in out.out
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


def test_resume_with_another_thread_count_continues_the_same_run(tmp_path, capsys):
    """Dropout is keyed by sample, not by how a batch is cut: a run stopped under 2 threads
    and resumed under 1 ends where an uninterrupted 1-thread run does (float64: up to the
    order of float additions, 1e-12 relative)."""
    from threadpoolctl import threadpool_limits

    from t2t_ref.parallel.threads import blas_threads
    args = TINY + ["--epochs", "2", "--dtype", "float64", "--drop", "0.1", "--drop-path", "0.2"]
    with threadpool_limits(1):
        code, _ = run_train(args + ["--out", str(tmp_path / "straight")], capsys)
    assert code == 0
    with threadpool_limits(2):
        if blas_threads() != 2:
            pytest.skip("NumPy's BLAS cannot run 2 threads here")
        code, _ = run_train(args + ["--out", str(tmp_path / "cut"), "--stop-after", "3"],
                            capsys)
    assert code == 130
    with threadpool_limits(1):
        code, captured = run_train(["--resume", str(tmp_path / "cut" / "last.safetensors")],
                                   capsys)
    assert code == 0, captured.err
    straight, cut = final_state(tmp_path / "straight")[0], final_state(tmp_path / "cut")[0]
    for key, value in straight.items():
        scale = max(np.max(np.abs(value)), 1e-30)
        err = np.max(np.abs(cut[key] - value)) / scale
        assert err < 1e-12, f"{key}: {err:.1e}"


@pytest.mark.parametrize("signum, name, code", [
    pytest.param(signal.SIGINT, "Ctrl-C", 130, marks=tried(
        "faults", "Ctrl-C (SIGINT) to a training process and its 2 loader workers",
        "exit 130, no traceback, `interrupted at step N by Ctrl-C: saved ...last.safetensors; "
        "continue with --resume ...`, `last` at step N; no process left behind")),
    pytest.param(signal.SIGTERM, "SIGTERM", 143, marks=tried(
        "faults", "SIGTERM (kill, docker stop, a scheduler's time limit) to every process of "
        "a training run (the process group: workers and multiprocessing's resource tracker "
        "too)", "the same as Ctrl-C, exit 143 (128 + 15); the workers ignore it")),
    pytest.param(signal.SIGUSR1, "SIGUSR1", 138, marks=tried(
        "faults", "SIGUSR1 (a scheduler's warning before a time limit) to every process of a "
        "training run", "the same, exit 138; no resource-tracker warning or traceback "
        "(the tracker blocks it)")),
])
def test_a_stop_signal_saves_last_and_exits_cleanly(tmp_path, signum, name, code):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "t2t_ref.train", *TINY, "--synthetic-train", "640",
            "--workers", "2", "--epochs", "50", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job's
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline:  # started
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.5)  # some steps into the run, with the workers started
        os.killpg(proc.pid, signum)  # every process of the run, as a terminal or a scheduler
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "resource_tracker" not in stderr, stderr
    said = re.search(rf"interrupted at step (\d+) by {name}: saved (\S+); continue with "
                     rf"--resume (\S+)\n", stderr)
    assert said, stderr
    assert said[2] == said[3] == str(out / "last.safetensors")
    _, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == int(said[1]) and 0 < meta["step"] < 50 * 20, meta
    deadline = time.time() + 10  # the workers and the resource tracker end with the run
    while time.time() < deadline and group_alive(proc.pid):
        time.sleep(0.1)
    assert not group_alive(proc.pid), "processes of the run were left behind"


@pytest.mark.parametrize("tool", [
    pytest.param("evaluate", marks=tried(
        "evaluation", "Ctrl-C during `evaluate` (2 loader workers)", "exit 130 and one line, "
        "`interrupted (Ctrl-C)`, no traceback; no process left behind")),
    pytest.param("train", marks=tried(
        "faults", "Ctrl-C while `train` is still starting (making its data)", "exit 130 and "
        "`interrupted (Ctrl-C)`, no traceback (nothing to save yet)")),
])
def test_ctrl_c_ends_a_tool_with_one_line(tmp_path, capsys, tool):
    if tool == "evaluate":
        out = tmp_path / "run"
        assert run_train(TINY + ["--epochs", "1", "--synthetic-val", "1500", "--out",
                                 str(out)], capsys)[0] == 0
        args = ["-m", "t2t_ref.evaluate", "--checkpoint", str(out / "last.safetensors"),
                "--batch-size", "1", "--workers", "2"]  # 1500 steps: Ctrl-C comes first
        wait = 3.0
    else:
        args = ["-m", "t2t_ref.train", *TINY, "--synthetic-train", "200000", "--out",
                str(tmp_path / "big")]  # 200,000 images to draw (5 s): still starting
        wait = 2.0
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(wait)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches every process
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().endswith("\ninterrupted (Ctrl-C)"), stderr[-500:]
    deadline = time.time() + 10
    while time.time() < deadline and group_alive(proc.pid):
        time.sleep(0.1)
    assert not group_alive(proc.pid), "processes of the tool were left behind"
    if tool == "train":
        assert not (tmp_path / "big" / "last.safetensors").exists()


@tried("faults", "a stop signal (SIGUSR1) during the EMA model's validation at an epoch's "
       "end", "validation stops at once (not after the whole set), exit 138, `last` holds the "
       "epoch's last step with the model's own weights (not the EMA's it was being scored "
       "with); the resumed run validates that epoch again and ends bit-identical to an "
       "uninterrupted run")
def test_a_stop_during_validation_saves_at_once_and_resumes_exactly(tmp_path, capsys,
                                                                     monkeypatch):
    args = TINY + ["--epochs", "2", "--drop", "0.1", "--ema-decay", "0.9"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_train(args + ["--out", str(whole)], capsys)[0] == 0
    real_evaluate, seen = train.evaluate, []

    def signalled(model, loader, desc="eval", **kwargs):  # SIGUSR1 as EMA validation begins
        seen.append(desc)
        if desc == "validation (EMA)":
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_evaluate(model, loader, desc=desc, **kwargs)

    monkeypatch.setattr(train, "evaluate", signalled)
    code, captured = run_train(args + ["--out", str(cut)], capsys)
    assert code == 138, captured.err
    assert seen == ["validation", "validation (EMA)"]
    assert "interrupted at step 3 by SIGUSR1" in captured.err
    _, meta, _, _ = load_checkpoint(cut / "last.safetensors")
    assert (meta["epoch"], meta["batch"], meta["step"]) == (0, 3, 3)
    assert not (cut / "metrics.jsonl").exists()  # the epoch was not recorded
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    code, captured = run_train(["--resume", str(cut / "last.safetensors")], capsys)
    assert code == 0, captured.err
    w1, m1, _, e1 = final_state(whole)
    w2, m2, _, e2 = final_state(cut)
    for key in w1:
        assert np.array_equal(w1[key], w2[key]), f"weights differ after resume: {key}"
    for key in e1:
        assert np.array_equal(e1[key], e2[key]), f"EMA weights differ after resume: {key}"
    h1 = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(h1, h2, strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "val_top1_ema"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@tried("evaluation", "`evaluate --data` on a folder whose class folders are the checkpoint's "
       "classes in another order (a model of the built-in shapes, whose classes are not in "
       "sorted order), or other classes", "the same names: matched by name, and the scores "
       "equal those on the same images in the model's order; others: exit 2, `error: the "
       "data's 3 classes differ from the checkpoint's 10 (first differences: 'a', 'b', 'c', "
       "'disc', 'hbars' and 8 more): evaluate on the dataset the model was trained on`")
def test_evaluate_matches_class_folders_to_the_model_by_name(tmp_path, capsys):
    from t2t_ref.data import make_shapes_splits
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    checkpoint = ["--checkpoint", str(out / "last.safetensors"), "--workers", "0"]
    _, (images, labels), classes = make_shapes_splits(96, 40, 32, 0)  # TINY's validation set
    assert list(classes) != sorted(classes)  # the case: folder order is not the model's
    data = tmp_path / "shapes"
    for split in ("train", "val"):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = data / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")

    def scored(*extra):
        code = evaluate.main(checkpoint + list(extra))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out.strip().splitlines()[-1])

    capsys.readouterr()
    drawn = scored()  # the built-in validation set itself, in the model's class order
    folders = scored("--data", str(data), "--crop-pct", "1")  # the same pixels, from files
    assert folders["images"] == drawn["images"] == 40
    for key in ("top1", "top5"):
        assert folders[key] == drawn[key], key
    assert folders["loss"] == pytest.approx(drawn["loss"], rel=1e-6)
    code = evaluate.main(["--weights", str(out / "last.safetensors"), "--model", "t2t_vit_7",
                          "--img-size", "32", "--data", str(data), "--crop-pct", "1",
                          "--workers", "0", "--no-ema"])  # the weights' path: val/ alone
    captured = capsys.readouterr()
    assert code == 0, captured.err
    weights = json.loads(captured.out.strip().splitlines()[-1])
    assert (weights["top1"], weights["top5"]) == (drawn["top1"], drawn["top5"])

    other = tmp_path / "other"
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            write_image_folder(other, [name], per_class=2, split=split)
    assert evaluate.main(checkpoint + ["--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: the data's 3 classes differ from the checkpoint's 10 (first "
                   "differences: 'a', 'b', 'c', 'disc', 'hbars' and 8 more): evaluate on the "
                   "dataset the model was trained on"), err


@tried("checkpoints", "`--resume runs/x` (the run's folder) of a run trained on an image "
       "folder, without --data; then with that folder moved; a folder without a checkpoint; "
       "`evaluate --checkpoint runs/x`; then an image added to the data", "continues from "
       "runs/x/last.safetensors on the data it was trained on; moved: exit 2, `error: the "
       "checkpoint was trained on D, which is not there (moved, or another machine): give its "
       "place with --data`; `--resume D is a folder without a last.safetensors: ...`; "
       "`checkpoint runs/x is a folder: pass a checkpoint file, e.g. runs/x/best.safetensors "
       "or last.safetensors`; the added image: `note: the data is not what the checkpoint was "
       "trained on (8+4 images, ... then, 9+4 images, ... now): the run goes on, but not as it "
       "would have ...`")
def test_resume_takes_a_run_folder_and_its_data_where_they_are(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    write_image_folder(data, ["cat", "dog"], per_class=6)
    args = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--val-fraction", "0.34"]
    code, captured = run_train(["--data", str(data), *args, "--epochs", "1", "--out", str(out)],
                               capsys)
    assert code == 0, captured.err
    code, captured = run_train(["--resume", str(out), "--epochs", "2"], capsys)
    assert code == 0, captured.err
    assert "resuming at epoch 2 of 2" in captured.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    _, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert meta["config"]["data"] == str(data)

    data.rename(tmp_path / "moved")
    code, captured = run_train(["--resume", str(out), "--epochs", "3"], capsys)
    assert code == 2
    assert captured.err.strip() == (f"error: the checkpoint was trained on {data}, which is not "
                                    "there (moved, or another machine): give its place with "
                                    "--data")
    code, captured = run_train(["--resume", str(out), "--epochs", "3", "--data",
                                str(tmp_path / "moved")], capsys)
    assert code == 0, captured.err
    code, captured = run_train(["--resume", str(tmp_path / "moved")], capsys)
    assert code == 2
    assert captured.err.strip() == (f"error: --resume {tmp_path / 'moved'} is a folder without "
                                    "a last.safetensors: pass the checkpoint of the run to "
                                    "continue")
    assert evaluate.main(["--checkpoint", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: checkpoint {out} is a folder: pass a checkpoint file, e.g. "
        f"{out / 'best.safetensors'} or last.safetensors")
    # the moved folder holds what the run was trained on: nothing was said; one image more is
    assert "note: the data" not in captured.err
    write_image_folder(tmp_path / "moved", ["cat"], per_class=7, seed=9)  # a seventh cat
    code, captured = run_train(["--resume", str(out), "--epochs", "4", "--data",
                                str(tmp_path / "moved")], capsys)
    assert code == 0, captured.err
    notes = [line for line in captured.err.splitlines() if line.startswith("note: the data")]
    assert len(notes) == 1 and re.fullmatch(
        r"note: the data is not what the checkpoint was trained on \(8\+4 images, \w+ then, "
        r"9\+4 images, \w+ now\): the run goes on, but not as it would have \(other epoch "
        r"orders, other samples\)", notes[0]), notes


@tried("data", "a training run's default --workers where /dev/shm is small (Docker's 64 MB "
       "default)", "as many workers as it has room for, and one line saying so: `note: "
       "/dev/shm has N MB free, room for the batches in flight of 2 loader workers, not 4: "
       "using 2 (give the container more, docker run --shm-size=2g, or set --workers)`")
def test_default_workers_fit_a_small_dev_shm(tmp_path, capsys, monkeypatch):
    from t2t_ref.data import workers
    batch = 32 * 3 * 32 * 32  # TINY's
    monkeypatch.setattr(train, "default_workers", lambda ranks_on_node=1: 4)  # as if 5 cores
    monkeypatch.setattr(workers, "shared_memory_free", lambda where="/dev/shm": 5 * batch)
    args = [a for a in TINY if a not in ("--workers", "0")]
    code, captured = run_train(args + ["--epochs", "1", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, captured.err
    assert "not 4: using 2 (give the container more, docker run --shm-size=2g, or set " \
        "--workers)" in captured.err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["workers"] == 2


@tried("data", "an unreadable image in the training set",
       "skipped; one warning line of its own (not inside the progress bar's), and "
       "`skipped 1 unreadable training image` at the end")
def test_trains_on_an_image_folder_with_held_out_validation(tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folder(data, ["cat", "dog", "eel"], per_class=8)
    (data / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    code, captured = run_train(["--data", str(data), "--img-size", "32", "--batch-size", "8",
                                "--epochs", "1", "--workers", "0", "--val-fraction", "0.25",
                                "--out", str(out)], capsys)
    assert code == 0, captured.err
    assert captured.err.count("warning: skipping unreadable image") == 1
    # on a line of its own, not written into the progress bar's
    segments = re.split(r"[\r\n]", captured.err)
    assert any(s.startswith("warning: skipping unreadable image") for s in segments), captured.err
    assert "skipped 1 unreadable training image\n" in captured.err
    _, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert meta["class_names"] == ["cat", "dog", "eel"]
    # 3 classes: top-2 beside top-1, labelled so (top-5 of 3 classes is always 100%)
    record = json.loads((out / "metrics.jsonl").read_text())
    assert "val_top2" in record and "val_top5" not in record
    assert "top-2 " in captured.out and "top-5" not in captured.out
    assert "of 3 classes" in captured.out
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
    pytest.param(lambda root: None, ["does not exist"], marks=tried(
        "data", "`--data` a folder that does not exist", "exit 2: `error: dataset folder ... "
        "does not exist: check the path ...`")),
    pytest.param(lambda root: root.mkdir(), ["no train/ folder"], marks=tried(
        "data", "`--data` a folder without train/", "exit 2: `error: no train/ folder in ...`")),
    pytest.param(lambda root: (root / "train").mkdir(parents=True), ["class"], marks=tried(
        "data", "`--data` with an empty train/", "exit 2: `error: no class folders in ...`")),
])
def test_missing_or_empty_data_folder(tmp_path, capsys, make, needles):
    root = tmp_path / "data"
    make(root)
    code, captured = run_train(["--data", str(root), "--out", str(tmp_path / "o")], capsys)
    assert_user_error(code, captured, *needles)


@tried("data", "train/ and val/ with different class folders",
       "exit 2, naming the folders only in one of them")
def test_train_and_val_with_different_classes(tmp_path, capsys):
    write_image_folder(tmp_path / "d", ["a", "b"], split="train")
    write_image_folder(tmp_path / "d", ["a", "c"], split="val")
    code, captured = run_train(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")],
                               capsys)
    assert_user_error(code, captured, "b", "c")


@tried("command line", "`--backend cupy` without CuPy or a GPU", "exit 2: `error: backend "
       "'cupy' needs ...`")
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


@tried("checkpoints", "`--resume` with `--model` or `--synthetic-classes` other than the "
       "checkpoint's", "exit 2: `error: a resumed run continues with its checkpoint's settings, "
       "but --model t2t_vit_10 (checkpoint: t2t_vit_7) differ: ...`")
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


@tried("checkpoints", "a new run into an `--out` that holds one", "exit 2: `error: ... already "
       "holds a run: continue it with --resume ...`; nothing overwritten")
def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    before = (out / "last.safetensors").read_bytes()
    code, captured = run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)
    assert_user_error(code, captured, "already holds a run", "--resume")
    assert (out / "last.safetensors").read_bytes() == before


@pytest.mark.parametrize("content, needle", [
    pytest.param(None, "does not exist", marks=tried(
        "checkpoints", "`--resume` / `evaluate --checkpoint` a missing file",
        "exit 2: `error: checkpoint ... does not exist: check the path`")),
    pytest.param(b"garbage" * 10, "not a readable", marks=tried(
        "checkpoints", "`--resume` / `evaluate --checkpoint` a file of garbage",
        "exit 2: `error: ... is not a readable safetensors checkpoint (...)`"))])
def test_bad_checkpoint_paths(tmp_path, capsys, content, needle):
    path = tmp_path / "ckpt.safetensors"
    if content is not None:
        path.write_bytes(content)
    code, captured = run_train(["--resume", str(path)], capsys)
    assert_user_error(code, captured, needle)
    code = evaluate.main(["--checkpoint", str(path)])
    assert_user_error(code, capsys.readouterr(), needle)


@pytest.mark.parametrize("damage", [
    pytest.param("flip", marks=tried(
        "checkpoints", "`--resume` / `evaluate --checkpoint` a checkpoint with one byte of its "
        "weights changed (a bad copy or disk; header intact)", "exit 2: `error: ... is "
        "damaged: its tensor ... is not what was written (a bad copy or disk): use another "
        "checkpoint ...`, by the CRC-32 each tensor is written with (it used to train on, or "
        "score 0% and exit 0)")),
    pytest.param("nan", marks=tried(
        "checkpoints", "a checkpoint written before the checksums, with NaN bytes in a tensor",
        "exit 2: `error: ... is damaged: ...` (t2t_ref never writes NaN or inf)"))])
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, capsys, damage):
    import struct
    from t2t_ref.checkpoint import CRC_KEY, META_KEY
    from safetensors import safe_open
    from safetensors.numpy import load_file, save
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    path = out / "last.safetensors"
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:header_end])
    key = "blocks.0.attn.qkv.weight"
    start, _ = header[key]["data_offsets"]
    if damage == "flip":
        data[header_end + start + 5] ^= 0x10  # one bit of one weight
        path.write_bytes(bytes(data))
    else:  # an older file (no checksums) whose tensor reads NaN
        tensors = load_file(path)
        tensors[key][0, 0] = np.nan
        path.write_bytes(save(tensors, {META_KEY: header["__metadata__"][META_KEY]}))
        with safe_open(str(path), framework="numpy") as f:
            assert CRC_KEY not in f.metadata()
    code, captured = run_train(["--resume", str(path), "--epochs", "2"], capsys)
    assert_user_error(code, captured, f"{path} is damaged: its tensor {key} is not what was "
                      "written")
    code = evaluate.main(["--checkpoint", str(path)])
    assert_user_error(code, capsys.readouterr(), f"{path} is damaged")


# ---- issue 11: flags that cannot work, paths that cannot be written, runs that diverge ------


@tried("checkpoints", "`--resume` with a flag written out at its default value that the "
       "checkpoint contradicts (`--model t2t_vit_7` on a t2t_vit_10 run, `--lr 0.0005` on a "
       "1e-3 run)", "exit 2, naming the flag (it used to be ignored: it equals the default)")
def test_resume_refuses_a_contradicting_flag_even_at_its_default(tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = run_train(TINY + ["--model", "t2t_vit_10", "--lr", "1e-3", "--epochs", "1",
                                "--max-nonfinite-steps", "5", "--out", str(out),
                                "--stop-after", "1"], capsys)
    assert code == 130
    last = str(out / "last.safetensors")
    code, captured = run_train(["--resume", last, "--model", "t2t_vit_7"], capsys)
    assert_user_error(code, captured, "--model t2t_vit_7 (checkpoint: t2t_vit_10)")
    code, captured = run_train(["--resume", last, "--lr", "0.0005"], capsys)
    assert_user_error(code, captured, "--lr 0.0005 (checkpoint: 0.001)")
    code, captured = run_train(["--resume", last, "--lr", "1e-3", "--workers", "1"], capsys)
    assert code == 0, captured.err  # agreeing flags, and where-the-run-is flags, are fine
    assert final_state(out)[1]["config"]["max_nonfinite_steps"] == 5  # kept, as not given


@tried("checkpoints", "`--resume` of a finished run, and `--epochs N` with N not above the "
       "epochs done", "exit 2: `error: the run has trained 1 of 1 epoch already: to train on, "
       "resume with --epochs N, N more than 1`")
def test_resume_of_a_finished_run_says_how_to_extend_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    code, captured = run_train(["--resume", str(out / "last.safetensors")], capsys)
    assert_user_error(code, captured, "has trained 1 of 1 epoch already", "--epochs N")
    code, captured = run_train(["--resume", str(out / "last.safetensors"), "--epochs", "1"],
                               capsys)
    assert_user_error(code, captured, "has trained 1 of 1 epoch already")
    code, captured = run_train(TINY + ["--epochs", "2", "--out", str(tmp_path / "two")], capsys)
    assert code == 0, captured.err
    code, captured = run_train(["--resume", str(tmp_path / "two"), "--epochs", "1"], capsys)
    assert_user_error(code, captured, "has trained 2 epochs, more than --epochs 1, already")


def test_a_run_is_not_shortened_below_its_warmup(tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = run_train(TINY + ["--epochs", "4", "--warmup-epochs", "3", "--out", str(out),
                                "--stop-after", "4"], capsys)
    assert code == 130
    code, captured = run_train(["--resume", str(out / "last.safetensors"), "--epochs", "2"],
                               capsys)
    assert_user_error(code, captured, "--epochs 2 is shorter than the run's warmup (3 epochs)")


@tried("checkpoints", "`--resume last --epochs 3` on a finished 2-epoch run",
       "trains on to epoch 3 on the cosine schedule of 3 epochs from the current step, and "
       "prints the learning rate's jump; `--epochs 3 --lr 1e-3` is still refused")
def test_a_finished_run_is_extended_by_more_epochs(tmp_path, capsys):
    from t2t_ref.schedule import CosineSchedule
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "2", "--out", str(out)], capsys)[0] == 0
    last = str(out / "last.safetensors")
    code, captured = run_train(["--resume", last, "--epochs", "3", "--lr", "1e-3"], capsys)
    assert_user_error(code, captured, "--lr 0.001 (checkpoint: 0.0005)")

    code, captured = run_train(["--resume", last, "--epochs", "3"], capsys)
    assert code == 0, captured.err
    # TINY: 3 steps per epoch, warmup 0.5 epochs (2 steps), min lr 1e-5
    old, new = (CosineSchedule(5e-4, total, warmup_steps=2, warmup_lr=1e-6, min_lr=1e-5)
                for total in (6, 9))
    assert (f"extending the run from 2 to 3 epochs: the cosine schedule now ends at step 9, "
            f"and the learning rate at step 6 goes from {old(6):.4g} to {new(6):.4g}"
            in captured.out), captured.out
    _, meta, optimizer, _ = load_checkpoint(out / "last.safetensors")
    assert (meta["epoch"], meta["step"], meta["config"]["epochs"]) == (3, 9, 3)
    assert optimizer["step"] == 9
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[2]["lr"] == pytest.approx(new(8))  # the new schedule's last step


@tried("command line", "`--out` an existing file, a path under a file, a folder that cannot be "
       "written", "exit 2 before any training: `error: --out X is a file: choose a folder path`, "
       "`... lies under F, which is a file ...`, `... cannot write in X (Permission denied) ...`")
def test_out_paths_that_cannot_hold_a_run(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, captured = run_train(TINY + ["--out", str(a_file)], capsys)
    assert_user_error(code, captured, f"--out {a_file} is a file: choose a folder path")
    code, captured = run_train(TINY + ["--out", str(a_file / "run")], capsys)
    assert_user_error(code, captured, f"lies under {a_file}, which is a file")

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: make the probe fail as it would for a user
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(atomic.tempfile, "TemporaryFile", refuse)
    code, captured = run_train(TINY + ["--out", str(locked / "run")], capsys)
    assert_user_error(code, captured, f"cannot write in {locked} (Permission denied)")
    assert not (locked / "run").exists()


@pytest.mark.parametrize("flag, says", [
    pytest.param("--out", "give a folder", marks=tried(
        "command line", "`train --out \"\"` (an unset variable in a script)",
        "exit 2: `error: argument --out: an empty path: give a folder`")),
    pytest.param("--init-from", "give a checkpoint file", marks=tried(
        "command line", "`train --init-from \"\"`",
        "exit 2: `error: argument --init-from: an empty path: give a checkpoint file` "
        "(it used to be ignored: the run started from random weights)")),
    pytest.param("--resume", "give a checkpoint or a run's folder"),
    pytest.param("--data", "give a dataset folder")])
def test_an_empty_path_is_refused(tmp_path, capsys, flag, says):
    with pytest.raises(SystemExit) as exited:  # argparse's own exit, as for other bad flags
        train.main(TINY + ["--out", str(tmp_path / "run"), flag, ""])
    assert_user_error(exited.value.code, capsys.readouterr(),
                      f"argument {flag}: an empty path: {says}")
    assert not (tmp_path / "run").exists()


@tried("checkpoints", "`--resume best.safetensors` into its run folder, whose last.safetensors "
       "is further on", "exit 2: `error: ... is at epoch 1 (step 3), but .../last.safetensors is "
       "further on (epoch 2, step 6); resuming into that folder would write over it: ...`; "
       "last untouched; `--out` a new folder branches off")
def test_resuming_an_older_checkpoint_does_not_write_over_a_newer_last(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    older = tmp_path / "epoch1.safetensors"
    older.write_bytes((out / "last.safetensors").read_bytes())
    assert run_train(["--resume", str(out), "--epochs", "2"], capsys)[0] == 0
    newer = (out / "last.safetensors").read_bytes()
    code, captured = run_train(["--resume", str(older), "--epochs", "2", "--out", str(out)],
                               capsys)
    assert_user_error(code, captured, f"{older} is at epoch 1 (step 3), but",
                      "is further on (epoch 2, step 6)", "give --out a new folder")
    assert (out / "last.safetensors").read_bytes() == newer
    code, captured = run_train(["--resume", str(older), "--epochs", "2", "--out",
                                str(tmp_path / "branch")], capsys)
    assert code == 0, captured.err
    assert (out / "last.safetensors").read_bytes() == newer


@tried("checkpoints", "`--resume --data` a folder whose class folders are not the run's "
       "(one renamed)", "exit 2: `error: the data's classes differ from the checkpoint's (2 vs "
       "2; in one and not the other: 'b', 'c'): resume on the dataset the run was started with`")
def test_resume_on_other_classes_names_them(tmp_path, capsys):
    for name, classes in (("d", ["a", "b"]), ("renamed", ["a", "c"])):
        write_image_folder(tmp_path / name, classes, per_class=8)
        write_image_folder(tmp_path / name, classes, per_class=2, split="val")
    out = tmp_path / "run"
    code, captured = run_train(["--data", str(tmp_path / "d"), "--out", str(out), "--img-size",
                                "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
                                "--warmup-epochs", "0"], capsys)
    assert code == 0, captured.err
    code, captured = run_train(["--resume", str(out), "--data", str(tmp_path / "renamed"),
                                "--epochs", "2"], capsys)
    assert_user_error(code, captured, "(2 vs 2; in one and not the other: 'b', 'c')")


@tried("checkpoints", "a second training process on a run folder another one is writing "
       "(a requeued job while the first still runs)", "exit 2: `error: ... is in use by another "
       "training process: wait for it to end, or choose another --out`; nothing written")
def test_a_run_folder_in_use_is_refused(tmp_path, capsys):
    import fcntl
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = os.open(out, os.O_RDONLY)  # what the other process's lock_run_folder holds
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, captured = run_train(["--resume", str(out), "--epochs", "2"], capsys)
        assert_user_error(code, captured, f"{out} is in use by another training process")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        os.close(other)
    code, captured = run_train(["--resume", str(out), "--epochs", "2"], capsys)
    assert code == 0, captured.err  # free again: the same command goes on
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], \
        "the lock leaves no file behind"


def test_a_file_system_without_locks_still_trains(tmp_path, capsys, monkeypatch):
    """Where the file system has no flock (Lustre mounted without -o flock says ENOSYS; some
    network file systems ENOLCK), the run goes on unlocked rather than call its own folder in
    use."""
    import errno
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    code, captured = run_train(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, captured.err
    assert (tmp_path / "run" / "last.safetensors").exists()


def test_far_more_workers_than_cores_get_a_note(tmp_path, capsys, monkeypatch):
    """--workers far above the cores (64 on 2 made the batches wait 23% of the time, not 3%):
    a note says so and names the default; the run goes on."""
    monkeypatch.setattr(train, "default_workers", lambda ranks=1: 1)  # as on 2 cores
    code, captured = run_train(TINY[:-4] + ["--workers", "5", "--warmup-epochs", "0.5",
                                            "--epochs", "1", "--out", str(tmp_path / "r")],
                               capsys)
    assert code == 0, captured.err
    assert "note: --workers 5 is many more than the 2 cores this process has" in captured.err
    assert "the default is 1" in captured.err
    code, captured = run_train(TINY + ["--epochs", "1", "--out", str(tmp_path / "s")], capsys)
    assert code == 0 and "many more than" not in captured.err  # --workers 0: no note


@tried("data", "a dataset folder with fewer training images than one batch",
       "exit 2: `error: ... has 6 training images, no whole batch of --batch-size 64 ...`")
def test_a_dataset_smaller_than_a_batch(tmp_path, capsys):
    write_image_folder(tmp_path / "d", ["a", "b"], per_class=3)
    write_image_folder(tmp_path / "d", ["a", "b"], per_class=1, split="val")
    code, captured = run_train(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                                "--workers", "0"], capsys)
    assert_user_error(code, captured, "has 6 training images, no whole batch of --batch-size 64")


@tried("faults", "leftover temporary files of a checkpoint write killed mid-way (ours, and "
       "the safetensors library's own)", "removed when the run starts again in that folder, "
       "with one line saying so")
def test_temporary_files_of_killed_writes_are_removed_on_the_next_start(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    leftovers = [".tmp-t2t_ref-999-0a0b0c0d-last.safetensors", ".tmp-abcd1234.safetensors",
                 ".tmpXy12Z9"]
    for name in leftovers:
        (out / name).write_bytes(b"\0" * 100)
    code, captured = run_train(["--resume", str(out / "last.safetensors"), "--epochs", "2"],
                               capsys)
    assert code == 0, captured.err
    assert f"removed 3 temporary files that an interrupted write left in {out}" in captured.err
    assert not any(name.startswith(".tmp") for name in os.listdir(out))


@tried("faults", "kill -9 of a training process at a random moment, then `--resume`",
       "the run goes on from the last epoch's checkpoint and ends bit-identical to an "
       "uninterrupted run")
def test_kill_9_then_resume_ends_with_identical_weights(tmp_path, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = TINY + ["--epochs", "3", "--drop", "0.1"]
    assert run_train(args + ["--out", str(whole)], capsys)[0] == 0
    proc = subprocess.Popen([sys.executable, "-m", "t2t_ref.train", *args, "--out",
                             str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "metrics.jsonl").exists() and time.time() < deadline:  # an epoch done
        time.sleep(0.02)
    time.sleep(float(np.random.default_rng().uniform(0, 0.5)))  # somewhere in epoch 2 or 3
    proc.kill()
    proc.wait()
    if not (killed / "last.safetensors").exists():
        pytest.fail("the process was killed before its first checkpoint")
    code, captured = run_train(["--resume", str(killed / "last.safetensors")], capsys)
    if code == 2 and "already" in captured.err:
        pytest.skip("the kill came after the run had finished")
    assert code == 0, captured.err
    w1, w2 = final_state(whole)[0], final_state(killed)[0]
    for key in w1:
        assert np.array_equal(w1[key], w2[key]), key


@tried("faults", "a checkpoint that cannot be written (the disk full; here the file-size "
       "limit, `ulimit -f`, makes the kernel refuse the write) in a resumed run",
       "exit 2, no traceback: `error: cannot write runs/x/last.safetensors (File too large); "
       "runs/x/last.safetensors still holds step 3: free space (or fix what the error names), "
       "then continue with --resume runs/x/last.safetensors`; that checkpoint's bytes "
       "unchanged, no temporary file left")
def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_the_last_one_intact(
        tmp_path, capsys):
    import resource
    out = tmp_path / "run"
    assert run_train(TINY + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    before = (out / "last.safetensors").read_bytes()
    assert len(before) > 2 ** 20  # the limit below stops its next write

    def limit_file_size():  # in the child: writes past 1 MB fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))

    last = out / "last.safetensors"
    job = subprocess.run([sys.executable, "-m", "t2t_ref.train", "--resume", str(last),
                          "--epochs", "2"], capture_output=True, text=True, timeout=300,
                         preexec_fn=limit_file_size)
    assert job.returncode == 2, job.stderr
    assert "Traceback" not in job.stderr, job.stderr
    errors = [line.split("\r")[-1] for line in job.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: cannot write {last} (File too large); {last} still holds step 3: "
                      f"free space (or fix what the error names), then continue with --resume "
                      f"{last}"], job.stderr
    assert last.read_bytes() == before
    assert sorted(os.listdir(out)) == ["best.safetensors", "config.json", "curves.png",
                                       "last.safetensors", "metrics.jsonl"]


@tried("faults", "kill -9 of a training process with 2 loader worker processes",
       "the workers notice within seconds and exit; multiprocessing's resource tracker then "
       "unlinks the run's shared memory (nothing of the run is left in /dev/shm or the "
       "process table)")
def test_loader_workers_end_with_a_killed_run_and_free_its_shared_memory(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "t2t_ref.train", *TINY, "--synthetic-train",
                             "640", "--workers", "2", "--epochs", "50", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        segments = set()
        while not segments and time.time() < deadline:  # the workers hold the batch ring
            assert proc.poll() is None, "the run ended early"
            for pid in group_members(proc.pid):
                segments |= mapped_shared_memory(pid)
            time.sleep(0.1)
        assert segments, "no worker mapped shared memory in time"
        proc.kill()
        proc.wait()
        deadline = time.time() + 15  # the workers check once a second
        while time.time() < deadline and (group_alive(proc.pid) or
                                          any(os.path.exists(s) for s in segments)):
            time.sleep(0.1)
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not group_alive(proc.pid), "worker processes outlived the killed run"
    assert not any(os.path.exists(s) for s in segments), f"{segments} left in /dev/shm"


def group_members(pgid):
    """The process ids of process group pgid, from /proc."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    return members


def mapped_shared_memory(pid):
    """The /dev/shm files that process pid has mapped."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split()[-1] for line in f if "/dev/shm/" in line}
    except OSError:
        return set()


def nan_from_step(monkeypatch, first, last=None):
    """Training's loss (and gradient) become NaN at steps first..last: a run diverging there."""
    from t2t_ref.ops.cross_entropy import cross_entropy
    steps = iter(range(10 ** 6))

    def diverging(logits, targets, smoothing=0.0):
        loss, dlogits = cross_entropy(logits, targets, smoothing)
        step = next(steps)
        if first <= step and (last is None or step <= last):
            return loss * float("nan"), dlogits * float("nan")
        return loss, dlogits

    monkeypatch.setattr(train, "cross_entropy", diverging)


@tried("faults", "`--lr 1e30`: the loss turns NaN within the first steps",
       "exit 3: `error: training diverged: 3 steps in a row up to step S had a NaN or inf loss "
       "or gradient norm (skipped, not applied); the last finite loss was L at step S'; the "
       "learning rate at step S was R: lower --lr ...`; no NumPy warnings; no checkpoint")
def test_a_learning_rate_far_too_high_stops_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = run_train(TINY + ["--lr", "1e30", "--synthetic-train", "320", "--out",
                                       str(out)], capsys)  # 10 steps per epoch
    assert code == 3
    lines = [line for line in captured.err.splitlines() if line.strip()
             and "it/s" not in line and "s/it" not in line]  # the progress bar's
    assert len(lines) == 1 and lines[0].startswith("error: training diverged: 3 steps in a row "
                                                   "up to step "), captured.err
    for needle in ("the last finite loss was", "the learning rate at step", "lower --lr",
                   "no checkpoint was written"):
        assert needle in lines[0], lines[0]
    assert "Warning" not in captured.err
    assert not (out / "last.safetensors").exists() and not (out / "best.safetensors").exists()


@tried("faults", "weights that blow up but stay finite (`--lr 1e30`, 3 steps per epoch): the "
       "validation outputs overflow", "`last` written (finite weights), `best` not: only a "
       "model with all outputs finite and a strictly better score replaces it; then exit 3")
def test_best_is_never_a_model_with_non_finite_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = run_train(TINY + ["--lr", "1e30", "--epochs", "2", "--out", str(out)],
                               capsys)
    assert code == 3, captured.err
    assert (out / "last.safetensors").exists() and not (out / "best.safetensors").exists()
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["val_nonfinite"] == 40 and record["val_top1"] == 0.0
    assert "40 validation images with non-finite outputs (counted wrong)" in captured.out
    assert f"{out / 'last.safetensors'} is as epoch 1 left it" in captured.err


@tried("faults", "a run that diverges after a good epoch", "exit 3 at the next read of the "
       "counters; `last` and `best` stay those of the good epoch (finite, not overwritten)")
def test_divergence_after_a_good_epoch_keeps_its_checkpoints(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_from_step(monkeypatch, 3)  # epoch 2 (steps 3, 4, 5) diverges
    code, captured = run_train(TINY + ["--epochs", "2", "--out", str(out)], capsys)
    assert code == 3, captured.err
    assert "up to step 5" in captured.err and "the last finite loss was" in captured.err
    assert f"{out / 'last.safetensors'} and {out / 'best.safetensors'} are as epoch 1 left " \
           "them" in captured.err
    for name in ("last", "best"):
        weights, meta, optimizer, _ = load_checkpoint(out / f"{name}.safetensors")
        assert (meta["epoch"], meta["step"]) == (1, 3), name
        assert all(np.isfinite(w).all() for w in weights.values()), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@tried("faults", "one NaN step in an otherwise healthy run",
       "skipped (weights, moments and EMA untouched) and counted: `1 non-finite step skipped` "
       "in the epoch's line and `nonfinite_steps` in metrics.jsonl; the run goes on")
def test_an_isolated_non_finite_step_is_skipped_and_counted(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_from_step(monkeypatch, 1, last=1)
    code, captured = run_train(TINY + ["--epochs", "2", "--ema-decay", "0.9", "--out", str(out)],
                               capsys)
    assert code == 0, captured.err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records] == [1, 0]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    assert "1 non-finite step skipped" in captured.out
    weights, meta, optimizer, ema = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == 6 and optimizer["step"] == 5  # 6 steps, 5 updates
    assert all(np.isfinite(w).all() for w in list(weights.values()) + list(ema.values()))


@tried("faults", "an epoch whose every step was non-finite (below --max-nonfinite-steps)",
       "its train_loss is `null` in metrics.jsonl (standard JSON, not Python's NaN)")
def test_metrics_stay_standard_json_when_an_epoch_has_no_finite_loss(tmp_path, capsys,
                                                                    monkeypatch):
    out = tmp_path / "run"
    nan_from_step(monkeypatch, 0, last=2)  # all three steps of the one epoch
    code, captured = run_train(TINY + ["--epochs", "1", "--max-nonfinite-steps", "4",
                                       "--out", str(out)], capsys)
    assert code == 0, captured.err

    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")

    record = json.loads((out / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record["train_loss"] is None and record["nonfinite_steps"] == 3
    assert math.isfinite(record["val_loss"])


def test_the_non_finite_check_reads_the_device_once_per_log_interval(tmp_path, capsys,
                                                                     monkeypatch):
    """20 steps: the counters come to the host at steps 10 and 20 and once at the epoch's end,
    never per step."""
    from t2t_ref.guard import StepMonitor
    reads = []
    read = StepMonitor.read
    monkeypatch.setattr(StepMonitor, "read",
                        lambda self, **kwargs: reads.append(1) or read(self, **kwargs))
    code, _ = run_train(TINY + ["--synthetic-train", "640", "--epochs", "1", "--out",
                                str(tmp_path / "run")], capsys)
    assert code == 0
    assert len(reads) == 3
