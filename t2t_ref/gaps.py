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
    """A random generator for the backend: NumPy's Generator, or on CuPy a CounterRNG.

    array_api_strict draws on the host with NumPy (it only exists for tests).
    """
    if backend_name(xp) == "cupy":
        return CounterRNG(seed)
    return np.random.default_rng(seed)


def uniform(xp, rng, shape, dtype, device):
    """Uniform [0, 1) samples of the given shape, made on the backend's device."""
    if isinstance(rng, CounterRNG):
        return rng.random(xp, shape, dtype, device)
    if backend_name(xp) in ("numpy", "cupy"):
        return rng.random(shape, dtype=dtype)
    sample = rng.random(shape)  # array_api_strict: float64 on the host, then to the device
    return xp.astype(to_device(sample, xp, device), dtype)


class CounterRNG:
    """Random numbers that are a hash of (seed, call number, element index): no state to
    set up and nothing that depends on the GPU.

    The training loop makes a generator per step (every random number is a function of
    seed and step, so a resumed run repeats an uninterrupted one). CuPy's own generators
    initialise a state per GPU thread on creation (XORWOW: about 270,000 curand_init calls
    and 13 MB per generator), and their numbers depend on the GPU's size. Here the k-th call
    of random(shape) gives element i the value hash32(i ^ key_k) / 2^32, key_k a hash of the
    seed and k, with hash32 the "lowbias32" integer mixer (Chris Wellons' hash-prospector):
    a bijection of 32-bit integers whose output bits each depend on every input bit.
    The plain version below is array-API code; on CuPy one kernel computes the same bits.
    """

    def __init__(self, seed):
        self.seed = int(seed) % 2**64
        self.calls = 0

    def _key(self):
        """key_k of the next call, a 32-bit integer mixing both halves of the seed and k."""
        low, high = self.seed % 2**32, self.seed // 2**32
        key = _hash32_int(_hash32_int(low ^ _hash32_int(high)) ^ _hash32_int(self.calls))
        self.calls += 1
        return key

    def random(self, xp, shape, dtype, device):
        """Uniform [0, 1) of `shape` on `device`, in steps of 2^-24 (exact in float32)."""
        n = math.prod(shape)
        if n >= 2**32:
            raise ValueError(f"CounterRNG draws at most 2^32 - 1 numbers per call, not {n}")
        key = self._key()
        from . import cupy_kernels
        if backend_name(xp) == "cupy" and cupy_kernels.uniform_supported(dtype):
            return cupy_kernels.hash_uniform(key, shape, dtype)
        return xp.reshape(hash_uniform(xp, key, n, dtype, device), shape)


def _hash32_int(x):
    """lowbias32 on a Python int (the same bits as _hash32 on an array)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _hash32(x):
    """lowbias32 on a uint32 array, in place (x is ours); multiplications wrap mod 2^32."""
    xp = array_namespace(x)
    x ^= xp.bitwise_right_shift(x, 16)
    x *= 0x7FEB352D
    x ^= xp.bitwise_right_shift(x, 15)
    x *= 0x846CA68B
    x ^= xp.bitwise_right_shift(x, 16)
    return x


def hash_uniform(xp, key, n, dtype, device):
    """(n,) uniform [0, 1): hash32(i ^ key) for i = 0 .. n-1, its top 24 bits / 2^24."""
    bits = xp.arange(n, dtype=xp.uint32, device=device)  # (n,)
    bits ^= key
    bits = _hash32(bits)
    top = xp.bitwise_right_shift(bits, 8)  # 24 bits: every value exact in float32
    return xp.astype(top, dtype) * (1.0 / 2**24)
