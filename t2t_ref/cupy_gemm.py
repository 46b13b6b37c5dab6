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
"""

import dataclasses

import numpy as np

# Values of the CUDA and cuBLAS enums (library_types.h, cublas_api.h): fixed by the ABI.
CUDA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}  # CUDA_R_32F, _16F, _16BF
OP_N, OP_T = 0, 1  # CUBLAS_OP_N, CUBLAS_OP_T
COMPUTE_32F = 68  # CUBLAS_COMPUTE_32F: sums in float32 whatever the operands
GEMM_DEFAULT_TENSOR_OP = 99  # CUBLAS_GEMM_DEFAULT_TENSOR_OP


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


def _strides_in_elements(x):
    return tuple(s // x.itemsize for s in x.strides)


def matmul(a, b, out_dtype):
    """a @ b for CuPy float16 or bfloat16 stacks (..., M, K) @ (..., K, N) with the same batch
    shape (2-D included): float32 sums, the result in out_dtype (a half type or float32).
    float32 operands work too (scripts/gpu_gemm.py times them against CuPy's matmul)."""
    import cupy
    from cupy_backends.cuda.libs import cublas
    if a.ndim != b.ndim or a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.dtype != b.dtype:
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
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)  # host scalars, compute type
    p, half = the_plan, CUDA_TYPES[a.dtype.name]
    if a.ndim == 2:  # one matrix: gemmEx, as CuPy's own 2-D matmul. The strided-batched call
        # with a batch of 1 ran at half its speed on an H200 (Linear's (12608, 384) @
        # (384, 1152) in bf16: 0.097 against 0.065 ms; scripts/gpu_gemm.py)
        cublas.gemmEx(
            cupy.cuda.device.get_cublas_handle(), p.first.op, p.second.op, p.m, p.n, p.k,
            one.ctypes.data, b.data.ptr, half, p.first.ld, a.data.ptr, half, p.second.ld,
            zero.ctypes.data, c.data.ptr, CUDA_TYPES[c.dtype.name], p.ldc,
            COMPUTE_32F, GEMM_DEFAULT_TENSOR_OP)
        return c
    cublas.gemmStridedBatchedEx(
        cupy.cuda.device.get_cublas_handle(), p.first.op, p.second.op, p.m, p.n, p.k,
        one.ctypes.data,
        b.data.ptr, half, p.first.ld, p.first.batch_stride,
        a.data.ptr, half, p.second.ld, p.second.batch_stride,
        zero.ctypes.data,
        c.data.ptr, CUDA_TYPES[c.dtype.name], p.ldc, p.stride_c,
        p.batch, COMPUTE_32F, GEMM_DEFAULT_TENSOR_OP)
    return c
