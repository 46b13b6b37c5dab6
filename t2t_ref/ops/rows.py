"""Sums along rows and down columns, as BLAS matrix-vector products.

LayerNorm and softmax reduce over a short last axis (64 to 400 values) of large arrays.
xp.sum(x, axis=-1) does that on one core, a few values at a time; the same sum written as
x @ column is one BLAS call that runs on every core at full memory speed (5x faster for
NumPy at these shapes). The results equal the plain sums up to float rounding.
"""

from ..backend import array_namespace, backend_name, device_of
from ..device_cache import DeviceCache
from ..gaps import matmul, wide_dtype


def row_dot(x, column):
    """x (..., D) @ column (D, 1) -> (..., 1): each row's dot product with the column."""
    xp = array_namespace(x)
    rows = xp.reshape(x, (-1, x.shape[-1]))  # (M, D)
    return xp.reshape(matmul(rows, column), (*x.shape[:-1], 1))


def row_sum(x):
    """x (..., D) -> (..., 1): the sum of each row, as xp.sum(x, axis=-1, keepdims=True)."""
    xp = array_namespace(x)
    return row_dot(x, xp.ones((x.shape[-1], 1), dtype=x.dtype, device=device_of(x)))


def row_mean(x):
    """x (..., D) -> (..., 1): the mean of each row, as xp.mean(x, axis=-1, keepdims=True)."""
    xp = array_namespace(x)
    D = x.shape[-1]
    return row_dot(x, xp.full((D, 1), 1.0 / D, dtype=x.dtype, device=device_of(x)))


def row_dots(a, b):
    """a, b (..., D) -> (..., 1): each row of a dotted with the same row of b, as
    xp.sum(a * b, axis=-1, keepdims=True)."""
    xp = array_namespace(a)
    if backend_name(xp) == "cupy":  # array-api-compat's vecdot on CuPy: a copy and a batched
        return xp.sum(a * b, axis=-1, keepdims=True)  # matmul; this is two kernels
    return xp.vecdot(a, b, axis=-1)[..., None]  # NumPy: one pass, no a * b array


def column_sum(x):
    """x (..., D) -> (D,): the sum over all rows, as ones (1, M) @ x (M, D); in float32 for
    a half-precision x (a bias gradient: it goes into the float32 gradient buffer)."""
    xp = array_namespace(x)
    rows = xp.reshape(x, (-1, x.shape[-1]))  # (M, D)
    ones = _ones_row(xp, rows.shape[0], x.dtype, device_of(x))  # (1, M)
    return xp.reshape(matmul(ones, rows, out_dtype=wide_dtype(x)), (x.shape[-1],))


_ONES = DeviceCache(limit=256)  # (M, dtype) -> ones (1, M): read only, made once per shape


def _ones_row(xp, M, dtype, device):
    """A (1, M) row of ones, kept for the next call of the same shape: a training step sums
    the same few shapes' columns over and over (on a GPU, a fill kernel each time saved)."""
    return _ONES.get(xp, device, (M, str(dtype)),
                     lambda: xp.ones((1, M), dtype=dtype, device=device))
