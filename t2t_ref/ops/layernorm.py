"""LayerNorm over the last axis: y = (x - mean) / sqrt(var + eps) * weight + bias.

The math is the textbook one; two things make it fast: every per-row or per-column sum is a
BLAS matrix-vector product (rows.py), and fresh temporaries are updated in place
(xhat *= rstd), so each step touches memory once. Only arrays made here are written to.
In half precision (precision.py) it runs on float32 copies: a mean and a variance of a
few hundred half-precision values lose most of their digits.
"""

from .. import cupy_kernels
from ..backend import array_namespace
from ..gaps import is_half, wide
from .rows import column_sum, row_dot, row_mean

EPS = 1e-5  # PyTorch's nn.LayerNorm default, used by the official T2T-ViT


def layernorm_forward(x, weight, bias, eps=EPS):
    """x (..., D), weight (D,), bias (D,) -> y (..., D).

    cache = (xhat, rstd, weight): the normalised input and 1/std, all the backward needs.
    """
    if is_half(x.dtype):  # a float32 island; y back in the half type
        if cupy_kernels.applies_half(x):  # CuPy: the island inside one kernel
            return cupy_kernels.layernorm_forward(x, weight, bias, eps)
        y, cache = layernorm_forward(wide(x), wide(weight), wide(bias), eps)
        return array_namespace(x).astype(y, x.dtype), cache
    if cupy_kernels.applies(x):  # CuPy: one kernel, one warp per row (cupy_kernels.py)
        return cupy_kernels.layernorm_forward(x, weight, bias, eps)
    xp = array_namespace(x)
    xhat = x - row_mean(x)  # (..., D) centred for now
    var = row_mean(xhat * xhat)  # (..., 1) biased, as PyTorch
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat *= rstd  # (..., D) now normalised
    y = xhat * weight
    y += bias
    return y, (xhat, rstd, weight)


def layernorm_backward(dy, cache):
    """dy (..., D) -> (dx (..., D), dweight (D,), dbias (D,)).

    forward was y = xhat * w + b with xhat = (x - mean) * rstd. Write g = dy * w, the gradient
    w.r.t. xhat; then dx = rstd * (g - mean(g) - xhat * mean(g * xhat)): the two means remove
    the directions that the mean and the variance normalisation took out of x.
    Both means are row dots with w / D: mean(g) = dy . (w / D), mean(g * xhat) = (dy * xhat)
    . (w / D), so g * xhat is never formed, and dy * xhat is shared with dweight.
    """
    if is_half(dy.dtype):  # the float32 island's backward; dx back in the half type
        if cupy_kernels.applies_half(dy):
            return cupy_kernels.layernorm_backward(dy, cache)
        dx, dweight, dbias = layernorm_backward(wide(dy), cache)
        return array_namespace(dy).astype(dx, dy.dtype), dweight, dbias
    if cupy_kernels.applies(dy):
        return cupy_kernels.layernorm_backward(dy, cache)
    xhat, rstd, weight = cache
    xp = array_namespace(dy)
    D = dy.shape[-1]
    w_column = xp.reshape(weight, (D, 1)) / D  # (D, 1)
    dy_xhat = dy * xhat  # (..., D)
    dweight = column_sum(dy_xhat)  # (D,)
    dbias = column_sum(dy)  # (D,)
    g_mean = row_dot(dy, w_column)  # (..., 1) mean(g)
    gx_mean = row_dot(dy_xhat, w_column)  # (..., 1) mean(g * xhat)
    dx = dy * weight  # (..., D) g
    dx -= g_mean
    dx -= xhat * gx_mean
    dx *= rstd
    return dx, dweight, dbias
