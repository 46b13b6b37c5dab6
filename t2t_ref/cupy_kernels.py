"""Fused CUDA kernels for the CuPy backend: the same math as the plain ops, in fewer passes.

On CuPy every array operation is one kernel launch and one trip of its operands through the
GPU's memory. The plain array-API ops (ops/*.py) are chains of such operations: GELU's
forward is about a dozen, LayerNorm's backward ten, AdamW thirteen per tensor. Each kernel
here does one of those chains in one launch, reading each input once:

    GELU forward / backward          one elementwise kernel each (the backward recomputes
                                     Phi(x) from x instead of storing it)
    dropout's keep mask              one elementwise kernel (gaps.KeyedRandom's hash)
    LayerNorm forward / backward     one warp per row (row sums by warp shuffles); the
                                     backward's weight and bias gradients are column sums,
                                     two matrix-vector products as in the plain op
    softmax forward / backward       one warp per row; the forward finds the row's maximum
                                     and its sum of exponentials in one pass ("online")
    AdamW                            one elementwise kernel over the flat parameter buffer

The plain ops stay the definition and the default everywhere else (NumPy, array_api_strict);
each op calls its kernel here when its input is a CuPy array (`applies`), and tests compare
every kernel with its plain twin on the GPU (tests/test_cupy_kernels.py). `plain_ops()` turns
the kernels off, for those tests; T2T_REF_PLAIN_OPS=1 in the environment turns them off for a
whole run (to time one against the other). Every kernel is a
template over its storage type: float and double, and (but AdamW, whose buffers are the float32
master) float16 and bfloat16, read into float and rounded once on the way out, so that under
the precision policy (precision.py) an op's float32 island is one kernel, not a cast, a kernel
and a cast. CI compiles this CUDA source with NVRTC and assembles it with ptxas on a machine
without a GPU, so a typo never waits for one.

Shapes: M rows (all leading axes together), D the row length (the last axis), n elements.
"""

import contextlib
import functools
import os

import numpy as np

WARP = 32
ROWS_PER_BLOCK = 8  # row kernels: one warp per row, 8 warps (256 threads) per block
THREADS = 256  # elementwise kernels: threads per block (a grid-stride loop covers the rest)

SOURCE = r"""
// ---- helpers: one name for the float and the double version of each function ----------
__device__ __forceinline__ float erf_(float x) { return erff(x); }
__device__ __forceinline__ double erf_(double x) { return erf(x); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }
template <typename T> __device__ __forceinline__ T minus_infinity();
template <> __device__ __forceinline__ float minus_infinity<float>() {
    return -__int_as_float(0x7f800000);
}
template <> __device__ __forceinline__ double minus_infinity<double>() {
    return -__longlong_as_double(0x7ff0000000000000LL);
}

// ---- storage types: float and double as they are; float16 and bfloat16 (16 bits each) are
// read into float, computed in float and rounded once when stored (round to nearest even), the
// precision policy's float32 island in one kernel. The conversions are the GPU's own cvt
// instructions (no header needed; ptxas checks them in CI).
struct half_t { unsigned short bits; };  // float16
struct bf16_t { unsigned short bits; };  // bfloat16
template <typename S> struct Compute { typedef S type; };  // the type S is computed in
template <> struct Compute<half_t> { typedef float type; };
template <> struct Compute<bf16_t> { typedef float type; };
__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ double load(double x) { return x; }
__device__ __forceinline__ float load(half_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ float load(bf16_t x) { return __uint_as_float((unsigned)x.bits << 16); }
template <typename S> __device__ __forceinline__ S store(typename Compute<S>::type v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ double store<double>(double v) { return v; }
template <> __device__ __forceinline__ half_t store<half_t>(float v) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}
template <> __device__ __forceinline__ bf16_t store<bf16_t>(float v) {
    bf16_t h;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#else  // no bf16 instruction before sm_80 (T4, V100): the same rounding by hand, so that
       // this module still loads there (bf16 itself is refused there: precision.py)
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) h.bits = (unsigned short)((u >> 16) | 0x40u);  // NaN
    else h.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // ties to even
#endif
    return h;
}

// The sum of v over the 32 lanes of a warp, given to every lane (butterfly of shuffles).
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

#define GRID_STRIDE_LOOP(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// One warp per row: the row this warp works on, and this thread's lane in it.
#define WARP_ROW(row, lane, rows)                                          \
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32; \
    const int lane = threadIdx.x % 32;                                    \
    if (row >= (rows)) return;  /* the whole warp leaves: shuffles stay full-warp */

// ---- GELU (ops/gelu.py): y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 -----------------
// x, y stored as S, computed in T. The backward reads x again and recomputes Phi(x): erf costs
// the GPU less than storing Phi (4 bytes an element of the MLP's widest activation) and
// reading it back; the plain op keeps it, where erf is the costly part (NumPy)
template <typename S>
__global__ void gelu_forward(const S* x, S* y, long long n) {
    typedef typename Compute<S>::type T;
    GRID_STRIDE_LOOP(i, n) {
        T xi = load(x[i]);
        y[i] = store<S>(xi * (T(0.5) * (T(1) + erf_(xi * T(0.70710678118654752440)))));
    }
}

// dx = dy (Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
template <typename S>
__global__ void gelu_backward(const S* x, const S* dy, S* dx, long long n) {
    typedef typename Compute<S>::type T;
    GRID_STRIDE_LOOP(i, n) {
        T xi = load(x[i]);
        T cdf = T(0.5) * (T(1) + erf_(xi * T(0.70710678118654752440)));
        T slope = cdf + xi * exp_(T(-0.5) * xi * xi) * T(0.39894228040143267794);
        dx[i] = store<S>(load(dy[i]) * slope);
    }
}

// ---- LayerNorm (ops/layernorm.py) over rows of length D ------------------------------------
// xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps); y = xhat * w + b
// x, y stored as S; w, b and the cache (xhat, rstd) in the compute type T
template <typename S>
__global__ void layernorm_forward(const S* x, const typename Compute<S>::type* w,
                                  const typename Compute<S>::type* b, S* y,
                                  typename Compute<S>::type* xhat,
                                  typename Compute<S>::type* rstd, long long rows, int D,
                                  typename Compute<S>::type eps) {
    typedef typename Compute<S>::type T;
    WARP_ROW(row, lane, rows)
    const S* xr = x + row * D;
    T sum = 0;
    for (int i = lane; i < D; i += 32) sum += load(xr[i]);
    const T mean = warp_sum(sum) / T(D);
    T sq = 0;  // two passes, as the plain op: the centred square, not E[x^2] - mean^2
    for (int i = lane; i < D; i += 32) { T d = load(xr[i]) - mean; sq += d * d; }
    const T r = T(1) / sqrt_(warp_sum(sq) / T(D) + eps);
    for (int i = lane; i < D; i += 32) {
        T h = (load(xr[i]) - mean) * r;
        xhat[row * D + i] = h;
        y[row * D + i] = store<S>(h * w[i] + b[i]);
    }
    if (lane == 0) rstd[row] = r;
}

// g = dy * w; dx = rstd (g - mean(g) - xhat mean(g xhat)); also writes dy * xhat, whose
// column sums are dweight
// dy, dx stored as S; the cache, w and dy_xhat in the compute type T
template <typename S>
__global__ void layernorm_backward(const S* dy, const typename Compute<S>::type* xhat,
                                   const typename Compute<S>::type* rstd,
                                   const typename Compute<S>::type* w, S* dx,
                                   typename Compute<S>::type* dy_xhat, long long rows, int D) {
    typedef typename Compute<S>::type T;
    WARP_ROW(row, lane, rows)
    const S* dyr = dy + row * D;
    const T* hr = xhat + row * D;
    T g_sum = 0, gx_sum = 0;
    for (int i = lane; i < D; i += 32) {
        T g = load(dyr[i]) * w[i];
        g_sum += g;
        gx_sum += g * hr[i];
    }
    const T g_mean = warp_sum(g_sum) / T(D), gx_mean = warp_sum(gx_sum) / T(D);
    const T r = rstd[row];
    for (int i = lane; i < D; i += 32) {
        T d = load(dyr[i]);
        dx[row * D + i] = store<S>(r * (d * w[i] - g_mean - hr[i] * gx_mean));
        dy_xhat[row * D + i] = d * hr[i];
    }
}

// ---- softmax (ops/softmax.py) over rows of length D ----------------------------------------
// p = exp(x - max) / sum(exp(x - max)); the max and the sum found in one pass: when a larger
// value turns up, the sum so far is rescaled to the new maximum
// x, p stored as S, computed in T
template <typename S>
__global__ void softmax_forward(const S* x, S* p, long long rows, int D) {
    typedef typename Compute<S>::type T;
    WARP_ROW(row, lane, rows)
    const S* xr = x + row * D;
    T m = minus_infinity<T>(), s = 0;
    for (int i = lane; i < D; i += 32) {
        T v = load(xr[i]);
        if (v > m) { s = s * exp_(m - v) + T(1); m = v; }
        else s += exp_(v - m);
    }
    for (int offset = 16; offset > 0; offset /= 2) {  // merge the lanes' (max, sum) pairs
        T m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        T s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        T mm = max_(m, m2);
        s = (s == T(0) ? T(0) : s * exp_(m - mm)) + (s2 == T(0) ? T(0) : s2 * exp_(m2 - mm));
        m = mm;
    }
    const T inv = T(1) / s;
    for (int i = lane; i < D; i += 32) p[row * D + i] = store<S>(exp_(load(xr[i]) - m) * inv);
}

// dx = p (dp - sum(dp p))
template <typename S>
__global__ void softmax_backward(const S* dp, const S* p, S* dx, long long rows, int D) {
    typedef typename Compute<S>::type T;
    WARP_ROW(row, lane, rows)
    const S* dr = dp + row * D;
    const S* pr = p + row * D;
    T dot = 0;
    for (int i = lane; i < D; i += 32) dot += load(dr[i]) * load(pr[i]);
    dot = warp_sum(dot);
    for (int i = lane; i < D; i += 32) {
        T pi = load(pr[i]);
        dx[row * D + i] = store<S>(pi * (load(dr[i]) - dot));
    }
}

// ---- dropout's keep mask (gaps.KeyedRandom): element j of global sample b ------------------
__device__ __forceinline__ unsigned int hash32(unsigned int x) {  // lowbias32
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

// mask = scale where the top 24 bits of hash32(hash32(j) ^ hash32(hash32(b) ^ key)) reach
// threshold (= ceil(p 2^24)), else 0; mask stored as S (scale given in S's compute type).
// The key is read from key_on_device when that is not null (a seed on the device: a CUDA
// graph's step, graphs.py), else it is the argument
template <typename S>
__global__ void keyed_keep_mask(S* mask, long long per_sample, long long n, unsigned int key,
                                const unsigned int* key_on_device, long long first_sample,
                                unsigned int threshold, typename Compute<S>::type scale) {
    typedef typename Compute<S>::type T;
    const S kept = store<S>(scale), dropped = store<S>(T(0));
    if (key_on_device != nullptr) key = *key_on_device;
    GRID_STRIDE_LOOP(i, n) {
        unsigned int sample_key = hash32(hash32((unsigned int)(first_sample + i / per_sample)) ^ key);
        unsigned int bits = hash32(hash32((unsigned int)(i % per_sample)) ^ sample_key);
        mask[i] = (bits >> 8) >= threshold ? kept : dropped;
    }
}

// ---- AdamW (optim.py), in place over the flat buffers, torch's order of operations ---------
// found_inf (may be null): a skipped step changes nothing. t = calls less skipped steps (the
// count of skipped steps, may be null, stays on the device); the constants are computed in
// double, as optim.py computes them in Python, then rounded to T.
template <typename T>
__global__ void adamw_update(T* p, const T* g, T* m, T* v, const unsigned char* decays,
                             long long n, double beta1, double beta2, double eps, double lr,
                             double weight_decay, long long calls, const bool* found_inf,
                             const double* skipped) {
    if (found_inf != nullptr && *found_inf) return;
    double t = double(calls) - (skipped != nullptr ? *skipped : 0.0);
    t = t < 1.0 ? 1.0 : t;
    const T step_size = T(lr / (1.0 - pow(beta1, t)));  // lr / bias correction of m
    const T bias_correction2_sqrt = T(sqrt(1.0 - pow(beta2, t)));
    const T decay_factor = T(1.0 - lr * weight_decay);
    const T b1 = T(beta1), b2 = T(beta2), one_minus_b1 = T(1.0 - beta1);
    const T one_minus_b2 = T(1.0 - beta2), e = T(eps);
    GRID_STRIDE_LOOP(i, n) {
        T pi = decays[i] ? p[i] * decay_factor : p[i];
        T gi = g[i];
        T mi = m[i] * b1 + one_minus_b1 * gi;
        T vi = v[i] * b2 + one_minus_b2 * gi * gi;
        T denom = sqrt_(vi) / bias_correction2_sqrt + e;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - mi / denom * step_size;
    }
}
"""

C_TYPES = {"float32": "float", "float64": "double"}
HALF_TYPES = {"float16": "half_t", "bfloat16": "bf16_t"}  # stored 16-bit, computed in float
STORAGE_TYPES = {**C_TYPES, **HALF_TYPES}
KERNELS = {  # kernel -> the dtypes it is compiled for (AdamW: the float32/64 master buffer)
    **{name: tuple(STORAGE_TYPES) for name in (
        "gelu_forward", "gelu_backward", "layernorm_forward", "layernorm_backward",
        "softmax_forward", "softmax_backward", "keyed_keep_mask")},
    "adamw_update": tuple(C_TYPES)}
NAME_EXPRESSIONS = tuple(f"{kernel}<{STORAGE_TYPES[dtype]}>"
                         for kernel, dtypes in KERNELS.items() for dtype in dtypes)
NVRTC_OPTIONS = ("-std=c++17",)

# T2T_REF_PLAIN_OPS=1 in the environment: the plain ops everywhere (to time one against the other)
_enabled = os.environ.get("T2T_REF_PLAIN_OPS", "") != "1"


def applies(x):
    """Is x a CuPy array that a kernel here should handle (float32 or float64, kernels on)?"""
    return (_enabled and type(x).__module__.startswith("cupy")
            and x.dtype.name in C_TYPES)


def applies_half(x):
    """Is x a CuPy float16 or bfloat16 array, for the kernels that read half precision and
    compute in float32 (GELU, LayerNorm, softmax, the keep mask), kernels on?"""
    return (_enabled and type(x).__module__.startswith("cupy")
            and x.dtype.name in HALF_TYPES)


def _compute_dtype(dtype):
    """The dtype a kernel computes (and keeps its caches) in for data stored as dtype."""
    return np.dtype(np.float32) if dtype.name in HALF_TYPES else dtype


def _in_compute_dtype(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


@contextlib.contextmanager
def plain_ops():
    """Within this block the ops run their plain array-API code on CuPy too."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


@functools.cache
def _module(device_id):
    import cupy
    return cupy.RawModule(code=SOURCE, options=NVRTC_OPTIONS, name_expressions=NAME_EXPRESSIONS)


_functions = {}  # (device id, kernel, dtype name) -> the compiled function: looked up once


def _kernel(name, dtype):
    import cupy
    key = (cupy.cuda.runtime.getDevice(), name, dtype.name)
    function = _functions.get(key)
    if function is None:
        function = _functions[key] = _module(key[0]).get_function(
            f"{name}<{STORAGE_TYPES[dtype.name]}>")
    return function


def _check_dtypes(kernel, dtype, **arrays):
    """Raise unless every array is of dtype: a kernel reads each buffer as the one type it
    was instantiated for, so a float32 gradient beside a bfloat16 cache would be read as
    garbage (pairs of bf16 values taken for one float, then memory past the buffer's end)."""
    wrong = {name: a.dtype.name for name, a in arrays.items() if a.dtype != dtype}
    if wrong:
        raise TypeError(f"cupy_kernels.{kernel}<{dtype.name}>: "
                        + ", ".join(f"{name} is {d}" for name, d in wrong.items())
                        + f" (all must be {dtype.name}); a t2t_ref bug: an op changed the dtype")


def _contiguous(x):
    import cupy
    return cupy.ascontiguousarray(x)


def _elementwise_grid(n):
    return (max(1, min(-(-n // THREADS), 65536)),), (THREADS,)


def _row_grid(rows):
    return (max(1, -(-rows // ROWS_PER_BLOCK)),), (ROWS_PER_BLOCK * WARP,)


# ---- GELU ------------------------------------------------------------------------------------

def gelu_forward(x):
    """As ops.gelu.gelu_forward: -> (y, (x,)). The cache is x alone (the plain op's also keeps
    Phi(x)): the backward kernel recomputes Phi. For a half x, y is half."""
    import cupy
    x = _contiguous(x)
    y = cupy.empty_like(x)
    _kernel("gelu_forward", x.dtype)(*_elementwise_grid(x.size), (x, y, np.int64(x.size)))
    return y, (x,)


def gelu_backward(dy, cache):
    """As ops.gelu.gelu_backward, from gelu_forward's cache (x,): -> dx."""
    import cupy
    (x,) = cache
    _check_dtypes("gelu_backward", dy.dtype, x=x)
    dy = _contiguous(dy)
    dx = cupy.empty_like(dy)
    _kernel("gelu_backward", dy.dtype)(*_elementwise_grid(x.size),
                                       (x, dy, dx, np.int64(x.size)))
    return dx


# ---- LayerNorm -------------------------------------------------------------------------------

def layernorm_forward(x, weight, bias, eps):
    """As ops.layernorm.layernorm_forward: -> (y, (xhat, rstd, weight)); for a half x, y is
    half and the cache float32 (weight too), as the plain op's float32 island leaves it."""
    import cupy
    x = _contiguous(x)
    compute = _compute_dtype(x.dtype)
    weight = _contiguous(_in_compute_dtype(weight, compute))
    bias = _contiguous(_in_compute_dtype(bias, compute))
    D = x.shape[-1]
    rows = x.size // D
    y, xhat = cupy.empty_like(x), cupy.empty(x.shape, dtype=compute)
    rstd = cupy.empty((*x.shape[:-1], 1), dtype=compute)
    _kernel("layernorm_forward", x.dtype)(
        *_row_grid(rows), (x, weight, bias, y, xhat, rstd, np.int64(rows), np.int32(D),
                           compute.type(eps)))
    return y, (xhat, rstd, weight)


def layernorm_backward(dy, cache):
    """As ops.layernorm.layernorm_backward: -> (dx, dweight, dbias)."""
    import cupy
    from .ops.rows import column_sum
    xhat, rstd, weight = cache
    dy = _contiguous(dy)
    compute = _compute_dtype(dy.dtype)
    _check_dtypes("layernorm_backward", compute, xhat=xhat, rstd=rstd)
    D = dy.shape[-1]
    rows = dy.size // D
    dx, dy_xhat = cupy.empty_like(dy), cupy.empty(dy.shape, dtype=compute)
    _kernel("layernorm_backward", dy.dtype)(
        *_row_grid(rows), (dy, _contiguous(xhat), _contiguous(rstd),
                           _contiguous(_in_compute_dtype(weight, compute)), dx, dy_xhat,
                           np.int64(rows), np.int32(D)))
    return dx, column_sum(dy_xhat), column_sum(dy)  # weight gradients in the compute dtype


# ---- softmax ---------------------------------------------------------------------------------

def softmax_forward(x):
    """As ops.softmax.softmax_forward: -> (p, p)."""
    import cupy
    x = _contiguous(x)
    D = x.shape[-1]
    p = cupy.empty_like(x)
    _kernel("softmax_forward", x.dtype)(*_row_grid(x.size // D),
                                        (x, p, np.int64(x.size // D), np.int32(D)))
    return p, p


def softmax_backward(dp, p):
    """As ops.softmax.softmax_backward: -> dx."""
    import cupy
    _check_dtypes("softmax_backward", dp.dtype, p=p)
    dp = _contiguous(dp)
    D = dp.shape[-1]
    dx = cupy.empty_like(dp)
    _kernel("softmax_backward", dp.dtype)(*_row_grid(dp.size // D),
                                          (dp, _contiguous(p), dx, np.int64(dp.size // D),
                                           np.int32(D)))
    return dx


# ---- random numbers --------------------------------------------------------------------------

def uniform_supported(dtype):
    return _enabled and np.dtype(dtype).name in STORAGE_TYPES


def keyed_keep_mask(key, first_sample, shape, threshold, scale, dtype):
    """As gaps.KeyedRandom.keep_mask: (B, ...) of scale (kept) and 0 (dropped). key: an int,
    or a 0-d uint32 CuPy array (read by the kernel where it lies)."""
    import cupy
    on_device = hasattr(key, "shape")
    mask = cupy.empty(shape, dtype=dtype)
    per_sample = max(1, mask.size // shape[0]) if shape[0] else 1
    compute = _compute_dtype(mask.dtype)
    # scale as the mask's dtype rounds it (exact in the compute type): as the plain op's
    # mask, made in the half type and multiplied by scale there
    scale = compute.type(np.asarray(scale, dtype=np.float64).astype(mask.dtype))
    _kernel("keyed_keep_mask", mask.dtype)(
        *_elementwise_grid(mask.size),
        (mask, np.int64(per_sample), np.int64(mask.size), np.uint32(0 if on_device else key),
         _contiguous(key) if on_device else np.uint64(0), np.int64(first_sample),
         np.uint32(threshold), scale))
    return mask


# ---- AdamW -----------------------------------------------------------------------------------

def adamw_update(p, g, m, v, decays, *, beta1, beta2, eps, lr, weight_decay, step_count,
                 found_inf=None, skipped=None):
    """One AdamW update in place of the flat 1-D buffers p, m, v (optim.AdamW's formulas);
    decays is a uint8 array, 1 where the element gets weight decay; found_inf a 0-d bool
    array (True: skip) and skipped a 0-d float64 array (steps skipped so far), or None."""
    _check_dtypes("adamw_update", p.dtype, g=g, m=m, v=v)
    null = np.uint64(0)  # a null pointer, passed by value
    _kernel("adamw_update", p.dtype)(
        *_elementwise_grid(p.size),
        (p, g, m, v, decays, np.int64(p.size), np.float64(beta1), np.float64(beta2),
         np.float64(eps), np.float64(lr), np.float64(weight_decay), np.int64(step_count),
         null if found_inf is None else found_inf, null if skipped is None else skipped))
