"""Exact GELU: y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as torch.nn.GELU().

Both passes are chains of a dozen or more elementwise operations (erf alone is a rational
function), so each is evaluated by gaps.in_chunks: on NumPy, cache-sized pieces at a time.
"""

import math

from .. import cupy_kernels
from ..backend import array_namespace
from ..gaps import erf, in_chunks, is_half, wide

INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x):
    """x (any shape) -> y (same shape). cache = (x, cdf) with cdf = Phi(x) (CuPy's kernel
    keeps x alone and recomputes Phi in its backward). In half precision on float32 copies
    (erf stays float32), y back in the half type."""
    if is_half(x.dtype):
        if cupy_kernels.applies_half(x):  # CuPy: one kernel reading half, computing float32
            return cupy_kernels.gelu_forward(x)
        y, cache = gelu_forward(wide(x))
        return array_namespace(x).astype(y, x.dtype), cache
    if cupy_kernels.applies(x):  # CuPy: the same in one kernel (cupy_kernels.py)
        return cupy_kernels.gelu_forward(x)
    cdf = in_chunks(_normal_cdf, x)
    return x * cdf, (x, cdf)


def _normal_cdf(x):
    """Phi(x), the standard normal CDF: 0.5 (1 + erf(x / sqrt 2))."""
    cdf = erf(x * INV_SQRT2)  # a new array: finished in place
    cdf += 1.0
    cdf *= 0.5
    return cdf


def gelu_backward(dy, cache):
    """forward was y = x Phi(x), so dy/dx = Phi(x) + x phi(x), phi the normal density."""
    if is_half(dy.dtype):
        if cupy_kernels.applies_half(dy):
            return cupy_kernels.gelu_backward(dy, cache)
        return array_namespace(dy).astype(gelu_backward(wide(dy), cache), dy.dtype)
    if cupy_kernels.applies(dy):
        return cupy_kernels.gelu_backward(dy, cache)
    x, cdf = cache
    return in_chunks(_gelu_grad, x, cdf, dy)


def _gelu_grad(x, cdf, dy):
    """dy * (Phi(x) + x phi(x)), with phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    xp = array_namespace(x)
    slope = x * x
    slope *= -0.5
    slope = xp.exp(slope)
    slope *= x
    slope *= INV_SQRT_2PI  # x phi(x)
    slope += cdf  # dy/dx
    slope *= dy
    return slope
