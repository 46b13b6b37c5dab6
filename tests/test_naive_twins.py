"""The fast ops against their slow, obvious twins (t2t_ref.naive), and fold as unfold's adjoint.

The twins loop the way the math is written (one window, one query row at a time); they are
themselves checked against torch here so that agreeing with them means something.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from t2t_ref.naive import attention_loops, fold_loops, unfold_loops
from t2t_ref.ops.attention import scaled_dot_product_attention_forward
from t2t_ref.ops.soft_split import (fold, output_size, soft_split_backward, soft_split_forward,
                                   unfold)

# (B, C, H, W, kernel, stride, padding): the T2T geometries and the corners
SPLITS = [
    pytest.param(2, 3, 12, 12, 7, 4, 2, id="t2t-7-4-2"),
    pytest.param(2, 3, 16, 16, 7, 4, 2, id="t2t-7-4-2-16px"),
    pytest.param(2, 4, 8, 8, 3, 2, 1, id="t2t-3-2-1"),
    pytest.param(1, 2, 7, 5, 3, 2, 1, id="t2t-3-2-1-odd-nonsquare"),
    pytest.param(2, 2, 5, 7, 3, 1, 0, id="nonsquare-3-1-0"),
    pytest.param(1, 3, 8, 7, 2, 3, 0, id="stride>kernel-2-3-0"),
    pytest.param(2, 2, 7, 9, 3, 2, 0, id="pad0-3-2-0"),
    pytest.param(1, 2, 8, 8, 4, 4, 0, id="hard-split-4-4-0"),
    pytest.param(1, 1, 4, 6, 1, 1, 0, id="kernel1"),
]


@pytest.mark.parametrize("B,C,H,W,k,s,p", SPLITS)
def test_unfold_equals_loops_and_torch(B, C, H, W, k, s, p):
    x = np.random.default_rng(0).standard_normal((B, C, H, W))
    loops = unfold_loops(x, k, s, p)
    L = output_size(H, k, s, p) * output_size(W, k, s, p)
    assert loops.shape == (B, C * k * k, L)
    assert_close(loops, F.unfold(torch.tensor(x), k, padding=p, stride=s).numpy(), 1e-15,
                 "unfold_loops vs torch")
    assert_close(unfold(x, k, s, p), loops, 1e-15, "unfold vs unfold_loops")


@pytest.mark.parametrize("B,C,H,W,k,s,p", SPLITS)
def test_fold_equals_loops_and_torch(B, C, H, W, k, s, p):
    L = output_size(H, k, s, p) * output_size(W, k, s, p)
    cols = np.random.default_rng(1).standard_normal((B, C * k * k, L))
    loops = fold_loops(cols, (H, W), k, s, p)
    assert_close(loops, F.fold(torch.tensor(cols), (H, W), k, padding=p, stride=s).numpy(),
                 1e-14, "fold_loops vs torch")
    assert_close(fold(cols, (H, W), k, s, p), loops, 1e-14, "fold vs fold_loops")


@pytest.mark.parametrize("B,C,H,W,k,s,p", SPLITS)
def test_fold_is_adjoint_of_unfold(B, C, H, W, k, s, p):
    """<unfold(x), y> == <x, fold(y)> for random x, y: fold is unfold's transpose, which is
    exactly what makes it unfold's backward."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, C, H, W))
    y = rng.standard_normal(unfold(x, k, s, p).shape)
    lhs = np.sum(unfold(x, k, s, p) * y)
    rhs = np.sum(x * fold(y, (H, W), k, s, p))
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs)), (lhs, rhs)


def coverage(H, W, k, s, p):
    """How many windows read each pixel, counted window by window."""
    count = np.zeros((H + 2 * p, W + 2 * p))
    for oh in range(output_size(H, k, s, p)):
        for ow in range(output_size(W, k, s, p)):
            count[oh * s:oh * s + k, ow * s:ow * s + k] += 1
    return count[p:p + H, p:p + W]


@pytest.mark.parametrize("H,W,k,s,p,most", [(8, 8, 3, 2, 1, 4), (12, 12, 7, 4, 2, 4),
                                            (5, 7, 3, 1, 0, 9), (8, 7, 2, 3, 0, 1)])
def test_overlapping_windows_sum_gradients(H, W, k, s, p, most):
    """A pixel read by n windows gets the sum of n gradients: with an all-ones gradient on
    every token, the soft split's backward is the window count of each pixel (and 0 for a
    pixel no window reads, as when stride > kernel)."""
    x = np.zeros((1, 2, H, W))
    tokens, cache = soft_split_forward(x, k, s, p)
    dx = soft_split_backward(np.ones_like(tokens), cache)
    expected = np.broadcast_to(coverage(H, W, k, s, p), x.shape)
    assert expected.max() == most  # the geometry overlaps as intended (or not, for s > k)
    assert_close(dx, expected, 1e-15, "dx = window count")


@pytest.mark.parametrize("B,h,N,d", [(2, 1, 5, 4), (1, 3, 6, 2), (2, 2, 1, 3)])
def test_attention_equals_loops(B, h, N, d):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((B, h, N, d)) for _ in range(3))
    scale = d ** -0.5
    loops = attention_loops(q, k, v, scale)
    qt, kt, vt = (torch.tensor(a) for a in (q, k, v))
    reference = (torch.softmax(qt @ kt.transpose(-2, -1) * scale, -1) @ vt).numpy()
    assert_close(loops, reference, 1e-13, "attention_loops vs torch")
    out, _ = scaled_dot_product_attention_forward(q, k, v, scale)
    assert_close(out, loops, 1e-13, "attention vs attention_loops")
