"""On a GPU: attention's batched products through CuPy's matmul against one cuBLAS call each
(t2t_ref/cupy_gemm.py), in float32, float16 and bfloat16: do they agree, and how long each takes.

    python scripts/gpu_gemm.py            # T2T-ViT-14 at 224, batch 64: (64, 6, 197, 64) stacks

gaps.matmul sends half products through cupy_gemm (CuPy's own matmul of half stacks multiplies
float32 copies); float32 still goes through CuPy's matmul, which copies transposed operands
(k^T) first. The timings say what routing float32 through cupy_gemm too would save. Exit 1
when cupy_gemm's result differs from the float64 product of the same operands by more than
the output type's rounding allows.
"""

import sys

import numpy as np


def main():
    import cupy

    from t2t_ref import cupy_gemm

    B, h, N, d = 64, 6, 197, 64
    rng = np.random.default_rng(0)
    q_host, k_host = rng.normal(size=(B, h, N, d)), rng.normal(size=(B, h, N, d))
    dtypes = [np.dtype(np.float32), np.dtype(np.float16)]
    try:
        import ml_dtypes
        dtypes.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    failed = False
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()

    def ms(function, repeats=20):
        function()
        times = []
        for _ in range(repeats):
            start.record()
            function()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    for dtype in dtypes:
        try:
            q = cupy.asarray(q_host.astype(dtype))
            k = cupy.asarray(k_host.astype(dtype))
        except (TypeError, ValueError) as err:
            print(f"{dtype.name:9s} skipped: this CuPy has no {dtype.name} arrays ({err})")
            continue
        kt = cupy.swapaxes(k, -1, -2)  # (B, h, d, N), a view: scores = q k^T
        exact = q_host.astype(dtype).astype(np.float64) @ np.swapaxes(
            k_host.astype(dtype).astype(np.float64), -1, -2)
        got = cupy.asnumpy(cupy_gemm.matmul(q, kt, dtype)).astype(np.float64)
        rounding = {"float32": 1e-6, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype.name]
        error = float(np.max(np.abs(got - exact)) / np.max(np.abs(exact)))
        ok = error <= 4 * rounding
        failed |= not ok
        try:
            cupy_time = f"{ms(lambda: cupy.matmul(q, kt)):7.3f} ms"
        except Exception as err:  # a CuPy without this dtype's matmul
            cupy_time = f"failed ({type(err).__name__})"
        print(f"{dtype.name:9s} q k^T {tuple(q.shape)}: cupy.matmul {cupy_time}, "
              f"cupy_gemm {ms(lambda: cupy_gemm.matmul(q, kt, dtype)):7.3f} ms; "
              f"max error {error:.2e} of the largest entry "
              f"({'PASS' if ok else 'FAIL'}, allowed {4 * rounding:.1e})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
