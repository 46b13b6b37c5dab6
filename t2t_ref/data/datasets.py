"""The two kinds of dataset the loader reads: image files on disk, and images in memory.

A dataset here only answers "what is sample i": its label, and its image as an RGB PIL image.
Transforms (crop, flip, normalise) belong to the loader, so both kinds of dataset go through
exactly the same augmentation code.

    FileDataset(samples)          samples = [(path, label), ...] as find_splits returns them;
                                  image(i) decodes the file (raises CorruptImage if it can't)
    ArrayDataset(images, labels)  images uint8 (N, H, W, 3), e.g. from make_shapes;
                                  image(i) wraps images[i] as a PIL image (no copy of the set)

Both are picklable, so they can be handed to worker processes (forked workers share an
ArrayDataset's array without copying it).
"""

import numpy as np
from PIL import Image

from .transforms import decode


class FileDataset:
    """Images on disk, decoded one at a time when asked for."""

    def __init__(self, samples):
        self.paths = [str(path) for path, _ in samples]
        self.labels = np.asarray([label for _, label in samples], dtype=np.int64)  # (N,)

    def __len__(self):
        return len(self.paths)

    def image(self, index):
        """The RGB PIL image of sample index; raises CorruptImage for an unreadable file."""
        return decode(self.paths[index])


class ArrayDataset:
    """Images already in memory, one uint8 (H, W, 3) array per sample."""

    def __init__(self, images, labels):
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3); got {images.dtype} "
                             f"{images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {labels.shape} do not match {len(images)} images")
        self.images, self.labels = images, labels  # (N, H, W, 3) uint8, (N,) int64

    def __len__(self):
        return len(self.images)

    def image(self, index):
        """Sample index as an RGB PIL image (H, W)."""
        return Image.fromarray(self.images[index])  # (H, W, 3) uint8 -> "RGB"
