"""RandAugment and random erasing (data/randaugment.py, data/erasing.py) against the published
definitions (timm's auto_augment.py and random_erasing.py, restated here as tables)."""

import math

import numpy as np
import pytest
from PIL import Image

from t2t_ref.data.erasing import random_erasing
from t2t_ref.data.randaugment import OPS, RAND_INCREASING_OPS, RAND_OPS, apply_op, rand_augment


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
