"""Random erasing (Zhong et al., 2020) as timm's RandomErasing does it, on a normalised batch.

    erasing = RandomErasing(probability=0.25, mode="pixel", max_count=1)   # the official recipe
    rows = erasing.draw(S, rng)        # in a loader worker, per sample: (max_count, 5) int64
    erasing.apply(x, rows_of_batch)    # on the consumer, after normalising: x (B, 3, S, S)

With the given probability, `count` rectangles (1, or uniformly 1..max_count) are replaced:
each covers a random fraction of the image in [min_area, max_area] divided by count, with an
aspect ratio log-uniform in [min_aspect, 1/min_aspect]; a rectangle that does not fit is drawn
again, up to 10 times. What fills it, by mode:
    "pixel"   per-pixel standard normal noise (the official T2T-ViT recipe's --remode)
    "rand"    one standard normal colour per rectangle
    "const"   zeros (the mean colour, in normalised units)

Why two halves. Erasing works on the *normalised* image, as timm's does (its GPU prefetcher
erases after normalising too), so the noise has the data's scale; but the loader hands on
uint8 images and normalisation happens on the consumer's device. So the worker draws each
sample's rectangles from the sample's generator (seeded by (seed, epoch, sample index)), with
one 32-bit key per rectangle, and returns them beside the images: a row (top, left, height,
width, key), height 0 for none. The consumer fills them, the noise a function of (key, element)
alone (gaps.keyed_normal). So a run erases the same pixels with the same noise whatever the
number of workers, threads or MPI ranks, on a resume too, and the noise never crosses the bus.
"""

import math
from dataclasses import dataclass

import numpy as np

from ..backend import array_namespace, backend_name, device_of
from ..gaps import keyed_normal, keyed_normal_at

MODES = ("pixel", "rand", "const")
BATCHED_BACKENDS = ("cupy",)  # where apply() fills all of a batch's rectangles at once
ATTEMPTS = 10
ROW = 5  # top, left, height, width, key


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


@dataclass(frozen=True)
class RandomErasing:
    """timm's --reprob / --remode / --recount. Bad values raise ValueError (one line)."""

    probability: float = 0.25
    mode: str = "pixel"
    max_count: int = 1
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3

    def __post_init__(self):
        if not 0 <= self.probability <= 1:
            raise ValueError(f"--reprob {self.probability:g}: a probability, from 0 (off) to 1")
        if self.mode not in MODES:
            raise ValueError(f"--remode {self.mode!r}: random erasing mode, choose one of "
                             f"{', '.join(MODES)}")
        if not (isinstance(self.max_count, int) and self.max_count >= 1):
            raise ValueError(f"--recount {self.max_count}: rectangles per image, at least 1")

    def draw(self, size, rng):
        """The worker's half for one S x S sample: (max_count, 5) int64 rows (top, left,
        height, width, key), height 0 where no rectangle is; every number from rng."""
        rows = np.zeros((self.max_count, ROW), dtype=np.int64)
        if rng.random() > self.probability:
            return rows
        count = 1 if self.max_count <= 1 else int(rng.integers(1, self.max_count + 1))
        boxes = erase_boxes(size, size, rng, count=count, min_area=self.min_area,
                            max_area=self.max_area, min_aspect=self.min_aspect)
        for k, box in enumerate(boxes):
            rows[k, :4] = box
            rows[k, 4] = rng.integers(0, 2**32)  # the key of this rectangle's noise
        return rows

    def apply(self, x, rows):
        """The consumer's half: x (B, C, S, S) normalised, any backend, erased in place (and
        returned); rows (B, max_count, 5) on the host, as the loader returned them. One
        slice assignment per rectangle (about B * probability of them), nothing read back.
        On a GPU, where each rectangle's twenty-odd small operations would each be a kernel
        launch, apply_batched does the same."""
        xp, device = array_namespace(x), device_of(x)
        if backend_name(xp) in BATCHED_BACKENDS:
            return self.apply_batched(x, rows)
        C = x.shape[1]
        for b, r in zip(*np.nonzero(rows[:, :, 2] > 0)):
            top, left, h, w, key = (int(v) for v in rows[b, r])
            if self.mode == "pixel":
                fill = keyed_normal(xp, key, (C, h, w), device)               # (C, h, w)
            elif self.mode == "rand":
                fill = keyed_normal(xp, key, (C, 1, 1), device)               # (C, 1, 1)
            else:
                fill = xp.zeros((C, 1, 1), dtype=xp.float32, device=device)
            x[int(b), :, top:top + h, left:left + w] = xp.astype(fill, x.dtype)
        return x

    def apply_batched(self, x, rows):
        """As apply, the same values to the bit, in a fixed number of whole-batch operations
        per rectangle slot (max_count of them) however many rectangles there are: every pixel
        (c, y, x) of image b learns whether it lies in b's rectangle and which element of
        the rectangle's noise it is, j = c*h*w + (y - top)*w + (x - left), and takes
        keyed_normal_at(j, C*h*w, key) where it does. The noise is computed for every pixel
        and kept inside the rectangles: cheap on a GPU, wasteful on a CPU (apply's loop)."""
        xp, device = array_namespace(x), device_of(x)
        B, C, S, _ = x.shape
        y = xp.reshape(xp.arange(S, dtype=xp.int64, device=device), (1, 1, S, 1))  # rows
        col = xp.reshape(xp.arange(S, dtype=xp.int64, device=device), (1, 1, 1, S))
        channel = xp.reshape(xp.arange(C, dtype=xp.int64, device=device), (1, C, 1, 1))
        for r in range(rows.shape[1]):  # later rectangles over earlier ones, as apply
            if not np.any(rows[:, r, 2] > 0):
                continue
            params = xp.asarray(np.ascontiguousarray(rows[:, r, :].T), device=device)  # (5, B)
            top, left, h, w, key = (xp.reshape(params[i, ...], (B, 1, 1, 1)) for i in range(ROW))
            inside = (y >= top) & (y < top + h) & (col >= left) & (col < left + w)  # (B,1,S,S)
            if self.mode == "const":
                fill = xp.zeros((), dtype=x.dtype, device=device)
            else:
                if self.mode == "pixel":  # element j of the rectangle's (C, h, w) noise
                    j, count = channel * (h * w) + (y - top) * w + (col - left), C * h * w
                else:  # "rand": element c of its (C, 1, 1) colour
                    j, count = channel, xp.full((B, 1, 1, 1), C, dtype=xp.int64,
                                                device=device)
                j = xp.where(inside, j, 0)  # (B, C, S, S) or (1, C, 1, 1): >= 0 everywhere
                fill = xp.astype(keyed_normal_at(xp.astype(j, xp.uint32),
                                                 xp.astype(count, xp.uint32),
                                                 xp.astype(key, xp.uint32)), x.dtype)
            x[...] = xp.where(inside, fill, x)
        return x


def random_erasing(x, rng, *, probability, mode="pixel", max_count=1, min_area=0.02,
                   max_area=1 / 3, min_aspect=0.3):
    """One normalised (C, S, S) image erased in place (and returned): both halves at once."""
    erasing = RandomErasing(probability, mode, max_count, min_area, max_area, min_aspect)
    erasing.apply(x[None], erasing.draw(x.shape[-1], rng)[None])
    return x
