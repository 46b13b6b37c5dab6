"""The half-precision cuBLAS product (t2t_ref/cupy_gemm.py): its arguments proven on the CPU,
its result on a GPU.

cuBLAS cannot run here, but what could go wrong in cupy_gemm is arithmetic on shapes and
strides: which operand is "transposed", which leading dimension and batch stride. So the CPU
tests run the plan through a NumPy model of cublasGemmStridedBatchedEx (column-major
matrices read from raw memory at pointer + batch * stride, with cuBLAS's own argument
checks) and compare with a @ b, for the layouts the model produces: contiguous stacks,
transposed views (k^T), offsets into a larger array, padded rows, axes of length 1. On a GPU
the real call is compared with NumPy's float32 product (skipped with the reason otherwise).
"""

import numpy as np
import pytest

from t2t_ref import cupy_gemm
from t2t_ref.backend import to_numpy

from conftest import cupy_or_skip


def _elements(x):
    return tuple(s // x.itemsize for s in x.strides)


def _offset(x, memory):
    """x's first element as an index into memory (x is a view of it): its device pointer."""
    return (x.__array_interface__["data"][0] - memory.__array_interface__["data"][0]) \
        // memory.itemsize


def _read(memory, pointer, op, rows, cols, ld):
    """op(X) as rows x cols, X column-major at memory[pointer] with leading dimension ld."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    index = pointer + (r + c * ld if op == cupy_gemm.OP_N else c + r * ld)
    assert index.size == 0 or (index.min() >= 0 and index.max() < memory.size), \
        "cuBLAS would read outside the operand's memory"
    return memory[index]


def cublas_model(p, first_memory, first_pointer, second_memory, second_pointer):
    """What cublasGemmStridedBatchedEx(op_first, op_second, m, n, k, 1, first, ld, stride,
    second, ld, stride, 0, C, ldc, stride_c, batch) writes into a fresh C (its memory)."""
    for operand, rows in ((p.first, p.m), (p.second, p.k)):  # cuBLAS's own checks: ld >= rows
        stored_rows = rows if operand.op == cupy_gemm.OP_N else (p.k if rows == p.m else p.n)
        assert operand.ld >= max(1, stored_rows), f"invalid leading dimension in {p}"
    assert p.ldc >= max(1, p.m)
    c = np.full(p.batch * p.stride_c, np.nan)
    for i in range(p.batch):
        A = _read(first_memory, first_pointer + i * p.first.batch_stride, p.first.op,
                  p.m, p.k, p.first.ld)
        B = _read(second_memory, second_pointer + i * p.second.batch_stride, p.second.op,
                  p.k, p.n, p.second.ld)
        product = A @ B  # m x n, stored column-major with ldc
        r, col = np.meshgrid(np.arange(p.m), np.arange(p.n), indexing="ij")
        c[i * p.stride_c + r + col * p.ldc] = product
    return c


def _stacks(case, rng):
    """(a, b, a's memory, b's memory): a (..., M, K) and b (..., K, N), views of 1-D arrays."""
    def memory_for(shape):
        return rng.normal(size=int(np.prod(shape)) + 7)

    def contiguous(shape, start=0):
        memory = memory_for(shape)
        return memory[start:start + int(np.prod(shape))].reshape(shape), memory

    def transposed(shape):  # a view (..., R, C) of a contiguous (..., C, R): like k^T
        x, memory = contiguous((*shape[:-2], shape[-1], shape[-2]))
        return np.swapaxes(x, -1, -2), memory

    B, h, M, K, N = 2, 3, 5, 4, 6
    if case == "2-D":
        (a, am), (b, bm) = contiguous((M, K)), contiguous((K, N), start=3)
    elif case == "q @ k^T":
        (a, am), (b, bm) = contiguous((B, h, M, K)), transposed((B, h, K, N))
    elif case == "q^T @ dscores":
        (a, am), (b, bm) = transposed((B, h, M, K)), contiguous((B, h, K, N), start=1)
    elif case == "both transposed":
        (a, am), (b, bm) = transposed((B, M, K)), transposed((B, K, N))
    elif case == "batch slice":  # x[1:3]: an offset into a bigger stack
        (big, am), (b, bm) = contiguous((4, M, K)), contiguous((2, K, N))
        a = big[1:3]
    elif case == "padded rows":  # x[..., :K] of a wider array: ld larger than the row
        (wide, am), (b, bm) = contiguous((B, M, K + 3)), contiguous((B, K, N))
        a = wide[..., :K]
    elif case == "length-1 axes":
        (a, am), (b, bm) = contiguous((1, h, 1, K)), transposed((1, h, K, 1))
    elif case == "permuted batch":  # (B, N, h, d) -> (B, h, N, d): no single batch stride
        x, am = contiguous((B, M, h, K))
        a = np.transpose(x, (0, 2, 1, 3))
        b, bm = contiguous((B, h, K, N))
    else:
        raise ValueError(case)
    return a, b, am, bm


CASES = ("2-D", "q @ k^T", "q^T @ dscores", "both transposed", "batch slice", "padded rows",
         "length-1 axes", "permuted batch")


@pytest.mark.parametrize("case", CASES)
def test_plan_computes_a_at_b_in_the_cublas_model(case):
    a, b, a_memory, b_memory = _stacks(case, np.random.default_rng(CASES.index(case)))
    plan = cupy_gemm.plan(a.shape, _elements(a), b.shape, _elements(b))
    if case == "permuted batch":
        assert plan is None, "a stack without one batch stride must be copied, not read in place"
        assert cupy_gemm.operand(b.shape, _elements(b)) is not None  # b is read in place
        a = np.ascontiguousarray(a)  # as cupy_gemm.matmul copies it
        a_memory = a.reshape(-1)
        plan = cupy_gemm.plan(a.shape, _elements(a), b.shape, _elements(b))
    assert plan is not None, f"{case}: cuBLAS should read {a.strides} and {b.strides} in place"
    memory = cublas_model(plan, b_memory, _offset(b, b_memory), a_memory, _offset(a, a_memory))
    expected = a @ b
    got = memory.reshape(expected.shape)  # c is a new contiguous (..., M, N)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12,
                               err_msg=f"{case}: plan {plan}")


def test_operand_refuses_layouts_cublas_cannot_read():
    assert cupy_gemm.operand((3, 4), (8, 2)) is None  # neither rows nor columns unit-stride
    assert cupy_gemm.operand((3, 4), (2, 1)) is None  # rows overlap: ld below the row length
    # two batch axes that do not step like one: (2, 3) matrices at 100 i + 12 j
    assert cupy_gemm.operand((2, 3, 3, 4), (100, 12, 4, 1)) is None
    assert cupy_gemm.operand((2, 3, 3, 4), (36, 12, 4, 1)).batch_stride == 12


# ---- on a GPU --------------------------------------------------------------------------------

def _on_gpu(cupy, x, memory, dtype):
    """x (a view of memory) rebuilt on the GPU in dtype: the same offset, shape and strides."""
    memory_gpu = cupy.asarray(memory.astype(dtype))
    start = _offset(x, memory)
    strides = tuple(s * memory_gpu.itemsize for s in _elements(x))
    return cupy.lib.stride_tricks.as_strided(memory_gpu[start:], x.shape, strides)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_half_product_on_the_gpu_equals_float32_sums(case, dtype):
    cupy = cupy_or_skip()
    if dtype == "bfloat16":
        dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    a, b, a_memory, b_memory = _stacks(case, np.random.default_rng(7))
    try:
        a_gpu, b_gpu = _on_gpu(cupy, a, a_memory, dtype), _on_gpu(cupy, b, b_memory, dtype)
    except (TypeError, ValueError) as err:
        pytest.skip(f"this CuPy has no {np.dtype(dtype)} arrays: {err}")
    # the exact products of the rounded operands; cuBLAS sums them in float32, then rounds once
    exact = a.astype(dtype).astype(np.float64) @ b.astype(dtype).astype(np.float64)
    for out_dtype in (a_gpu.dtype, np.dtype(np.float32)):
        got = to_numpy(cupy_gemm.matmul(a_gpu, b_gpu, out_dtype))
        assert got.dtype == out_dtype, f"{case}: result {got.dtype}, asked for {out_dtype}"
        rounding = 2.0 ** -8 if out_dtype.name == "bfloat16" else \
            2.0 ** -11 if out_dtype.name == "float16" else 1e-6
        np.testing.assert_allclose(got.astype(np.float64), exact, rtol=2 * rounding,
                                   atol=2 * rounding * np.abs(exact).max(),
                                   err_msg=f"{case} {np.dtype(dtype)} -> {out_dtype}")
