"""The augmentation of the training recipe against the published definitions: RandAugment and
random erasing (data/randaugment.py, data/erasing.py; timm's auto_augment.py and
random_erasing.py, restated here as tables), the train and eval transforms with timm's flags
(data/transforms.py), normalisation (torchvision's, by torch itself)."""

import math
import re

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from t2t_ref.backend import get_namespace, to_numpy
from t2t_ref.data import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, RandomErasing,
                          TrainTransform, eval_transform, normalize, random_resized_crop_params)
from t2t_ref.data.erasing import random_erasing
from t2t_ref.data.randaugment import OPS, RAND_INCREASING_OPS, RAND_OPS, apply_op, rand_augment
from t2t_ref.data.transforms import to_uint8_chw
from t2t_ref.gaps import keyed_normal


def photo(size=48, seed=0):
    """A colourful test image: gradients, a disc and noise, so every op has something to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1)
    img[(x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05] = (250, 30, 60)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


class Fixed:
    """A stand-in Generator whose random() is fixed: picks the direction of signed ops."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


# timm's level functions at magnitude 9 (x = 0.9), the positive direction (random() <= 0.5)
ARGUMENT_AT_9 = {"Rotate": 27.0, "ShearX": 0.27, "ShearY": 0.27, "TranslateXRel": 0.405,
                 "TranslateYRel": 0.405, "Color": 1.72, "Contrast": 1.72, "Brightness": 1.72,
                 "Sharpness": 1.72, "ColorIncreasing": 1.81, "ContrastIncreasing": 1.81,
                 "BrightnessIncreasing": 1.81, "SharpnessIncreasing": 1.81, "Posterize": 3,
                 "PosterizeIncreasing": 1, "Solarize": 230, "SolarizeIncreasing": 26,
                 "SolarizeAdd": 99, "AutoContrast": None, "Equalize": None, "Invert": None}


@pytest.mark.parametrize("name", sorted(OPS))
def test_magnitude_to_argument_is_timms(name):
    _, argument = OPS[name]
    got = argument(0.9, Fixed(0.2))
    expected = ARGUMENT_AT_9[name]
    assert got == pytest.approx(expected) if expected is not None else got is None, (name, got)
    if name in ("Rotate", "ShearX", "TranslateXRel", "ColorIncreasing"):  # the other way
        flipped = argument(0.9, Fixed(0.8))
        assert flipped == pytest.approx(2.0 - expected if "Increasing" in name else -expected)


# the ops that leave the image as it is at magnitude 0 by their definition (no rotation,
# shear or shift; increasing ops at their mildest), and the ones that do so at magnitude 10
IDENTITY_AT_0 = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "SolarizeAdd",
                 "SolarizeIncreasing", "ColorIncreasing", "ContrastIncreasing",
                 "BrightnessIncreasing", "SharpnessIncreasing"}
IDENTITY_AT_10 = {"Solarize"}  # threshold 256: nothing is at or above it


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_at_magnitude_0_and_10(name):
    img = photo()
    original = np.asarray(img)
    rng = np.random.default_rng(0)
    for magnitude, identities in ((0, IDENTITY_AT_0), (10, IDENTITY_AT_10)):
        out = apply_op(img, name, magnitude, rng)
        assert out.size == img.size and out.mode == "RGB"
        same = np.array_equal(np.asarray(out), original)
        if name in ("AutoContrast", "Equalize", "Invert"):
            assert not same, f"{name} left the image unchanged"
        elif name in identities:
            assert same, f"{name} at magnitude {magnitude} should leave the image unchanged"
        else:
            assert not same, f"{name} at magnitude {magnitude} left the image unchanged"


def test_spec_grammar():
    augment = rand_augment("rand-m9-mstd0.5-inc1")
    assert (augment.magnitude, augment.num_ops, augment.magnitude_std) == (9, 2, 0.5)
    assert augment.ops == RAND_INCREASING_OPS and augment.weights is None
    augment = rand_augment("rand-m7-n3")
    assert (augment.magnitude, augment.num_ops, augment.magnitude_std) == (7, 3, 0)
    assert augment.ops == RAND_OPS
    assert rand_augment("rand-inc0").ops == RAND_OPS  # (timm reads inc0 as on)
    assert rand_augment("rand-mstd101").magnitude_std == math.inf
    assert rand_augment("rand-m12-mmax15").magnitude_max == 15
    weighted = rand_augment("rand-w0")
    assert weighted.weights[RAND_OPS.index("Rotate")] == pytest.approx(0.3)
    assert weighted.weights[RAND_OPS.index("Invert")] == 0


@pytest.mark.parametrize("spec, says", [("rand-x", "'x' is not a section"),
                                        ("augmix-m3", "starts with 'rand'"),
                                        ("rand-m9.5", "m takes a whole number"),
                                        ("rand-n0", "n must be at least 1"),
                                        ("rand-w1", "w0 is the only")])
def test_bad_specs_say_what_is_wrong(spec, says):
    with pytest.raises(ValueError, match=says) as err:
        rand_augment(spec)
    assert "\n" not in str(err.value)


def test_randaugment_is_a_function_of_the_generator():
    augment = rand_augment("rand-m9-mstd0.5-inc1")
    img = photo()
    runs = [np.asarray(augment(img, np.random.default_rng(s))) for s in (1, 1, 2, 3, 4, 5)]
    assert np.array_equal(runs[0], runs[1])
    assert sum(not np.array_equal(runs[0], r) for r in runs[2:]) >= 3
    # n ops, each with probability 0.5: about a quarter of the images come out untouched
    untouched = np.mean([np.array_equal(np.asarray(augment(img, np.random.default_rng(s))),
                                        np.asarray(img)) for s in range(200)])
    assert 0.1 < untouched < 0.45, untouched


# ---- random erasing --------------------------------------------------------------------------

def test_random_erasing_erases_a_fraction_within_the_bounds():
    erased_fractions, erased_images = [], 0
    for seed in range(300):
        x = np.full((3, 64, 64), 7.0, dtype=np.float32)
        out = random_erasing(x, np.random.default_rng(seed), probability=0.25, mode="pixel")
        assert out.shape == (3, 64, 64) and out.dtype == np.float32
        changed = np.any(out != 7.0, axis=0)
        if changed.any():
            erased_images += 1
            erased_fractions.append(changed.mean())
    assert 0.18 < erased_images / 300 < 0.32, erased_images  # probability 0.25
    assert min(erased_fractions) >= 0.02 * 0.5 and max(erased_fractions) <= 1 / 3 * 1.2, \
        (min(erased_fractions), max(erased_fractions))  # area in [0.02, 1/3], rounded sides


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_modes(mode):
    x = np.full((3, 64, 64), 7.0, dtype=np.float32)
    out = random_erasing(x, np.random.default_rng(0), probability=1.0, mode=mode, max_count=3)
    inside = out[:, np.any(out != 7.0, axis=0)]  # (3, erased pixels)
    assert inside.size > 0
    if mode == "const":
        assert np.all(inside == 0.0)
    elif mode == "rand":  # one colour per rectangle: few distinct values per channel
        assert len(np.unique(inside[0])) <= 3
    else:  # per-pixel normal noise
        assert abs(inside.mean()) < 0.2 and 0.8 < inside.std() < 1.2


def test_random_erasing_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="choose one of pixel, rand, const"):
        random_erasing(np.zeros((3, 8, 8)), np.random.default_rng(0), probability=1.0,
                       mode="noise")


# ---- the training and evaluation transforms (data/transforms.py) -----------------------------

SQUARE = 40  # a square photo's side; the outputs below are S = 32


def square_photo(seed=0):
    return photo(SQUARE, seed)


def resized(img, size=32):
    """The identity pipeline's image: only resized (bicubic) to size x size."""
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("options", [
    {}, {"no_aug": True}, {"hflip": 1.0, "vflip": 1.0}, {"interpolation": "random"},
    {"interpolation": "bilinear"}, {"color_jitter": 0.4}, {"aa": "rand-m9-mstd0.5-inc1"},
    {"aa": "rand-m7-n3-mstd101", "interpolation": "random", "scale": (0.3, 0.6)}],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "default")
def test_train_transform_outputs_s_by_s_uint8_and_normalises_into_range(options):
    transform = TrainTransform(**options)
    for seed in range(5):
        img = transform(photo(48 + 8 * seed, seed).resize((48 + 8 * seed, 40)), 32,
                        np.random.default_rng(seed))
        assert img.size == (32, 32) and img.mode == "RGB"
        x = to_uint8_chw(img)
        assert x.shape == (3, 32, 32) and x.dtype == np.uint8
        z = normalize(x)
        low = (0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
        high = (1 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
        assert z.shape == (3, 32, 32) and z.dtype == np.float32
        assert np.all(z >= low[:, None, None] - 1e-6) and np.all(z <= high[:, None, None] + 1e-6)


def test_normalize_is_torchvisions_to_tensor_then_normalize():
    """Against torch: ToTensor's x.float().div(255), then Normalize's sub_(mean).div_(std)."""
    import torch
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    t = torch.from_numpy(x).float().div(255)
    t = t.sub_(torch.tensor(IMAGENET_MEAN)[:, None, None]).div_(
        torch.tensor(IMAGENET_STD)[:, None, None])
    got = normalize(x)
    assert got.dtype == np.float32
    assert np.array_equal(got, t.numpy()), f"differs by {np.abs(got - t.numpy()).max()}"


def test_no_aug_only_resizes_and_centre_crops():
    rng = np.random.default_rng(0)
    transform = TrainTransform(no_aug=True, aa="rand-m9-mstd0.5-inc1", color_jitter=0.4)
    square = square_photo()
    for _ in range(10):
        assert np.array_equal(np.asarray(transform(square, 32, rng)), resized(square))
    # a 60 x 40 image: shorter side to 32 (48 x 32, bicubic), centre crop from left 8
    wide = photo(60).resize((60, 40))
    expected = wide.resize((48, 32), Image.Resampling.BICUBIC).crop((8, 0, 40, 32))
    assert np.array_equal(np.asarray(transform(wide, 32, rng)), np.asarray(expected))


def test_no_flip_and_a_whole_crop_are_the_identity_pipeline():
    """--hflip 0 with a crop of the whole image (scale 1, ratio 1) and --crop-pct 1: a square
    image is only resized, in training and in evaluation."""
    square = square_photo()
    whole = TrainTransform(scale=(1, 1), ratio=(1, 1), hflip=0.0)
    for seed in range(20):
        assert np.array_equal(np.asarray(whole(square, 32, np.random.default_rng(seed))),
                              resized(square))
    assert np.array_equal(np.asarray(EvalTransform(crop_pct=1.0)(square, 32)), resized(square))
    # the official 0.9 zooms in: resize to int(32 / 0.9) = 35, crop the centre 32
    zoomed = square.resize((35, 35), Image.Resampling.BICUBIC).crop((2, 2, 34, 34))
    assert np.array_equal(np.asarray(EvalTransform()(square, 32)), np.asarray(zoomed))
    assert np.array_equal(normalize(to_uint8_chw(EvalTransform(0.5, "bilinear")(square, 32))),
                          eval_transform(square, 32, 0.5, "bilinear"))


@pytest.mark.parametrize("flag, p, flip", [("hflip", 0.0, np.fliplr), ("hflip", 0.3, np.fliplr),
                                           ("hflip", 1.0, np.fliplr), ("vflip", 0.7, np.flipud)])
def test_flips_happen_with_their_probability(flag, p, flip):
    square = square_photo()
    transform = TrainTransform(scale=(1, 1), ratio=(1, 1), **{"hflip": 0.0, flag: p})
    plain = resized(square)
    flipped = 0
    for seed in range(400):
        out = np.asarray(transform(square, 32, np.random.default_rng(seed)))
        assert np.array_equal(out, plain) or np.array_equal(out, flip(plain))
        flipped += np.array_equal(out, flip(plain))
    sd = math.sqrt(400 * p * (1 - p))
    assert abs(flipped - 400 * p) <= 4 * sd + 0.5, (flipped, 400 * p)


def test_random_interpolation_picks_bilinear_or_bicubic():
    img = square_photo()
    transform = TrainTransform(scale=(0.5, 0.5), ratio=(1, 1), hflip=0.0,
                               interpolation="random")
    kinds = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_params(SQUARE, SQUARE, rng, (0.5, 0.5), (1, 1))
        choice = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
        expected = img.crop((left, top, left + w, top + h)).resize((32, 32), choice)
        out = transform(img, 32, np.random.default_rng(seed))
        assert np.array_equal(np.asarray(out), np.asarray(expected))
        kinds.append(choice)
    assert len(set(kinds)) == 2


def test_colour_jitter_is_torchvisions_in_a_random_order():
    """ColorJitter(0.4, 0.4, 0.4) restated: a permutation of 4 (hue is off), then brightness,
    contrast, saturation factors uniform in [0.6, 1.4], each Pillow's enhancer, in that order."""
    from PIL import ImageEnhance
    img = square_photo()
    transform = TrainTransform(scale=(1, 1), ratio=(1, 1), hflip=0.0, color_jitter=0.4)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        random_resized_crop_params(SQUARE, SQUARE, rng, (1, 1), (1, 1))  # the crop's draws
        expected = img.resize((32, 32), Image.Resampling.BICUBIC)
        for k in rng.permutation(4):
            if k < 3:
                enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast,
                            ImageEnhance.Color)[k]
                expected = enhancer(expected).enhance(rng.uniform(0.6, 1.4))
        got = transform(img, 32, np.random.default_rng(seed))
        assert np.array_equal(np.asarray(got), np.asarray(expected)), seed
    # and --aa turns it off, as in timm: RandAugment alone follows the crop
    aa = TrainTransform(scale=(1, 1), ratio=(1, 1), hflip=0.0, color_jitter=0.4, aa="rand-m9")
    for seed in range(10):
        rng = np.random.default_rng(seed)
        random_resized_crop_params(SQUARE, SQUARE, rng, (1, 1), (1, 1))
        expected = rand_augment("rand-m9", "bicubic")(
            img.resize((32, 32), Image.Resampling.BICUBIC), rng)
        got = aa(img, 32, np.random.default_rng(seed))
        assert np.array_equal(np.asarray(got), np.asarray(expected)), seed


@pytest.mark.parametrize("options, says", [
    ({"hflip": -1}, "--hflip -1: a probability"), ({"vflip": 2}, "--vflip 2: a probability"),
    ({"interpolation": "cubic"}, "--train-interpolation 'cubic': choose one of random"),
    ({"aa": "rand-x"}, "'x' is not a section"), ({"scale": (0.5, 0.2)}, "--scale 0.5 0.2"),
    ({"color_jitter": -1}, "--color-jitter -1")])
def test_bad_transform_settings_say_which_flag(options, says):
    with pytest.raises(ValueError, match=re.escape(says)) as err:
        TrainTransform(**options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make, says", [
    (lambda: EvalTransform(crop_pct=0), "--crop-pct 0: give a fraction in (0, 1]"),
    (lambda: EvalTransform(interpolation="random"), "--interpolation 'random'"),
    (lambda: RandomErasing(probability=2), "--reprob 2: a probability"),
    (lambda: RandomErasing(mode="noise"), "--remode 'noise'"),
    (lambda: RandomErasing(max_count=0), "--recount 0")])
def test_bad_eval_and_erasing_settings_say_which_flag(make, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        make()


# ---- random erasing in two halves: rectangles in the worker, noise on the device -------------

def erase_batch(erasing, batch, size, backend="numpy", seeds=None, fill=7.0):
    """A constant normalised batch (B, 3, S, S) erased as the loader and feed.py do: rows
    drawn per sample from its own generator, applied on the backend's device."""
    xp, device = get_namespace(backend)
    seeds = range(batch) if seeds is None else seeds
    rows = np.stack([erasing.draw(size, np.random.default_rng(s)) for s in seeds])
    x = xp.full((len(rows), 3, size, size), fill, dtype=xp.float32, device=device)
    return to_numpy(erasing.apply(x, rows)), rows


def test_consumer_erasing_statistics():
    erasing = RandomErasing(0.25, "pixel")
    out, rows = erase_batch(erasing, 400, 64)
    changed = np.any(out != 7.0, axis=1)                                # (B, S, S)
    erased = changed.any(axis=(1, 2))
    assert np.array_equal(erased, rows[:, 0, 2] > 0)
    assert 0.18 < erased.mean() < 0.32, erased.mean()                   # probability 0.25
    fractions = changed[erased].mean(axis=(1, 2))
    assert fractions.min() >= 0.02 * 0.8 and fractions.max() <= 1 / 3 * 1.15, \
        (fractions.min(), fractions.max())
    noise = out.transpose(1, 0, 2, 3)[:, changed]                       # (3, erased pixels)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02, (noise.mean(), noise.std())
    assert stats.kstest(noise.ravel()[:20000], "norm").pvalue > 1e-3    # standard normal


def test_consumer_erasing_is_the_same_on_every_backend_piece_and_run():
    erasing = RandomErasing(1.0, "pixel", max_count=3)
    whole, rows = erase_batch(erasing, 6, 32)
    again, _ = erase_batch(erasing, 6, 32)
    assert np.array_equal(whole, again)
    # two pieces (two ranks, or two threads) erase what the whole batch does
    first, _ = erase_batch(erasing, 4, 32, seeds=range(4))
    second, _ = erase_batch(erasing, 2, 32, seeds=range(4, 6))
    assert np.array_equal(np.concatenate([first, second]), whole)
    strict, _ = erase_batch(erasing, 6, 32, backend="array_api_strict")
    assert np.array_equal(strict, whole)
    # each rectangle gets its own noise
    b, r = np.argwhere(rows[:, :, 2] > 0)[0]
    t, left, h, w, _ = rows[b, r]
    assert len(np.unique(whole[b, :, t:t + h, left:left + w])) > 0.9 * 3 * h * w


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
@pytest.mark.parametrize("max_count", [1, 3])
def test_batched_erasing_is_the_rectangle_loop_to_the_bit(backend, mode, max_count):
    """apply_batched (the GPU's: whole-batch operations per rectangle slot) against apply's
    loop over rectangles (numpy), overlapping rectangles (max_count 3) included, on every
    backend; on CuPy apply itself takes the batched path.

    To the bit on the CPU backends. A GPU's log, cos and sqrt are not NumPy's: there the
    noise may differ in its last bit (the first device run: 4 cases did), so on CuPy the same
    pixels must be erased, the rest untouched to the bit, and the noise within a few float32
    roundings."""
    erasing = RandomErasing(0.7, mode, max_count=max_count)
    rows = np.stack([erasing.draw(20, np.random.default_rng(s)) for s in range(9)])
    assert 0 < int(np.sum(rows[:, :, 2] > 0)) < 9 * max_count  # some erased, some not
    x = np.random.default_rng(1).standard_normal((9, 3, 20, 20)).astype(np.float32)
    looped = erasing.apply(x.copy(), rows)  # numpy: the loop
    xp, device = get_namespace(backend)
    batched = to_numpy(erasing.apply_batched(xp.asarray(x.copy(), device=device), rows))
    assert not np.array_equal(looped, x)
    if backend != "cupy":
        assert np.array_equal(batched, looped)
        return
    erased = looped != x
    assert np.array_equal(batched != x, erased), "another set of pixels erased"
    np.testing.assert_allclose(batched[erased], looped[erased], rtol=4e-6, atol=4e-6)
    # on one backend the loop and the batched path are the same operations: to the bit
    assert np.array_equal(to_numpy(erasing.apply(xp.asarray(x.copy(), device=device), rows)),
                          batched)


def test_keyed_normal_is_a_function_of_key_and_element():
    xp, device = get_namespace("numpy")
    a = keyed_normal(xp, 5, (3, 10, 10), device)
    assert a.dtype == np.float32 and a.shape == (3, 10, 10)
    assert np.array_equal(a, keyed_normal(xp, 5, (3, 10, 10), device))
    assert not np.array_equal(a, keyed_normal(xp, 6, (3, 10, 10), device))
    big = keyed_normal(xp, 5, (100_000,), device)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02
