"""Dropout (per element) and drop path (per sample: stochastic depth), inverted scaling.

Both act only in training and only when p > 0; otherwise they are the identity and cache None.
The kept values are scaled by 1/(1-p) so the expected output equals the input, as PyTorch does.
"""

from ..backend import array_namespace, device_of


def _keep_mask(xp, rng, shape, p, dtype, device):
    """1/(1-p) where kept (probability 1-p), 0 where dropped. rng is a gaps.KeyedRandom: the
    decisions along axis 0 belong to the samples, whatever piece of a batch this is."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return rng.keep_mask(xp, shape, p, dtype, device)


def dropout_forward(x, p, rng, training):
    """x (any shape) -> y (same). cache = the scaled keep mask, or None when inactive."""
    if not training or p == 0.0:
        return x, None
    xp = array_namespace(x)
    mask = _keep_mask(xp, rng, x.shape, p, x.dtype, device_of(x))  # (same as x)
    return x * mask, mask


def dropout_backward(dy, cache):
    """forward was y = x * mask, so dx = dy * mask."""
    mask = cache
    return dy if mask is None else dy * mask


def drop_path_forward(x, p, rng, training):
    """x (B, ...) -> y: each sample's whole residual branch is kept or dropped together.

    cache = the scaled per-sample mask (B, 1, ..., 1), or None when inactive.
    """
    if not training or p == 0.0:
        return x, None
    xp = array_namespace(x)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = _keep_mask(xp, rng, shape, p, x.dtype, device_of(x))  # (B, 1, ..., 1)
    return x * mask, mask


drop_path_backward = dropout_backward  # the same y = x * mask, only the mask's shape differs
