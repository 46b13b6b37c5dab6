"""RandAugment (Cubuk et al., 2020) as timm implements it, on PIL images.

    augment = rand_augment("rand-m9-mstd0.5-inc1")       # the official T2T-ViT recipe's
    img = augment(img, rng)                              # an RGB PIL image, a NumPy Generator

A spec is "rand" and dash-separated sections in any order (timm's grammar):
    m<int>      magnitude, 0..10 (default 10)
    n<int>      ops applied per image (default 2)
    mstd<float> magnitude noise: each op draws its magnitude from N(m, mstd) (default 0); above
                100, uniformly from [0, m]
    mmax<int>   the magnitude's upper clip (default 10)
    inc<int>    1: the "increasing" op set, whose every op gets stronger with the magnitude
    w<int>      0: timm's weighted op choice (without replacement)

Per image: n ops drawn from the 15 of the set (with replacement; without, under w0), each
applied with probability 0.5, at a magnitude drawn as above and clipped to [0, mmax]; each op
maps the magnitude m to its argument as OPS below says (x = m / 10). Ops with a direction
(rotate, shear, translate, and the increasing enhancements) take it with probability 0.5 each
way. Geometric ops fill uncovered pixels with the ImageNet mean in 0..255 (124, 116, 104) and
resample with bilinear or bicubic at random (timm's default, "random" interpolation), or with
the `interpolation` given.

Differences from timm, on purpose: every random number comes from the Generator passed in (the
loader makes one per (seed, epoch, sample)), not from Python's and NumPy's global state, so a
run is repeatable and independent of the number of workers; and "inc0" turns the increasing set
off (timm reads it as bool("0"), which is True).
"""

import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: the magnitude scale
FILL = (124, 116, 104)  # round(255 * ImageNet mean): what geometric ops uncover
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
OP_PROBABILITY = 0.5


# ---- the ops: (img, argument, rng, resample) -> img ------------------------------------------

def _affine(img, matrix, resample):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample,
                         fillcolor=FILL)


def rotate(img, degrees, resample):
    return img.rotate(degrees, resample=resample, fillcolor=FILL)


def shear_x(img, factor, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), resample)


def shear_y(img, factor, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), resample)


def translate_x(img, fraction, resample):
    return _affine(img, (1, 0, fraction * img.size[0], 0, 1, 0), resample)


def translate_y(img, fraction, resample):
    return _affine(img, (1, 0, 0, 0, 1, fraction * img.size[1]), resample)


def posterize(img, bits, resample):
    """Keep the `bits` high bits of each value. 0 bits makes the image black, as Pillow did
    when timm's ranges were set (Pillow 10+ refuses 0 in ImageOps.posterize)."""
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits)


def solarize(img, threshold, resample):
    return ImageOps.solarize(img, threshold)


def solarize_add(img, add, resample, threshold=128):
    """Add `add` to the values below threshold (clipped at 255), as timm's solarize_add."""
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhancer(kind):
    return lambda img, factor, resample: kind(img).enhance(factor)


def _no_argument(function):
    return lambda img, _argument, resample: function(img)


# ---- magnitude -> argument (x = magnitude / 10), each as timm's level function ----------------

def _signed(value, rng):
    return -value if rng.random() > 0.5 else value


def _rotate_arg(x, rng):
    return _signed(30.0 * x, rng)  # degrees in [-30, 30]


def _shear_arg(x, rng):
    return _signed(0.3 * x, rng)


def _translate_arg(x, rng):
    return _signed(0.45 * x, rng)  # a fraction of the side, in [-0.45, 0.45]


def _enhance_arg(x, rng):
    return 1.8 * x + 0.1  # in [0.1, 1.9]; 1 leaves the image as it is


def _enhance_increasing_arg(x, rng):
    return max(0.1, 1.0 + _signed(0.9 * x, rng))  # away from 1 as x grows


def _posterize_arg(x, rng):
    return int(4 * x)  # bits kept, 0..4 (fewer is stronger: decreasing)


def _posterize_increasing_arg(x, rng):
    return 4 - int(4 * x)


def _solarize_arg(x, rng):
    return int(256 * x)  # threshold: lower is stronger (decreasing)


def _solarize_increasing_arg(x, rng):
    return 256 - int(256 * x)


def _solarize_add_arg(x, rng):
    return int(110 * x)


def _none(x, rng):
    return None


# name -> (op, magnitude -> argument)
OPS = {
    "AutoContrast": (_no_argument(ImageOps.autocontrast), _none),
    "Equalize": (_no_argument(ImageOps.equalize), _none),
    "Invert": (_no_argument(ImageOps.invert), _none),
    "Rotate": (rotate, _rotate_arg),
    "Posterize": (posterize, _posterize_arg),
    "PosterizeIncreasing": (posterize, _posterize_increasing_arg),
    "Solarize": (solarize, _solarize_arg),
    "SolarizeIncreasing": (solarize, _solarize_increasing_arg),
    "SolarizeAdd": (solarize_add, _solarize_add_arg),
    "Color": (_enhancer(ImageEnhance.Color), _enhance_arg),
    "ColorIncreasing": (_enhancer(ImageEnhance.Color), _enhance_increasing_arg),
    "Contrast": (_enhancer(ImageEnhance.Contrast), _enhance_arg),
    "ContrastIncreasing": (_enhancer(ImageEnhance.Contrast), _enhance_increasing_arg),
    "Brightness": (_enhancer(ImageEnhance.Brightness), _enhance_arg),
    "BrightnessIncreasing": (_enhancer(ImageEnhance.Brightness), _enhance_increasing_arg),
    "Sharpness": (_enhancer(ImageEnhance.Sharpness), _enhance_arg),
    "SharpnessIncreasing": (_enhancer(ImageEnhance.Sharpness), _enhance_increasing_arg),
    "ShearX": (shear_x, _shear_arg),
    "ShearY": (shear_y, _shear_arg),
    "TranslateXRel": (translate_x, _translate_arg),
    "TranslateYRel": (translate_y, _translate_arg),
}

RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                       "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm's _RAND_CHOICE_WEIGHTS_0 (for w0), by op position in the (plain) set
CHOICE_WEIGHTS = {"Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1,
                  "TranslateYRel": 0.1, "Color": 0.025, "Sharpness": 0.025,
                  "AutoContrast": 0.025, "Solarize": 0.005, "SolarizeAdd": 0.005,
                  "Contrast": 0.005, "Brightness": 0.005, "Equalize": 0.005, "Posterize": 0.0,
                  "Invert": 0.0}


def apply_op(img, name, magnitude, rng, resample=Image.Resampling.BICUBIC):
    """One op at a magnitude (0..10 and beyond with mmax), always applied: for tests and for
    seeing what an op does."""
    op, argument = OPS[name]
    return op(img, argument(magnitude / MAX_LEVEL, rng), resample)


class RandAugment:
    """The transform a spec describes; call it as augment(img, rng)."""

    def __init__(self, ops, magnitude=10.0, num_ops=2, magnitude_std=0.0, magnitude_max=10.0,
                 weights=None, interpolation="random", spec=None):
        self.ops, self.magnitude, self.num_ops = tuple(ops), float(magnitude), int(num_ops)
        self.magnitude_std, self.magnitude_max = float(magnitude_std), float(magnitude_max)
        self.weights = None if weights is None else np.asarray(weights) / np.sum(weights)
        self.interpolation, self.spec = interpolation, spec

    def __call__(self, img, rng):
        """An RGB PIL image -> the augmented one, every random choice from rng."""
        chosen = rng.choice(len(self.ops), self.num_ops, replace=self.weights is None,
                            p=self.weights)
        for index in chosen:
            if rng.random() > OP_PROBABILITY:  # each op is applied with probability 0.5
                continue
            magnitude = self.magnitude
            if self.magnitude_std == math.inf:
                magnitude = rng.uniform(0.0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.magnitude_std)
            magnitude = min(max(magnitude, 0.0), self.magnitude_max)
            if self.interpolation == "random":
                resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[
                    int(rng.integers(2))]
            else:
                resample = INTERPOLATIONS[self.interpolation]
            img = apply_op(img, self.ops[index], magnitude, rng, resample)
        return img

    def __repr__(self):
        return f"RandAugment({self.spec!r})"


def rand_augment(spec, interpolation="random"):
    """Parse a timm RandAugment spec ("rand-m9-mstd0.5-inc1") into a RandAugment; ValueError
    with one line saying what is wrong with the spec."""
    sections = spec.split("-")
    if sections[0] != "rand":
        raise ValueError(f"--aa {spec!r}: a RandAugment spec starts with 'rand', e.g. "
                         "rand-m9-mstd0.5-inc1")
    options = dict(magnitude=MAX_LEVEL, num_ops=2, magnitude_std=0.0, magnitude_max=MAX_LEVEL)
    ops, weights = RAND_OPS, None
    for section in sections[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|w)(\d+(?:\.\d+)?)", section)
        if match is None:
            raise ValueError(f"--aa {spec!r}: {section!r} is not a section of the grammar "
                             "(m<int>, n<int>, mstd<float>, mmax<int>, inc<0|1>, w0), e.g. "
                             "rand-m9-mstd0.5-inc1")
        key, value = match[1], float(match[2])
        if key != "mstd" and value != int(value):
            raise ValueError(f"--aa {spec!r}: {key} takes a whole number, not {match[2]}")
        if key == "m":
            options["magnitude"] = value
        elif key == "n":
            if value < 1:
                raise ValueError(f"--aa {spec!r}: n must be at least 1")
            options["num_ops"] = int(value)
        elif key == "mstd":
            options["magnitude_std"] = math.inf if value > 100 else value
        elif key == "mmax":
            options["magnitude_max"] = value
        elif key == "inc":
            ops = RAND_INCREASING_OPS if value else RAND_OPS
        elif key == "w":
            if value != 0:
                raise ValueError(f"--aa {spec!r}: w0 is the only set of op weights")
            weights = [CHOICE_WEIGHTS[name] for name in RAND_OPS]
    if interpolation not in ("random", *INTERPOLATIONS):
        raise ValueError(f"interpolation {interpolation!r}: choose random, bilinear or bicubic")
    return RandAugment(ops, weights=weights, interpolation=interpolation, spec=spec, **options)
