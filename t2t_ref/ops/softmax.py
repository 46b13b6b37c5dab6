"""Softmax over the last axis.

In half precision (precision.py) it runs on float32 copies (a sum of exponentials over a row
of thousands loses its small terms in half precision) and returns p in the half type, the
dtype the product p v takes; the backward reads that p."""

from .. import cupy_kernels
from ..backend import array_namespace
from ..gaps import is_half, wide
from .rows import row_dots, row_sum


def softmax_forward(x):
    """x (..., N) -> p (..., N), rows summing to 1. cache = p.

    Subtracting the row maximum changes nothing mathematically and keeps exp() from overflowing.
    """
    if is_half(x.dtype):  # a float32 island
        if cupy_kernels.applies_half(x):  # CuPy: the island inside one kernel
            return cupy_kernels.softmax_forward(x)
        p = array_namespace(x).astype(softmax_forward(wide(x))[0], x.dtype)
        return p, p
    if cupy_kernels.applies(x):  # CuPy: one kernel, one warp per row (cupy_kernels.py)
        return cupy_kernels.softmax_forward(x)
    xp = array_namespace(x)
    p = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    p /= row_sum(p)  # in place: p is ours
    return p, p


def softmax_backward(dp, cache):
    """forward was p_i = exp(x_i) / sum_j exp(x_j), so dx_i = p_i (dp_i - sum_j dp_j p_j)."""
    p = cache
    if is_half(dp.dtype):  # the float32 island's backward
        if cupy_kernels.applies_half(dp):
            return cupy_kernels.softmax_backward(dp, p)
        return array_namespace(dp).astype(softmax_backward(wide(dp), wide(p)), dp.dtype)
    if cupy_kernels.applies(dp):
        return cupy_kernels.softmax_backward(dp, p)
    dx = dp - row_dots(dp, p)  # (..., 1) the row dots sum_j dp_j p_j
    dx *= p
    return dx
