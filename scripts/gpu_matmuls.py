"""Every matrix product of one training step, timed one by one: where t2t_ref's products lose
time, and to what.

    python scripts/gpu_matmuls.py                 # T2T-ViT-14, 224, batch 64, bf16, on CuPy
    python scripts/gpu_matmuls.py --precision float32 --model t2t_vit_7

Runs one training step (forward and backward) and keeps every gaps.matmul call with its
operands: the arrays themselves, laid out as the step made them (transposed views and all).
The calls are grouped by shapes, layouts and dtypes, and each group's product is timed with
CUDA events (median of 5): t2t_ref's (gaps.matmul: for half operands one cuBLAS call,
cupy_gemm.py) and PyTorch's torch.matmul on the very same memory (shared through DLPack, same
strides; its result in the operands' type, as autocast's), which is what torch.autocast's
products run. The table lists the groups by
t2t_ref's total time per step; the last line sums them. The half-precision step was slower
than the float32 one on an H200 (BENCHMARKS.md), and its products were the largest part of
the difference: this says which products, and whether cuBLAS itself or the way t2t_ref
calls it is slower.

tests/test_gpu_trace.py runs the recording and the grouping on NumPy.
"""

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

import gpu_gemm  # beside this script: its CUDA-event timer
import t2t_ref
from t2t_ref import gaps
from t2t_ref.backend import get_namespace, to_device


@contextlib.contextmanager
def recording(calls):
    """Within the block every call of gaps.matmul (through any module that imported it)
    appends (a, b, out_dtype, the calling function's name) to calls."""
    original = gaps.matmul

    def recorded(a, b, out_dtype=None):
        caller = sys._getframe(1).f_code.co_name
        calls.append((a, b, out_dtype, caller))
        return original(a, b, out_dtype)

    patched = [(module, name) for module in list(sys.modules.values())
               if module is not None and getattr(module, "__name__", "").startswith("t2t_ref")
               for name, value in list(vars(module).items()) if value is original]
    for module, name in patched:
        setattr(module, name, recorded)
    try:
        yield calls
    finally:
        for module, name in patched:
            setattr(module, name, original)


def layout(x):
    """'N' (rows contiguous), 'T' (a transposed view: columns contiguous) or 'other', with the
    leading dimension in elements."""
    strides = [s // x.itemsize for s in x.strides]
    rows, cols = x.shape[-2:]
    if strides[-1] == 1 and strides[-2] >= cols:
        return f"N{strides[-2]}"
    if strides[-2] == 1 and strides[-1] >= rows:
        return f"T{strides[-1]}"
    return "other"


SHORT = {"float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def dtype_name(dtype):
    """'f32', 'bf16', ... for a dtype of any backend (or a NumPy scalar type)."""
    try:
        name = np.dtype(dtype).name
    except TypeError:  # array_api_strict's DType
        name = str(dtype).rsplit(".", 1)[-1]
    return SHORT.get(name, name)


def signature(a, b, out_dtype):
    """(a's shape, a's layout, b's shape, b's layout, 'operands>result' dtypes)."""
    out = dtype_name(out_dtype if out_dtype is not None else a.dtype)
    return (tuple(a.shape), layout(a), tuple(b.shape), layout(b),
            f"{dtype_name(a.dtype)}>{out}")


def groups(calls):
    """{signature: [calls]} in the order first seen."""
    grouped = defaultdict(list)
    for call in calls:
        grouped[signature(*call[:3])].append(call)
    return dict(grouped)


def step_calls(model_name, img_size, batch, precision, backend):
    """The gaps.matmul calls of one training step (forward and backward), after a warm-up."""
    xp, device = get_namespace(backend)
    model = t2t_ref.create_model(model_name, num_classes=1000, img_size=img_size,
                                 backend=backend, seed=0, precision=precision).train()
    rng = np.random.default_rng(0)
    x = to_device(rng.standard_normal((batch, 3, img_size, img_size), dtype=np.float32), xp,
                  device)
    dlogits = to_device(rng.standard_normal((batch, 1000), dtype=np.float32) / batch, xp,
                        device)
    model.forward(x)  # a warm-up step: kernels compiled, caches filled
    model.backward(dlogits)
    calls = []
    with recording(calls):
        model.forward(x)
        model.backward(dlogits)
    return calls


def cuda_ms(function):
    return gpu_gemm.cuda_ms(function, repeats=5)


def host_ms(function, repeats=5):
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def torch_product(a, b, out_dtype):
    """torch.matmul on a's and b's memory (DLPack on CuPy; a copy on NumPy, whose bfloat16
    torch does not read), as a function of no arguments, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    if type(a).__module__.startswith("cupy"):
        ta, tb = torch.from_dlpack(a), torch.from_dlpack(b)
    else:
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(a.dtype),
                                                                         torch.float32)
        ta = torch.from_numpy(np.asarray(a, np.float32)).to(dtype)
        tb = torch.from_numpy(np.asarray(b, np.float32)).to(dtype)
    return lambda: torch.matmul(ta, tb)


def table(grouped, time_ms):
    """Rows (signature, count, t2t_ref ms each, torch ms each or None), slowest total first."""
    rows = []
    for sig, calls in grouped.items():
        a, b, out_dtype, _ = calls[0]
        ours = time_ms(lambda: gaps.matmul(a, b, out_dtype))
        try:
            theirs_fn = torch_product(a, b, out_dtype)
            theirs = time_ms(theirs_fn) if theirs_fn is not None else None
        except Exception as err:  # noqa: BLE001 - a layout DLPack or torch refuses: no figure
            print(f"torch could not take {sig}: {type(err).__name__}: {err}")
            theirs = None
        rows.append((sig, len(calls), calls[0][3], ours, theirs))
    return sorted(rows, key=lambda r: -r[1] * r[3])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="t2t_vit_14")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["float32", "bf16", "fp16"])
    parser.add_argument("--backend", default="cupy")
    args = parser.parse_args()
    calls = step_calls(args.model, args.img_size, args.batch, args.precision, args.backend)
    grouped = groups(calls)
    time_ms = cuda_ms if args.backend == "cupy" else host_ms
    rows = table(grouped, time_ms)
    print(f"{args.model} {args.img_size}x{args.img_size} batch {args.batch} {args.precision} "
          f"on {args.backend}: {len(calls)} products in {len(grouped)} kinds")
    print(f"{'calls':>5} {'from':28s} {'a (layout)':28s} {'b (layout)':28s} {'dtypes':>9} "
          f"{'t2t_ref ms':>10} {'torch ms':>9} {'ratio':>6}")
    total_ours = total_theirs = 0.0
    for (a_shape, a_layout, b_shape, b_layout, dtypes), count, caller, ours, theirs in rows:
        total_ours += count * ours
        total_theirs += count * (theirs or 0.0)
        ratio = f"{ours / theirs:6.2f}" if theirs else "     -"
        print(f"{count:5d} {caller[:28]:28s} {str(a_shape) + ' ' + a_layout:28s} "
              f"{str(b_shape) + ' ' + b_layout:28s} {dtypes:>9} "
              f"{ours:10.3f} {theirs if theirs is not None else float('nan'):9.3f} {ratio}")
    print(f"per step: t2t_ref {total_ours:.1f} ms in products, PyTorch {total_theirs:.1f} ms "
          f"on the same operands")
    return 0


if __name__ == "__main__":
    sys.exit(main())
