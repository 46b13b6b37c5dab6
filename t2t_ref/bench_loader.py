"""How fast the loader feeds a training run: images/s at 224 with the official recipe's
augmentation, for 1, 2 and all cores' worker processes (or the --workers count alone, 0: in
the training process). `python -m t2t_ref.bench --loader [--workers N]`.

    photos  : JPEG files (about 500 x 375, quality 90, like ImageNet's) cut from the photographs
              scikit-image ships (astronaut, coffee, chelsea, rocket, ...; photo-like stand-ins
              where it is missing), written to a temporary folder: decoding real JPEGs is a
              large part of a loader's work
    workers : each count's loader makes one whole epoch of uint8 batches (random resized crop,
              random interpolation, flip, RandAugment rand-m9-mstd0.5-inc1, the erasing
              rectangles), timed from its start (workers working ahead of a clock started
              later would flatter them); the last figure uses every core
    consumer: the training process's own share per batch, on NumPy: normalising the uint8
              batch to float32 and random erasing 0.25 (pixel), in ms per batch

The figure to compare is the model's images/s (python -m t2t_ref.bench): the loader is not the
bottleneck while it makes more.
"""

import os
import tempfile
import time

import numpy as np
from PIL import Image

from .data import FileDataset, Loader, RandomErasing, TrainTransform, model_input
from .recipe import OFFICIAL_AA

# Batches per worker in a timed epoch, at least: the first device run timed 6 batches with 16
# workers, so 10 of them had nothing to do and "all cores" measured 6 (940 images/s).
BATCHES_PER_WORKER = 3
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def source_photos(seed=0):
    """(what they are, [(H, W, 3) uint8]): scikit-image's photographs, or where it is not
    installed (a bare GPU machine) stand-ins with a photo's texture: a smooth colour field,
    shapes and sensor-like noise, which JPEG-compress and decode at about a photo's cost."""
    try:
        import skimage.data
        return "scikit-image's photographs", [getattr(skimage.data, n)()[..., :3]
                                              for n in PHOTOS]
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    photos = []
    for _ in PHOTOS:
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        x = np.asarray(field.resize((640, 480), Image.Resampling.BICUBIC), dtype=np.float64)
        y, z = np.mgrid[0:480, 0:640]
        for _ in range(8):  # discs with sharp edges
            cy, cx, r = rng.uniform(0, 480), rng.uniform(0, 640), rng.uniform(20, 120)
            x[(y - cy) ** 2 + (z - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        x += rng.normal(0, 8, x.shape)
        photos.append(np.clip(x, 0, 255).astype(np.uint8))
    return "generated stand-ins (scikit-image is not installed)", photos


def write_photos(root, count, seed=0):
    """count JPEG files under root, each a random crop (about 500 x 375, either way round) of
    one of the source photos; returns [(path, label)]."""
    rng = np.random.default_rng(seed)
    _, sources = source_photos(seed)
    samples = []
    for i in range(count):
        photo = Image.fromarray(sources[i % len(sources)])
        scale = 520 / max(photo.size) * rng.uniform(1.0, 1.6)  # zoom in a little, at random
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)),
                             Image.Resampling.BICUBIC)
        w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
        w, h = min(w, photo.width), min(h, photo.height)
        left = int(rng.integers(0, photo.width - w + 1))
        top = int(rng.integers(0, photo.height - h + 1))
        path = os.path.join(root, f"{i:05d}.jpg")
        photo.crop((left, top, left + w, top + h)).save(path, quality=90)
        samples.append((path, i % len(sources)))
    return samples


def recipe_loader(dataset, batch, size, workers):
    """The official recipe's training loader."""
    return Loader(dataset, batch, size, train=True, workers=workers,
                  transform=TrainTransform(interpolation="random", aa=OFFICIAL_AA),
                  erasing=RandomErasing(0.25))


def loader_rate(dataset, batch, size, workers, transform=None, erasing=None):
    """Images/s of one whole epoch of a loader over dataset, timed from the start."""
    warm = Loader(dataset, batch, size, train=True, workers=0, transform=transform,
                  erasing=erasing)
    next(warm.epoch_batches(0))  # imports and caches warm, in this process
    with Loader(dataset, batch, size, train=True, workers=workers, transform=transform,
                erasing=erasing) as loader:
        start = time.perf_counter()
        made = sum(len(b.labels) for b in loader.epoch_batches(1))
        return made / (time.perf_counter() - start)


def consumer_ms(dataset, batch, size, repeats=5):
    """ms per batch of the training process's share on NumPy: normalise + erase."""
    import array_api_compat.numpy as xp
    loader = recipe_loader(dataset, batch, size, workers=0)
    images, _, erase = next(loader.epoch_batches(0))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model_input(images, erase, loader.erasing, xp=xp, device="cpu")
        times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))


def rate_line(workers, rate):
    """The printed line of one worker count (0: the loading done in the training process)."""
    if workers == 0:
        return f"   0 workers (in the training process): {rate:7.1f} images/s"
    return (f"  {workers:>2} worker process{'es' if workers > 1 else '  '}: {rate:7.1f} "
            f"images/s ({rate / workers:.1f} per worker)")


def run(batch=64, size=224, batches=6, worker_counts=None, out=print):
    """Measure and print; returns {"workers": {count: images/s}, "consumer_ms": ...}."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = worker_counts or sorted({1, 2, cores})
    with tempfile.TemporaryDirectory(prefix="t2t-loader-bench-") as root:
        dataset_samples = write_photos(root, batch * batches)
        dataset = FileDataset(dataset_samples)
        out(f"loader: {len(dataset)} JPEG photos (about 500 x 375, from "
            f"{source_photos()[0]}) -> {batch} x 3 x {size} x {size} uint8 batches, official "
            f"recipe's augmentation ({OFFICIAL_AA}, random erasing 0.25), {cores} cores")
        rates = {}
        for workers in counts:
            # at least BATCHES_PER_WORKER batches for each worker: the photos listed again
            # (decoded anew each time) where there are fewer
            needed = batch * max(batches, BATCHES_PER_WORKER * workers)
            epoch = FileDataset([dataset_samples[i % len(dataset_samples)]
                                 for i in range(needed)])
            warm = recipe_loader(epoch, batch, size, 0)
            rates[workers] = loader_rate(epoch, batch, size, workers, warm.transform,
                                         warm.erasing)
            out(rate_line(workers, rates[workers]))
        ms = consumer_ms(dataset, batch, size)
        out(f"  the training process's share (normalise + erase, NumPy): {ms:.1f} ms per batch")
    return {"batch": batch, "size": size, "cores": cores, "workers": rates, "consumer_ms": ms}
