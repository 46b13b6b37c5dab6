"""Image transforms of the official T2T-ViT recipe, on PIL images, returning NumPy arrays.

    train: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)), bicubic
           -> horizontal flip with probability 0.5 -> float32 CHW in [0, 1] -> normalise
    eval:  resize the shorter side to int(size / 0.9) (248 for 224), bicubic
           -> centre crop size x size -> float32 CHW in [0, 1] -> normalise

These follow torchvision's PIL code paths step by step (the crop-parameter algorithm, its
rounding, crop-then-resize, the centre crop's rounding), so an image goes through the same
pixels as in the official PyTorch training; only the random numbers differ, drawn here from a
NumPy Generator the caller passes in (the loader derives one per sample from
(seed, epoch, sample index)).

Shapes: H, W the decoded image's height and width; S the output size. Every output is
(3, S, S) float32, channel order RGB.
"""

import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.9  # eval resizes to int(S / 0.9), then crops S: the centre 90%

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)  # (3,)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


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


def train_transform(img, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """PIL image (any mode) -> (3, size, size) float32: random resized crop, flip, normalise."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    top, left, h, w = random_resized_crop_params(img.height, img.width, rng, scale, ratio)
    img = img.crop((left, top, left + w, top + h))                 # (h, w)
    img = img.resize((size, size), Image.Resampling.BICUBIC)       # (S, S)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_normalized_chw(img)


def eval_transform(img, size):
    """PIL image (any mode) -> (3, size, size) float32: resize to int(size/0.9), centre crop."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    short = int(size / EVAL_CROP_FRACTION)           # 248 for 224, 35 for 32
    w, h = img.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)     # torchvision: long side truncated
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)  # (short, long) or (long, short)
    top = int(round((new_h - size) / 2.0))           # torchvision's CenterCrop rounding
    left = int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))            # (S, S)
    return to_normalized_chw(img)


def to_normalized_chw(img):
    """RGB PIL image (H, W) -> (3, H, W) float32, (x / 255 - mean) / std per channel.

    Elementwise the same float32 operations in the same order as torchvision's ToTensor then
    Normalize. The uint8 pixels are made channel-first *before* the float arithmetic: NumPy's
    loops run far faster along a long contiguous last axis than along an axis of 3.
    """
    x = np.asarray(img)                                   # (H, W, 3) uint8
    x = np.ascontiguousarray(x.transpose(2, 0, 1))        # (3, H, W) uint8
    x = x.astype(np.float32)
    x /= 255.0                                            # in [0, 1]
    x -= _MEAN[:, None, None]
    x /= _STD[:, None, None]
    return x                                              # (3, H, W) float32
