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


def cuda_ms(function, repeats=20):
    """Median GPU time of function() in ms, by CUDA events, after one untimed call."""
    import cupy
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    function()
    times = []
    for _ in range(repeats):
        start.record()
        function()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


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
    ms = cuda_ms

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
    failed |= linear_products(dtypes, ms)
    return 1 if failed else 0


def linear_products(dtypes, ms):
    """Linear's 2-D products at T2T-ViT-14's 224, batch 64 (12,608 token rows): x W^T with W
    (out, in) read transposed, as ops/linear.py multiplies them; TFLOP/s beside PyTorch's
    own product of the same operands (torch.matmul), the rate cuBLAS reaches here."""
    import cupy
    import torch

    from t2t_ref import cupy_gemm
    rng = np.random.default_rng(1)
    failed = False
    for M, K, N in ((12608, 384, 1152), (12608, 384, 384), (12608, 1152, 384)):
        x_host, w_host = rng.normal(size=(M, K)), rng.normal(size=(N, K)) / np.sqrt(K)
        flops = 2.0 * M * K * N
        for dtype in dtypes:
            try:
                x, w = cupy.asarray(x_host.astype(dtype)), cupy.asarray(w_host.astype(dtype))
            except (TypeError, ValueError):
                continue
            wt = w.T
            exact = x_host.astype(dtype).astype(np.float64) @ w_host.astype(dtype).astype(
                np.float64).T
            got = cupy.asnumpy(cupy_gemm.matmul(x, wt, dtype)).astype(np.float64)
            rounding = {"float32": 1e-6, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype.name]
            error = float(np.max(np.abs(got - exact)) / np.max(np.abs(exact)))
            ok = error <= 4 * rounding
            failed |= not ok
            ours = ms(lambda: cupy_gemm.matmul(x, wt, dtype))
            torch_dtype = {"float32": torch.float32, "float16": torch.float16,
                           "bfloat16": torch.bfloat16}[dtype.name]
            tx = torch.as_tensor(x_host, device="cuda").to(torch_dtype)
            tw = torch.as_tensor(w_host, device="cuda").to(torch_dtype)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(21):
                start.record()
                torch.matmul(tx, tw.T)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            theirs = float(np.median(times[1:]))
            try:
                plain = f"{ms(lambda: cupy.matmul(x, wt)):7.3f} ms"
            except Exception as err:
                plain = f"failed ({type(err).__name__})"
            print(f"{dtype.name:9s} x W^T ({M}, {K}) @ ({K}, {N}): cupy.matmul {plain}, "
                  f"cupy_gemm {ours:7.3f} ms ({flops / ours / 1e9:6.1f} TFLOP/s), torch "
                  f"{theirs:7.3f} ms ({flops / theirs / 1e9:6.1f} TFLOP/s); error {error:.1e} "
                  f"({'PASS' if ok else 'FAIL'})")
    return failed


if __name__ == "__main__":
    sys.exit(main())
