"""FlatTensors (flat.py): named views into one buffer, and the weight EMA on it."""

import numpy as np
import pytest

import t2t_ref
from t2t_ref.backend import get_namespace, to_numpy
from t2t_ref.ema import WeightEMA
from t2t_ref.flat import FlatTensors

from conftest import on

SHAPES = {"a": (2, 3), "b": (4,), "c": (1, 1, 2)}


def test_views_share_one_buffer(backend):
    xp, device = get_namespace(backend)
    flat = FlatTensors(xp, SHAPES, xp.float64, device, order=["b", "c", "a"])
    assert list(flat) == ["a", "b", "c"], "the dict keeps the shapes' order"
    assert [(n, a, b) for n, a, b, _ in flat.layout] == [("b", 0, 4), ("c", 4, 6), ("a", 6, 12)]
    flat["a"] = on(backend, np.arange(6.0).reshape(2, 3), "float64")
    flat.update(b=on(backend, np.full(4, 7.0), "float64"))
    expected = np.concatenate([np.full(4, 7.0), np.zeros(2), np.arange(6.0)])
    np.testing.assert_array_equal(to_numpy(flat.flat), expected)
    flat.flat *= 2.0  # one call over the buffer changes every named tensor
    np.testing.assert_array_equal(to_numpy(flat["a"]), 2 * np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(to_numpy(flat["b"]), np.full(4, 14.0))


def test_assignment_checks_names_and_shapes():
    flat = FlatTensors(*get_namespace("numpy")[:1], SHAPES, np.float32, "cpu")
    with pytest.raises(ValueError, match="a: shape \\(3, 2\\) does not fit \\(2, 3\\)"):
        flat["a"] = np.zeros((3, 2))
    with pytest.raises(KeyError, match="'z' is not one of these tensors"):
        flat["z"] = np.zeros(1)


def test_copy_and_zeros_like_keep_the_layout():
    xp, device = get_namespace("numpy")
    flat = FlatTensors(xp, SHAPES, xp.float32, device, order=["c", "a", "b"])
    flat.flat[...] = np.arange(12.0)
    twin = flat.copy()
    assert twin.same_layout(flat) and twin.flat is not flat.flat
    np.testing.assert_array_equal(twin.flat, flat.flat)
    twin.flat += 1.0
    assert flat.flat[0] == 0.0, "a copy has its own buffer"
    assert not np.any(flat.zeros_like().flat)


def test_model_params_and_grads_are_flat():
    """The model's parameters and gradients are views into one buffer each; the weight
    matrices (the tensors with weight decay) lie in one stretch."""
    model = t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=32)
    assert isinstance(model.params, FlatTensors)
    assert model.params.flat.shape[0] == model.num_parameters(trainable_only=True)
    ndims = [len(shape) for _, _, _, shape in model.params.layout]
    assert ndims == sorted(ndims, key=lambda d: d <= 1), "matrices, then vectors"
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    model.backward(np.ones((2, 3), np.float32) * 0 + model.forward(x))
    assert isinstance(model.grads, FlatTensors) and model.grads.same_layout(model.params)
    for name, start, stop, shape in model.grads.layout:
        np.testing.assert_array_equal(model.grads.flat[start:stop].reshape(shape),
                                      model.grads[name], err_msg=name)


def test_ema_on_flat_buffers_equals_per_tensor_ema():
    """Bit for bit: the flat EMA update does the per-tensor arithmetic."""
    xp, device = get_namespace("numpy")
    rng = np.random.default_rng(1)
    flat = FlatTensors(xp, SHAPES, xp.float32, device)
    flat.flat[...] = rng.normal(size=12)
    plain = {k: v.copy() for k, v in flat.items()}
    flat_ema, plain_ema = WeightEMA(flat, 0.9), WeightEMA(plain, 0.9)
    assert isinstance(flat_ema.params, FlatTensors)
    for _ in range(3):
        flat.flat[...] = rng.normal(size=12)
        plain = {k: v.copy() for k, v in flat.items()}
        flat_ema.update(flat)
        plain_ema.update(plain)
    for k in SHAPES:
        np.testing.assert_array_equal(flat_ema.params[k], plain_ema.params[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_update_with_every_tensor_equals_assigning_each(backend, dtype, monkeypatch):
    """update() given every tensor (a backward's gradients) writes one concatenation into the
    buffer on NumPy and CuPy; it must store what assigning them one by one stores, in the
    buffer's dtype, whatever the order of the dict, and still refuse a wrong shape."""
    import types

    from t2t_ref import flat as flat_module
    if dtype == "float16" and backend == "array_api_strict":
        pytest.skip("array_api_strict has no float16")
    xp, device = get_namespace(backend)
    rng = np.random.default_rng(3)
    values = {name: rng.normal(size=shape) for name, shape in SHAPES.items()}
    one_by_one = FlatTensors(xp, SHAPES, xp.float32, device, order=["c", "a", "b"])
    at_once = FlatTensors(xp, SHAPES, xp.float32, device, order=["c", "a", "b"])
    for name, value in values.items():
        one_by_one[name] = on(backend, value, dtype)
    native, concatenations = flat_module._native_module(at_once.flat), []
    if native is not None:  # count the one-call path's calls
        def concatenate(pieces, out):
            concatenations.append(len(pieces))
            return native.concatenate(pieces, out=out)
        spy = types.SimpleNamespace(concatenate=concatenate,
                                    may_share_memory=native.may_share_memory)
        monkeypatch.setattr(flat_module, "_native_module", lambda x: spy)
    at_once.update({name: on(backend, values[name], dtype) for name in ["b", "c", "a"]})
    np.testing.assert_array_equal(to_numpy(at_once.flat), to_numpy(one_by_one.flat))
    assert to_numpy(at_once.flat).dtype == np.float32 and np.any(to_numpy(at_once.flat))
    assert concatenations == ([] if native is None else [3]), "one call for every tensor"
    # a buffer's own views given back (values that could move while being read): the same
    at_once.update({name: one_by_one[name] for name in SHAPES})
    one_by_one.update(dict(one_by_one))
    np.testing.assert_array_equal(to_numpy(one_by_one.flat), to_numpy(at_once.flat))
    wrong = {name: on(backend, v, "float32")
             for name, v in {**values, "a": np.zeros((3, 2))}.items()}
    with pytest.raises(ValueError, match="a: shape \\(3, 2\\) does not fit \\(2, 3\\)"):
        at_once.update(wrong)


def test_update_copies_one_by_one_while_a_graph_records(monkeypatch):
    """While a CUDA graph records, update() given every tensor copies them one by one: CuPy's
    concatenation of more than 8 arrays uploads their addresses from a host buffer that every
    replay would read again after CuPy reused it. The stored values are the same."""
    from t2t_ref import capture
    from t2t_ref import flat as flat_module
    xp, device = get_namespace("numpy")
    values = {name: np.random.default_rng(4).normal(size=shape) for name, shape in SHAPES.items()}
    expected = FlatTensors(xp, SHAPES, xp.float32, device)
    expected.update(values)
    recorded = FlatTensors(xp, SHAPES, xp.float32, device)

    class NoConcatenation:
        may_share_memory = staticmethod(np.may_share_memory)

        @staticmethod
        def concatenate(pieces, out):
            raise AssertionError("a concatenation while a graph records")

    monkeypatch.setattr(flat_module, "_native_module", lambda x: NoConcatenation)
    with capture.recording():
        recorded.update(values)
    np.testing.assert_array_equal(recorded.flat, expected.flat)
