"""Half-precision matrix products on CuPy that reach the tensor cores: one cuBLAS call.

CuPy's `matmul` of float16 stacks (ndim > 2: attention's (B, h, N, d) products) copies both
operands to float32 and multiplies those, so the tensor cores are never used; and any stack
that is a transposed view (attention's k^T) is first copied to be contiguous. cuBLAS's
`gemmStridedBatchedEx` does the product directly: half operands read as they lie in memory
(a transposed view is just "op T"), float32 sums (CUBLAS_COMPUTE_32F), and a float16, bfloat16
or float32 result. gaps.matmul calls it for half operands on CuPy; the math is still a @ b.

cuBLAS is column-major, and a row-major (M, K) matrix is a column-major (K, M) one. So the
row-major C = A B (M x N) is computed as the column-major C^T = B^T A^T (N x M): cuBLAS's
first operand is our b, its second our a. `plan` works out the arguments from shapes and
strides alone (pure Python); `matmul` makes the call. tests/test_cupy_gemm.py checks both on
the CPU against a NumPy model of the cuBLAS call.

While a CUDA graph records (capture.py), every product on CuPy comes here, float32 ones too,
and cuBLAS is called through ctypes (`DirectCublas`): CuPy's own cuBLAS wrappers refuse any
call while a stream captures (CuPy issue #6290), though cuBLAS's products can be captured
(from CUDA 12.2 on cuBLAS takes its workspace from the stream's pool, cudaMallocAsync).
"""

import ctypes
import dataclasses
import os
import re

import numpy as np

from . import capture

# Values of the CUDA and cuBLAS enums (library_types.h, cublas_api.h): fixed by the ABI.
CUDA_TYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}  # CUDA_R_32F, ...
OP_N, OP_T = 0, 1  # CUBLAS_OP_N, CUBLAS_OP_T
COMPUTE_32F = 68  # CUBLAS_COMPUTE_32F: sums in float32 whatever the operands
COMPUTE_64F = 70  # CUBLAS_COMPUTE_64F: float64 operands, float64 sums
COMPUTE_32F_FAST_TF32 = 77  # float32 operands rounded to TF32: what CuPy's matmul does under
# CUPY_TF32=1, so that a recorded product is the eager one
GEMM_DEFAULT_TENSOR_OP = 99  # CUBLAS_GEMM_DEFAULT_TENSOR_OP: half operands
GEMM_DEFAULT = -1  # CUBLAS_GEMM_DEFAULT: float32 and float64 operands (the tensor-op hint may
# let cuBLAS round float32 operands to half, CUBLAS_COMPUTE_32F_FAST_16F: not for them)


@dataclasses.dataclass(frozen=True)
class Operand:
    """How cuBLAS reads one stack of matrices in place, in elements: op (OP_N: its memory is
    already the column-major matrix cuBLAS wants; OP_T: the transpose of it), leading
    dimension ld, and batch_stride between consecutive matrices (0 for a single matrix)."""
    op: int
    ld: int
    batch_stride: int


def operand(shape, strides):
    """The Operand for a row-major-indexed stack (..., R, C) with these strides (in elements)
    as the *transposed* matrix cuBLAS multiplies (C x R, column-major), or None when the
    stack is not laid out so that cuBLAS can read it in place (then copy it contiguous).

        row-major (strides (.., ld, 1)):    column-major C x R, ld = ld, op N
        column-major (strides (.., 1, ld)): column-major R x C read transposed, op T
    """
    R, C = shape[-2:]
    row_stride, column_stride = strides[-2:]
    # an axis of length 1 is never stepped along, so its stride is anything (NumPy and CuPy
    # give a new axis, x[:, :, None], stride 0): read it as the contiguous one
    if C == 1:
        column_stride = 1
    if R == 1:
        row_stride = max(1, C) if column_stride == 1 else 1
    if column_stride == 1 and row_stride >= max(1, C):
        op, ld = OP_N, row_stride
    elif row_stride == 1 and column_stride >= max(1, R):
        op, ld = OP_T, column_stride
    else:
        return None
    batch = shape[:-2]
    if not batch or all(n == 1 for n in batch):
        return Operand(op, ld, 0)
    # The batch axes must step through memory like one axis: each axis's stride is the next
    # axis's stride times its length (axes of length 1 step nowhere and are skipped).
    axes = [(n, s) for n, s in zip(batch, strides[:-2]) if n != 1]
    for (_, outer), (n, inner) in zip(axes, axes[1:]):
        if outer != inner * n:
            return None
    return Operand(op, ld, axes[-1][1])


@dataclasses.dataclass(frozen=True)
class Plan:
    """The arguments of one cublasGemmStridedBatchedEx call for c = a @ b, with a (..., M, K),
    b (..., K, N) and c a new contiguous (..., M, N): cuBLAS's m, n, k and its first operand
    (our b), second operand (our a) and result (our c, ldc N)."""
    m: int
    n: int
    k: int
    first: Operand
    second: Operand
    ldc: int
    stride_c: int
    batch: int


def plan(a_shape, a_strides, b_shape, b_strides):
    """The Plan for a @ b (strides in elements), or None when a or b must be copied first."""
    M, K = a_shape[-2:]
    N = b_shape[-2:][1]
    first, second = operand(b_shape, b_strides), operand(a_shape, a_strides)
    if first is None or second is None:
        return None
    batch = int(np.prod(a_shape[:-2], dtype=np.int64))
    return Plan(m=N, n=M, k=K, first=first, second=second, ldc=N, stride_c=M * N, batch=batch)


def takes(a, b):
    """Can one cuBLAS call compute a @ b: operands of one dtype, stacks with the same batch
    shape (2-D included; no broadcasting)? gaps.matmul sends such products here."""
    return a.dtype == b.dtype and a.ndim == b.ndim >= 2 and a.shape[:-2] == b.shape[:-2]


def _strides_in_elements(x):
    return tuple(s // x.itemsize for s in x.strides)


def matmul(a, b, out_dtype):
    """a @ b for CuPy float16 or bfloat16 stacks (..., M, K) @ (..., K, N) with the same batch
    shape (2-D included): float32 sums, the result in out_dtype (a half type or float32).
    float32 and float64 operands work too (their own precision's sums): while a CUDA graph
    records, every product comes here (scripts/gpu_gemm.py times float32 against CuPy's)."""
    import cupy
    cublas = _cublas()
    if not takes(a, b):
        raise ValueError(f"cupy_gemm.matmul: {a.shape} {a.dtype} @ {b.shape} {b.dtype}: "
                         "needs two stacks of one dtype with the same batch shape")
    M, N = a.shape[-2], b.shape[-1]
    c = cupy.empty((*a.shape[:-2], M, N), dtype=out_dtype)
    if c.size == 0:
        return c
    if a.shape[-1] == 0:  # an empty sum
        c.fill(0)
        return c
    # an operand laid out so that cuBLAS cannot read it in place is copied (that one only)
    if operand(a.shape, _strides_in_elements(a)) is None:
        a = cupy.ascontiguousarray(a)
    if operand(b.shape, _strides_in_elements(b)) is None:
        b = cupy.ascontiguousarray(b)
    the_plan = plan(a.shape, _strides_in_elements(a), b.shape, _strides_in_elements(b))
    if the_plan is None:  # cannot be: a contiguous stack is always readable in place
        raise AssertionError(f"cupy_gemm.plan: no cuBLAS layout for {a.shape} {a.strides} @ "
                             f"{b.shape} {b.strides}")
    # alpha and beta: host scalars of the compute type (read when the call is made, and baked
    # into a graph's recording: 1 and 0 do not change)
    compute, scalar = (COMPUTE_64F, np.float64) if a.dtype.name == "float64" else \
        (COMPUTE_32F, np.float32)
    if a.dtype.name == "float32" and _tf32():
        compute = COMPUTE_32F_FAST_TF32
    algo = GEMM_DEFAULT if a.dtype.name in ("float32", "float64") else GEMM_DEFAULT_TENSOR_OP
    one, zero = np.ones((), scalar), np.zeros((), scalar)
    p, half = the_plan, CUDA_TYPES[a.dtype.name]
    if a.ndim == 2:  # one matrix: gemmEx, as CuPy's own 2-D matmul. The strided-batched call
        # with a batch of 1 ran at half its speed on an H200 (Linear's (12608, 384) @
        # (384, 1152) in bf16: 0.097 against 0.065 ms; scripts/gpu_gemm.py)
        cublas.gemmEx(
            cupy.cuda.device.get_cublas_handle(), p.first.op, p.second.op, p.m, p.n, p.k,
            one.ctypes.data, b.data.ptr, half, p.first.ld, a.data.ptr, half, p.second.ld,
            zero.ctypes.data, c.data.ptr, CUDA_TYPES[c.dtype.name], p.ldc,
            compute, algo)
        return c
    cublas.gemmStridedBatchedEx(
        cupy.cuda.device.get_cublas_handle(), p.first.op, p.second.op, p.m, p.n, p.k,
        one.ctypes.data,
        b.data.ptr, half, p.first.ld, p.first.batch_stride,
        a.data.ptr, half, p.second.ld, p.second.batch_stride,
        zero.ctypes.data,
        c.data.ptr, CUDA_TYPES[c.dtype.name], p.ldc, p.stride_c,
        p.batch, compute, algo)
    return c


def _tf32():
    """Does CuPy's own float32 matmul use TF32 (CUPY_TF32 set above 0, read as CuPy reads it)?"""
    try:
        return int(os.environ.get("CUPY_TF32", "0")) > 0
    except ValueError:
        return False


# ---- cuBLAS through ctypes, while a CUDA graph records ----------------------------------------

def _cublas():
    """The cuBLAS calls to make: CuPy's wrappers, or, while a CUDA graph records, DirectCublas
    on the libcublas CuPy loaded (made once)."""
    if capture.active():
        global _DIRECT
        if _DIRECT is None:
            import cupy
            _DIRECT = DirectCublas(loaded_library("libcublas"),
                                   lambda: cupy.cuda.get_current_stream().ptr)
        return _DIRECT
    from cupy_backends.cuda.libs import cublas
    return cublas


_DIRECT = None


def loaded_library(name, maps="/proc/self/maps"):
    """The path of the shared library `name` ("libcublas") that CuPy's wrappers call into.
    CuPy 14 loads its CUDA libraries through cuda-pathfinder, whose load_nvidia_dynamic_lib is
    cached: asked again, it names the very file CuPy loaded. Else the one such library mapped
    into this process (/proc/self/maps); two different ones (PyTorch's own beside CuPy's, say)
    are refused rather than guessed between: a handle of one library given to the other's
    functions would be undefined."""
    from cupy_backends.cuda.libs import cublas  # noqa: F401 - loads libcublas
    try:
        from cuda import pathfinder
        loaded = pathfinder.load_nvidia_dynamic_lib(name[len("lib"):])
        if getattr(loaded, "abs_path", None):
            return loaded.abs_path
    except Exception:  # noqa: BLE001 - no pathfinder (CuPy 13), or it cannot say: the maps
        pass
    pattern = re.compile(rf"/{re.escape(name)}\.so(\.[0-9]+)*$")
    with open(maps) as lines:
        paths = {line.split(maxsplit=5)[-1].strip() for line in lines}
    found = sorted({os.path.realpath(p) if os.path.exists(p) else p
                    for p in paths if pattern.search(p)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise RuntimeError(f"{name} is not loaded in this process (is CuPy's cuBLAS usable?)")
    raise RuntimeError(f"{len(found)} different {name} are loaded ({', '.join(found)}): "
                       "which one CuPy uses cannot be told")


class DirectCublas:
    """cublasGemmEx and cublasGemmStridedBatchedEx called through ctypes, with the arguments
    of CuPy's wrappers (cupy_backends.cuda.libs.cublas), each call on the current stream as
    theirs are, without their refusal while a stream captures. The prototypes are
    cublas_api.h's: handles, streams and pointers as void *, the enums as int, the strides
    long long."""

    def __init__(self, library, current_stream):
        lib = ctypes.CDLL(library)
        self.current_stream = current_stream  # () -> the current stream's handle (an int)
        P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        self._set_stream = _function(lib, ("cublasSetStream_v2", "cublasSetStream"), [P, P])
        self._gemm = _function(lib, ("cublasGemmEx",),
                               [P, I, I, I, I, I, P, P, I, I, P, I, I, P, P, I, I, I, I])
        self._batched = _function(lib, ("cublasGemmStridedBatchedEx",),
                                  [P, I, I, I, I, I, P, P, I, I, L, P, I, I, L, P, P, I, I, L,
                                   I, I, I])

    def _on_current_stream(self, handle):
        _check(self._set_stream(handle, self.current_stream()), "cublasSetStream")

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
               beta, C, Ctype, ldc, computeType, algo):
        self._on_current_stream(handle)
        _check(self._gemm(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
                          beta, C, Ctype, ldc, computeType, algo), "cublasGemmEx")

    def gemmStridedBatchedEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda,
                             strideA, B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC,
                             batchCount, computeType, algo):
        self._on_current_stream(handle)
        _check(self._batched(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B,
                             Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
                             computeType, algo), "cublasGemmStridedBatchedEx")


def _function(lib, names, argtypes):
    """The first of names that lib exports, with its argument types; status (int) returned."""
    for name in names:
        function = getattr(lib, name, None)
        if function is not None:
            function.argtypes, function.restype = argtypes, ctypes.c_int
            return function
    raise RuntimeError(f"{lib._name} exports none of {', '.join(names)}")


def _check(status, call):
    if status != 0:  # CUBLAS_STATUS_SUCCESS
        raise RuntimeError(f"{call} failed with cuBLAS status {status}")
