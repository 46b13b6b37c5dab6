"""Random erasing (Zhong et al., 2020) as timm's RandomErasing does it, on a normalised image.

    x = random_erasing(x, rng, probability=0.25, mode="pixel", max_count=1)   # (3, S, S)

With the given probability, `count` rectangles (1, or uniformly 1..max_count) are replaced:
each covers a random fraction of the image in [min_area, max_area] divided by count, with an
aspect ratio log-uniform in [min_aspect, 1/min_aspect]; a rectangle that does not fit is drawn
again, up to 10 times. What fills it, by mode:
    "pixel"   per-pixel standard normal noise (the official T2T-ViT recipe's --remode)
    "rand"    one standard normal colour per rectangle
    "const"   zeros (the mean colour, in normalised units)
It works on the *normalised* image, as timm's does, so the noise has the data's scale. Every
random number comes from the Generator passed in (one per (seed, epoch, sample)).
"""

import math

import numpy as np

MODES = ("pixel", "rand", "const")
ATTEMPTS = 10


def erase_boxes(height, width, rng, *, count, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """[(top, left, h, w), ...]: the rectangles one erasing draws (up to count)."""
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    boxes = []
    for _ in range(count):
        for _ in range(ATTEMPTS):
            target_area = rng.uniform(min_area, max_area) * height * width / count
            aspect = math.exp(rng.uniform(*log_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))  # timm's randint: both ends in
                left = int(rng.integers(0, width - w + 1))
                boxes.append((top, left, h, w))
                break
    return boxes


def random_erasing(x, rng, *, probability, mode="pixel", max_count=1, min_area=0.02,
                   max_area=1 / 3, min_aspect=0.3):
    """x (C, H, W) float, normalised -> x with the rectangles replaced (in place; returned)."""
    if mode not in MODES:
        raise ValueError(f"random erasing mode {mode!r}: choose one of {', '.join(MODES)}")
    if rng.random() > probability:
        return x
    C, H, W = x.shape
    count = 1 if max_count <= 1 else int(rng.integers(1, max_count + 1))
    for top, left, h, w in erase_boxes(H, W, rng, count=count, min_area=min_area,
                                       max_area=max_area, min_aspect=min_aspect):
        if mode == "pixel":
            fill = rng.standard_normal((C, h, w))
        elif mode == "rand":
            fill = rng.standard_normal((C, 1, 1))
        else:
            fill = np.zeros((C, 1, 1))
        x[:, top:top + h, left:left + w] = fill.astype(x.dtype)
    return x
