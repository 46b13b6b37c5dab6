"""Central-difference gradient checks in float64 for the ops with tricky backwards.

For a random upstream gradient g, the scalar f(inputs) = sum(op(inputs) * g) is differentiated
numerically, entry by entry: (f(x + h) - f(x - h)) / 2h with h = 1e-6, and compared with the
hand-written backward. In float64 the relative error of a right backward is about 1e-9; a wrong
one is 1e-2 or worse. The tolerance 1e-7 sits between.
"""

import math

import numpy as np
import pytest

from conftest import assert_close
from t2t_ref.ops.attention import (scaled_dot_product_attention_backward,
                                   scaled_dot_product_attention_forward,
                                   self_attention_backward, self_attention_forward)
from t2t_ref.ops.cross_entropy import cross_entropy
from t2t_ref.ops.gelu import gelu_backward, gelu_forward
from t2t_ref.ops.layernorm import layernorm_backward, layernorm_forward
from t2t_ref.ops.performer import (performer_attention_backward, performer_attention_forward,
                                   random_features_backward, random_features_forward)
from t2t_ref.ops.soft_split import fold, soft_split_backward, soft_split_forward, unfold
from t2t_ref.ops.softmax import softmax_backward, softmax_forward

H = 1e-6
TOL = 1e-7


def numeric_grad(f, x):
    """d f / d x by central differences; f takes no arguments and reads x (perturbed in place)."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + H
        plus = f()
        x[idx] = old - H
        minus = f()
        x[idx] = old
        grad[idx] = (plus - minus) / (2 * H)
    return grad


def check(forward, backward, inputs, names, seed=0):
    """forward(*inputs) -> (out, cache); backward(g, cache) -> a sequence of grads, one for each
    name ('i' for inputs[i], 'i.key' for inputs[i][key] of a parameter dict). Checks each
    named input's gradient numerically."""
    rng = np.random.default_rng(seed)
    out, cache = forward(*inputs)
    g = rng.standard_normal(np.shape(out))
    grads = backward(g, cache)

    def f():
        return float(np.sum(np.asarray(forward(*inputs)[0]) * g))

    assert len(grads) == len(names)
    for name, analytic in zip(names, grads):
        x = lookup(inputs, name)
        assert_close(analytic, numeric_grad(f, x), TOL, f"d{name}")


def lookup(inputs, name):
    """name 'i' -> inputs[i]; 'i.key' -> inputs[i][key] (a parameter dict)."""
    index, _, key = name.partition(".")
    value = inputs[int(index)]
    return value[key] if key else value


def test_layernorm_gradcheck():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6)) + 2.0
    w, b = 1.0 + 0.5 * rng.standard_normal(6), rng.standard_normal(6)
    check(layernorm_forward, layernorm_backward, [x, w, b], ["0", "1", "2"])


def test_layernorm_gradcheck_small_variance():
    """Rows with a variance comparable to eps: the eps inside the sqrt matters."""
    rng = np.random.default_rng(2)
    x = 1e-2 * rng.standard_normal((3, 5))
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    check(layernorm_forward, layernorm_backward, [x, w, b], ["0", "1", "2"])


def test_softmax_gradcheck():
    x = 2.0 * np.random.default_rng(3).standard_normal((2, 3, 5))
    check(softmax_forward, lambda g, c: (softmax_backward(g, c),), [x], ["0"])


def test_gelu_gradcheck():
    x = 3.0 * np.random.default_rng(4).standard_normal((4, 6))
    check(gelu_forward, lambda g, c: (gelu_backward(g, c),), [x], ["0"])


@pytest.mark.parametrize("h", [1, 2])
def test_scaled_dot_product_attention_gradcheck(h):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, h, 4, 3)) for _ in range(3))

    def forward(q, k, v):
        return scaled_dot_product_attention_forward(q, k, v, 0.7)

    check(forward, scaled_dot_product_attention_backward, [q, k, v], ["0", "1", "2"])


@pytest.mark.parametrize("num_heads,value_skip,qkv_bias",
                         [(1, True, False), (2, False, True), (2, True, True)])
def test_self_attention_gradcheck(num_heads, value_skip, qkv_bias):
    rng = np.random.default_rng(6)
    d_in, E = 5, 4
    x = rng.standard_normal((2, 3, d_in))
    params = {"qkv.weight": 0.5 * rng.standard_normal((3 * E, d_in)),
              "proj.weight": 0.5 * rng.standard_normal((E, E)),
              "proj.bias": rng.standard_normal(E)}
    if qkv_bias:
        params["qkv.bias"] = rng.standard_normal(3 * E)

    def forward(x, params):
        return self_attention_forward(x, params, num_heads, d_in ** -0.5, value_skip=value_skip)

    def backward(g, cache):
        dx, grads = self_attention_backward(g, cache)
        assert set(grads) == set(params)
        return [dx] + [grads[name] for name in sorted(params)]

    check(forward, backward, [x, params], ["0"] + [f"1.{name}" for name in sorted(params)])


def orthogonal_features(rng, m, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, m)))
    return q.T * math.sqrt(m)


def test_random_features_gradcheck():
    rng = np.random.default_rng(7)
    z, w = 0.5 * rng.standard_normal((2, 4, 6)), orthogonal_features(rng, 3, 6)
    check(random_features_forward, lambda g, c: (random_features_backward(g, c),), [z, w],
          ["0"])


@pytest.mark.parametrize("d,e,m", [(6, 6, 3), (4, 5, 4)])
def test_performer_attention_gradcheck(d, e, m):
    rng = np.random.default_rng(8)
    q, k = 0.5 * rng.standard_normal((2, 5, d)), 0.5 * rng.standard_normal((2, 5, d))
    v, w = rng.standard_normal((2, 5, e)), orthogonal_features(rng, m, d)
    check(performer_attention_forward, performer_attention_backward, [q, k, v, w],
          ["0", "1", "2"])


@pytest.mark.parametrize("C,Hh,W,k,s,p", [(2, 6, 6, 3, 2, 1), (1, 8, 8, 7, 4, 2),
                                          (2, 5, 7, 3, 1, 0), (1, 7, 8, 2, 3, 0)])
def test_soft_split_gradcheck(C, Hh, W, k, s, p):
    x = np.random.default_rng(9).standard_normal((2, C, Hh, W))
    check(lambda x: soft_split_forward(x, k, s, p), lambda g, c: (soft_split_backward(g, c),),
          [x], ["0"])


def test_fold_gradcheck():
    """fold is linear; its gradient is unfold (the adjoint the other way round)."""
    k, s, p, size = 3, 2, 1, (6, 5)
    cols = np.random.default_rng(10).standard_normal((2, 2 * 9, 3 * 3))

    def forward(cols):
        return fold(cols, size, k, s, p), None

    check(forward, lambda g, _: (unfold(g, k, s, p),), [cols], ["0"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradcheck(smoothing):
    rng = np.random.default_rng(11)
    logits, labels = rng.standard_normal((4, 6)), rng.integers(0, 6, size=4)
    _, dlogits = cross_entropy(logits, labels, smoothing)
    numeric = numeric_grad(lambda: float(cross_entropy(logits, labels, smoothing)[0]), logits)
    assert_close(dlogits, numeric, TOL, "dlogits")
