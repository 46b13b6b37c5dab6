"""The transformer MLP: Linear -> GELU -> Dropout -> Linear -> Dropout."""

from .dropout import dropout_backward, dropout_forward
from .gelu import gelu_backward, gelu_forward
from .linear import linear_backward, linear_forward


def mlp_forward(x, w1, b1, w2, b2, *, hidden_drop=0.0, out_drop=0.0, rng=None, training=False):
    """x (..., D) -> y (..., Dout) through a hidden width w1.shape[0].

    The backbone's Mlp drops after both layers (hidden_drop = out_drop = drop_rate); the
    performer's nn.Sequential drops only at the end (hidden_drop = 0, out_drop = 0.1).
    """
    h, fc1_cache = linear_forward(x, w1, b1)  # (..., Dh)
    a, gelu_cache = gelu_forward(h)  # (..., Dh)
    a, hidden_drop_cache = dropout_forward(a, hidden_drop, rng, training)
    y, fc2_cache = linear_forward(a, w2, b2)  # (..., Dout)
    y, out_drop_cache = dropout_forward(y, out_drop, rng, training)
    return y, (fc1_cache, gelu_cache, hidden_drop_cache, fc2_cache, out_drop_cache)


def mlp_backward(dy, cache):
    """dy (..., Dout) -> (dx, dw1, db1, dw2, db2), unwinding the forward in reverse."""
    fc1_cache, gelu_cache, hidden_drop_cache, fc2_cache, out_drop_cache = cache
    dy = dropout_backward(dy, out_drop_cache)
    da, dw2, db2 = linear_backward(dy, fc2_cache)
    da = dropout_backward(da, hidden_drop_cache)
    dh = gelu_backward(da, gelu_cache)
    dx, dw1, db1 = linear_backward(dh, fc1_cache)
    return dx, dw1, db1, dw2, db2
