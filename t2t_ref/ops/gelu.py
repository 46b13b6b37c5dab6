"""Exact GELU: y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as torch.nn.GELU()."""

import math

from ..backend import array_namespace
from ..gaps import erf

INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x):
    """x (any shape) -> y (same shape). cache = (x, cdf) with cdf = Phi(x)."""
    cdf = erf(x * INV_SQRT2)  # a new array: finished in place below
    cdf += 1.0
    cdf *= 0.5  # Phi(x), the standard normal CDF
    return x * cdf, (x, cdf)


def gelu_backward(dy, cache):
    """forward was y = x Phi(x), so dy/dx = Phi(x) + x phi(x), phi the normal density."""
    x, cdf = cache
    xp = array_namespace(dy)
    slope = x * x
    slope *= -0.5
    slope = xp.exp(slope)
    slope *= x
    slope *= INV_SQRT_2PI  # x phi(x)
    slope += cdf  # dy/dx
    slope *= dy
    return slope
