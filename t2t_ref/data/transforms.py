"""Image transforms of the official T2T-ViT recipe (timm's), on PIL images, and normalisation.

    train (TrainTransform, a sample's generator rng drawn in this order):
        RandomResizedCrop(S, scale, ratio) with `interpolation` ("random": bilinear or bicubic
        drawn per image, timm's RandomResizedCropAndInterpolation)
        -> horizontal flip with probability hflip -> vertical flip with probability vflip
        -> RandAugment (aa, e.g. "rand-m9-mstd0.5-inc1"), or colour jitter when aa is None
        no_aug: only resize the shorter side to S and centre-crop S (timm's --no-aug)
    eval (EvalTransform): resize the shorter side to int(S / crop_pct) (248 for 224 at the
        official 0.9; S at 1.0, the whole of a square image), centre crop S
    then: to_uint8_chw (3, S, S) uint8, the loader's output; normalize, on the consumer's
        device: (x / 255 - mean) / std in float32; random erasing after that (erasing.py)

These follow torchvision's and timm's PIL code paths step by step (the crop-parameter
algorithm, its rounding, crop-then-resize, the centre crop's rounding, ColorJitter's random
order), so an image goes through the same pixels as in the official PyTorch training; only the
random numbers differ, drawn here from a NumPy Generator the caller passes in (the loader
derives one per sample from (seed, epoch, sample index)).

Shapes: H, W the decoded image's height and width; S the output size; channel order RGB.
train_transform and eval_transform are the whole chain for one image, ending normalised:
(3, S, S) float32 (for predict, the tutorials and tests).
"""
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageEnhance

from ..backend import array_namespace, backend_name, device_of
from .randaugment import rand_augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.9  # eval resizes to int(S / 0.9), then crops S: the centre 90%
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
TRAIN_INTERPOLATIONS = ("random", *RESAMPLE)  # random: bilinear or bicubic, per image


class CorruptImage(Exception):
    """A file that could not be opened or decoded as an image; .path names it, .reason says why."""

    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path, self.reason = path, reason


def decode(path):
    """Open an image file and return it as an 'RGB' PIL image (decoded, file closed).

    Any mode is converted with PIL's convert('RGB'), as torchvision's ImageFolder loader does:
    grayscale is repeated into three channels, palettes are looked up, alpha is dropped (not
    composited onto a background). High bit depths are scaled to 8 bits first (to_8_bits),
    where convert('RGB') would clip them. Any failure to open or decode (missing file, no
    permission, truncated or random bytes, unknown format) raises CorruptImage.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now, while the file is open: errors surface here
            img = to_8_bits(img)
            return img if img.mode == "RGB" else img.convert("RGB")
    except CorruptImage:
        raise
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, ... for bad files
        raise CorruptImage(path, f"{type(err).__name__}: {err}") from err


def to_8_bits(img):
    """A high-bit-depth PIL image scaled to 8 bits ('L'); other images as they are.

    Pillow keeps 16-bit grayscale (PNG, TIFF) as mode 'I;16' (older versions, and some
    formats: 'I', 32-bit integers holding the 16-bit values), and convert('RGB') clips those
    values at 255: a 16-bit image came out nearly all white. Here 0..65535 maps to 0..255
    (x / 257, rounded). 16-bit colour PNGs need nothing: Pillow reads them as 'RGB'/'RGBA',
    keeping each sample's high byte. A float image ('F') has no agreed range, and is refused.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        x = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)  # (H, W)
        return Image.fromarray(np.rint(x / 257.0).astype(np.uint8))  # (H, W) uint8: 'L'
    if img.mode == "F":
        raise CorruptImage(getattr(img, "filename", "") or "image", "a 32-bit float image "
                           "has no agreed value range: save it with 8 or 16 bits")
    return img


def random_resized_crop_params(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: (top, left, crop_height, crop_width).

    Up to 10 tries: an area fraction uniform in scale, an aspect ratio (w/h) log-uniform in
    ratio; the first crop that fits is placed uniformly at random. If none fits, the whole
    image, cut down to the nearest allowed aspect ratio, centred.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))  # Python's round, as torchvision
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: centre crop, clamped to the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w



@dataclass(frozen=True)
class TrainTransform:
    """The training transform timm's flags describe (see the module docstring); picklable, so
    worker processes get it. Bad values raise ValueError with one line naming the flag."""

    scale: tuple = (0.08, 1.0)        # --scale: RandomResizedCrop's area fraction range
    ratio: tuple = (3 / 4, 4 / 3)     # --ratio: its aspect-ratio (w/h) range
    hflip: float = 0.5                # --hflip: probability of a horizontal flip
    vflip: float = 0.0                # --vflip
    interpolation: str = "bicubic"    # --train-interpolation
    color_jitter: float = 0.0         # --color-jitter: brightness/contrast/saturation strength
    aa: str | None = None             # --aa: RandAugment spec; colour jitter is off when set
    no_aug: bool = False              # --no-aug: resize + centre crop only

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        for flag, value in (("--hflip", self.hflip), ("--vflip", self.vflip)):
            if not 0 <= value <= 1:
                raise ValueError(f"{flag} {value:g}: a probability, from 0 (off) to 1")
        if self.interpolation not in TRAIN_INTERPOLATIONS:
            raise ValueError(f"--train-interpolation {self.interpolation!r}: choose one of "
                             + ", ".join(TRAIN_INTERPOLATIONS))
        if not self.color_jitter >= 0:
            raise ValueError(f"--color-jitter {self.color_jitter:g}: give 0 (off) or more")
        for flag, (low, high) in (("--scale", self.scale), ("--ratio", self.ratio)):
            if not 0 < low <= high:
                raise ValueError(f"--{flag[2:]} {low:g} {high:g}: give 0 < MIN <= MAX")
        if self.scale[1] > 1:
            raise ValueError(f"--scale {self.scale[0]:g} {self.scale[1]:g}: the area fraction "
                             "is at most 1")
        if self.aa is not None:
            self.randaugment  # parse now: a bad spec fails here, not in a worker

    @cached_property
    def randaugment(self):
        """The RandAugment of aa (None without); its geometric ops resample as the crop does,
        timm's way ("random" stays random)."""
        return None if self.aa is None else rand_augment(
            self.aa, interpolation=self.interpolation if self.interpolation in
            ("bilinear", "bicubic") else "random")

    def __call__(self, img, size, rng):
        """PIL image (any mode) -> augmented RGB PIL image (S, S), every choice from rng."""
        img = img if img.mode == "RGB" else img.convert("RGB")
        if self.no_aug:  # (timm resamples "random" as bilinear here)
            kind = "bilinear" if self.interpolation == "random" else self.interpolation
            return resize_and_centre_crop(img, size, size, RESAMPLE[kind])
        top, left, h, w = random_resized_crop_params(img.height, img.width, rng, self.scale,
                                                     self.ratio)
        if self.interpolation == "random":
            resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
        else:
            resample = RESAMPLE[self.interpolation]
        img = img.crop((left, top, left + w, top + h))                 # (h, w)
        img = img.resize((size, size), resample)                       # (S, S)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.vflip > 0 and rng.random() < self.vflip:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        elif self.color_jitter > 0:
            img = color_jitter(img, self.color_jitter, rng)
        return img


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to int(S / crop_pct), centre crop S (timm's eval transform).

    as_drawn: an image that is already S x S is taken as it is (the built-in shapes, drawn at
    the training size, are scored as drawn rather than zoomed and cut at the border)."""

    crop_pct: float = EVAL_CROP_FRACTION  # --crop-pct
    interpolation: str = "bicubic"        # --interpolation
    as_drawn: bool = False

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"--crop-pct {self.crop_pct:g}: give a fraction in (0, 1]; 1 "
                             "evaluates the whole (square) image")
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"--interpolation {self.interpolation!r}: choose one of "
                             + ", ".join(RESAMPLE))

    def __call__(self, img, size, rng=None):
        """PIL image (any mode) -> RGB PIL image (S, S)."""
        img = img if img.mode == "RGB" else img.convert("RGB")
        if self.as_drawn and img.size == (size, size):
            return img
        short = int(size / self.crop_pct)  # 248 for 224 at 0.9 (timm: math.floor)
        return resize_and_centre_crop(img, short, size, RESAMPLE[self.interpolation])


def resize_and_centre_crop(img, short, size, resample):
    """Resize the shorter side to `short` (the longer one in proportion, truncated as
    torchvision does), then crop the centre size x size (torchvision's rounding)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)  # (short, long) or (long, short)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))            # (S, S)


def color_jitter(img, strength, rng):
    """torchvision's ColorJitter(strength, strength, strength) on a PIL image, as timm's
    scalar --color-jitter makes it: brightness, contrast and saturation factors each uniform
    in [max(0, 1 - strength), 1 + strength], applied in a random order (no hue)."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in rng.permutation(4):  # torchvision permutes 4 (hue is the 4th, off here)
        if k < 3:
            img = enhancers[k](img).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return img


def to_uint8_chw(img):
    """RGB PIL image (H, W) -> (3, H, W) uint8: what a loader hands on."""
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))  # (3, H, W) uint8


_CONSTANTS = {}  # (backend, device) -> (mean, std), each (3, 1, 1) float32, made once


def normalize(images):
    """uint8 (..., 3, H, W) on any backend -> float32 (x / 255 - mean) / std, a new array.

    Elementwise the same float32 operations in the same order as torchvision's ToTensor then
    Normalize. The mean and std live on the images' device, made once per device: a new
    3-element array per batch would be a host-to-device copy every step on a GPU.
    """
    xp = array_namespace(images)
    device = device_of(images)
    key = (backend_name(xp), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = tuple(xp.reshape(xp.asarray(v, dtype=xp.float32, device=device),
                                           (3, 1, 1)) for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _CONSTANTS[key]
    x = xp.astype(images, xp.float32)                     # (..., 3, H, W), a new array
    x /= 255.0                                            # in [0, 1]
    x -= mean
    x /= std
    return x


def train_transform(img, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """PIL image (any mode) -> (3, size, size) float32: random resized crop, flip, normalise
    (the default TrainTransform, whole, on the host)."""
    return normalize(to_uint8_chw(TrainTransform(scale, ratio)(img, size, rng)))


def eval_transform(img, size, crop_pct=EVAL_CROP_FRACTION, interpolation="bicubic"):
    """PIL image (any mode) -> (3, size, size) float32: resize to int(size / crop_pct),
    centre crop, normalise."""
    return normalize(to_uint8_chw(EvalTransform(crop_pct, interpolation)(img, size)))
