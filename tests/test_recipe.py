"""--recipe official and timm's augmentation flags end to end: the recipe's values for every
model (against the official recipe's table, restated here), explicit flags winning, the printed
command, what a checkpoint records, evaluate using the checkpoint's evaluation transform unless
told otherwise, --no-aug and the identity pipeline, old checkpoints, real scans (scikit-learn's
digits) as class folders."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from t2t_ref import evaluate, train
from t2t_ref.checkpoint import load_checkpoint, save_checkpoint
from t2t_ref.data import default_workers
from t2t_ref.data.digits import main as digits_main
from t2t_ref.data.transforms import RESAMPLE
from t2t_ref.recipe import erasing_of, eval_transform_of, train_transform_of
from t2t_ref.schedule import lr_at

TINY = ["--synthetic-train", "64", "--synthetic-val", "32", "--batch-size", "32",
        "--img-size", "32", "--workers", "0", "--warmup-epochs", "0.5"]

# The official recipe (the official repository's README commands and main.py defaults):
# lr at a total batch of 512 and weight decay by model size
OFFICIAL_LR_AT_512 = {"t2t_vit_7": 1e-3, "t2t_vit_10": 1e-3, "t2t_vit_12": 1e-3,
                      "t2t_vit_14": 5e-4, "t2t_vit_19": 5e-4, "t2t_vit_24": 5e-4,
                      "t2t_vit_t_14": 5e-4, "t2t_vit_t_19": 5e-4, "t2t_vit_t_24": 5e-4}
OFFICIAL_WEIGHT_DECAY = {"t2t_vit_7": 0.03, "t2t_vit_10": 0.03, "t2t_vit_12": 0.03,
                         "t2t_vit_14": 0.05, "t2t_vit_t_14": 0.05, "t2t_vit_19": 0.065,
                         "t2t_vit_t_19": 0.065, "t2t_vit_24": 0.065, "t2t_vit_t_24": 0.065}
OFFICIAL_EVERYWHERE = dict(
    img_size=224, epochs=310, cooldown_epochs=10, warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5,
    label_smoothing=0.1, drop_path=0.1, mixup=0.8, cutmix=1.0, ema_decay=0.99996,
    aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1, hflip=0.5, vflip=0.0,
    crop_scale=[0.08, 1.0], crop_ratio=[0.75, 4 / 3], train_interpolation="random",
    crop_pct=0.9, interpolation="bicubic")


def resolve(argv):
    """train's configuration of a command line (what start() resolves, without a run)."""
    args = train.build_parser().parse_args(argv)
    return train.resolve_config(args, vars(train.build_parser(defaults=False).parse_args(argv)))


@pytest.mark.parametrize("model", sorted(OFFICIAL_LR_AT_512))
@pytest.mark.parametrize("batch", [512, 64])
def test_the_official_recipe_for_every_model(model, batch):
    config = resolve(["--recipe", "official", "--model", model, "--batch-size", str(batch),
                      "--data", "somewhere"])
    assert config["lr"] == pytest.approx(OFFICIAL_LR_AT_512[model] * batch / 512)
    assert config["weight_decay"] == OFFICIAL_WEIGHT_DECAY[model]
    for key, value in OFFICIAL_EVERYWHERE.items():
        assert config[key] == pytest.approx(value), key
    assert config["batch_size"] == batch and config["recipe"] == "official"
    assert config["warmup_prefix"] is False  # timm's default: the warmup replaces the cosine's start


def test_explicit_flags_win_over_the_recipe():
    config = resolve(["--recipe", "official", "--lr", "1e-4", "--aa", "none", "--hflip", "0",
                      "--epochs", "5", "--warmup-epochs", "1", "--cooldown-epochs", "1",
                      "--reprob", "0.5", "--img-size", "64", "--scale", "0.5", "1"])
    assert (config["lr"], config["aa"], config["hflip"], config["epochs"]) == (1e-4, None, 0, 5)
    assert (config["warmup_epochs"], config["cooldown_epochs"]) == (1, 1)
    assert (config["reprob"], config["img_size"], config["crop_scale"]) == (0.5, 64, [0.5, 1])
    assert config["weight_decay"] == 0.03 and config["mixup"] == 0.8  # the rest: the recipe's
    # and a flag given at its default value still counts as given
    assert resolve(["--recipe", "official", "--hflip", "0.5", "--mixup", "0"])["mixup"] == 0


def test_the_printed_command_gives_the_same_configuration():
    config = resolve(["--recipe", "official", "--model", "t2t_vit_14", "--batch-size", "128",
                      "--data", "imagenet", "--reprob", "0.3"])
    words = train.command_line(config).split()
    assert "--recipe" not in words and words[words.index("--lr") + 1] == "0.000125"
    again = resolve(words)
    assert {**again, "recipe": "official"} == config, \
        {k: (v, config[k]) for k, v in again.items() if v != config[k]}


def test_a_run_prints_the_resolved_recipe_and_records_its_flags(tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(TINY + ["--recipe", "official", "--epochs", "2", "--cooldown-epochs", "0",
                              "--out", str(out), "--stop-after", "1"])
    assert code == 130
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("--recipe"))
    assert line.startswith("--recipe official resolves to: python -m t2t_ref.train ")
    command = line.split("python -m t2t_ref.train ", 1)[1].split()
    for flag in ("--aa", "--reprob", "--mixup", "--cutmix", "--ema-decay", "--drop-path",
                 "--weight-decay", "--lr", "--train-interpolation", "--no-warmup-prefix"):
        assert flag in command, flag
    _, meta, _, _ = load_checkpoint(out / "last.safetensors")
    saved = meta["config"]
    assert saved == resolve(command + ["--stop-after", "1", "--workers", "0"]) | \
        {"recipe": "official", "workers": 0}
    for key in ("hflip", "vflip", "crop_pct", "interpolation", "train_interpolation",
                "color_jitter", "aa", "reprob", "remode", "recount", "no_aug", "crop_scale",
                "crop_ratio"):
        assert key in saved, key
    assert (saved["aa"], saved["reprob"], saved["lr"]) == ("rand-m9-mstd0.5-inc1", 0.25, 6.25e-5)
    # without --data (the built-in shapes) the recipe leaves the image size at 32
    assert resolve(["--recipe", "official"])["img_size"] == 32


def test_warmup_prefix_reaches_the_runs_schedule(tmp_path):
    """--no-warmup-prefix (the official recipe's, timm's default) and --warmup-prefix (the
    default here) give the runs their own schedules: each epoch's logged learning rate is the
    formula's (tested against timm's curve in test_optim) under that setting, and the two
    differ."""
    logged = {}
    for flag, prefix in (("--warmup-prefix", True), ("--no-warmup-prefix", False)):
        out = tmp_path / flag
        assert train.main(TINY + ["--epochs", "3", "--warmup-epochs", "1", "--out", str(out),
                                  flag]) == 0
        assert json.loads((out / "config.json").read_text())["warmup_prefix"] is prefix
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        # 2 steps an epoch, 6 in all, the first 2 warmup; an epoch logs its last step's rate
        logged[prefix] = [r["lr"] for r in records]
        assert logged[prefix] == pytest.approx(
            [lr_at(r["step"] - 1, base_lr=5e-4, total_steps=6, warmup_steps=2,
                   warmup_prefix=prefix) for r in records], rel=1e-12)
    assert logged[True][1] != pytest.approx(logged[False][1], rel=1e-3), logged


def test_workers_default_to_the_cores_less_one(tmp_path, capsys):
    args = [a for a in TINY if a not in ("--workers", "0")] + ["--epochs", "1",
                                                                "--out", str(tmp_path)]
    assert train.main(args + ["--stop-after", "1"]) == 130
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["workers"] == default_workers()


def square(seed=0, size=24):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_no_aug_and_no_flip_whole_image_are_the_identity_pipeline_from_the_flags():
    """--no-aug (whatever else is set), and --hflip 0 with a whole-image crop and --crop-pct 1:
    a square image is only resized, and erasing is off under --no-aug."""
    img = square()
    resized = np.asarray(img.resize((16, 16), RESAMPLE["bicubic"]))
    no_aug = resolve(["--no-aug", "--aa", "rand-m9", "--reprob", "0.5", "--hflip", "1"])
    plain = resolve(["--hflip", "0", "--crop-pct", "1", "--scale", "1", "1", "--ratio", "1",
                     "1", "--data", "somewhere"])
    assert erasing_of(no_aug) is None and erasing_of(plain) is None
    for config in (no_aug, plain):
        transform = train_transform_of(config)
        for seed in range(10):
            out = transform(img, 16, np.random.default_rng(seed))
            assert np.array_equal(np.asarray(out), resized)
    assert np.array_equal(np.asarray(eval_transform_of(plain)(img, 16)), resized)
    assert not np.array_equal(np.asarray(eval_transform_of(no_aug)(img, 16)), resized)  # 0.9


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    assert digits_main([str(root), "--val-fraction", "0.1"]) == 0
    return root


def test_the_digits_helper_writes_class_folders_of_real_scans(digits, capsys):
    from sklearn.datasets import load_digits
    per_class = np.bincount(load_digits().target)                  # 174 .. 183 scans
    held_out = int(sum(round(0.1 * n) for n in per_class))         # stratified
    for split, total in (("train", 1797 - held_out), ("val", held_out)):
        classes = sorted(os.listdir(digits / split))
        assert classes == [str(d) for d in range(10)]
        files = [f for c in classes for f in os.listdir(digits / split / c)]
        assert len(files) == total, split
    scan = Image.open(next((digits / "val" / "3").iterdir()))
    assert scan.size == (8, 8) and scan.mode == "L"
    assert digits_main([str(digits)]) == 2  # not over an existing set
    assert "is not an empty folder" in capsys.readouterr().err


def test_evaluate_uses_the_checkpoints_crop_unless_told(digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(digits), "--img-size", "16", "--epochs", "1",
                       "--batch-size", "128", "--workers", "0", "--warmup-epochs", "0.5",
                       "--hflip", "0", "--crop-pct", "1", "--interpolation", "bilinear",
                       "--lr", "2e-3", "--out", str(out)]) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    capsys.readouterr()
    checkpoint = ["--checkpoint", str(out / "last.safetensors"), "--data", str(digits),
                  "--workers", "0"]

    def scored(*extra):
        assert evaluate.main(checkpoint + list(extra)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    as_trained = scored()
    assert (as_trained["crop_pct"], as_trained["interpolation"]) == (1.0, "bilinear")
    assert as_trained["loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    cropped = scored("--crop-pct", "0.6")
    assert (cropped["crop_pct"], cropped["interpolation"]) == (0.6, "bilinear")
    assert cropped["loss"] != pytest.approx(as_trained["loss"], rel=1e-3)
    assert scored("--interpolation", "bicubic")["interpolation"] == "bicubic"


def test_a_checkpoint_from_before_these_flags_resumes_with_the_old_pipeline(tmp_path, capsys):
    """Its configuration lacks the new flags: it continues with what it was trained with
    (flip 0.5, crop 0.9, no RandAugment or erasing); a flag that says otherwise is refused."""
    out = tmp_path / "old"
    assert train.main(TINY + ["--epochs", "2", "--out", str(out), "--stop-after", "2"]) == 130
    path = out / "last.safetensors"
    weights, meta, optimizer, ema = load_checkpoint(path)
    for key in ("hflip", "vflip", "crop_pct", "interpolation", "train_interpolation",
                "color_jitter", "aa", "reprob", "remode", "recount", "no_aug",
                "cooldown_epochs", "recipe", "warmup_prefix"):
        del meta["config"][key]
    meta.pop("format_version", None)
    save_checkpoint(path, weights, meta, optimizer=optimizer, ema=ema)
    capsys.readouterr()
    assert train.main(["--resume", str(path), "--hflip", "0"]) == 2
    assert "--hflip 0.0 (checkpoint: 0.5)" in capsys.readouterr().err
    assert train.main(["--resume", str(path), "--hflip", "0.5", "--crop-pct", "0.9"]) == 0
    assert load_checkpoint(path)[1]["config"]["hflip"] == 0.5
