"""scripts/gpu_trace.py, the device script's tool for finding where a GPU model parts ways with
NumPy's: proven on the CPU by planting a fault in one op and asking it to name that op."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

import t2t_ref

_PATH = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "gpu_trace.py"


@pytest.fixture(scope="module")
def gpu_trace():
    sys.path.insert(0, str(_PATH.parent))  # as when it runs: it imports gpu_parity beside it
    spec = importlib.util.spec_from_file_location("gpu_trace", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recorded_run(gpu_trace, x, dlogits):
    log = []
    with gpu_trace.recording(log):
        model = t2t_ref.create_model("t2t_vit_t_14", num_classes=10, img_size=32, seed=0)
        logits, dx = gpu_trace.run(model, x, dlogits)
    return log, dx


def test_trace_names_the_op_whose_output_is_wrong(gpu_trace, monkeypatch):
    """softmax's backward made wrong in the attention layers (a third of its rows scaled, as
    a kernel that skipped some rows would leave them): the trace's first differing op is that
    one, not the ops downstream of it, and the forward's ops all agree."""
    from t2t_ref.ops import attention, softmax
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    dlogits = rng.standard_normal((2, 10)).astype(np.float32)
    reference, ref_dx = _recorded_run(gpu_trace, x, dlogits)

    original = softmax.softmax_backward

    def softmax_backward(dp, p):  # the fault: rows 0, 3, 6, ... of every map scaled
        dx = original(dp, p)
        dx[..., ::3, :] *= 3.0
        return dx
    softmax_backward.__module__, softmax_backward.__name__ = original.__module__, original.__name__
    monkeypatch.setattr(attention, "softmax_backward", softmax_backward)
    theirs, dx = _recorded_run(gpu_trace, x, dlogits)
    assert gpu_trace.rel_error(dx, ref_dx) > 1e-2, "the planted fault should change d(input)"

    lines = gpu_trace.differing_ops(theirs, reference, tolerance=1e-6, show=3)
    assert "softmax.softmax_backward" in lines[0], "\n".join(lines)
    assert len(lines) == 3 and all("call" in line for line in lines), "\n".join(lines)
    # the same run against itself: every op agrees
    assert gpu_trace.differing_ops(reference, reference, 1e-6, 3) == ["  every op within 1e-06"]


def test_half_precision_records_the_same_calls_as_float32(gpu_trace):
    """Under bf16 NumPy's LayerNorm, GELU and softmax call themselves on float32 copies (their
    island), where CuPy runs one kernel: each op is recorded once, so the bf16 trace lists the
    calls float32's does, in the same order (the first device trace parted at call 2)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    dlogits = rng.standard_normal((1, 10)).astype(np.float32)
    names = {}
    for precision in ("float32", "bf16"):
        log = []
        with gpu_trace.recording(log):
            model = t2t_ref.create_model("t2t_vit_t_14", num_classes=10, img_size=32, seed=0,
                                         precision=precision)
            gpu_trace.run(model, x, dlogits)
        names[precision] = [name for name, _ in log]
    assert names["bf16"] == names["float32"]
    assert names["bf16"].count("layernorm.layernorm_forward") == 2 * 14 + 2 * 2 + 1


def test_trace_compares_only_the_ops_both_sides_call(gpu_trace):
    """An op only one side records is left out, and the rest still line up."""
    a = [np.ones(3)]
    reference = [("layernorm.layernorm_forward", a), ("linear.linear_forward", a),
                 ("layernorm.layernorm_backward", a), ("linear.linear_backward", [np.ones(3)])]
    theirs = [("linear.linear_forward", a), ("linear.linear_backward", [np.full(3, 2.0)])]
    lines = gpu_trace.differing_ops(theirs, reference, tolerance=1e-3, show=5)
    assert len(lines) == 1 and "call    1 linear.linear_backward" in lines[0], lines


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_exact_ops_check_runs_every_case_and_agrees_with_itself(gpu_trace, dtype):
    """The backend's own half-precision operations (copies, gathers, casts, adds of views)
    against NumPy's: on NumPy itself every one of them agrees to the bit, and a refusal is
    reported as such rather than ending the check."""
    import ml_dtypes

    from t2t_ref.backend import get_namespace
    xp, _ = get_namespace("numpy")
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    results = gpu_trace.exact_ops(xp, dt)
    assert len(results) == 14 and all(count == 0 for _, count, _ in results), results
    assert all(size > 0 for _, _, size in results)


@pytest.fixture(scope="module")
def gpu_matmuls():
    sys.path.insert(0, str(_PATH.parent))  # as when it runs: it imports gpu_gemm beside it
    path = _PATH.parent / "gpu_matmuls.py"
    spec = importlib.util.spec_from_file_location("gpu_matmuls", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_matmul_census_keeps_every_product_of_a_step(gpu_matmuls):
    """scripts/gpu_matmuls.py (the device script's `matmuls` stage) on NumPy: one bf16
    training step's products, all of them (Linear's forward and both backward products per
    layer, attention's two and four, the bias gradients' column sums), grouped with their
    layouts; gaps.matmul is itself again afterwards."""
    from t2t_ref import gaps
    from t2t_ref.ops import linear
    calls = gpu_matmuls.step_calls("t2t_vit_7", 32, 2, "bf16", "numpy")
    assert linear.matmul is gaps.matmul and gaps.matmul.__name__ == "matmul"
    callers = {c[3] for c in calls}
    assert {"linear_forward", "linear_backward", "scaled_dot_product_attention_forward",
            "scaled_dot_product_attention_backward", "column_sum"} <= callers, callers
    count = lambda name: sum(c[3] == name for c in calls)  # noqa: E731
    assert count("linear_backward") == 2 * count("linear_forward")  # dx and dW per layer
    assert count("scaled_dot_product_attention_backward") == \
        2 * count("scaled_dot_product_attention_forward")
    grouped = gpu_matmuls.groups(calls)
    assert sum(len(v) for v in grouped.values()) == len(calls)
    # the weight gradient's x^T is a transposed view, read as such; its result float32
    assert any(sig[1].startswith("T") and sig[4] == "bf16>f32" for sig in grouped)
    rows = gpu_matmuls.table(dict(list(grouped.items())[:3]), gpu_matmuls.host_ms)
    assert all(ours > 0 and theirs > 0 for _, _, _, ours, theirs in rows)
