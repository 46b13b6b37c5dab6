"""What the array API standard lacks, in one place: erf, random numbers, and in_chunks.

Everything else in t2t_ref uses only the standard's functions. Each function here has a
NumPy branch, a CuPy branch, and a branch for array_api_strict (the test backend), which does
its work on the host (or with standard functions) and returns arrays on the input's device.
in_chunks is a speed tool only: it evaluates an elementwise chain on NumPy in cache-sized
pieces, which the standard cannot express, and gives the same result as calling it whole.
"""

import math

import numpy as np
import scipy.special

from .backend import array_namespace, backend_name, device_of, to_device, to_numpy
from .shards import in_shard_thread


# float32 erf as Eigen and XLA compute it: erf(x) = x P(x^2) / Q(x^2) with x clamped to [-4, 4]
# (beyond, erf rounds to +-1 in float32); within 5e-7 of the exact value everywhere, a few
# float32 ulps. Coefficients highest power first.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
            -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
            -1.60960333262415e-02)
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
            -7.37332916720468e-03, -1.42647390514189e-02)
_CHUNK = 1 << 16  # elements: a chunk's temporaries stay in the CPU's cache


def erf(x):
    """The error function, elementwise, on x's backend (GELU needs it; the standard has none).

    Always returns a new array. float64: SciPy's erf (CuPy's on the GPU). float32: the rational
    approximation above, written with standard array functions; on NumPy it is evaluated in
    cache-sized chunks, about 6x faster than scipy.special.erf, which works in double.
    """
    xp = array_namespace(x)
    name = backend_name(xp)
    if name == "cupy":
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    if x.dtype == xp.float32:
        return in_chunks(erf_float32, x)
    if name == "numpy":
        return xp.asarray(scipy.special.erf(x))
    # array_api_strict: compute on the host, hand the result back on x's device.
    host = scipy.special.erf(to_numpy(x))
    return xp.astype(to_device(host, xp, device_of(x)), x.dtype)


def erf_float32(x):
    """erf of a float32 array by the rational approximation (see _ERF32_P); a new array."""
    xp = array_namespace(x)
    x = xp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = x2 * _ERF32_P[0]
    for c in _ERF32_P[1:-1]:  # Horner's rule, in place on the fresh array p
        p += c
        p *= x2
    p += _ERF32_P[-1]
    p *= x
    q = x2 * _ERF32_Q[0]
    for c in _ERF32_Q[1:-1]:
        q += c
        q *= x2
    q += _ERF32_Q[-1]
    p /= q
    return p


def in_chunks(fn, *arrays):
    """fn(*arrays) for an elementwise fn of same-shaped arrays; on NumPy evaluated _CHUNK
    elements at a time: the same result, but the temporaries of a chain of operations stay in
    the CPU's cache instead of streaming through memory once per operation. Other backends
    (CuPy runs each operation as one kernel anyway) get fn(*arrays) whole, and so does a
    thread running one of the model's shards (shards.py): there, NumPy calls on a chunk are so
    short that two threads keep waiting for each other's turn with Python's GIL (GELU on two
    shards at once took 1.5x as long in chunks as whole)."""
    xp = array_namespace(*arrays)
    size = math.prod(arrays[0].shape)
    if backend_name(xp) != "numpy" or size <= _CHUNK or in_shard_thread():
        return fn(*arrays)
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"in_chunks needs arrays of one shape, got {[a.shape for a in arrays]}")
    flats = [np.reshape(a, -1) for a in arrays]
    first = fn(*(f[:_CHUNK] for f in flats))
    out = np.empty(size, dtype=first.dtype)
    out[:_CHUNK] = first
    for start in range(_CHUNK, size, _CHUNK):
        out[start:start + _CHUNK] = fn(*(f[start:start + _CHUNK] for f in flats))
    return np.reshape(out, arrays[0].shape)


def make_rng(xp, seed):
    """A random generator for the backend: NumPy's Generator, or CuPy's on the GPU.

    array_api_strict draws on the host with NumPy (it only exists for tests).
    """
    if backend_name(xp) == "cupy":
        import cupy
        return cupy.random.default_rng(seed)
    return np.random.default_rng(seed)


def uniform(xp, rng, shape, dtype, device):
    """Uniform [0, 1) samples of the given shape, made on the backend's device."""
    if backend_name(xp) in ("numpy", "cupy"):
        return rng.random(shape, dtype=dtype)
    sample = rng.random(shape)  # array_api_strict: float64 on the host, then to the device
    return xp.astype(to_device(sample, xp, device), dtype)
