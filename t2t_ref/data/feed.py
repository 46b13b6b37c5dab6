"""The consumer's side of a batch: a loader's uint8 images -> the model's input on its device.

    x = model_input(images, erase, erasing, xp=xp, device=device, dtype=xp.float32)

    images (B, 3, S, S) uint8, on the host (or already on the device: upload.py's batches)
    -> upload (a quarter of float32's bytes)
    -> normalise in float32: (x / 255 - mean) / std, torchvision's operations in its order
    -> random erasing, which needs normalised values (erasing.py: the workers drew the
       rectangles and noise keys; the noise is made here, on the device)
    -> the model's dtype                                    (B, 3, S, S)

Mixup and cutmix come after (t2t_ref/mixup.py), on the same device, as timm applies them to
the normalised, erased batch. Array API code: NumPy on the CPU path, CuPy on a GPU.
"""

import numpy as np

from ..backend import to_device
from .transforms import normalize


def model_input(images, erase=None, erasing=None, *, xp, device, dtype=None):
    """images (B, 3, S, S) uint8 -> the model's input (B, 3, S, S) of dtype (default float32)
    on device; erase: the loader's (B, R, 5) rectangles for erasing (a RandomErasing), or
    None."""
    if isinstance(images, np.ndarray):
        images = to_device(images, xp, device)         # (B, 3, S, S) uint8
    x = normalize(images)                              # (B, 3, S, S) float32, a new array
    if erase is not None and erasing is not None:
        erasing.apply(x, erase)
    return x if dtype is None or dtype == x.dtype else xp.astype(x, dtype)
