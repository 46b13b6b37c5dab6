"""The float16 loss scale (loss_scale.py) against torch's GradScaler update, on every backend."""

import numpy as np
import pytest
import torch

from t2t_ref.backend import get_namespace, to_numpy
from t2t_ref.flat import FlatTensors
from t2t_ref.loss_scale import DynamicLossScale

from conftest import on

FLAGS = [False, False, True, False, False, False, True, True, False, False, False, False]


def test_scale_follows_torchs_update(backend):
    """Back off on an overflow, grow after growth_interval (3 here) finite steps in a row:
    the scale after every step equals torch._amp_update_scale_'s (GradScaler's update)."""
    xp, device = get_namespace(backend)
    ours = DynamicLossScale(xp, device, init_scale=2.0 ** 10, growth_interval=3)
    scale = torch.tensor(2.0 ** 10)
    tracker = torch.tensor(0, dtype=torch.int32)
    for step, flag in enumerate(FLAGS):
        ours.update(xp.asarray(flag, device=device))
        torch._amp_update_scale_(scale, tracker, torch.tensor(float(flag)), 2.0, 0.5, 3)
        assert float(to_numpy(ours.scale)) == float(scale), f"step {step}"
        assert int(to_numpy(ours.good_steps)) == int(tracker), f"step {step}"


def test_unscale_divides_and_finds_overflows(backend):
    xp, device = get_namespace(backend)
    scaler = DynamicLossScale(xp, device, init_scale=8.0)
    grads = FlatTensors(xp, {"a": (2, 3), "b": (4,)}, xp.float32, device)
    grads.flat[...] = on(backend, np.arange(10.0) * 8.0, "float32")
    found_inf = scaler.unscale(grads)
    assert not bool(to_numpy(found_inf))
    np.testing.assert_array_equal(to_numpy(grads.flat), np.arange(10.0))
    grads["b"] = on(backend, np.array([1.0, np.inf, 0.0, 2.0]), "float32")
    assert bool(to_numpy(scaler.unscale(grads)))
    plain = {"a": on(backend, np.full((2, 3), 16.0), "float32"),
             "b": on(backend, np.array([np.nan, 0, 0, 0]), "float32")}
    assert bool(to_numpy(scaler.unscale(plain)))
    np.testing.assert_array_equal(to_numpy(plain["a"]), np.full((2, 3), 2.0))


def test_scaled_gradient_and_state_round_trip():
    xp, device = get_namespace("numpy")
    scaler = DynamicLossScale(xp, device, init_scale=4.0, growth_interval=2)
    assert scaler.scale_gradient(np.ones(3, np.float16)).dtype == np.float16
    np.testing.assert_array_equal(scaler.scale_gradient(np.ones(3, np.float32)), [4, 4, 4])
    for flag in (False, False, False):
        scaler.update(np.asarray(flag))
    state = scaler.state_dict()
    assert state["scale"] == 8.0 and state["good_steps"] == 1
    again = DynamicLossScale(xp, device)
    again.load_state_dict(state)
    again.update(np.asarray(False))
    assert again.state_dict()["scale"] == 16.0 and again.state_dict()["good_steps"] == 0


def test_bad_settings_are_refused():
    xp, device = get_namespace("numpy")
    with pytest.raises(ValueError, match="growth_factor > 1"):
        DynamicLossScale(xp, device, growth_factor=1.0)
