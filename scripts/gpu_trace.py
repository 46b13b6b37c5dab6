"""Where a backend first parts ways with NumPy: every op's output, in call order.

    python scripts/gpu_trace.py --variant t2t_vit_t_14 --precision bf16   # CuPy against NumPy

gpu_parity.py says *that* a model's gradients differ; this says *where*. One eval-mode forward
and backward of the same model (same weights, batch and upstream gradient) runs on NumPy and
on the backend under test, both under the same precision policy, and every function of
t2t_ref.ops named *_forward or *_backward records what it returns (a forward's output; all
of a backward's gradients), in call order. The ops whose outputs differ by more than
--tolerance (max |a - b| / max(|a| + |b|)) are listed, the first ones first: the first is
where to look. Then the backend runs again with one suspect switched off at a time (the fused
kernels, the soft split's gathers, the cuBLAS half products) and prints d(input)'s distance
from NumPy's for each: the suspect whose absence mends it is the culprit. Against an error
that moves from run to run (the first device run's bf16 T2T-ViT-t-14: d(input) 0.61 and
0.69 from float32 in two runs, 0.82 from NumPy's bf16 in a third, on the same inputs): the
backend against itself, and on CuPy every run after the first starts with each new
allocation filled with NaN bytes (a read of memory nothing wrote then shows as the first op
with a non-finite output).

An op that calls itself is recorded once: under bf16/fp16 on NumPy, LayerNorm, GELU and
softmax run again on float32 copies (their island), where CuPy runs one fused kernel. Ops
that only one side calls are left out of the comparison.
"""

import argparse
import contextlib
import sys

import numpy as np

import t2t_ref
from gpu_parity import rel_error  # scripts/ is on the path when a script runs from it
from gpu_parity import run as run_with_grads
from t2t_ref.backend import get_namespace, to_device, to_numpy
from t2t_ref.instrument import is_op, wrapped


def run(model, x, dlogits):
    """gpu_parity.run's eval-mode forward and backward: -> (logits, d(input)) on the host."""
    return run_with_grads(model, x, dlogits)[:2]


def _arrays(value):
    """The arrays in a returned value (tuples, lists and dicts walked; dict keys sorted)."""
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    if isinstance(value, dict):
        return [a for k in sorted(value) for a in _arrays(value[k])]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [value]
    return []


@contextlib.contextmanager
def recording(log):
    """Every t2t_ref.ops function named *_forward / *_backward appends (name, [arrays as
    float64 NumPy]) to log while the block runs (each module's reference to it is wrapped)."""
    running = set()

    def wrap(function):
        name = f"{function.__module__.rsplit('.', 1)[-1]}.{function.__name__}"
        backward = function.__name__.endswith("_backward")

        def recorded(*args, **kwargs):
            if name in running:  # the op calling itself (a half-precision island runs the
                return function(*args, **kwargs)  # op on float32 copies): recorded once
            running.add(name)
            try:
                out = function(*args, **kwargs)
            finally:
                running.discard(name)
            kept = out if backward else (out[0] if isinstance(out, tuple) else out)
            log.append((name, [to_numpy(a).astype(np.float64) for a in _arrays(kept)]))
            return out
        return recorded

    with wrapped(is_op, wrap):
        yield log


def differing_ops(theirs, reference, tolerance, show, backend="the backend"):
    """Lines naming the first `show` ops whose outputs differ by more than tolerance, in call
    order, over the ops both recordings have; or one line saying every op agrees."""
    shared = {name for name, _ in theirs} & {name for name, _ in reference}
    theirs = [entry for entry in theirs if entry[0] in shared]
    reference = [entry for entry in reference if entry[0] in shared]
    lines = []
    for i, ((name, ours), (ref_name, refs)) in enumerate(zip(theirs, reference)):
        if name != ref_name:
            lines.append(f"  call {i}: {name} on {backend}, {ref_name} on numpy: the call "
                         "sequences part here; stopping")
            break
        errors = [float("inf") if a.shape != b.shape else rel_error(a, b) if a.size else 0.0
                  for a, b in zip(ours, refs)]
        if len(ours) != len(refs):
            errors.append(float("inf"))
        worst = max(errors, default=0.0)
        if not worst <= tolerance:
            lines.append(f"  call {i:4d} {name:42s} outputs {len(ours)}, worst {worst:.2e} "
                         f"(each: {' '.join(f'{e:.1e}' for e in errors[:6])})")
            if len(lines) >= show:
                break
    return lines or [f"  every op within {tolerance:g}"]


def exact_ops(xp, dtype, device=None):
    """The backend's own array operations whose result has one right answer (copies,
    gathers, selections, casts, one rounded add or product), on a half dtype, with the
    layouts the model gives them (transposed views, strided slices, a size-1 axis), against
    NumPy's on the same values, to the bit: -> [(op, differing elements, of how many)].
    CuPy's bfloat16 is new (CuPy 14, 'experimental'); this says at once whether one of its
    operations, rather than t2t_ref's code, is what goes wrong."""
    rng = np.random.default_rng(5)
    host = rng.standard_normal((4, 1, 24, 16)).astype(np.float32).astype(dtype)  # (B, h, N, d)
    other = rng.standard_normal((4, 1, 16, 24)).astype(np.float32).astype(dtype)
    index = rng.integers(0, 24 * 16, size=(300, 4))  # into one sample's (24 * 16) values
    keep = rng.random((4, 300, 4)) < 0.7

    def cases(lib, a, b, idx, mask):  # name -> how to compute it with library lib
        t = lib.swapaxes(b, -1, -2)  # (4, 1, 24, 16), a transposed view, as k^T's product
        s = a[:, :, ::2, :]  # a strided slice

        def taken():
            flat = lib.reshape(a, (4, -1))
            return lib.reshape(lib.take(flat, lib.reshape(idx, (-1,)), axis=1), (4, 300, 4))

        def scaled():
            out = a * 1  # a fresh copy, scaled in place as attention's dscores
            out *= 147 ** -0.5
            return out

        def four_slices():
            g = taken()
            return g[:, :, 0] + g[:, :, 1] + g[:, :, 2] + g[:, :, 3]
        return {
            "copy of a transposed view": lambda: lib.ascontiguousarray(t),
            "reshape of a permuted view": lambda: lib.reshape(lib.transpose(t, (0, 2, 1, 3)),
                                                              (4, 24, 16)),
            "astype float32 of a transposed view": lambda: t.astype(np.float32),
            "astype back from float32": lambda: t.astype(np.float32).astype(a.dtype),
            "add: view + view": lambda: t + t,
            "add: contiguous + transposed": lambda: a + t,
            "add: strided slices": lambda: s + t[:, :, ::2, :],
            "multiply in place by a float (rounded once?)": scaled,
            "multiply by a float, a new array (dtype kept?)": lambda: a * (147 ** -0.5),
            "take (gather), 2-D index": taken,
            "where with a 0-d zero": lambda: lib.where(mask, taken(), lib.zeros((), a.dtype)),
            "stack of contiguous and transposed": lambda: lib.stack([a, t, a], axis=0),
            "concat along the last axis": lambda: lib.concatenate([a, t], axis=-1),
            "sum of four strided slices": four_slices,
        }

    want = cases(np, host, other, index, keep)
    native = np if device is None else __import__("cupy")
    on_device = (host, other) if device is None else (to_device(host, xp, device),
                                                      to_device(other, xp, device))
    got = cases(native, *on_device, native.asarray(index), native.asarray(keep))
    results = []
    for name, make in want.items():
        expected = make()
        try:
            value = np.asarray(to_numpy(got[name]()))
        except Exception as err:  # an operation this library refuses for the dtype
            results.append((f"{name}: raised {type(err).__name__}", -1, expected.size))
            continue
        if value.dtype != expected.dtype:  # (CuPy 14's where: bfloat16 in, float32 out)
            results.append((f"{name}: gives {value.dtype}, not {expected.dtype}", -1,
                            expected.size))
            continue
        unsigned = np.uint16 if expected.itemsize == 2 else np.uint32
        same_shape = value.shape == expected.shape
        results.append((name, int(np.sum(value.view(unsigned) != expected.view(unsigned)))
                        if same_shape else -1, expected.size))
    return results


@contextlib.contextmanager
def suspect_off(name):
    """The backend's run with one suspect replaced by its plain twin."""
    from t2t_ref import cupy_gemm, cupy_kernels
    from t2t_ref.ops import soft_split
    if name == "fused kernels":
        with cupy_kernels.plain_ops():
            yield
    elif name == "soft-split gathers":
        saved = soft_split.GATHER_FORWARD, soft_split.GATHER_BACKWARD
        soft_split.GATHER_FORWARD, soft_split.GATHER_BACKWARD = (), ()
        try:
            yield
        finally:
            soft_split.GATHER_FORWARD, soft_split.GATHER_BACKWARD = saved
    elif name == "cuBLAS half products":
        saved = cupy_gemm.matmul

        def float32_copies(a, b, out_dtype):
            import cupy
            return cupy.matmul(a.astype(cupy.float32), b.astype(cupy.float32)).astype(out_dtype)
        cupy_gemm.matmul = float32_copies
        try:
            yield
        finally:
            cupy_gemm.matmul = saved
    else:
        yield


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="t2t_vit_t_14")
    parser.add_argument("--precision", default="bf16", choices=["float32", "bf16", "fp16"])
    parser.add_argument("--backend", default="cupy")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=5e-2)
    parser.add_argument("--show", type=int, default=12, help="differing ops to list")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.img_size, args.img_size)).astype(np.float32)
    dlogits = rng.standard_normal((args.batch, 10)).astype(np.float32)
    kw = dict(num_classes=10, img_size=args.img_size, seed=0, precision=args.precision)

    reference, theirs = [], []
    with recording(reference):
        ref_logits, ref_dx = run(t2t_ref.create_model(args.variant, backend="numpy", **kw),
                                 x, dlogits)
    with recording(theirs):
        logits, dx = run(t2t_ref.create_model(args.variant, backend=args.backend, **kw),
                         x, dlogits)
    print(f"{args.variant} {args.precision}, {args.backend} against numpy: logits "
          f"{rel_error(logits, ref_logits):.2e}, dx {rel_error(dx, ref_dx):.2e}; "
          f"{len(theirs)} op calls ({len(reference)} on numpy)")
    for line in differing_ops(theirs, reference, args.tolerance, args.show, args.backend):
        print(line)

    again = run(t2t_ref.create_model(args.variant, backend=args.backend, **kw), x, dlogits)
    print(f"  {args.backend} against itself (a second run): logits "
          f"{rel_error(again[0], logits):.2e}, dx {rel_error(again[1], dx):.2e}"
          "  (0 unless something reads memory nothing wrote, or races)")

    # The runs below each start from NaN-filled memory (on CuPy): a run after a run of the
    # same model would otherwise find the last run's values in the memory pool, and a read of
    # memory nothing wrote could look right by luck (it did in the first trace's runs)
    fresh = nan_filled_allocations if args.backend == "cupy" else contextlib.nullcontext
    for suspect in (None, "fused kernels", "soft-split gathers", "cuBLAS half products"):
        log = []
        with fresh(), suspect_off(suspect), recording(log):
            logits, dx = run(t2t_ref.create_model(args.variant, backend=args.backend, **kw),
                             x, dlogits)
        first = next(((i, name) for i, (name, arrays) in enumerate(log)
                      if not all(np.isfinite(a).all() for a in arrays)), None)
        what = "as it is" if suspect is None else f"without {suspect}"
        print(f"  {what:30s}: logits {rel_error(logits, ref_logits):.2e}, dx "
              f"{rel_error(dx, ref_dx):.2e}; first op with a non-finite output: "
              f"{'none' if first is None else f'call {first[0]} {first[1]}'}")
    if args.precision != "float32":
        dtype = np.dtype(np.float16) if args.precision == "fp16" else \
            np.dtype(__import__("ml_dtypes").bfloat16)
        xp, device = get_namespace(args.backend)
        try:
            with fresh():
                checks = exact_ops(xp, dtype, None if args.backend == "numpy" else device)
        except Exception as err:  # e.g. host bfloat16 arrays this CuPy cannot take
            print(f"  {args.backend}'s own {dtype.name} operations: not checked "
                  f"({type(err).__name__}: {err})")
            return 0
        wrong = [f"{name} ({count} of {size})" for name, count, size in checks if count]
        print(f"  {args.backend}'s own {dtype.name} operations against NumPy's, to the bit: "
              f"{len(checks) - len(wrong)} of {len(checks)} agree"
              + (f"; differing: {'; '.join(wrong)}" if wrong else ""))
    return 0


@contextlib.contextmanager
def nan_filled_allocations():
    """Every CuPy allocation in the block comes filled with 0xFF bytes: NaN in float16,
    bfloat16, float32 and float64 alike (and -1 in integers)."""
    import cupy
    pool = cupy.cuda.MemoryPool()

    def allocate(size):
        memory = pool.malloc(size)
        if size:
            memory.memset_async(0xFF, size)
        return memory
    cupy.cuda.set_allocator(allocate)
    try:
        yield
    finally:
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
        from t2t_ref import device_cache
        device_cache.clear_all()  # arrays cached while the poisoned pool was in use


if __name__ == "__main__":
    sys.exit(main())
