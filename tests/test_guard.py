"""Non-finite steps, caught on the device (guard.py): AdamW and the EMA skip a flagged step
without a host transfer, and StepMonitor counts what the training loop reads back."""

import math

import numpy as np
import pytest

from conftest import on
from reliability import tried
from t2t_ref.backend import get_namespace, to_numpy
from t2t_ref.ema import WeightEMA
from t2t_ref.guard import StepMonitor, grad_norm
from t2t_ref.optim import AdamW

RNG = np.random.default_rng(0)
PARAMS = {"w": RNG.standard_normal((300, 400)).astype(np.float32),  # in pieces on NumPy
          "b": RNG.standard_normal(7).astype(np.float32)}
GRADS = [{k: RNG.standard_normal(v.shape).astype(np.float32) for k, v in PARAMS.items()}
         for _ in range(5)]
LRS = [1e-3, 2e-3, 3e-3, 4e-3, 5e-3]


def run_adamw(backend, skip_at=None, drop=None):
    """Five AdamW steps (decay on w, none on b). skip_at: that step's gradient is NaN and the
    step is flagged; drop: that step is left out altogether. Every step passes found_inf
    when skip_at is given."""
    xp, device = get_namespace(backend)
    params = {k: on(backend, v.copy()) for k, v in PARAMS.items()}
    opt = AdamW(params, weight_decay=0.05)
    for i, (grads, lr) in enumerate(zip(GRADS, LRS)):
        if i == drop:
            continue
        grads = {k: v.copy() for k, v in grads.items()}
        if i == skip_at:
            grads["w"][3, 4] = np.nan
        found_inf = None if skip_at is None else xp.asarray(i == skip_at, device=device)
        opt.step(params, {k: on(backend, v) for k, v in grads.items()}, lr, found_inf=found_inf)
    return {k: to_numpy(v) for k, v in params.items()}, opt


@tried("faults", "a NaN gradient in one step, seen by AdamW (the first step, or a later one)",
       "the step skipped on the device: weights, moments and the count of updates bit-identical "
       "to a run without that step")
@pytest.mark.parametrize("skip_at", [0, 2])
def test_a_flagged_step_is_skipped_exactly(backend, skip_at):
    """The run with a skipped NaN step equals, bit for bit, the run without that step: the
    weights, both moments and the count of updates (so the bias corrections) are untouched."""
    skipped, opt_skipped = run_adamw(backend, skip_at=skip_at)
    dropped, opt_dropped = run_adamw(backend, drop=skip_at)
    for key in PARAMS:
        assert np.isfinite(skipped[key]).all(), key
        assert np.array_equal(skipped[key], dropped[key]), key
        for moments in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(to_numpy(getattr(opt_skipped, moments)[key]),
                                  to_numpy(getattr(opt_dropped, moments)[key])), (moments, key)
    assert opt_skipped.updates() == opt_dropped.updates() == 4
    assert opt_skipped.state_dict()["step"] == 4


def test_an_unflagged_step_is_bit_for_bit_the_plain_one(backend):
    """found_inf=False (the training loop's every step) changes no bit of the update."""
    xp, device = get_namespace(backend)
    plain, _ = run_adamw(backend)
    params = {k: on(backend, v.copy()) for k, v in PARAMS.items()}
    opt = AdamW(params, weight_decay=0.05)
    for grads, lr in zip(GRADS, LRS):
        opt.step(params, {k: on(backend, v) for k, v in grads.items()}, lr,
                 found_inf=xp.asarray(False, device=device))
    for key in PARAMS:
        assert np.array_equal(to_numpy(params[key]), plain[key]), key


def test_the_ema_skips_a_flagged_step(backend):
    xp, device = get_namespace(backend)
    params = {k: on(backend, v) for k, v in PARAMS.items()}
    reference, flagged = WeightEMA(params, 0.9), WeightEMA(params, 0.9)
    moved = {k: on(backend, v + 1.0) for k, v in PARAMS.items()}
    reference.update(moved)
    flagged.update(moved, found_inf=xp.asarray(False, device=device))
    flagged_before = {k: to_numpy(v) for k, v in flagged.params.items()}
    flagged.update(moved, found_inf=xp.asarray(True, device=device))
    for key in PARAMS:
        assert np.array_equal(to_numpy(flagged.params[key]), to_numpy(reference.params[key]))
        assert np.array_equal(to_numpy(flagged.params[key]), flagged_before[key])


def test_grad_norm_is_the_global_l2_norm(backend):
    grads = {k: on(backend, v) for k, v in GRADS[0].items()}
    expected = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2))
                             for v in GRADS[0].values()))
    assert float(to_numpy(grad_norm(grads))) == pytest.approx(expected, rel=1e-5)
    broken = dict(GRADS[0], b=np.array([0, np.inf, 0, 0, 0, 0, 0], dtype=np.float32))
    assert not np.isfinite(to_numpy(grad_norm({k: on(backend, v) for k, v in broken.items()})))


def test_step_monitor_counts_skips_runs_and_trips(backend):
    """Losses 1, nan, 2, nan, nan, nan, 3 with a limit of 3 in a row: trips at step 5; the
    sums cover the finite steps only; a finite step restarts the run."""
    xp, device = get_namespace(backend)
    monitor = StepMonitor(xp, device, limit=3)
    norm = xp.asarray(1.0, device=device)
    flags = []
    for step, loss in enumerate([1.0, math.nan, 2.0, math.nan, math.nan, math.nan, 3.0]):
        found_inf = monitor.step(step, xp.asarray(loss, dtype=xp.float32, device=device), norm,
                                 batch=4)
        flags.append(bool(to_numpy(found_inf)))
        if step == 4:
            assert monitor.read()["tripped"] == -1  # two in a row so far
    r = monitor.read()
    assert flags == [False, True, False, True, True, True, False]
    assert r["tripped"] == 5 and r["run"] == 0 and r["skipped"] == 4
    assert r["loss_sum"] == 4 * (1.0 + 2.0 + 3.0) and r["images"] == 12
    assert r["last_loss"] == 3.0 and r["last_loss_step"] == 6 and r["loss"] == 3.0
    # an inf gradient norm with a finite loss is a non-finite step too
    monitor.new_epoch()
    inf = xp.asarray(math.inf, device=device)
    assert bool(to_numpy(monitor.step(7, xp.asarray(1.0, device=device), inf, batch=4)))
    assert monitor.read()["skipped"] == 1 and monitor.read()["images"] == 0


def test_a_loss_scale_overflow_is_skipped_but_is_no_divergence():
    """Under a float16 loss scale an inf gradient with a finite loss is the scale's overflow:
    skipped and counted, but not a step towards the limit of non-finite steps in a row."""
    xp, device = get_namespace("numpy")
    monitor = StepMonitor(xp, device, limit=2)
    finite, inf = np.asarray(1.0), np.asarray(np.inf)
    flags = [bool(monitor.step(i, finite, inf, 4, scaled=True)) for i in range(5)]
    state = monitor.read()
    assert flags == [True] * 5 and state["skipped"] == 5 and state["tripped"] < 0
    assert bool(monitor.step(5, np.asarray(np.nan), finite, 4, scaled=True))
    assert bool(monitor.step(6, np.asarray(np.nan), finite, 4, scaled=True))
    assert monitor.read()["tripped"] == 6, "two non-finite losses in a row trip it"
