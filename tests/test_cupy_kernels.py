"""The CuPy kernels (cupy_kernels.py) against their plain array-API twins, and their source.

On a machine without a GPU only the first tests run: NVRTC (from CUDA's PyPI wheel) compiles
the CUDA source for every kernel and dtype, and ptxas (from the nvcc wheel) assembles it for
sm_75, sm_80 and sm_90, and every wrapper's launch is checked against its kernel's
parameters in that PTX (count, order, widths), so CI catches a typo or a float passed as a
double without a device. The rest need CuPy and a GPU, and are
skipped with the reason otherwise: each kernel's output against the plain op's on the same
CuPy input (cupy_kernels.plain_ops() turns the kernels off), in float32, float64, float16 and
bfloat16 (the plain op's float32 island), on shapes with rows longer and shorter than a warp
and inputs that are not contiguous.
"""

import sys

import numpy as np
import pytest

from t2t_ref import cupy_kernels
from t2t_ref.backend import get_namespace, to_numpy
from t2t_ref.gaps import KeyedRandom, seed_array
from t2t_ref.ops.gelu import gelu_backward, gelu_forward
from t2t_ref.ops.layernorm import layernorm_backward, layernorm_forward
from t2t_ref.ops.softmax import softmax_backward, softmax_forward
from t2t_ref.optim import AdamW

from conftest import assert_close, cupy_or_skip, on
from nvrtc import assemble, compile_to_ptx, find_nvrtc, find_ptxas

TOL = {"float32": 2e-6, "float64": 1e-13,
       # half: both sides compute in float32 and round once; they may differ by one unit in
       # the last place (2^-11 and 2^-8 relative) where their float32 values straddle a step
       "float16": 2e-3, "bfloat16": 1.6e-2}
HALF = ["float16", "bfloat16"]


def test_cuda_source_compiles_without_a_gpu():
    if find_nvrtc() is None:
        pytest.skip("libnvrtc not found: pip install nvidia-cuda-nvrtc-cu12 (the test extra)")
    ok, log, lowered = compile_to_ptx(cupy_kernels.SOURCE, cupy_kernels.NAME_EXPRESSIONS,
                                      cupy_kernels.NVRTC_OPTIONS)
    assert ok, f"NVRTC could not compile cupy_kernels.SOURCE:\n{log}"
    assert sorted(lowered) == sorted(cupy_kernels.NAME_EXPRESSIONS)
    assert all(f"<{cupy_kernels.STORAGE_TYPES[dtype]}>" in " ".join(lowered)
               for dtype in ("float16", "bfloat16")), "the half-precision kernels are missing"


@pytest.mark.parametrize("arch", ["75", "80", "90"])
def test_cuda_source_assembles_for_the_gpus_without_one(arch):
    """NVRTC passes the half conversions' inline PTX (cvt.f32.f16, cvt.rn.bf16.f32) through
    unread: ptxas (CUDA's nvcc wheel) assembles the PTX as the driver would on a T4 (sm_75:
    no bf16 instruction, so the whole module must load without it), an A100 (sm_80) and an
    H100/H200 (sm_90)."""
    if find_nvrtc() is None or find_ptxas() is None:
        pytest.skip("NVRTC or ptxas not found: pip install nvidia-cuda-nvrtc-cu12 "
                    "nvidia-cuda-nvcc-cu12 (the test extra)")
    ok, log, _ = compile_to_ptx(cupy_kernels.SOURCE, cupy_kernels.NAME_EXPRESSIONS,
                                cupy_kernels.NVRTC_OPTIONS, arch=f"compute_{arch}")
    assert ok, log
    arch = f"sm_{arch}"
    ok, log = assemble(compile_to_ptx.last_ptx, arch)
    assert ok, f"ptxas could not assemble the kernels for {arch}:\n{log}"


# ---- every launch's arguments against its kernel's parameters, from the PTX (no GPU) ----------

PTX_KINDS = {np.float32: ".f32", np.float64: ".f64", np.int32: ".u32", np.uint32: ".u32",
             np.int64: ".u64", np.uint64: ".u64"}  # a scalar argument's PTX parameter type


def _entry_parameters(ptx):
    """{mangled kernel name: [PTX parameter types]} of every .entry in the PTX."""
    import re
    entries = {}
    for match in re.finditer(r"\.entry\s+(\S+)\(([^)]*)\)", ptx):
        entries[match.group(1)] = re.findall(r"\.param\s+(\.\w+)", match.group(2))
    return entries


class _RecordingCupy:
    """A stand-in for the parts of CuPy that cupy_kernels' wrappers call: NumPy arrays, and
    kernels that record their launches instead of running."""

    def __init__(self):
        import types
        self.launches = []
        self.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0))
        self.empty, self.empty_like = np.zeros, np.zeros_like  # (no kernel fills them)
        self.ascontiguousarray = np.ascontiguousarray
        recorder = self

        class RawModule:
            def __init__(self, code, options, name_expressions):
                pass

            def get_function(self, name):
                return lambda grid, block, args: recorder.launches.append((name, args))
        self.RawModule = RawModule


def test_every_launch_matches_its_kernels_parameters(monkeypatch):
    """Each wrapper's arguments, in number, order and width, as the compiled kernel declares
    them (its PTX entry's parameters): a double where a float is expected, or one argument
    too few, is garbage on a GPU and nothing on a CPU, so this is where it is caught. Every
    kernel, every dtype it is compiled for."""
    if find_nvrtc() is None:
        pytest.skip("libnvrtc not found: pip install nvidia-cuda-nvrtc-cu12 (the test extra)")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ok, log, lowered = compile_to_ptx(cupy_kernels.SOURCE, cupy_kernels.NAME_EXPRESSIONS,
                                      cupy_kernels.NVRTC_OPTIONS)
    assert ok, log
    parameters = {name: _entry_parameters(compile_to_ptx.last_ptx)[mangled]
                  for name, mangled in lowered.items()}
    fake = _RecordingCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    cupy_kernels._module.cache_clear()
    cupy_kernels._functions.clear()
    try:
        rng = np.random.default_rng(0)
        for name in cupy_kernels.STORAGE_TYPES:
            dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
            x = rng.normal(size=(3, 5, 40)).astype(dtype)
            w, b = np.ones(40, dtype), np.zeros(40, dtype)
            _, cache = cupy_kernels.gelu_forward(x)
            cupy_kernels.gelu_backward(x, cache)
            _, cache = cupy_kernels.layernorm_forward(x, w, b, 1e-5)
            cupy_kernels.layernorm_backward(x, cache)
            p, _ = cupy_kernels.softmax_forward(x)
            cupy_kernels.softmax_backward(x, p)
            cupy_kernels.keyed_keep_mask(7, 0, (3, 5, 40), 2**20, 1 / 0.9, dtype)
            cupy_kernels.keyed_keep_mask(np.asarray(7, np.uint32), 0, (3, 5, 40), 2**20,
                                         1 / 0.9, dtype)  # the key on the device
            if name in cupy_kernels.C_TYPES:  # AdamW: the float32/64 master buffers only
                flat = rng.normal(size=100).astype(dtype)
                for skip in (None, (np.zeros((), bool), np.zeros((), np.float64))):
                    found_inf, skipped = skip or (None, None)
                    cupy_kernels.adamw_update(
                        flat, flat, flat.copy(), flat.copy(), np.ones(100, np.uint8),
                        beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-3, weight_decay=0.05,
                        step_count=1, found_inf=found_inf, skipped=skipped)
    finally:
        cupy_kernels._module.cache_clear()
        cupy_kernels._functions.clear()
    launched = {name for name, _ in fake.launches}
    assert launched == set(cupy_kernels.NAME_EXPRESSIONS), \
        f"not launched by the wrappers: {sorted(set(cupy_kernels.NAME_EXPRESSIONS) - launched)}"
    for name, args in fake.launches:
        expected = parameters[name]
        got = [".u64" if isinstance(a, np.ndarray) else PTX_KINDS[type(a)] for a in args]
        assert got == expected, f"{name}: launched with {got}, the kernel takes {expected}"


def test_a_kernel_refuses_operands_of_another_dtype(monkeypatch):
    """A kernel reads every buffer as the one dtype it was compiled for: a float32 gradient
    beside a bfloat16 cache (the first GPU run's bf16 fault) or a float64 gradient beside a
    float32 master buffer is refused with the names and dtypes, before anything is launched;
    matching operands launch."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    fake = _RecordingCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    cupy_kernels._module.cache_clear()
    cupy_kernels._functions.clear()
    try:
        x = np.ones((2, 3, 8), bf16)
        wrong = x.astype(np.float32)
        _, gelu_cache = cupy_kernels.gelu_forward(x)
        p, _ = cupy_kernels.softmax_forward(x)
        _, norm_cache = cupy_kernels.layernorm_forward(x, np.ones(8, np.float32),
                                                        np.zeros(8, np.float32), 1e-5)
        flat = np.zeros(10, np.float32)
        calls = {
            "gelu_backward": lambda dy: cupy_kernels.gelu_backward(dy, gelu_cache),
            "softmax_backward": lambda dy: cupy_kernels.softmax_backward(dy, p),
            "layernorm_backward": lambda dy: cupy_kernels.layernorm_backward(
                dy.astype(np.float64) if dy.dtype == np.float32 else dy, norm_cache),
            "adamw_update": lambda dy: cupy_kernels.adamw_update(
                flat, flat.astype(np.float64) if dy.dtype == np.float32 else flat,
                flat.copy(), flat.copy(), np.ones(10, np.uint8), beta1=0.9, beta2=0.999,
                eps=1e-8, lr=1e-3, weight_decay=0.0, step_count=1)}
        for name, call in calls.items():
            before = len(fake.launches)
            with pytest.raises(TypeError, match=rf"cupy_kernels\.{name}<.*>: .* is .*t2t_ref bug"):
                call(wrong)
            assert len(fake.launches) == before, f"{name} launched with a wrong dtype"
            call(x)  # the right dtypes: launched
            assert len(fake.launches) == before + 1, name
    finally:
        cupy_kernels._module.cache_clear()
        cupy_kernels._functions.clear()


def test_the_bf16_rounding_by_hand_equals_round_to_nearest_even():
    """Before sm_80 the kernels round float32 to bfloat16 with integer arithmetic (store<bf16_t>
    in cupy_kernels.SOURCE, restated here on uint32 arrays): it must be ml_dtypes' rounding,
    ties to even, overflow to inf, NaN kept NaN."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    source = cupy_kernels.SOURCE
    assert "(u & 0x7fffffffu) > 0x7f800000u) h.bits = (unsigned short)((u >> 16) | 0x40u)" \
        in source and "(u + 0x7fffu + ((u >> 16) & 1u)) >> 16" in source, \
        "the CUDA rounding changed: change its restatement here too"
    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan,
                         3.4028235e38, 1e-45, 1.00390625, 1.01171875, 1.0 + 2**-8 * 1.5,
                         65504.0, 3.3961776e38], dtype=np.float32)  # incl. ties and overflow
    x = np.concatenate([specials, rng.normal(size=100_000).astype(np.float32) * 1e3,
                        rng.integers(0, 2**32, 100_000, dtype=np.uint32).view(np.float32)])
    u = x.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = np.where(nan, (u >> 16) | 0x40, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    by_hand = (bits & 0xFFFF).astype(np.uint16).view(ml_dtypes.bfloat16)
    with np.errstate(invalid="ignore"):  # NaN in, NaN out: nothing to warn about
        expected = x.astype(ml_dtypes.bfloat16)
    assert np.array_equal(np.isnan(by_hand.astype(np.float32)), np.isnan(x))
    same = np.isnan(x) | (by_hand.view(np.uint16) == expected.view(np.uint16))
    assert same.all(), f"differs at {x[~same][:5]}: {by_hand[~same][:5]} vs {expected[~same][:5]}"


# ---- the kernels on a GPU -------------------------------------------------------------------

def _random(shape, seed, dtype, scale=1.0):
    values = np.random.default_rng(seed).normal(size=shape) * scale
    if dtype != "bfloat16":
        return on("cupy", values, dtype)
    import cupy
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    try:
        return cupy.asarray(values.astype(bfloat16))
    except (TypeError, ValueError) as err:
        pytest.skip(f"this CuPy takes no bfloat16 arrays: {err}")


def _both(function, *args):
    """(kernel's result, plain op's result) of function(*args), as host arrays (nested)."""
    fused = function(*args)
    with cupy_kernels.plain_ops():
        plain = function(*args)
    return fused, plain


def _compare(fused, plain, tol, name):
    if isinstance(plain, (tuple, list)):
        for i, (f, p) in enumerate(zip(fused, plain)):
            _compare(f, p, tol, f"{name}[{i}]")
    elif plain is not None and not isinstance(plain, (int, float)):
        assert_close(to_numpy(fused), to_numpy(plain), tol, name)


SHAPES = [(3, 5, 64), (2, 7, 147), (4, 384), (2, 3, 1000), (1, 33)]


@pytest.mark.parametrize("dtype", ["float32", "float64"] + HALF)
@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_kernels(dtype, shape):
    cupy_or_skip()
    x = _random(shape, 0, dtype, scale=3.0)
    dy = _random(shape, 1, dtype)
    fused, plain = _both(gelu_forward, x)
    _compare(fused[0], plain[0], TOL[dtype], "gelu_forward")
    _compare(fused[1][0], plain[1][0], TOL[dtype], "gelu_forward's cache: x")
    with cupy_kernels.plain_ops():  # each backward from its own forward's cache: the kernel
        plain_dx = gelu_backward(dy, plain[1])  # keeps x alone, the plain op (x, Phi(x))
    _compare(gelu_backward(dy, fused[1]), plain_dx, TOL[dtype], "gelu_backward")


@pytest.mark.parametrize("dtype", ["float32", "float64"] + HALF)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_kernels(dtype, shape):
    cupy = cupy_or_skip()
    D = shape[-1]
    x = _random(shape, 0, dtype, scale=2.0) + 0.5
    w, b = _random((D,), 2, dtype), _random((D,), 3, dtype)
    dy = _random(shape, 4, dtype)
    fused, plain = _both(layernorm_forward, x, w, b)
    _compare(fused, plain, TOL[dtype], "layernorm_forward")
    fused_back = layernorm_backward(dy, fused[1])
    with cupy_kernels.plain_ops():
        plain_back = layernorm_backward(dy, plain[1])
    _compare(fused_back, plain_back, 10 * TOL[dtype], "layernorm_backward")
    # a non-contiguous input (a transposed view) gives the same as its contiguous copy
    xt = cupy.swapaxes(x, -1, -2) if x.ndim == 3 else x
    if xt is not x:
        xt = cupy.swapaxes(cupy.ascontiguousarray(xt), -1, -2)  # same values, other strides
        _compare(layernorm_forward(xt, w, b)[0], fused[0], 0.0, "non-contiguous input")


@pytest.mark.parametrize("dtype", ["float32", "float64"] + HALF)
@pytest.mark.parametrize("shape", SHAPES + [(2, 3136)])
def test_softmax_kernels(dtype, shape):
    cupy_or_skip()
    x = _random(shape, 0, dtype, scale=4.0)
    dp = _random(shape, 1, dtype)
    fused, plain = _both(softmax_forward, x)
    _compare(fused, plain, TOL[dtype], "softmax_forward")
    _compare(*_both(softmax_backward, dp, plain[0]), TOL[dtype], "softmax_backward")
    big = x * 1e3  # rows whose maximum comes late: the online rescaling must hold
    _compare(*_both(softmax_forward, big), TOL[dtype], "softmax_forward, large values")


@pytest.mark.parametrize("dtype", ["float32", "float64"] + HALF)
@pytest.mark.parametrize("shape", [(5, 1001), (3, 7, 64), (4, 1, 1)])
def test_keep_mask_kernel_gives_the_plain_masks(dtype, shape):
    cupy = cupy_or_skip()
    xp, device = get_namespace("cupy")
    dtype = _random((1,), 0, dtype).dtype  # (a skip where this CuPy has no bfloat16)
    for seed, first in ((0, 0), (12345, 17), (2**40 + 3, 2**20)):
        fused = KeyedRandom(seed, first).keep_mask(xp, shape, 0.3, dtype, device)
        with cupy_kernels.plain_ops():
            plain = KeyedRandom(seed, first).keep_mask(xp, shape, 0.3, dtype, device)
        assert isinstance(fused, cupy.ndarray) and fused.shape == shape
        assert fused.dtype == plain.dtype == dtype
        np.testing.assert_array_equal(to_numpy(fused), to_numpy(plain))
        # the seed on the device (a CUDA graph's step): the kernel reads the key there
        on_device = KeyedRandom(seed_array(xp, seed, device), first).keep_mask(
            xp, shape, 0.3, dtype, device)
        np.testing.assert_array_equal(to_numpy(on_device), to_numpy(plain))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adamw_kernel_matches_the_plain_flat_update(dtype):
    cupy_or_skip()
    import t2t_ref
    results = []
    for fused in (True, False):
        model = t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=32, backend="cupy",
                                     dtype=dtype)
        opt = AdamW(model.params, weight_decay=0.05)
        grads = model.params.zeros_like()
        for step in range(3):
            grads.flat[...] = _random(grads.flat.shape, 10 + step, dtype)
            if fused:
                opt.step(model.params, grads, 1e-2)
            else:
                with cupy_kernels.plain_ops():
                    opt.step(model.params, grads, 1e-2)
        results.append((to_numpy(model.params.flat), to_numpy(opt.exp_avg.flat),
                        to_numpy(opt.exp_avg_sq.flat)))
    for name, a, b in zip(("params", "exp_avg", "exp_avg_sq"), *results):
        assert_close(a, b, 10 * TOL[dtype], name)


def test_adamw_kernel_skips_a_flagged_step_on_the_device():
    """found_inf True: parameters and moments unchanged, and the next step's bias correction
    counts only the steps taken, as the plain path does."""
    cupy_or_skip()
    import t2t_ref
    results = []
    for fused in (True, False):
        model = t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=32, backend="cupy")
        opt = AdamW(model.params, weight_decay=0.05)
        grads = model.params.zeros_like()
        xp = model.xp
        for step, flagged in enumerate([False, True, False]):
            grads.flat[...] = _random(grads.flat.shape, 20 + step, "float32")
            before = to_numpy(model.params.flat).copy()
            flag = xp.asarray(flagged)
            if fused:
                opt.step(model.params, grads, 1e-2, found_inf=flag)
            else:
                with cupy_kernels.plain_ops():
                    opt.step(model.params, grads, 1e-2, found_inf=flag)
            if flagged:
                np.testing.assert_array_equal(to_numpy(model.params.flat), before)
        assert opt.updates() == 2
        results.append(to_numpy(model.params.flat))
    assert_close(results[0], results[1], 10 * TOL["float32"], "params after a skipped step")


def test_kernels_are_used_oncupy_or_skip():
    """applies() is what routes the ops: on for CuPy float arrays, off inside plain_ops()."""
    cupy_or_skip()
    x = _random((2, 3), 0, "float32")
    assert cupy_kernels.applies(x)
    with cupy_kernels.plain_ops():
        assert not cupy_kernels.applies(x)
    assert not cupy_kernels.applies(np.zeros(3, np.float32))
