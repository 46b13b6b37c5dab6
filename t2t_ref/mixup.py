"""Mixup and CutMix on a normalised batch on its device, as timm's Mixup does for the official
recipe (after random erasing).

Both blend each image with the batch's mirror image (the batch in reverse order) and blend
the labels by the same fraction lam, giving probability targets (B, K):
- mixup:  x = lam * x + (1 - lam) * x_reversed, lam ~ Beta(alpha, alpha)
- cutmix: a random box of area (1 - lam) * S^2 is pasted from x_reversed; lam is then
          recomputed from the box actually pasted (it may be clipped at the border).
Per batch, one of the two is chosen (each with probability 0.5 when both are on).
The choice, lam and the box are drawn on the host from the step's generator (nothing is read
back from the device); the images are mixed with array API calls on their own device; the
targets are made on the host (B x K numbers) for the caller to upload.
Under MPI a rank holds a piece of the batch; its samples' partners, B-1-i, are elsewhere in
the batch, and come in as `partners` (a loader's mirrored piece: see data/loader.py).
"""

import numpy as np

from .backend import array_namespace


def one_hot(labels, num_classes):
    """labels (B,) -> (B, K) float32."""
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def cutmix_box(rng, size, lam):
    """A box (top, bottom, left, right) covering about (1 - lam) of a size x size image."""
    cut = int(size * np.sqrt(1.0 - lam))
    cy, cx = rng.integers(0, size, size=2)
    top, bottom = np.clip([cy - cut // 2, cy + cut // 2], 0, size)
    left, right = np.clip([cx - cut // 2, cx + cut // 2], 0, size)
    return int(top), int(bottom), int(left), int(right)


def mix_batch(images, labels, num_classes, rng, mixup_alpha=0.8, cutmix_alpha=1.0,
              partners=None):
    """images (B, 3, S, S) on any backend, labels (B,) host -> (mixed images on the same
    device, targets (B, K) float32 on the host). partners: (images, labels) each sample is
    mixed with, row by row (default: the batch reversed)."""
    xp = array_namespace(images)
    targets = one_hot(labels, num_classes)
    other_images, other_labels = partners if partners is not None else \
        (xp.flip(images, axis=0), labels[::-1])
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    if use_cutmix:
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        top, bottom, left, right = cutmix_box(rng, images.shape[-1], lam)
        images = xp.asarray(images, copy=True)
        images[:, :, top:bottom, left:right] = other_images[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / images.shape[-1] ** 2
    elif mixup_alpha > 0:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        images = lam * images + (1.0 - lam) * other_images
    else:
        return images, targets
    other_targets = one_hot(other_labels, num_classes)
    return images, (lam * targets + (1.0 - lam) * other_targets).astype(np.float32)
