"""What the array API standard lacks, in one place: erf, random numbers, half-precision
products (matmul, wide), and in_chunks.

Everything else in t2t_ref uses only the standard's functions. Each function here has a
NumPy branch, a CuPy branch, and a branch for array_api_strict (the test backend), which does
its work on the host (or with standard functions) and returns arrays on the input's device.
in_chunks is a speed tool only: it evaluates an elementwise chain on NumPy in cache-sized
pieces, which the standard cannot express, and gives the same result as calling it whole.
"""

import contextlib
import math
import threading

import numpy as np
import scipy.special

from . import capture, cupy_gemm
from .backend import array_namespace, backend_name, device_of, to_device, to_numpy
from .device_cache import DeviceCache


# float32 erf as Eigen and XLA compute it: erf(x) = x P(x^2) / Q(x^2) with x clamped to [-4, 4]
# (beyond, erf rounds to +-1 in float32); within 5e-7 of the exact value everywhere, a few
# float32 ulps. Coefficients highest power first.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
            -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
            -1.60960333262415e-02)
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
            -7.37332916720468e-03, -1.42647390514189e-02)


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


# ---- half precision: float16 and bfloat16 (see t2t_ref/precision.py) -------------------------

HALF = ("float16", "bfloat16")


def is_half(dtype):
    """Is dtype float16 or bfloat16 (ml_dtypes' bfloat16, NumPy's and CuPy's)?
    The item size first: asked about 800 times a step, and a NumPy dtype's name is a
    microsecond to make. The answer is kept per dtype: under bf16/fp16 most calls are about
    2-byte dtypes."""
    if getattr(dtype, "itemsize", None) != 2:  # array_api_strict's: no item size, no halves
        return False
    answer = _IS_HALF.get(dtype)
    if answer is None:
        answer = _IS_HALF[dtype] = str(getattr(dtype, "name", dtype)) in HALF
    return answer


_IS_HALF = {}  # dtype -> is_half(dtype), for the 2-byte dtypes asked about


def wide(x):
    """x in float32 if it is a half type, else x itself: the dtype of the precision policy's
    float32 islands (statistics, exponentials, sums that half precision would spoil)."""
    if not is_half(x.dtype):
        return x
    xp = array_namespace(x)
    return xp.astype(x, xp.float32)


def wide_dtype(x):
    """The dtype wide(x) has, without making it."""
    return array_namespace(x).float32 if is_half(x.dtype) else x.dtype


def matmul(a, b, out_dtype=None):
    """a @ b as xp.matmul, for half types too: the products of float16 or bfloat16 operands
    are summed in float32 and rounded once, to out_dtype (default: a's dtype), as a GPU's
    tensor cores sum them. NumPy has no half-precision BLAS (its float16 matmul is a slow
    loop, its bfloat16 one returns float32): it multiplies float32 copies, which rounds
    the same way. On CuPy, one cuBLAS call on the tensor cores (cupy_gemm.py: CuPy's own
    matmul of half stacks would multiply float32 copies)."""
    xp = array_namespace(a)
    out_dtype = a.dtype if out_dtype is None else out_dtype
    half = is_half(a.dtype)
    if (half or capture.active()) and backend_name(xp) == "cupy" and cupy_gemm.takes(a, b):
        # (while a CUDA graph records, every product: CuPy's matmul may not call cuBLAS then)
        product = cupy_gemm.matmul(a, b, out_dtype)
    elif not half:
        product = xp.matmul(a, b)
    else:  # NumPy: the same sums on float32 copies
        product = xp.matmul(xp.astype(a, xp.float32), xp.astype(b, xp.float32))
    return product if product.dtype == out_dtype else xp.astype(product, out_dtype)


def where(condition, x, y):
    """xp.where(condition, x, y) in x's dtype, half types included. CuPy 14's where has no
    bfloat16 loop: it picks the first loop bfloat16 casts to safely, float32, and returns
    float32 (NumPy keeps bfloat16). A gradient turned float32 that way reached the fused
    kernels beside bfloat16 caches, which they then read as float32 (the first GPU run's
    wrong bf16 T2T-ViT-t-14 gradients). Both values are exact in float32: the cast back
    changes none."""
    xp = array_namespace(x)
    out = xp.where(condition, x, y)
    return out if out.dtype == x.dtype else xp.astype(out, x.dtype)


# ---- cache-sized pieces on NumPy: one rule, for every chain of elementwise passes ---------------
#
# A chain of NumPy operations over a long array streams the whole array through memory once per
# operation; over CHUNK-element pieces the temporaries stay in the CPU's cache. The rule:
#   - in-place chains (AdamW's dozen passes over the weights and moments: in_pieces) run in
#     pieces always, in worker threads too (AdamW over 21.5M values on two threads: 45 ms in
#     pieces, 146 ms whole);
#   - chains that make a new array (GELU's erf: in_chunks) run in pieces on the main thread and
#     whole inside whole_arrays(), which the worker threads of t2t_ref.parallel enter: there,
#     two threads each allocating and filling many short pieces keep waiting for each other's
#     turn with Python's GIL (GELU on two pieces of a batch at once: 14 ms in chunks, 11 ms
#     whole, with keep_freed_memory's heap);
#   - other backends: whole arrays (CuPy runs each operation as one kernel).
CHUNK = 1 << 16  # elements: the arrays of a chain's piece fit in a 2 MiB cache
_thread = threading.local()  # .whole: in_chunks evaluates whole arrays in this thread


@contextlib.contextmanager
def whole_arrays():
    """In this thread, in_chunks calls fn on whole arrays (see the rule above)."""
    saved, _thread.whole = getattr(_thread, "whole", False), True
    try:
        yield
    finally:
        _thread.whole = saved


def in_chunks(fn, *arrays):
    """fn(*arrays) for an elementwise fn of same-shaped arrays that returns a new array; on
    NumPy evaluated CHUNK elements at a time (outside whole_arrays(): the rule above): the same
    result, the temporaries in the cache."""
    xp = array_namespace(*arrays)
    size = math.prod(arrays[0].shape)
    if backend_name(xp) != "numpy" or size <= CHUNK or getattr(_thread, "whole", False):
        return fn(*arrays)
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"in_chunks needs arrays of one shape, got {[a.shape for a in arrays]}")
    flats = [np.reshape(a, -1) for a in arrays]
    first = fn(*(f[:CHUNK] for f in flats))
    out = np.empty(size, dtype=first.dtype)
    out[:CHUNK] = first
    for start in range(CHUNK, size, CHUNK):
        out[start:start + CHUNK] = fn(*(f[start:start + CHUNK] for f in flats))
    return np.reshape(out, arrays[0].shape)


def in_pieces(arrays, read_only=()):
    """Yield the arrays whole, or, for NumPy arrays of one size, as matching CHUNK-element
    slices of their flat views, for a chain that updates them in place (writing into a slice
    writes into the array): the rule above. Every array that is written must be C-contiguous
    for that (else: whole); those at the positions `read_only` may be copies."""
    first = arrays[0]
    written = [a for i, a in enumerate(arrays) if i not in read_only]
    if not (isinstance(first, np.ndarray) and first.size > CHUNK
            and all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in written)):
        yield arrays
        return
    flat = [np.reshape(np.asarray(a), -1) for a in arrays]  # views where contiguous
    for start in range(0, first.size, CHUNK):
        yield tuple(a[start:start + CHUNK] for a in flat)


def make_rng(xp, seed):
    """The generator of dropout's random numbers: a KeyedRandom (the same on every backend).
    xp is accepted for symmetry with the other gaps and ignored: the numbers do not depend on
    the backend."""
    return KeyedRandom(seed)


class KeyedRandom:
    """Random numbers that are a function of (seed, call, sample, element) alone.

    Dropout and drop path draw a keep/drop decision for every element of a (B, ...) array. If
    those came from a generator's stream, they would depend on how the batch was cut (two
    threads, two processes, one GPU each draw their own streams) and on the backend. Here the
    decision for element j of global sample b, in the k-th draw since the generator was made,
    is a hash of those numbers and the seed:

        key_k = hash32(hash32(seed_low ^ hash32(seed_high)) ^ hash32(k))    per draw
        s_b   = hash32(key_k ^ hash32(b))                                   per sample
        bits  = hash32(hash32(j) ^ s_b)                                     per element
        keep  = bits / 2^32 >= p      (top 24 bits, so exact in float32)

    hash32 is the "lowbias32" integer mixer (Chris Wellons' hash-prospector): a bijection of
    32-bit integers whose every output bit depends on every input bit. So the same sample
    gets the same mask however the batch is cut (`piece(start)` is the generator of a piece
    that starts at sample `start`), on NumPy, CuPy (one kernel, cupy_kernels.py) and
    array_api_strict alike, and a resumed run continues exactly.

    The seed is a Python int, or a device array from `seed_array` (uint32 [low, high]): then
    each key_k is computed on the device from it, so a step recorded once as a CUDA graph
    (graphs.py) draws new masks when the array is overwritten with the next step's seed. The
    numbers are the same either way.
    """

    def __init__(self, seed, first_sample=0, draws=0):
        self.seed = seed if hasattr(seed, "shape") else int(seed) % 2**64
        self.first_sample = int(first_sample)  # global index of the batch's sample 0
        self.draws = int(draws)  # k: draws made so far

    def piece(self, start):
        """The generator for the piece of the batch that starts at sample `start`: the same
        seed and draw count, its samples numbered from first_sample + start."""
        return KeyedRandom(self.seed, self.first_sample + start, self.draws)

    def _next_key(self):
        """key_k as a Python int, or as a 0-d uint32 device array for a seed on the device."""
        k = _hash32_int(self.draws)
        self.draws += 1
        if hasattr(self.seed, "shape"):  # the same formula, on the device: 0-d arrays
            xp = array_namespace(self.seed)
            high = xp.astype(self.seed[1], xp.uint32, copy=True)  # _hash32 works in place
            key = _hash32(self.seed[0] ^ _hash32(high))
            key ^= k
            return _hash32(key)
        low, high = self.seed % 2**32, self.seed // 2**32
        return _hash32_int(_hash32_int(low ^ _hash32_int(high)) ^ k)

    def keep_mask(self, xp, shape, p, dtype, device):
        """(B, ...) float mask: 1/(1-p) where kept (probability 1-p), 0 where dropped; the
        decisions of sample b are its own, element by element along the other axes."""
        samples, per_sample = shape[0], math.prod(shape[1:])
        if per_sample >= 2**32 or self.first_sample + samples > 2**32:
            raise ValueError("KeyedRandom numbers at most 2^32 samples and 2^32 elements each")
        key = self._next_key()
        threshold = math.ceil(p * 2**24)  # keep iff the top 24 bits >= threshold
        scale = 1.0 / (1.0 - p)
        from . import cupy_kernels
        if backend_name(xp) == "cupy" and cupy_kernels.uniform_supported(dtype):
            return cupy_kernels.keyed_keep_mask(key, self.first_sample, shape, threshold,
                                                scale, dtype)
        bits = keyed_bits(xp, key, self.first_sample, samples, per_sample, device)
        keep = xp.bitwise_right_shift(bits, 8) >= threshold  # (B, per_sample)
        mask = xp.astype(keep, dtype)
        mask *= scale  # in place: a Python float would promote bfloat16 to float32
        return xp.reshape(mask, shape)


def seed_array(xp, seed, device, out=None):
    """A seed as KeyedRandom takes it on the device: uint32 [low, high] of seed mod 2^64;
    written into `out` (in place: a recorded graph reads it there) when given."""
    seed = int(seed) % 2**64
    host = np.array([seed % 2**32, seed // 2**32], dtype=np.uint32)
    if out is None:
        return to_device(host, xp, device)
    out[...] = to_device(host, xp, device)
    return out


def keyed_normal(xp, key, shape, device):
    """float32 standard normal numbers of the given shape, a function of (key, element) alone:
    random erasing's noise (data/erasing.py), made on the consumer's device from a 32-bit key
    the loader drew, so no worker, thread or rank count changes it.

    Element j (row-major) takes two uniforms from KeyedRandom's hash, u = bits / 2^24 of
    hash32(hash32(i) ^ key) for i = j and i = n + j (n elements), and Box-Muller:
        z = sqrt(-2 ln(1 - u1)) * cos(2 pi u2)        (1 - u1 in (0, 1]: no log of 0)
    """
    n = math.prod(shape)
    if 2 * n > 2**32:
        raise ValueError("keyed_normal numbers at most 2^31 elements")
    ids = xp.arange(n, dtype=xp.uint32, device=device)                   # (n,) j
    return xp.reshape(keyed_normal_at(ids, n, int(key) % 2**32), shape)


def keyed_normal_at(index, count, key):
    """Element `index` of keyed_normal(key, an array of `count` elements), for an array of
    indices (uint32) and a key that is an int or a uint32 array broadcasting with them: many
    keys' numbers in one set of whole-array operations (erasing.py's batched fill). The
    operations are keyed_normal's own, so the numbers are the same to the bit."""
    xp = array_namespace(index)
    u1 = _keyed_uniform(index, key)
    u2 = _keyed_uniform(index + count, key)                               # ids n + j
    radius = xp.sqrt(-2.0 * xp.log(1.0 - u1))
    return radius * xp.cos((2.0 * math.pi) * u2)


def _keyed_uniform(ids, key):
    """float32 u = (hash32(hash32(ids) ^ key) >> 8) / 2^24, in [0, 1) exactly."""
    xp = array_namespace(ids)
    bits = _hash32(_hash32(xp.astype(ids, xp.uint32, copy=True)) ^ key)  # uint32
    return xp.astype(xp.bitwise_right_shift(bits, 8), xp.float32) * 2.0**-24


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


def keyed_bits(xp, key, first_sample, samples, per_sample, device):
    """(samples, per_sample) uint32: hash32(hash32(j) ^ s_b) of KeyedRandom's formulas."""
    sample_ids = xp.arange(first_sample, first_sample + samples, dtype=xp.uint32,
                           device=device)  # (B,) global b
    sample_keys = _hash32(_hash32(sample_ids) ^ key)  # (B,) s_b
    element_hashes = _element_hashes(xp, per_sample, device)  # (n,) hash32(j), kept
    if backend_name(xp) != "numpy" or getattr(_thread, "whole", False):
        return _hash32(element_hashes[None, :] ^ sample_keys[:, None])  # (B, n)
    # NumPy: cache-sized pieces, so the hash's passes stay in the cache
    out = np.empty((samples, per_sample), dtype=np.uint32)
    for b in range(samples):
        for start in range(0, per_sample, CHUNK):
            piece = element_hashes[start:start + CHUNK] ^ sample_keys[b]
            out[b, start:start + CHUNK] = _hash32(piece)
    return out


_ELEMENT_HASHES = DeviceCache()  # n -> hash32(arange(n)): the same in every draw


def _element_hashes(xp, n, device):
    return _ELEMENT_HASHES.get(
        xp, device, (n,), lambda: _hash32(xp.arange(n, dtype=xp.uint32, device=device)))
