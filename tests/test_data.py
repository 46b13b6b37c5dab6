"""Tests of t2t_ref.data: folder scanning, transforms, the synthetic set, the batch loader.

Every test makes its own data (real JPEG/PNG/BMP/WEBP files written with Pillow into tmp_path,
or synthetic arrays), small enough that the whole file runs in seconds.
"""

import math
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features
from scipy import stats

from reliability import tried
from t2t_ref.data import (IMAGENET_MEAN, IMAGENET_STD, SHAPE_CLASSES, ArrayDataset,
                          CorruptImage, DataError, EvalTransform, FileDataset, Loader,
                          RandomErasing, TrainTransform, decode, default_workers,
                          eval_transform, find_splits, make_shapes, make_shapes_splits,
                          model_input, normalize, random_resized_crop_params, sample_rng,
                          train_transform)
from t2t_ref.data.transforms import to_uint8_chw

HAS_WEBP = features.check("webp")


def random_image(rng, width=48, height=40, mode="RGB"):
    """A smooth random RGB image (compresses like a photo), converted to mode."""
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    return img.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else img.convert(mode)


@pytest.fixture
def image_folder(tmp_path):
    """DIR/train/{dog, ant, cat} (made in unsorted order) with mixed formats and junk:

    ant: 5 .jpg + 1 .JPEG, and notes.txt, .DS_Store (ignored)
    cat: .png in RGB, L (grayscale), RGBA, P (palette), and 2 .bmp
    dog: 3 .webp (or .png without WebP support), 2 .jpg, and corrupt.jpg (random bytes)
    Every class lists 6 images; returns the root.
    """
    rng = np.random.default_rng(0)
    train = tmp_path / "data" / "train"
    for name in ("dog", "ant", "cat"):
        (train / name).mkdir(parents=True)
    for i in range(5):
        random_image(rng).save(train / "ant" / f"a{i}.jpg", quality=90)
    random_image(rng).save(train / "ant" / "A5.JPEG", format="JPEG")
    (train / "ant" / "notes.txt").write_text("not an image")
    (train / "ant" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    for i, mode in enumerate(("RGB", "L", "RGBA", "P")):
        random_image(rng, mode=mode).save(train / "cat" / f"c{i}.png")
    for i in range(4, 6):
        random_image(rng).save(train / "cat" / f"c{i}.bmp")
    for i in range(3):
        ext = "webp" if HAS_WEBP else "png"
        random_image(rng).save(train / "dog" / f"d{i}.{ext}")
    for i in range(3, 5):
        random_image(rng).save(train / "dog" / f"d{i}.jpg")
    (train / "dog" / "corrupt.jpg").write_bytes(rng.integers(0, 256, 500, np.uint8).tobytes())
    return tmp_path / "data"


def make_class_folders(root, counts, split="train"):
    """root/split/<name>/<i>.png for {name: count}; tiny images."""
    rng = np.random.default_rng(1)
    for name, count in counts.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            random_image(rng, 8, 8).save(folder / f"{i:03d}.png")


# ---- folder.py ------------------------------------------------------------------------------

def test_classes_sorted_and_files_matched_by_extension(image_folder):
    classes, train, val = find_splits(image_folder, val_fraction=0.0)
    assert classes == ["ant", "cat", "dog"]
    assert val == []
    names = {os.path.basename(p): label for p, label in train}
    assert len(train) == 18
    assert names["A5.JPEG"] == 0 and names["c1.png"] == 1 and names["corrupt.jpg"] == 2
    assert "notes.txt" not in names and ".DS_Store" not in names
    for path, label in train:  # every sample's label is its folder's index
        assert classes[label] == os.path.basename(os.path.dirname(path))


def test_images_in_sub_folders_of_a_class_are_its_images(tmp_path):
    """As torchvision's ImageFolder: a class's images at any depth under its folder, in order
    of their path within it; hidden folders skipped; a link back up listed once, not looped."""
    rng = np.random.default_rng(2)
    cat, dog = tmp_path / "train" / "cat", tmp_path / "train" / "dog"
    for path in (cat / "z.png", cat / "sub" / "b.png", cat / "sub" / "deeper" / "c.png",
                 cat / ".cache" / "hidden.png", dog / "d.png", tmp_path / "elsewhere.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(rng, 8, 8).save(path)
    (cat / "sub" / "up").symlink_to(cat, target_is_directory=True)  # a cycle
    (dog / "linked.png").symlink_to(tmp_path / "elsewhere.png")     # a linked file counts
    (dog / "broken.png").symlink_to(tmp_path / "missing.png")       # a dead link does not
    classes, train, _ = find_splits(tmp_path, val_fraction=0.0)
    assert classes == ["cat", "dog"]
    within = [(os.path.relpath(path, tmp_path / "train"), label) for path, label in train]
    assert within == [(os.path.join("cat", "sub", "b.png"), 0),
                      (os.path.join("cat", "sub", "deeper", "c.png"), 0),
                      (os.path.join("cat", "z.png"), 0),
                      (os.path.join("dog", "d.png"), 1), (os.path.join("dog", "linked.png"), 1)]


def test_every_extension_of_torchvisions_image_folder_is_read(tmp_path):
    """TIFF (8- and 16-bit), PPM and PGM as well as JPEG, PNG, BMP and WebP: the files
    torchvision's ImageFolder takes are images here too, and decode to RGB."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "train" / "x"
    folder.mkdir(parents=True)
    (tmp_path / "train" / "y").mkdir()
    random_image(rng, 9, 7).save(tmp_path / "train" / "y" / "0.png")
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.TIF")
    Image.fromarray(pixels[..., 0]).save(folder / "b.tiff")
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(folder / "c.tif")  # 16-bit
    Image.fromarray(pixels).save(folder / "d.ppm")
    Image.fromarray(pixels[..., 0]).save(folder / "e.pgm")
    _, train, _ = find_splits(tmp_path, val_fraction=0.0)
    names = [os.path.basename(path) for path, label in train if label == 0]
    assert names == ["a.TIF", "b.tiff", "c.tif", "d.ppm", "e.pgm"]
    for path, label in train:
        image = decode(path)
        assert image.mode == "RGB" and image.size == (9, 7), path
    gray = np.asarray(decode(str(folder / "c.tif")))[..., 0]
    assert np.array_equal(gray, pixels[..., 0])  # 16 bits scaled back to the 8 they came from


def test_holdout_is_stratified_seeded_and_the_right_size(tmp_path):
    counts = {"b": 20, "a": 10, "c": 31}
    make_class_folders(tmp_path, counts)
    classes, train, val = find_splits(tmp_path, val_fraction=0.2, seed=3)
    again = find_splits(tmp_path, val_fraction=0.2, seed=3)
    other = find_splits(tmp_path, val_fraction=0.2, seed=4)
    assert (classes, train, val) == again
    assert val != other[2]
    assert not set(train) & set(val)
    for label, name in enumerate(classes):
        n_val = sum(1 for _, y in val if y == label)
        n_train = sum(1 for _, y in train if y == label)
        assert n_val + n_train == counts[name]
        assert n_val == int(0.2 * counts[name] + 0.5)  # 2, 4, 6: every class in both


def test_val_folder_is_used_when_present(tmp_path):
    make_class_folders(tmp_path, {"x": 3, "y": 2})
    make_class_folders(tmp_path, {"x": 1, "y": 2}, split="val")
    classes, train, val = find_splits(tmp_path, val_fraction=0.5)  # fraction ignored
    assert classes == ["x", "y"] and len(train) == 5
    assert [label for _, label in val] == [0, 1, 1]
    assert all(f"{os.sep}val{os.sep}" in path for path, _ in val)


def _flat_val(root):
    make_class_folders(root, {"x": 2})
    (root / "val").mkdir()
    random_image(np.random.default_rng(0)).save(root / "val" / "ILSVRC2012_val_00000001.JPEG",
                                                 format="JPEG")


def _empty_files(root):
    make_class_folders(root, {"x": 2})
    (root / "train" / "y").mkdir()
    (root / "train" / "y" / "0.jpg").write_bytes(b"")


def folder_case(what, make, kwargs, expected):
    """A dataset folder find_splits refuses: one line containing expected (exit 2 in the CLIs)."""
    return pytest.param(make, kwargs, expected, marks=tried(
        "data", what, f"exit 2: `error: ...{expected}...` (the problem, then the fix)"))


@pytest.mark.parametrize("make, kwargs, expected", [
    folder_case("`--data` a folder that does not exist", lambda root: None, {},
                "does not exist"),
    folder_case("`--data` a file", lambda root: root.write_text("x"), {}, "is a file"),
    (lambda root: root.mkdir(), {}, "no train/ folder"),
    (lambda root: (root / "train").mkdir(parents=True), {}, "no class folders"),
    folder_case("val/ images not sorted into class folders (ImageNet's val/ as downloaded)",
                _flat_val, {}, "no class folders"),
    folder_case("a class folder without images", lambda root: (
        make_class_folders(root, {"x": 2}), (root / "train" / "y").mkdir()), {},
        "has no images"),
    folder_case("a class folder of empty (0-byte) files", _empty_files, {}, "empty (0 bytes)"),
    (lambda root: (make_class_folders(root, {"x": 2, "y": 2, "z": 2}),
                   make_class_folders(root, {"x": 1, "w": 1}, split="val")), {},
     "only in train: 'y', 'z'; only in val: 'w'"),
    folder_case("`--val-fraction` too small for a class", lambda root: make_class_folders(
        root, {"x": 20, "y": 2}), {"val_fraction": 0.1}, "class 'y' (2 images) with 0 validation"),
    folder_case("`--val-fraction` leaving a class no training image", lambda root:
                make_class_folders(root, {"x": 2, "y": 2}), {"val_fraction": 0.9},
                "with 2 validation and 0 training"),
    (lambda root: make_class_folders(root, {"x": 2}), {"val_fraction": 1.0}, "outside [0, 1)"),
    folder_case("a dataset with one class", lambda root: make_class_folders(root, {"only": 4}),
                {"val_fraction": 0.5}, "has one class folder, 'only': a classifier needs at "
                "least two classes"),
    (lambda root: (make_class_folders(root, {"only": 2}),
                   make_class_folders(root, {"only": 2}, split="val")), {}, "has one class"),
])
def test_folder_errors_name_the_problem(tmp_path, make, kwargs, expected):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError) as info:
        find_splits(root, **kwargs)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message and ": " in message  # one line: the problem, then the fix


# ---- transforms.py --------------------------------------------------------------------------

def test_decode_converts_every_mode_to_rgb_and_rejects_bad_files(image_folder):
    for name in ("c0.png", "c1.png", "c2.png", "c3.png", "c4.bmp"):
        img = decode(image_folder / "train" / "cat" / name)
        assert img.mode == "RGB" and img.size == (48, 40)
    gray = decode(image_folder / "train" / "cat" / "c1.png")
    assert np.array_equal(np.asarray(gray)[..., 0], np.asarray(gray)[..., 2])
    for bad in (image_folder / "train" / "dog" / "corrupt.jpg", image_folder / "missing.jpg",
                image_folder / "train" / "ant" / "notes.txt"):
        with pytest.raises(CorruptImage) as info:
            decode(bad)
        assert info.value.path == bad and info.value.reason


def write_png16(path, pixels):
    """A 16-bit PNG of pixels (H, W, C) uint16, C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA, written
    by hand (Pillow cannot write 16-bit colour)."""
    H, W, C = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(H))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", W, H, 16, {1: 0, 2: 4, 3: 2, 4: 6}[C], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@tried("data", "16-bit PNG images (grey, grey+alpha, RGB, RGBA) and a 16-bit TIFF",
       "scaled to 8 bits (0..65535 to 0..255, within one level), not clipped to white")
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_images_are_scaled_to_8_bits(tmp_path, channels):
    """A dark 16-bit image (values up to 20000 of 65535) must decode dark; clipped at 255, as
    convert('RGB') does with mode I;16, it came out all white."""
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 20_000, (6, 7, channels)).astype(np.uint16)
    write_png16(tmp_path / "deep.png", pixels)
    decoded = np.asarray(decode(tmp_path / "deep.png")).astype(np.int64)  # (6, 7, 3)
    colour = pixels[..., :3] if channels >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
    assert np.abs(decoded - colour / 257).max() <= 1
    assert decoded.max() < 90


def test_16_and_32_bit_integer_tiffs_are_scaled_and_float_ones_refused(tmp_path):
    pixels = np.arange(0, 60_000, 1000, dtype=np.uint16).reshape(6, 10)
    for dtype in (np.uint16, np.int32):  # Pillow: modes I;16 and I
        Image.fromarray(pixels.astype(dtype)).save(tmp_path / "deep.tif")
        decoded = np.asarray(decode(tmp_path / "deep.tif"))[..., 0]
        assert np.array_equal(decoded, np.rint(pixels / 257).astype(np.uint8))
    Image.fromarray(pixels.astype(np.float32) / 65535).save(tmp_path / "float.tif")
    with pytest.raises(CorruptImage, match="float image has no agreed value range"):
        decode(tmp_path / "float.tif")


def test_eval_transform_matches_a_hand_computed_centre_crop():
    img = random_image(np.random.default_rng(5), width=60, height=40)
    out = eval_transform(img, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    # by hand: shorter side to int(32 / 0.9) = 35 -> (52, 35); crop left round(10), top round(1.5)
    resized = img.resize((52, 35), Image.Resampling.BICUBIC)
    crop = np.asarray(resized.crop((10, 2, 42, 34)), dtype=np.float32) / 255.0  # (32, 32, 3)
    expected = ((crop - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)
    assert np.array_equal(out, expected)
    assert eval_transform(img.convert("L"), 32).shape == (3, 32, 32)  # any mode


def test_normalisation_of_a_constant_image():
    colour = (200, 100, 30)
    out = eval_transform(Image.new("RGB", (70, 50), colour), 224)
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    assert out.shape == (3, 224, 224)
    assert np.allclose(out, np.float32(expected)[:, None, None], atol=1e-5)


def test_random_resized_crop_stays_within_scale_and_ratio():
    rng = np.random.default_rng(0)
    height, width = 120, 160
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(height, width, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # bounds hold up to the rounding of w and h to whole pixels
        assert 0.08 * height * width * 0.9 <= h * w <= height * width
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_falls_back_to_a_centre_crop_of_allowed_ratio():
    rng = np.random.default_rng(0)
    # an impossible scale forces the fallback; a 3:1 image is cut to 4:3, centred
    assert random_resized_crop_params(100, 300, rng, scale=(2.0, 3.0)) == (0, 83, 100, 133)
    assert random_resized_crop_params(300, 100, rng, scale=(2.0, 3.0)) == (83, 0, 133, 100)
    assert random_resized_crop_params(90, 100, rng, scale=(2.0, 3.0)) == (0, 0, 90, 100)


def test_train_transform_flips_about_half_the_time():
    left_dark = np.zeros((30, 40, 3), dtype=np.uint8)
    left_dark[:, 20:] = 255
    img = Image.fromarray(left_dark)
    rng = np.random.default_rng(1)
    flips = 0
    for _ in range(400):  # scale 1 and ratio 4/3 crop the whole image: only the flip varies
        out = train_transform(img, 16, rng, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
        assert out.shape == (3, 16, 16) and out.dtype == np.float32
        flips += out[0, :, :8].mean() > out[0, :, 8:].mean()
    assert 160 <= flips <= 240  # binomial(400, 0.5): mean 200, sd 10


def test_train_transform_is_a_function_of_the_generator():
    img = random_image(np.random.default_rng(2))
    a = train_transform(img, 24, np.random.default_rng(7))
    b = train_transform(img, 24, np.random.default_rng(7))
    c = train_transform(img, 24, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---- synthetic.py ---------------------------------------------------------------------------

def test_synthetic_set_is_deterministic_and_balanced():
    images, labels, names = make_shapes(1003, 32, seed=0)
    again, labels_again, _ = make_shapes(1003, 32, seed=0)
    other, _, _ = make_shapes(1003, 32, seed=1)
    assert images.shape == (1003, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and names == list(SHAPE_CLASSES)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    counts = np.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    _, labels4, names4 = make_shapes(40, 32, seed=0, num_classes=4)
    assert names4 == list(SHAPE_CLASSES[:4]) and np.bincount(labels4).tolist() == [10] * 4


def test_synthetic_splits_differ_and_are_deterministic():
    (tx, ty), (vx, vy), _ = make_shapes_splits(100, 50, 32, seed=0)
    (tx2, _), (vx2, _), _ = make_shapes_splits(100, 50, 32, seed=0)
    assert tx.shape == (100, 32, 32, 3) and vx.shape == (50, 32, 32, 3)
    assert np.array_equal(tx, tx2) and np.array_equal(vx, vx2)
    assert not np.array_equal(tx[:50], vx)


def test_synthetic_classes_differ_by_shape_not_colour():
    images, labels, _ = make_shapes(2000, 32, seed=0)
    pixels = images.astype(np.float64)
    groups = lambda values: [values[labels == c] for c in range(10)]  # noqa: E731
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]],
                            axis=1)                                       # (N, 4S, 3)
    background = np.median(border, axis=1)                                # (N, 3)
    distance = np.linalg.norm(pixels - background[:, None, None], axis=-1)
    inside = distance > 50                                                # (N, S, S)
    foreground = (np.sum(pixels * inside[..., None], axis=(1, 2))
                  / np.sum(inside, axis=(1, 2))[:, None])                 # (N, 3)
    # colour: the background and the shape's colour do not depend on the class
    for name, colour in (("background", background), ("foreground", foreground)):
        for channel in range(3):
            p = stats.f_oneway(*groups(colour[:, channel])).pvalue
            assert p > 0.001, f"{name} channel {channel}: class means differ, p = {p:.2g}"
    # the shape is the lighter colour in every image (up to the noise, for pairs of nearly
    # equal luma that differ in hue)
    luma_difference = (foreground - background) @ np.array([0.299, 0.587, 0.114])  # (N,)
    assert luma_difference.min() > -3.0, \
        f"a shape darker than its background by {-luma_difference.min():.1f} (of 255)"
    # shape: the fraction of the image that is not background does
    area = inside.mean(axis=(1, 2))                                       # (N,)
    assert stats.f_oneway(*groups(area)).pvalue < 1e-20
    # and orientation tells hbars from vbars: vertical vs horizontal change
    dy = np.abs(np.diff(pixels, axis=1)).mean(axis=(1, 2, 3))
    dx = np.abs(np.diff(pixels, axis=2)).mean(axis=(1, 2, 3))
    orientation = (dy - dx) / (dy + dx)
    hbars, vbars = SHAPE_CLASSES.index("hbars"), SHAPE_CLASSES.index("vbars")
    assert orientation[labels == hbars].mean() > 0.1 > -0.1 > orientation[labels == vbars].mean()


# ---- datasets.py and loader.py --------------------------------------------------------------

def all_batches(loader, epoch, start_batch=0):
    return list(loader.epoch_batches(epoch, start_batch))


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for k, ((x, y, e), (x2, y2, e2)) in enumerate(zip(got, expected)):
        assert x.dtype == np.uint8 and y.dtype == np.int64
        assert np.array_equal(y, y2), f"batch {k}: labels {y} vs {y2}"
        assert np.array_equal(x, x2), \
            f"batch {k}: images differ by {np.abs(x.astype(int) - x2).max()}"
        assert (e is None) == (e2 is None) and (e is None or np.array_equal(e, e2)), \
            f"batch {k}: erasing rectangles {e} vs {e2}"


@pytest.mark.parametrize("processes", [False, True])
def test_loader_batches_do_not_depend_on_workers(image_folder, processes, capsys):
    _, train, _ = find_splits(image_folder, val_fraction=0.0)
    reported = []
    with Loader(FileDataset(train), 4, 16, train=True, seed=1) as serial, \
            Loader(FileDataset(train), 4, 16, train=True, seed=1, workers=2, processes=processes,
                   on_bad_file=lambda path, reason: reported.append(path)) as parallel:
        for epoch in range(2):
            assert_same_batches(all_batches(parallel, epoch), all_batches(serial, epoch))
    corrupt = str(image_folder / "train" / "dog" / "corrupt.jpg")
    # skipped, counted, reported once over two epochs (stderr for one loader, callback other)
    assert list(serial.bad_files) == [corrupt] and list(parallel.bad_files) == [corrupt]
    assert reported == [corrupt]
    err = capsys.readouterr().err
    assert err.startswith("warning: skipping unreadable image") and err.count("\n") == 1


def test_loader_epochs_cover_the_data_in_a_seeded_order():
    images, labels, _ = make_shapes(50, 32, seed=0)
    data = ArrayDataset(images, labels)
    train = Loader(data, 8, 32, train=True, seed=0)
    assert len(train) == 6                                  # drop_last: 50 // 8
    order0, order1 = train.epoch_order(0), train.epoch_order(1)
    assert np.array_equal(order0, Loader(data, 8, 32, train=True, seed=0).epoch_order(0))
    assert not np.array_equal(order0, order1)
    assert sorted(order0.tolist()) == list(range(50))
    batches = all_batches(train, 0)
    assert [len(b.labels) for b in batches] == [8] * 6
    assert np.array_equal(np.concatenate([b.labels for b in batches]), labels[order0[:48]])
    evaluation = Loader(data, 8, 32, train=False)
    assert len(evaluation) == 7                              # keeps the last 2
    batches = all_batches(evaluation, 0)
    assert [len(b.labels) for b in batches] == [8] * 6 + [2]
    assert np.array_equal(np.concatenate([b.labels for b in batches]), labels)  # in order
    x = batches[0].images
    assert x.shape == (8, 3, 32, 32) and x.dtype == np.uint8
    assert np.array_equal(normalize(x[0]), eval_transform(data.image(0), 32))


def test_eval_without_resize_takes_the_images_as_they_are():
    """as_drawn=True (the built-in shapes): an S x S image is only normalised, pixel for
    pixel; the default resizes to S/0.9 and crops S, which changes the pixels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    dataset = ArrayDataset(images, np.arange(6) % 2)
    expected = ((images.transpose(0, 3, 1, 2) / 255.0 - np.asarray(IMAGENET_MEAN)[:, None, None])
                / np.asarray(IMAGENET_STD)[:, None, None])
    with Loader(dataset, 3, 16, train=False, transform=EvalTransform(as_drawn=True)) as loader:
        as_drawn = normalize(np.concatenate([b.images for b in loader.epoch_batches(0)]))
    with Loader(dataset, 3, 16, train=False) as loader:
        resized = normalize(np.concatenate([b.images for b in loader.epoch_batches(0)]))
    assert np.abs(as_drawn - expected).max() < 1e-5, "eval_resize=False changed the pixels"
    assert np.abs(resized - expected).max() > 0.1, "the default eval transform did not resize"


def test_loader_resumes_mid_epoch():
    images, labels, _ = make_shapes(64, 32, seed=0)
    data = ArrayDataset(images, labels)
    with Loader(data, 8, 32, train=True, seed=2, workers=2) as loader:
        full = all_batches(loader, 3)
        assert_same_batches(all_batches(loader, 3, start_batch=5), full[5:])
        assert all_batches(loader, 3, start_batch=len(loader)) == []
        with pytest.raises(ValueError):
            loader.epoch_batches(3, start_batch=len(loader) + 1)
    serial = Loader(data, 8, 32, train=True, seed=2)
    assert_same_batches(all_batches(serial, 3, start_batch=5), full[5:])


def test_loader_augments_in_memory_images_like_files():
    images, labels, _ = make_shapes(16, 32, seed=0)
    loader = Loader(ArrayDataset(images, labels), 16, 32, train=True, seed=0, shuffle=False)
    (x, y, _), = all_batches(loader, 0)
    for i in (0, 7):  # sample i of epoch 0: train_transform with the generator of (0, 0, i)
        expected = train_transform(Image.fromarray(images[i]), 32, sample_rng(0, 0, i))
        assert np.array_equal(normalize(x[i]), expected)
    plain = eval_transform(Image.fromarray(images[0]), 32)
    assert not np.array_equal(normalize(x[0]), plain)  # augmented


@pytest.mark.parametrize("processes", [False, True])
def test_loader_workers_shut_down_on_interrupt_and_early_stop(processes):
    images, labels, _ = make_shapes(64, 32, seed=0)
    loader = Loader(ArrayDataset(images, labels), 4, 32, train=True, workers=2,
                    processes=processes)
    with pytest.raises(KeyboardInterrupt):
        with loader:
            for k, _ in enumerate(loader.epoch_batches(0)):
                if k == 2:
                    pool = loader._pool
                    workers = list(pool._processes.values()) if processes else list(pool._threads)
                    raise KeyboardInterrupt
    assert loader._pool is None and len(workers) == 2
    for worker in workers:
        worker.join(timeout=5)
        assert not worker.is_alive()
    # an early stop leaves the loader usable; the next epoch restarts the workers
    batches = loader.epoch_batches(1)
    next(batches)
    batches.close()
    assert len(all_batches(loader, 1)) == len(loader)
    loader.close()


def test_dataset_and_loader_argument_errors():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(np.zeros((2, 8, 8, 3), np.float32), [0, 1])
    with pytest.raises(ValueError, match="do not match"):
        ArrayDataset(np.zeros((2, 8, 8, 3), np.uint8), [0])
    with pytest.raises(ValueError, match="smaller batch"):
        Loader(ArrayDataset(np.zeros((2, 8, 8, 3), np.uint8), [0, 1]), 4, 8, train=True)
    assert math.isclose(IMAGENET_STD[0], 0.229)


# ---- the whole recipe through the loader: workers, pieces, shared memory ----------------------

RECIPE = dict(transform=TrainTransform(scale=(0.3, 1.0), hflip=0.5, vflip=0.2,
                                       interpolation="random", aa="rand-m9-mstd0.5-inc1"),
              erasing=RandomErasing(0.5, "pixel", max_count=2))


def recipe_loader(dataset, **options):
    return Loader(dataset, 8, 32, train=True, seed=3, **RECIPE, **options)


@pytest.mark.parametrize("workers, processes", [(1, True), (2, True), (2, False)])
def test_recipe_batches_do_not_depend_on_workers(workers, processes):
    """RandAugment, random interpolation, flips and the erasing rectangles come out the same
    from the calling process, worker threads and worker processes, epoch after epoch."""
    images, labels, _ = make_shapes(40, 32, seed=0)
    data = ArrayDataset(images, labels)
    with recipe_loader(data) as serial, \
            recipe_loader(data, workers=workers, processes=processes) as parallel:
        for epoch in range(2):
            expected = all_batches(serial, epoch)
            assert_same_batches(all_batches(parallel, epoch), expected)
    erase = np.concatenate([b.erase for b in expected])
    assert erase.shape == (40, 2, 5) and 0.3 < np.mean(erase[:, 0, 2] > 0) < 0.7
    # sample i of the epoch is the recipe applied with sample i's generator, nothing else
    order = serial.epoch_order(1)
    rng = sample_rng(3, 1, int(order[0]))
    first = to_uint8_chw(RECIPE["transform"](data.image(int(order[0])), 32, rng))
    assert np.array_equal(expected[0].images[0], first)
    assert np.array_equal(expected[0].erase[0], RECIPE["erasing"].draw(32, rng))


def test_pieces_and_the_consumer_give_the_whole_batch():
    """MPI ranks read pieces of each batch (and mirrored pieces for mixup): normalised and
    erased on the consumer's side, the pieces put together are the whole batch."""
    import array_api_compat.numpy as xp
    images, labels, _ = make_shapes(24, 32, seed=0)
    data = ArrayDataset(images, labels)

    def consumed(loader):
        return [(model_input(b.images, b.erase, loader.erasing, xp=xp, device="cpu"), b.labels)
                for b in loader.epoch_batches(0)]

    whole = consumed(recipe_loader(data))
    pieces = [consumed(recipe_loader(data, piece=(i, 3))) for i in range(3)]
    mirrored = consumed(recipe_loader(data, piece=(0, 3), mirrored=True))
    for k, (x, y) in enumerate(whole):
        assert np.array_equal(np.concatenate([p[k][0] for p in pieces]), x), f"batch {k}"
        assert np.array_equal(np.concatenate([p[k][1] for p in pieces]), y)
        assert np.array_equal(mirrored[k][0], x[::-1][:3])  # sample B-1-j for sample j


def shared_blocks():
    return {name for name in os.listdir("/dev/shm") if name.startswith(("psm_", "wnsm_"))} \
        if os.path.isdir("/dev/shm") else set()


def test_worker_processes_free_their_shared_memory():
    images, labels, _ = make_shapes(48, 32, seed=0)
    before = shared_blocks()
    with recipe_loader(ArrayDataset(images, labels), workers=2) as loader:
        assert len(all_batches(loader, 0)) == 6
        batches = loader.epoch_batches(1)
        next(batches)
        assert len(shared_blocks() - before) == 1  # one ring of slots for the epoch
        batches.close()  # an early stop frees the ring too
        assert shared_blocks() == before
    assert shared_blocks() == before


@tried("data", "worker processes with less shared memory (/dev/shm) than their batches need, "
       "(Docker gives 64 MB)", "`error: the loader's worker processes need 9 MB of shared "
       "memory for the batches in flight, but /dev/shm has 5 MB free: use fewer --workers or a "
       "smaller batch, or give the container more (docker run --shm-size=2g)`, before any "
       "worker starts")
def test_too_little_shared_memory_is_said_before_a_worker_dies(monkeypatch):
    images, labels, _ = make_shapes(16, 224, seed=0)
    loader = Loader(ArrayDataset(images, labels), 16, 224, train=True, workers=2)
    real = os.statvfs

    def small(path):  # 5 MB free, where 4 slots of 16 x 3 x 224 x 224 uint8 need 9.2 MB
        stat = real(path)
        return os.statvfs_result((*stat[:4], 5 * 2**20 // stat.f_frsize, *stat[5:]))

    monkeypatch.setattr(os, "statvfs", small)
    with loader, pytest.raises(DataError, match=r"need 9 MB of shared memory.*5 MB free: use "
                               r"fewer --workers or a smaller batch") as err:
        next(loader.epoch_batches(0))
    assert "\n" not in str(err.value)


def test_default_workers_fit_in_the_shared_memory(monkeypatch):
    """--workers' default takes as many workers as /dev/shm holds the batches of (2 in flight
    each), here Docker's 64 MB at 224 x 224, batch 64 (9.2 MB a batch: 6 fit)."""
    from t2t_ref.data import workers
    batch = 64 * 3 * 224 * 224
    monkeypatch.setattr(workers, "shared_memory_free", lambda where="/dev/shm": 64 * 2**20)
    count, note = workers.workers_that_fit(15, batch)
    assert count == 3
    assert note == ("note: /dev/shm has 64 MB free, room for the batches in flight of 3 loader "
                    "workers, not 15: using 3 (give the container more, docker run "
                    "--shm-size=2g, or set --workers)")
    assert workers.workers_that_fit(15, batch, rings=2)[0] == 1  # mixup's partner loader too
    count, note = workers.workers_that_fit(15, batch, ranks_on_node=4)  # 16 MB each
    assert count == 0 and note.endswith("not 15: loading in the training process instead "
                                        "(give the container more, docker run --shm-size=2g, "
                                        "or set --workers)")
    assert "shared by 4 MPI ranks" in note
    assert workers.workers_that_fit(3, batch) == (3, None)  # they fit: nothing to say
    monkeypatch.setattr(workers, "shared_memory_free", lambda where="/dev/shm": None)
    assert workers.workers_that_fit(15, batch) == (15, None)  # nothing to ask: as asked


def test_default_workers_are_the_cores_less_one_shared_by_ranks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers() == 15 and default_workers(4) == 3 and default_workers(16) == 0
