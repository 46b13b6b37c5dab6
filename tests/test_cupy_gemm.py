"""The half-precision cuBLAS product (t2t_ref/cupy_gemm.py): its arguments proven on the CPU,
its result on a GPU.

cuBLAS cannot run here, but what could go wrong in cupy_gemm is arithmetic on shapes and
strides: which operand is "transposed", which leading dimension and batch stride. So the CPU
tests run the plan through a NumPy model of cublasGemmStridedBatchedEx (column-major
matrices read from raw memory at pointer + batch * stride, with cuBLAS's own argument
checks) and compare with a @ b, for the layouts the model produces: contiguous stacks,
transposed views (k^T), offsets into a larger array, padded rows, axes of length 1. Then the
whole of cupy_gemm.matmul runs against stand-ins for CuPy (NumPy arrays with a .data.ptr) and
for cuBLAS (gemmStridedBatchedEx with CuPy's signature, computing through that model on the
memory behind the pointers), so the call itself (operand order, pointers, type codes) is
proven too. On a GPU the real call is compared with the exact product of the rounded operands
(skipped with the reason otherwise).
"""

import sys

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
    # cuBLAS's own checks: ld >= the rows of the matrix as stored (op(first) is m x k,
    # op(second) k x n; a transposed one is stored the other way round)
    for operand, rows, cols in ((p.first, p.m, p.k), (p.second, p.k, p.n)):
        stored_rows = rows if operand.op == cupy_gemm.OP_N else cols
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
    elif case == "square, transposed":  # dout^T p at N = d: m == k, which op T must not mix up
        (a, am), (b, bm) = transposed((B, h, K, K)), contiguous((B, h, K, N), start=2)
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
    elif case == "new axes":  # the performer's qp @ kp_sum[:, :, None]: a stride-0 axis
        (a, am), (v, bm) = contiguous((B, M, K)), contiguous((B, K))
        b = v[:, :, None]
    elif case == "new axes, a":  # a row vector the same way, x[:, None, :]
        (v, am), (b, bm) = contiguous((B, K)), contiguous((B, K, N))
        a = v[:, None, :]
    elif case == "permuted batch":  # (B, N, h, d) -> (B, h, N, d): no single batch stride
        x, am = contiguous((B, M, h, K))
        a = np.transpose(x, (0, 2, 1, 3))
        b, bm = contiguous((B, h, K, N))
    elif case == "permuted batch, b":  # the same on the other side: b must be copied
        a, am = contiguous((B, h, M, K))
        x, bm = contiguous((B, K, h, N))
        b = np.transpose(x, (0, 2, 1, 3))
    else:
        raise ValueError(case)
    return a, b, am, bm


CASES = ("2-D", "q @ k^T", "q^T @ dscores", "square, transposed", "both transposed",
         "batch slice", "padded rows", "length-1 axes", "new axes", "new axes, a",
         "permuted batch", "permuted batch, b")


@pytest.mark.parametrize("case", CASES)
def test_plan_computes_a_at_b_in_the_cublas_model(case):
    a, b, a_memory, b_memory = _stacks(case, np.random.default_rng(CASES.index(case)))
    plan = cupy_gemm.plan(a.shape, _elements(a), b.shape, _elements(b))
    if case.startswith("permuted batch"):
        assert plan is None, "a stack without one batch stride must be copied, not read in place"
        if cupy_gemm.operand(a.shape, _elements(a)) is None:  # as cupy_gemm.matmul copies it
            a = np.ascontiguousarray(a)
            a_memory = a.reshape(-1)
        if cupy_gemm.operand(b.shape, _elements(b)) is None:
            b = np.ascontiguousarray(b)
            b_memory = b.reshape(-1)
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


# ---- the whole of cupy_gemm.matmul, with a stand-in CuPy and cuBLAS (no GPU) -----------------

DTYPE_OF_CUDA_TYPE = {0: "float32", 1: "float64", 2: "float16", 14: "bfloat16"}


class _DeviceArray(np.ndarray):
    """A NumPy array dressed as a CuPy one for cupy_gemm.matmul: .data.ptr is its address."""

    @property
    def data(self):
        import types
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _numpy_dtype(name):
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if name == "bfloat16" \
        else np.dtype(name)


def _at(pointer, count, dtype):
    """count elements of dtype at a raw address (the stand-in GPU's memory is the host's)."""
    import ctypes
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(pointer)
    return np.frombuffer(raw, dtype=np.uint8).view(dtype)


def _extent(op, rows, cols, ld, stride, batch):
    """Elements from an operand's pointer to the last one cuBLAS reads, plus one."""
    if rows == 0 or cols == 0:
        return 0
    last = (rows - 1) + (cols - 1) * ld if op == cupy_gemm.OP_N else (cols - 1) + (rows - 1) * ld
    return (batch - 1) * stride + last + 1


def _stand_in_cublas(calls):
    """cupy_backends.cuda.libs.cublas with gemmStridedBatchedEx's signature (CuPy's cpdef,
    argument for argument) computing through cublas_model on the memory behind the pointers."""
    import ctypes
    import types

    def gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA,
                             B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
                             computeType, algo):
        double = DTYPE_OF_CUDA_TYPE[Atype] == "float64"  # float64: float64 sums and scalars
        compute = cupy_gemm.COMPUTE_64F if double else cupy_gemm.COMPUTE_32F
        if DTYPE_OF_CUDA_TYPE[Atype] == "float32" and cupy_gemm._tf32():
            compute = cupy_gemm.COMPUTE_32F_FAST_TF32  # as CuPy's matmul under CUPY_TF32=1
        full = DTYPE_OF_CUDA_TYPE[Atype] in ("float32", "float64")  # no tensor-op hint for them
        assert (computeType, algo) == (compute, cupy_gemm.GEMM_DEFAULT if full else
                                       cupy_gemm.GEMM_DEFAULT_TENSOR_OP)
        scalar = ctypes.c_double if double else ctypes.c_float
        assert scalar.from_address(alpha).value == 1.0
        assert scalar.from_address(beta).value == 0.0
        plan = cupy_gemm.Plan(m=m, n=n, k=k, first=cupy_gemm.Operand(transa, lda, strideA),
                              second=cupy_gemm.Operand(transb, ldb, strideB), ldc=ldc,
                              stride_c=strideC, batch=batchCount)
        first_dtype = _numpy_dtype(DTYPE_OF_CUDA_TYPE[Atype])
        second_dtype = _numpy_dtype(DTYPE_OF_CUDA_TYPE[Btype])
        first = _at(A, _extent(transa, m, k, lda, strideA, batchCount), first_dtype)
        second = _at(B, _extent(transb, k, n, ldb, strideB, batchCount), second_dtype)
        product = cublas_model(plan, first.astype(np.float64), 0, second.astype(np.float64), 0)
        out = _at(C, batchCount * strideC, _numpy_dtype(DTYPE_OF_CUDA_TYPE[Ctype]))
        out[:] = product.astype(out.dtype)
        calls.append(plan)

    def gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
               Ctype, ldc, computeType, algo):
        """One matrix: gemmStridedBatchedEx with a batch of 1 (CuPy's signature)."""
        gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype,
                             ldb, 0, beta, C, Ctype, ldc, m * n, 1, computeType, algo)
        calls[-1] = ("gemmEx", calls[-1])

    return types.SimpleNamespace(gemmStridedBatchedEx=gemmStridedBatchedEx, gemmEx=gemmEx)


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """CuPy and cuBLAS replaced by stand-ins on host memory; yields the list of cuBLAS calls."""
    import types
    calls = []
    cupy = types.ModuleType("cupy")
    cupy.empty = lambda shape, dtype: np.empty(shape, dtype).view(_DeviceArray)
    cupy.ascontiguousarray = lambda x: np.ascontiguousarray(x).view(_DeviceArray)
    cupy.cuda = types.SimpleNamespace(device=types.SimpleNamespace(get_cublas_handle=lambda: 1))
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = _stand_in_cublas(calls)
    for name, module in (("cupy", cupy), ("cupy_backends", types.ModuleType("cupy_backends")),
                         ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                         ("cupy_backends.cuda.libs", libs)):
        monkeypatch.setitem(sys.modules, name, module)
    yield calls


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_matmul_calls_cublas_so_that_it_computes_a_at_b(stand_in_gpu, case, dtype):
    """cupy_gemm.matmul end to end on the CPU: its one cuBLAS call (operand order, pointers,
    types, leading dimensions, strides; the copy of an operand cuBLAS cannot read) computes
    a @ b, in the half type and in float32 (float32 and float64 operands: what every product
    is while a CUDA graph records)."""
    dtype = _numpy_dtype(dtype)
    a, b, a_memory, b_memory = _stacks(case, np.random.default_rng(CASES.index(case)))

    def on_device(x, memory):  # the same view of the memory, in dtype
        half = memory.astype(dtype)
        strides = tuple(e * half.itemsize for e in _elements(x))
        view = np.lib.stride_tricks.as_strided(half[_offset(x, memory):], x.shape, strides)
        return view.view(_DeviceArray)

    a_dev, b_dev = on_device(a, a_memory), on_device(b, b_memory)
    exact = a_dev.astype(np.float64) @ b_dev.astype(np.float64)
    for out_dtype in ((dtype,) * 2 if dtype == np.float64 else (dtype, np.dtype(np.float32))):
        got = cupy_gemm.matmul(a_dev, b_dev, out_dtype)
        assert got.dtype == out_dtype and got.shape == exact.shape
        if out_dtype == np.float64:  # float64 sums: equal up to their order's last bit
            np.testing.assert_allclose(got, exact, rtol=1e-14, atol=1e-15,
                                       err_msg=f"{case} {dtype} -> {out_dtype}")
        else:  # rounded to a narrower type, the order of float64 sums does not show
            np.testing.assert_array_equal(np.asarray(got).view(np.uint8),
                                          exact.astype(out_dtype).view(np.uint8),
                                          err_msg=f"{case} {dtype} -> {out_dtype}")
    assert len(stand_in_gpu) == 2, "one cuBLAS call per product"
    one_matrix = [isinstance(call, tuple) and call[0] == "gemmEx" for call in stand_in_gpu]
    assert one_matrix == [a.ndim == 2] * 2, "gemmEx for one matrix, strided-batched for stacks"


# ---- while a CUDA graph records: cuBLAS through ctypes (capture.py) ----------------------------

def test_while_a_graph_records_every_product_goes_to_cublas_directly(stand_in_gpu, monkeypatch):
    """CuPy's cuBLAS wrappers refuse any call while a stream captures, so while a graph records,
    gaps.matmul sends float32 products to cupy_gemm too, and cupy_gemm calls cuBLAS through
    DirectCublas; outside a recording float32 stays with CuPy's matmul and the half products
    with CuPy's cuBLAS wrappers."""
    from t2t_ref import capture, gaps
    direct = []
    monkeypatch.setattr(cupy_gemm, "_DIRECT", _stand_in_cublas(direct))
    a, b, _, _ = _stacks("q @ k^T", np.random.default_rng(0))
    a, b = a.astype(np.float32).view(_DeviceArray), b.astype(np.float32).view(_DeviceArray)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    sent = []
    monkeypatch.setattr(gaps, "backend_name", lambda xp: "cupy")  # these arrays stand for CuPy's
    real = cupy_gemm.matmul
    monkeypatch.setattr(cupy_gemm, "matmul", lambda *args: sent.append(args) or real(*args))
    np.testing.assert_allclose(gaps.matmul(a, b), exact, rtol=1e-6)
    assert sent == [] and stand_in_gpu == [] and direct == [], "float32 eagerly: CuPy's matmul"
    with capture.recording():
        np.testing.assert_allclose(gaps.matmul(a, b), exact, rtol=1e-6)
        assert capture.active()
    assert not capture.active()
    assert len(sent) == 1 and len(direct) == 1 and stand_in_gpu == [], \
        "while recording: cupy_gemm, and cuBLAS through ctypes"
    half_a, half_b = a.astype(np.float16).view(_DeviceArray), b.astype(np.float16).view(_DeviceArray)
    gaps.matmul(half_a, half_b)
    assert len(sent) == 2 and len(stand_in_gpu) == 1 and len(direct) == 1, \
        "half products eagerly: cupy_gemm through CuPy's wrappers"


def test_float32_products_use_tf32_exactly_when_cupys_matmul_does(stand_in_gpu, monkeypatch):
    """A recorded float32 product must equal CuPy's eager one: TF32 sums where CUPY_TF32 makes
    CuPy's matmul use them, full float32 otherwise (bench and the tests run with it unset)."""
    seen = []
    a = np.ones((4, 8), np.float32).view(_DeviceArray)
    b = np.ones((8, 3), np.float32).view(_DeviceArray)
    real = cupy_gemm._cublas

    def spy():
        cublas = real()
        return types.SimpleNamespace(gemmEx=lambda *args: seen.append(args[-2]) or
                                     cublas.gemmEx(*args))
    import types
    monkeypatch.setattr(cupy_gemm, "_cublas", spy)
    for value, compute in (("0", cupy_gemm.COMPUTE_32F), ("1", cupy_gemm.COMPUTE_32F_FAST_TF32)):
        monkeypatch.setenv("CUPY_TF32", value)
        np.testing.assert_array_equal(cupy_gemm.matmul(a, b, np.dtype(np.float32)), 8.0)
        assert seen[-1] == compute, (value, seen)
    monkeypatch.delenv("CUPY_TF32")
    cupy_gemm.matmul(a.astype(np.float16).view(_DeviceArray),
                     b.astype(np.float16).view(_DeviceArray), np.dtype(np.float32))
    assert seen[-1] == cupy_gemm.COMPUTE_32F  # half operands: float32 sums whatever CUPY_TF32


STUB_CUBLAS = r"""
/* cuBLAS's prototypes (cublas_api.h), recording their arguments: DirectCublas's ctypes
   declarations must pass each one at its declared width (a long long stride as an int would
   arrive cut, a pointer as an int would arrive as garbage) */
static long long args[32];
static int status = 0;
long long stub_arg(int i) { return args[i]; }
void stub_fail_with(int s) { status = s; }
int cublasSetStream_v2(void *handle, void *stream) {
    args[30] = (long long)handle; args[31] = (long long)stream; return 0; }
int cublasGemmEx(void *handle, int transa, int transb, int m, int n, int k, const void *alpha,
                 const void *A, int Atype, int lda, const void *B, int Btype, int ldb,
                 const void *beta, void *C, int Ctype, int ldc, int computeType, int algo) {
    long long a[] = {(long long)handle, transa, transb, m, n, k, (long long)alpha,
                     (long long)A, Atype, lda, (long long)B, Btype, ldb, (long long)beta,
                     (long long)C, Ctype, ldc, computeType, algo};
    for (int i = 0; i < 19; i++) args[i] = a[i];
    return status; }
int cublasGemmStridedBatchedEx(void *handle, int transa, int transb, int m, int n, int k,
                               const void *alpha, const void *A, int Atype, int lda,
                               long long strideA, const void *B, int Btype, int ldb,
                               long long strideB, const void *beta, void *C, int Ctype,
                               int ldc, long long strideC, int batchCount, int computeType,
                               int algo) {
    long long a[] = {(long long)handle, transa, transb, m, n, k, (long long)alpha,
                     (long long)A, Atype, lda, strideA, (long long)B, Btype, ldb, strideB,
                     (long long)beta, (long long)C, Ctype, ldc, strideC, batchCount,
                     computeType, algo};
    for (int i = 0; i < 23; i++) args[i] = a[i];
    return status; }
"""


@pytest.fixture(scope="module")
def stub_cublas(tmp_path_factory):
    """A shared library with cuBLAS's three entry points that records their arguments, built
    with the machine's C compiler (skipped without one)."""
    import shutil
    import subprocess
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) to build the stand-in libcublas")
    folder = tmp_path_factory.mktemp("stub_cublas")
    source, library = folder / "stub.c", folder / "libcublas.so.99"
    source.write_text(STUB_CUBLAS)
    subprocess.run([compiler, "-shared", "-fPIC", "-O0", "-o", str(library), str(source)],
                   check=True, capture_output=True)
    return str(library)


def test_direct_cublas_passes_every_argument_at_its_declared_width(stub_cublas):
    """DirectCublas's ctypes calls against a C library with cuBLAS's prototypes: every
    argument arrives as passed (pointers and strides past 2^32 included), the handle's stream
    is set to the current one first, and a failed status is one error naming the call."""
    import ctypes
    direct = cupy_gemm.DirectCublas(stub_cublas, current_stream=lambda: 0x7F00_0000_1234)
    stub = ctypes.CDLL(stub_cublas)
    stub.stub_arg.restype, stub.stub_arg.argtypes = ctypes.c_longlong, [ctypes.c_int]
    handle, big = 0x5555_0000_0010, 0x7E00_0000_0000  # addresses above 4 GiB
    gemm = (handle, 1, 0, 300, 200, 100, big + 8, big + 16, 14, 192, big + 24, 14, 100,
            big + 32, big + 40, 0, 300, 68, 99)
    direct.gemmEx(*gemm)
    assert [stub.stub_arg(i) for i in range(19)] == list(gemm)
    assert (stub.stub_arg(30), stub.stub_arg(31)) == (handle, 0x7F00_0000_1234)
    batched = (handle, 0, 1, 3136, 3136, 64, big + 8, big + 16, 2, 192, 3 * 2**31, big + 24, 2,
               192, 5 * 2**31, big + 32, big + 40, 2, 3136, 7 * 2**31, 64, 68, 99)
    direct.gemmStridedBatchedEx(*batched)
    assert [stub.stub_arg(i) for i in range(23)] == list(batched)
    stub.stub_fail_with(7)
    with pytest.raises(RuntimeError, match="cublasGemmEx failed with cuBLAS status 7"):
        direct.gemmEx(*gemm)
    stub.stub_fail_with(0)


def test_the_libcublas_cupy_loaded_is_the_one_called(tmp_path, monkeypatch):
    """DirectCublas opens the very libcublas CuPy's wrappers use: the file cuda-pathfinder
    loaded for CuPy 14 (its answer is cached); without pathfinder, the one libcublas mapped
    into the process (/proc/self/maps; not libcublasLt); two different ones are refused, not
    guessed between."""
    import types
    monkeypatch.setitem(sys.modules, "cupy_backends", types.ModuleType("cupy_backends"))
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda", types.ModuleType("cupy_backends.cuda"))
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = types.ModuleType("cublas")
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", libs)
    maps = tmp_path / "maps"
    line = "7f00-7f01 r-xp 00000000 08:01 1 {}\n"
    cupys = "/opt/venv/nvidia/cu13/lib/libcublas.so.13"
    maps.write_text(line.format("/usr/lib/x86_64-linux-gnu/libc.so.6")
                    + line.format("/opt/venv/nvidia/cu13/lib/libcublasLt.so.13")
                    + line.format(cupys) + line.format(cupys))  # (mapped in several pieces)
    cuda = types.ModuleType("cuda")  # no pathfinder: the maps
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", None)  # (the real one, if imported)
    assert cupy_gemm.loaded_library("libcublas", maps) == cupys
    with pytest.raises(RuntimeError, match="libcurand is not loaded"):
        cupy_gemm.loaded_library("libcurand", maps)
    torchs = "/opt/torch/lib/python3.12/site-packages/nvidia/cublas/lib/libcublas.so.13"
    with open(maps, "a") as f:
        f.write(line.format(torchs))
    with pytest.raises(RuntimeError, match="2 different libcublas are loaded"):
        cupy_gemm.loaded_library("libcublas", maps)
    asked = []  # CuPy 14: pathfinder names the file it loaded for CuPy
    cuda.pathfinder = types.SimpleNamespace(load_nvidia_dynamic_lib=lambda lib: asked.append(
        lib) or types.SimpleNamespace(abs_path=cupys))
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", cuda.pathfinder)
    assert cupy_gemm.loaded_library("libcublas", maps) == cupys and asked == ["cublas"]


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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_products_record_into_a_cuda_graph_and_replay(dtype):
    """On a GPU: gaps.matmul recorded into a CUDA graph (CuPy's own cuBLAS wrappers would
    refuse while the stream captures), then replayed on new operands written in place."""
    cupy = cupy_or_skip()
    from t2t_ref import capture, gaps
    rng = np.random.default_rng(5)
    a = cupy.asarray(rng.normal(size=(4, 3, 64, 32)).astype(dtype))
    b = cupy.asarray(rng.normal(size=(4, 3, 32, 48)).astype(dtype))
    w = cupy.asarray(rng.normal(size=(32, 16)).astype(dtype))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        gaps.matmul(a, b)  # warm-up: cuBLAS sets itself up outside the recording
        stream.begin_capture()
        try:
            with capture.recording():
                c, rows = gaps.matmul(a, b), gaps.matmul(a[0, 0], w)  # a stack, one matrix
        finally:
            graph = stream.end_capture()
        a[...] = cupy.asarray(rng.normal(size=a.shape).astype(dtype))
        graph.launch(stream)
        expected = (to_numpy(a).astype(np.float64) @ to_numpy(b).astype(np.float64),
                    to_numpy(a[0, 0]).astype(np.float64) @ to_numpy(w).astype(np.float64))
    stream.synchronize()
    tol = 1e-5 if dtype == "float32" else 2e-3
    for got, want in zip((c, rows), expected):
        np.testing.assert_allclose(to_numpy(got).astype(np.float64), want, rtol=tol,
                                   atol=tol * np.abs(want).max())
