"""Official checkpoints in and out: import, export, convert, predict, fine-tune and evaluate,
and their bad input. The official-format files are made here from the PyTorch oracle
(t2t_ref/torch_port.py) the way the release's training code saved them; nothing is downloaded."""

import argparse
import functools
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import load_file

import t2t_ref
from t2t_ref import convert, evaluate, predict, train
from t2t_ref.checkpoint import load_checkpoint, save_checkpoint
from t2t_ref.data import decode, eval_transform
from t2t_ref.pretrained import PretrainedError, imagenet_classes, read_weights, \
    resize_pos_embed
from conftest import assert_close
from reliability import tried
from t2t_ref.torch_port import create_torch_model

SIZE, BATCH = 32, 2
# a tiny built-in training run (see test_train.py): 3 steps per epoch at 32 x 32, 10 classes
TINY = ["--synthetic-train", "96", "--synthetic-val", "40", "--batch-size", "32",
        "--img-size", "32", "--workers", "0", "--warmup-epochs", "0.5"]


class Unsafe:
    """Anything a weights-only unpickler must refuse to rebuild."""


@functools.lru_cache(maxsize=None)
def make_oracle(name, num_classes=10, img_size=SIZE):
    """The PyTorch oracle in float64, eval mode; built once per shape (tests load weights in)."""
    torch.manual_seed(0)
    oracle = create_torch_model(name, num_classes=num_classes, img_size=img_size).double()
    return oracle.eval()


@functools.lru_cache(maxsize=None)
def oracle_weights(name, num_classes, img_size, head_scale):
    """(raw, EMA) float64 state dicts of the oracle; the EMA stands in as other weights of the
    same shapes, and head_scale sharpens the probabilities. Computed once per shape."""
    torch.manual_seed(0)
    raw = create_torch_model(name, num_classes=num_classes, img_size=img_size).double()
    raw = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    raw["head.weight"] *= head_scale
    gen = torch.Generator().manual_seed(1)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
           for k, v in raw.items()}
    return raw, ema


def save_official(path, name, raw, ema=None, layout="official"):
    """Save state dicts as the release's files are laid out (timm's CheckpointSaver, with the
    training arguments as an argparse.Namespace), or as the variants found in the wild."""
    if layout in ("official", "module"):
        prefix = "module." if layout == "module" else ""
        obj = {"epoch": 309, "arch": name, "version": 2, "metric": 71.7,
               "state_dict": {prefix + k: v for k, v in raw.items()},
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
               "args": argparse.Namespace(model=name, lr=1e-3, img_size=SIZE, mixup=0.8,
                                          opt_betas=None, data="/data/imagenet"),
               "state_dict_ema": {prefix + k: v for k, v in ema.items()}}
    elif layout == "net":
        obj = {"net": raw}
    elif layout == "bare":
        obj = dict(raw)
    torch.save(obj, path)
    return path


def official_pair(tmp_path, name, layout="official", num_classes=10, img_size=SIZE,
                  head_scale=1.0, dtype=torch.float64):
    """(file path, raw state dict, EMA state dict) of an official-format file."""
    raw, ema = oracle_weights(name, num_classes, img_size, head_scale)
    raw = {k: v.to(dtype) for k, v in raw.items()}
    ema = {k: v.to(dtype) for k, v in ema.items()}
    path = tmp_path / f"{name}_{layout}.pth.tar"
    return save_official(path, name, raw, ema, layout), raw, ema


def oracle_logits(name, state_dict, x, num_classes=10, img_size=SIZE):
    oracle = make_oracle(name, num_classes, img_size)
    oracle.load_state_dict({k: v.double() for k, v in state_dict.items()}, strict=True)
    with torch.no_grad():
        return oracle(torch.tensor(x)).numpy()


def random_images(size=SIZE, seed=0):
    return np.random.default_rng(seed).normal(size=(BATCH, 3, size, size))


def assert_user_error(code, captured, *needles):
    assert code == 2, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- import ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, layout", [("t2t_vit_7", "official"), ("t2t_vit_7", "module"),
                                          ("t2t_vit_7", "net"), ("t2t_vit_7", "bare"),
                                          ("t2t_vit_t_14", "official")])
def test_import_matches_oracle(tmp_path, name, layout):
    """EMA weights by default where the file has them, raw ones otherwise; logits equal the
    oracle's holding the same weights (float64, <= 1e-9)."""
    path, raw, ema = official_pair(tmp_path, name, layout)
    x = random_images()
    has_ema = layout in ("official", "module")
    model = t2t_ref.load_pretrained(path, name, dtype="float64")
    assert (model.name, model.img_size, model.num_classes) == (name, SIZE, 10)
    logits = t2t_ref.to_numpy(model.eval().forward(x))
    assert_close(logits, oracle_logits(name, ema if has_ema else raw, x), 1e-9, "logits")
    if name == "t2t_vit_7":  # (the bigger transformer variant once is enough)
        if has_ema:
            model = t2t_ref.load_pretrained(path, name, use_ema=False, dtype="float64")
            assert_close(model.forward(x), oracle_logits(name, raw, x), 1e-9, "raw logits")
        # without a name: the official file's args.model, else the only variant its shapes fit
        assert t2t_ref.load_pretrained(path).name == name


def test_import_a_float32_file_keeps_its_bits(tmp_path):
    path, _, ema = official_pair(tmp_path, "t2t_vit_7", dtype=torch.float32)
    state = t2t_ref.load_pretrained(path).state_dict()
    for key, value in ema.items():
        assert np.array_equal(state[key], value.numpy()), key


def test_position_table_resize_matches_torch_bicubic():
    """The NumPy bicubic equals torch's F.interpolate(bicubic, align_corners=False), up and
    down, class row kept."""
    rng = np.random.default_rng(0)
    for old, new in [(14, 24), (14, 4), (2, 4), (3, 5), (5, 3)]:
        table = rng.normal(size=(1, 1 + old * old, 8))
        assert_close(resize_pos_embed(table, new), torch_resize_pos_embed(table, new), 1e-12,
                     f"pos_embed {old}->{new}")


def torch_resize_pos_embed(table, grid):
    """The official resize_pos_embed (utils.py of the release), in float64."""
    posemb = torch.as_tensor(table, dtype=torch.float64)
    tok, cells = posemb[:, :1], posemb[0, 1:]
    old = int(math.sqrt(len(cells)))
    cells = cells.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells, size=(grid, grid), mode="bicubic", align_corners=False)
    cells = cells.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([tok, cells], dim=1).numpy()


def test_another_image_size_and_class_count(tmp_path):
    """img_size 64 from a file made at 32: the position table resized as the official code
    does, logits equal the oracle's at 64 with that table. Another class count: a fresh head,
    exactly the model's own seeded initialisation; every other weight the file's."""
    path, _, ema = official_pair(tmp_path, "t2t_vit_7")
    model = t2t_ref.load_pretrained(path, "t2t_vit_7", img_size=64, dtype="float64")
    resized = dict(ema, pos_embed=torch.from_numpy(
        torch_resize_pos_embed(ema["pos_embed"].numpy(), 4)))
    x = random_images(64)
    assert_close(model.forward(x), oracle_logits("t2t_vit_7", resized, x, img_size=64), 1e-9,
                 "logits at 64")

    model = t2t_ref.load_pretrained(path, "t2t_vit_7", num_classes=3, dtype="float64", seed=5)
    fresh = t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=SIZE, dtype="float64",
                                 seed=5).state_dict()
    state = model.state_dict()
    for key in ("head.weight", "head.bias"):
        assert np.array_equal(state[key], fresh[key]), key
    assert np.abs(state["head.weight"]).max() > 0
    for key, value in ema.items():
        if not key.startswith("head."):
            assert np.array_equal(state[key], value.numpy()), key


def test_official_namespace_loads_without_running_code(tmp_path):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    weight_file = read_weights(path)
    assert weight_file.which == "state_dict_ema"
    assert weight_file.args["model"] == "t2t_vit_7" and weight_file.args["mixup"] == 0.8
    bad = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"cls_token": torch.zeros(1, 1, 256)}, "hook": Unsafe()}, bad)
    with pytest.raises(PretrainedError, match=r"Unsafe.*arbitrary code"):
        read_weights(bad)


# ---- convert and export ----------------------------------------------------------------------


def test_export_of_a_t2t_ref_checkpoint_loads_strictly_in_torch(tmp_path, capsys):
    """A t2t_ref training checkpoint -> .pth -> the official model, strict=True: same logits."""
    model = t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=SIZE, dtype="float64",
                                 seed=3)
    checkpoint = tmp_path / "last.safetensors"
    save_checkpoint(checkpoint, model.state_dict(),
                    {"model": "t2t_vit_7", "class_names": ["a", "b", "c"], "step": 6,
                     "config": {"img_size": SIZE, "dtype": "float64"}},
                    optimizer={"step": 6, "exp_avg": {"cls_token": np.ones((1, 1, 256))}})
    out = tmp_path / "exported.pth"
    assert convert.main([str(checkpoint), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    oracle = make_oracle("t2t_vit_7", num_classes=3)
    state = torch.load(out, weights_only=True)
    assert list(state) == list(model.state_dict())  # the official order
    oracle.load_state_dict(state, strict=True)
    x = random_images()
    with torch.no_grad():
        want = oracle(torch.tensor(x)).numpy()
    assert_close(model.eval().forward(x), want, 1e-9, "logits")


def test_convert_round_trip_official_to_t2t_ref_and_back(tmp_path, capsys):
    """official float32 .pth.tar -> .safetensors (ImageNet class names, usable by evaluate's
    checkpoint reader) -> .pth: the tensors come back bit for bit."""
    path, _, ema = official_pair(tmp_path, "t2t_vit_7", num_classes=1000, dtype=torch.float32)
    ours, back = tmp_path / "t.safetensors", tmp_path / "back.pth"
    assert convert.main([str(path), str(ours)]) == 0
    assert convert.main([str(ours), str(back)]) == 0
    capsys.readouterr()
    plain = load_file(ours)  # an ordinary state dict under the official keys
    _, meta, optimizer, _ = load_checkpoint(ours)
    assert meta["model"] == "t2t_vit_7" and optimizer is None
    assert meta["class_names"][0] == "n01440764" and len(meta["class_names"]) == 1000
    model, _, _ = evaluate.model_from_checkpoint(ours, "numpy")
    assert model.name == "t2t_vit_7" and model.dtype_name == "float32"
    state = torch.load(back, weights_only=True)
    assert set(state) == set(ema) == set(plain)
    for key, value in ema.items():
        assert torch.equal(state[key], value), key
        assert np.array_equal(plain[key], value.numpy()), key


# ---- predict ---------------------------------------------------------------------------------


def write_images(folder):
    """Three images of different sizes and modes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "wide.png", folder / "gray.png", folder / "tall.jpg"]
    Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), mode="L").save(paths[1])
    Image.fromarray(rng.integers(0, 256, (47, 33, 3), dtype=np.uint8)).save(paths[2])
    return [str(p) for p in paths]


def parse_predictions(text):
    """{path: [(probability, name), ...]} from predict's output."""
    result, current = {}, None
    for line in text.splitlines():
        if line.startswith("  "):
            prob, name = line.strip().split("  ", 1)
            result[current].append((float(prob), name))
        else:
            current = line
            result[current] = []
    return result


def oracle_top(oracle, paths, k=5):
    x = np.stack([eval_transform(decode(p), SIZE) for p in paths]).astype(np.float64)
    with torch.no_grad():
        probs = torch.softmax(oracle(torch.tensor(x)), dim=1).numpy()
    return [(np.argsort(-p)[:k], p) for p in probs]


def test_predict_prints_the_oracles_top5_with_imagenet_names(tmp_path, capsys):
    path, _, ema = official_pair(tmp_path, "t2t_vit_7", num_classes=1000, head_scale=300.0)
    images = write_images(tmp_path / "img")
    assert predict.main([*images, "--weights", str(path)]) == 0
    printed = parse_predictions(capsys.readouterr().out)
    oracle = make_oracle("t2t_vit_7", num_classes=1000)
    oracle.load_state_dict(ema)
    _, names = imagenet_classes()
    for image, (top, probs) in zip(images, oracle_top(oracle, images)):
        assert [name for _, name in printed[image]] == [names[i] for i in top]
        assert np.allclose([p for p, _ in printed[image]], probs[top], atol=2e-4)
    assert max(p for p, _ in printed[images[0]]) > 0.05  # sharp enough to mean something


def three_class_checkpoint(tmp_path):
    """A t2t_ref checkpoint of a 3-class T2T-ViT-7 whose classes are cat, dog and eel."""
    model = t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=SIZE, seed=2)
    checkpoint = tmp_path / "best.safetensors"
    save_checkpoint(checkpoint, model.state_dict(),
                    {"model": "t2t_vit_7", "class_names": ["cat", "dog", "eel"], "step": 1,
                     "config": {"img_size": SIZE, "dtype": "float32"}})
    return checkpoint


def test_predict_uses_a_checkpoints_class_names(tmp_path, capsys):
    checkpoint = three_class_checkpoint(tmp_path)
    images = write_images(tmp_path / "img")[:1]
    assert predict.main([*images, "--checkpoint", str(checkpoint)]) == 0  # evaluate's name
    printed = parse_predictions(capsys.readouterr().out)[images[0]]
    assert sorted(name for _, name in printed) == ["cat", "dog", "eel"]
    assert sum(p for p, _ in printed) == pytest.approx(1.0, abs=2e-4)


@tried("prediction", "`predict` on a folder (images in sub-folders, one unreadable file) "
       "and an empty folder, in batches of 2", "every image of the folder, in order of its path, "
       "printed as when named one by one; `error:` lines for the unreadable file and `no image "
       "files in folder ...`; exit 1")
def test_predict_on_a_folder_reads_it_all_in_batches(tmp_path, capsys):
    checkpoint = three_class_checkpoint(tmp_path)
    folder = tmp_path / "photos"
    images = write_images(folder / "b") + write_images(folder / "a" / "deeper")
    (folder / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "nothing").mkdir()
    weights = ["--checkpoint", str(checkpoint), "--top", "3"]
    assert predict.main(sorted(images) + weights) == 0  # one by one
    one_by_one = parse_predictions(capsys.readouterr().out)
    code = predict.main([str(folder), str(tmp_path / "nothing"), "--batch-size", "2", *weights])
    captured = capsys.readouterr()
    assert code == 1
    from_folder = parse_predictions(captured.out)
    assert list(from_folder) == [*sorted(i for i in images if "/a/" in i),
                                 *sorted(i for i in images if "/b/" in i)]
    for path, lines in from_folder.items():
        assert [n for _, n in lines] == [n for _, n in one_by_one[path]], path
        assert np.allclose([p for p, _ in lines], [p for p, _ in one_by_one[path]], atol=1e-4)
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, captured.err
    assert "broken.jpg" in errors[0] or "broken.jpg" in errors[1]
    assert f"error: no image files in folder {str(tmp_path / 'nothing')!r}" in captured.err
    assert "1 of 7 images failed" in captured.err


def test_imagenet_class_list():
    synsets, names = imagenet_classes()
    assert len(synsets) == len(set(synsets)) == len(names) == 1000
    assert synsets == sorted(synsets)  # the ImageFolder order of the val folders
    assert (synsets[0], names[0]) == ("n01440764", "tench")
    assert (synsets[-1], names[-1]) == ("n15075141", "toilet tissue")


# ---- fine-tune and evaluate ------------------------------------------------------------------


def test_init_from_official_weights_and_from_a_t2t_ref_checkpoint(tmp_path, capsys):
    """--init-from starts training from the file's EMA weights: a new 10-class head (the
    model's own seeded init), the 48-pixel position table resized to 32. Stopped before the
    first step, the saved weights are exactly those starting weights."""
    path, _, ema = official_pair(tmp_path, "t2t_vit_7", num_classes=1000, img_size=48,
                                 dtype=torch.float32)
    out = tmp_path / "run"
    code = train.main(TINY + ["--init-from", str(path), "--stop-after", "0", "--out", str(out)])
    assert code == 130
    printed = capsys.readouterr().out
    assert "new 10-class head" in printed and "resized bicubically from 3x3 to 2x2" in printed
    weights, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert meta["config"]["init_from"] == str(path)
    fresh = t2t_ref.create_model("t2t_vit_7", num_classes=10, img_size=SIZE).state_dict()
    for key, value in weights.items():
        if key.startswith("head."):
            want = fresh[key]
        elif key == "pos_embed":
            want = torch_resize_pos_embed(ema[key].numpy(), 2).astype(np.float32)
        else:
            want = ema[key].numpy()
        assert np.array_equal(value, want), key

    # from that t2t_ref checkpoint: its weights as they are, no optimizer state
    again = tmp_path / "again"
    code = train.main(TINY + ["--init-from", str(out / "last.safetensors"), "--stop-after",
                              "0", "--out", str(again)])
    assert code == 130
    assert "new" not in capsys.readouterr().out.split("initialised from", 1)[1].splitlines()[0]
    second, _, _, _ = load_checkpoint(again / "last.safetensors")
    for key in weights:
        assert np.array_equal(second[key], weights[key]), key

    code = train.main(["--resume", str(out / "last.safetensors"), "--init-from", str(path)])
    assert_user_error(code, capsys.readouterr(), "--init-from", "--resume")


@tried("checkpoints", "`--resume` a weights-only file (written by `convert`)",
       "exit 2: `error: ... holds weights only, not a training run to continue: start from it "
       "with --init-from ...`")
def test_resume_refuses_a_weights_only_file(tmp_path, capsys):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    converted = tmp_path / "w.safetensors"
    assert convert.main([str(path), str(converted)]) == 0
    capsys.readouterr()
    code = train.main(["--resume", str(converted)])
    assert_user_error(code, capsys.readouterr(), "weights only", "--init-from")


def write_val_folder(root, classes, per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / "val" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / name / f"{i}.png")


@tried("evaluation", "an unreadable image in the validation folder",
       "skipped, warned once, and counted: `skipped 1 unreadable image`, `unreadable` in the "
       "JSON result")
def test_evaluate_official_weights_on_a_val_only_folder(tmp_path, capsys):
    path, _, ema = official_pair(tmp_path, "t2t_vit_7", num_classes=3, head_scale=300.0)
    data = tmp_path / "data"
    write_val_folder(data, ["a", "b", "c"])
    code = evaluate.main(["--weights", str(path), "--model", "t2t_vit_7", "--data", str(data),
                          "--workers", "0", "--img-size", str(SIZE)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    oracle = make_oracle("t2t_vit_7", num_classes=3)
    oracle.load_state_dict(ema)
    files = [str(data / "val" / c / f"{i}.png") for c in "abc" for i in range(2)]
    labels = np.repeat(np.arange(3), 2)
    top1 = [top[0] for top, _ in oracle_top(oracle, files, k=1)]
    assert result["images"] == 6 and result["which"] == "state_dict_ema"
    assert result["top1"] == pytest.approx(100.0 * np.mean(np.asarray(top1) == labels))
    assert "top2" in result and "top5" not in result  # 3 classes: top-2 is the top-k

    # an unreadable validation image is skipped, and counted in the summary
    (data / "val" / "b" / "broken.png").write_bytes(b"\x89PNG broken")
    code = evaluate.main(["--weights", str(path), "--data", str(data), "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["unreadable"] == 1
    assert "skipped 1 unreadable image" in captured.err
    (data / "val" / "b" / "broken.png").unlink()

    # 1000-class (ImageNet) weights need the 1000 synset folders
    imagenet, _, _ = official_pair(tmp_path, "t2t_vit_7", num_classes=1000)
    code = evaluate.main(["--weights", str(imagenet), "--data", str(data), "--workers", "0"])
    assert_user_error(code, capsys.readouterr(), "n01440764")
    # a folder with train/ but no val/
    (tmp_path / "t" / "train" / "a").mkdir(parents=True)
    code = evaluate.main(["--weights", str(path), "--data", str(tmp_path / "t")])
    assert_user_error(code, capsys.readouterr(), "no val/ folder")
    code = evaluate.main(["--weights", str(path)])
    assert_user_error(code, capsys.readouterr(), "--data")


# ---- bad input -------------------------------------------------------------------------------


def every_cli(weights, tmp_path, images):
    """The four ways a weights file comes in, as (name, command line runner)."""
    return [
        ("predict", lambda: predict.main([*images, "--weights", str(weights)])),
        ("convert", lambda: convert.main([str(weights), str(tmp_path / "o.safetensors")])),
        ("evaluate", lambda: evaluate.main(["--weights", str(weights), "--data",
                                            str(tmp_path)])),
        ("train", lambda: train.main(TINY + ["--init-from", str(weights),
                                             "--out", str(tmp_path / "run")])),
    ]


def not_checkpoints(tmp_path):
    """(file, what the error says) for files that are no checkpoint."""
    cases = []
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage" * 10)
    cases.append((garbage, "is not a checkpoint"))
    damaged = tmp_path / "damaged.pth.tar"
    damaged.write_bytes(b"\x80\x02" + b"\x00" * 30)
    cases.append((damaged, "not a readable PyTorch checkpoint"))
    picture = tmp_path / "picture.png"
    Image.new("RGB", (8, 8)).save(picture)
    cases.append((picture, "is not a checkpoint"))
    no_weights = tmp_path / "no_weights.pth"
    torch.save({"epoch": 3, "args": argparse.Namespace(model="t2t_vit_7")}, no_weights)
    cases.append((no_weights, "no state dict"))
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    cases.append((tensor, "not a checkpoint dict"))
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7)}, resnet)
    cases.append((resnet, "holds no weights of a model"))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"cls_token": torch.zeros(1, 1, 256)}, "x": Unsafe()}, unsafe)
    cases.append((unsafe, "arbitrary code"))
    return cases


@tried("checkpoints", "a missing file, garbage, a damaged pickle, a picture, a dict without "
       "weights, a ResNet's weights, an unsafe pickle, given to predict, convert, evaluate and "
       "train --init-from", "exit 2: one line naming the file and what it is")
def test_missing_and_non_checkpoint_files_in_every_cli(tmp_path, capsys):
    images = write_images(tmp_path / "img")[:1]
    cases = [(tmp_path / "nowhere.pth.tar", "does not exist")] + not_checkpoints(tmp_path)
    for weights, needle in cases:
        for cli, run in every_cli(weights, tmp_path, images):
            code = run()
            captured = capsys.readouterr()
            if cli == "train" and needle == "holds no weights of a model":
                needle = "does not fit t2t_vit_7"  # train names its model: the keys are told
            assert_user_error(code, captured, str(weights) if cli != "train" else "", needle)


@tried("checkpoints", "weights of another variant (`--model` that does not fit the file)",
       "exit 2: `error: ... does not fit t2t_vit_10: 33 missing keys (...); the file looks like "
       "t2t_vit_7`")
def test_checkpoint_of_another_variant_says_what_does_not_fit(tmp_path, capsys):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    out = str(tmp_path / "o.safetensors")
    code = convert.main([str(path), out, "--model", "t2t_vit_10"])
    assert_user_error(code, capsys.readouterr(), "does not fit t2t_vit_10", "33 missing keys",
                      "blocks.7.norm1.weight", "looks like t2t_vit_7")
    code = convert.main([str(path), out, "--model", "t2t_vit_14"])
    assert_user_error(code, capsys.readouterr(), "cls_token (1, 1, 256) in the file, "
                      "(1, 1, 384) in the model", "looks like t2t_vit_7")
    code = convert.main([str(path), out, "--model", "t2t_vit_t_14"])
    assert_user_error(code, capsys.readouterr(), "unexpected",
                      "tokens_to_token.attention1.w", "missing",
                      "tokens_to_token.attention1.attn.qkv.weight")
    code = predict.main([*write_images(tmp_path / "img")[:1], "--weights", str(path),
                         "--model", "t2t_vit_12"])
    assert_user_error(code, capsys.readouterr(), "does not fit t2t_vit_12")
    code = train.main(TINY + ["--model", "t2t_vit_t_14", "--init-from", str(path), "--out",
                              str(tmp_path / "run")])
    assert_user_error(code, capsys.readouterr(), "does not fit t2t_vit_t_14")


@tried("prediction", "`predict good.png broken.jpg missing.png`",
       "the good image's classes printed; one `error: cannot read image ...` line for each bad "
       "one; exit 1")
def test_a_bad_image_does_not_stop_the_others(tmp_path, capsys):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    good = write_images(tmp_path / "img")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    missing = tmp_path / "missing.png"
    code = predict.main([good[0], str(broken), good[1], str(missing), "--weights", str(path)])
    captured = capsys.readouterr()
    assert code == 1
    assert list(parse_predictions(captured.out)) == good[:2]
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "broken.jpg" in errors[0] and "missing.png" in errors[1]
    assert "2 of 4 images failed" in captured.err
    code = predict.main([str(missing), "--weights", str(path)])
    assert code == 1 and "missing.png" in capsys.readouterr().err


@tried("prediction", "weights holding NaN (a diverged run's)",
       "exit 2: `error: ... holds NaN or inf weights (1 tensors, e.g. head.bias) ...`")
def test_predict_refuses_non_finite_weights(tmp_path, capsys):
    raw, ema = oracle_weights("t2t_vit_7", 10, SIZE, 1.0)
    ema = dict(ema, **{"head.bias": torch.full((10,), float("nan"), dtype=torch.float64)})
    path = save_official(tmp_path / "nan.pth.tar", "t2t_vit_7", raw, ema)
    code = predict.main([*write_images(tmp_path / "img")[:1], "--weights", str(path)])
    assert_user_error(code, capsys.readouterr(), "holds NaN or inf weights", "head.bias")


@tried("prediction", "finite weights whose outputs overflow to inf or NaN",
       "`error: IMAGE: the model's output is NaN or inf, no prediction` per image (never a "
       "`nan disc` line); exit 1")
def test_predict_refuses_non_finite_outputs(tmp_path, capsys):
    raw, ema = oracle_weights("t2t_vit_7", 10, SIZE, 1.0)
    ema = dict(ema, **{"head.weight": torch.full_like(ema["head.weight"], 3e38)})  # < float32's max
    path = save_official(tmp_path / "huge.pth.tar", "t2t_vit_7", raw, ema)
    images = write_images(tmp_path / "img")[:2]
    code = predict.main([*images, "--weights", str(path)])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.count("the model's output is NaN or inf") == 2, captured.err
    assert "nan" not in captured.out.lower()


@tried("prediction", "a malicious pickle (`os.system` in a .pth)",
       "refused unrun: exit 2, `error: ... pickles posix.system, which is not loaded because "
       "unpickling it could run arbitrary code ...` (t2t_ref's line, not PyTorch's paragraph)")
def test_a_malicious_pickle_is_refused_with_our_own_line(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned > " + str(tmp_path / "pwned"),)

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"cls_token": torch.zeros(1, 1, 256)}, "x": Payload()}, path)
    code = predict.main([*write_images(tmp_path / "img")[:1], "--weights", str(path)])
    captured = capsys.readouterr()
    assert_user_error(code, captured, f"pickles {os.system.__module__}.system",
                      "could run arbitrary code")
    assert "In PyTorch 2.6" not in captured.err
    assert not (tmp_path / "pwned").exists()


@tried("evaluation", "`evaluate --checkpoint` on a file written by `convert`, without --data",
       "exit 2: `error: ... holds converted weights, not a run trained here, so it comes with no "
       "validation set: pass one with --data DIR`")
def test_evaluate_on_converted_weights_asks_for_data(tmp_path, capsys):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    ours = tmp_path / "w.safetensors"
    assert convert.main([str(path), str(ours)]) == 0
    capsys.readouterr()
    code = evaluate.main(["--checkpoint", str(ours), "--workers", "0"])
    assert_user_error(code, capsys.readouterr(), "holds converted weights", "--data DIR")


@tried("checkpoints", "a .pth file without PyTorch installed",
       "exit 2: `error: reading the PyTorch file ... needs PyTorch, which is not installed: pip "
       "install 't2t_ref[torch]'`")
def test_without_torch_pth_files_say_what_to_install(tmp_path, capsys, monkeypatch):
    path, _, _ = official_pair(tmp_path, "t2t_vit_7")
    ours = tmp_path / "w.safetensors"
    assert convert.main([str(path), str(ours)]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    code = predict.main([*write_images(tmp_path / "img")[:1], "--weights", str(path)])
    assert_user_error(code, capsys.readouterr(), "needs PyTorch", "pip install 't2t_ref[torch]'")
    code = convert.main([str(ours), str(tmp_path / "w.pth")])
    assert_user_error(code, capsys.readouterr(), "needs PyTorch")
    assert t2t_ref.load_pretrained(ours).name == "t2t_vit_7"  # safetensors need no torch
