"""What the array API standard lacks, in one place: erf and random numbers.

Everything else in t2t_ref uses only the standard's functions. Each function here has a
NumPy branch, a CuPy branch, and a branch for array_api_strict (the test backend), which does
its work on the host and moves the result back to the array's device explicitly.
"""

import numpy as np
import scipy.special

from .backend import array_namespace, backend_name, device_of, to_device, to_numpy


def erf(x):
    """The error function, elementwise, on x's backend (GELU needs it; the standard has none)."""
    xp = array_namespace(x)
    name = backend_name(xp)
    if name == "numpy":
        return xp.asarray(scipy.special.erf(x))
    if name == "cupy":
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    # array_api_strict: compute on the host, hand the result back on x's device.
    host = scipy.special.erf(to_numpy(x))
    return xp.astype(to_device(host, xp, device_of(x)), x.dtype)


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
