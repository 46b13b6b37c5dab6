"""Mixup and CutMix on a host batch, as timm's Mixup does for the official recipe.

Both blend each image with the batch's mirror image (the batch in reverse order) and blend
the labels by the same fraction lam, giving probability targets (B, K):
- mixup:  x = lam * x + (1 - lam) * x_reversed, lam ~ Beta(alpha, alpha)
- cutmix: a random box of area (1 - lam) * S^2 is pasted from x_reversed; lam is then
          recomputed from the box actually pasted (it may be clipped at the border).
Per batch, one of the two is chosen (each with probability 0.5 when both are on).
Under MPI a rank holds a piece of the batch; its samples' partners, B-1-i, are elsewhere in
the batch, and come in as `partners` (a loader's mirrored piece: see data/loader.py).
"""

import numpy as np


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
    """images (B, 3, S, S) float32, labels (B,) -> (mixed images, targets (B, K)).
    partners: (images, labels) each sample is mixed with, row by row (default: the batch
    reversed)."""
    targets = one_hot(labels, num_classes)
    other_images, other_labels = partners if partners is not None else \
        (images[::-1], labels[::-1])
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    if use_cutmix:
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        top, bottom, left, right = cutmix_box(rng, images.shape[-1], lam)
        images = images.copy()
        images[:, :, top:bottom, left:right] = other_images[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / images.shape[-1] ** 2
    elif mixup_alpha > 0:
        lam = rng.beta(mixup_alpha, mixup_alpha)
        images = (lam * images + (1.0 - lam) * other_images).astype(images.dtype)
    else:
        return images, targets
    other_targets = one_hot(other_labels, num_classes)
    return images, (lam * targets + (1.0 - lam) * other_targets).astype(np.float32)
