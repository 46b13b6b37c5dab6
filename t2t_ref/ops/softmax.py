"""Softmax over the last axis."""

from ..backend import array_namespace


def softmax_forward(x):
    """x (..., N) -> p (..., N), rows summing to 1. cache = p.

    Subtracting the row maximum changes nothing mathematically and keeps exp() from overflowing.
    """
    xp = array_namespace(x)
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp, cache):
    """forward was p_i = exp(x_i) / sum_j exp(x_j), so dx_i = p_i (dp_i - sum_j dp_j p_j)."""
    p = cache
    xp = array_namespace(dp)
    return p * (dp - xp.sum(dp * p, axis=-1, keepdims=True))
