"""The squeeze-and-excitation channel gate (SENet), as the SELayer of the official
t2t_vit_se.py, and the SE attention that uses it.

    s = mean over the N tokens of x         (B, D)      squeeze: one number per channel
    a = ReLU(s W1^T)                        (B, D/r)    W1 (D/r, D), no bias, r = 16
    g = sigmoid(a W2^T)                     (B, D)      W2 (D, D/r), no bias
    y = x * g                               (B, N, D)   every token's channels, one gate

The mean runs over every token, the class token included (the official AdaptiveAvgPool1d
over the transposed (B, D, N) tokens).
"""

from ..backend import array_namespace
from ..gaps import is_half, where, wide
from .attention import self_attention_backward, self_attention_forward
from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward


def relu_forward(z):
    """z (any shape) -> max(z, 0). cache = the mask z > 0."""
    xp = array_namespace(z)
    positive = z > 0
    return where(positive, z, xp.zeros_like(z)), positive  # (gaps.where: half stays half)


def relu_backward(dy, cache):
    """forward was y = max(z, 0), so dz = dy where z > 0, else 0."""
    xp = array_namespace(dy)
    return where(cache, dy, xp.zeros_like(dy))


def sigmoid_forward(z):
    """z (any shape) -> 1 / (1 + exp(-z)), without overflow: with e = exp(-|z|) <= 1, it is
    1 / (1 + e) for z >= 0 and e / (1 + e) below. cache = the output. Half precision: on a
    float32 copy, the output back in the half type."""
    xp = array_namespace(z)
    if is_half(z.dtype):
        y = xp.astype(sigmoid_forward(wide(z))[0], z.dtype)
        return y, y
    e = xp.exp(-xp.abs(z))
    y = xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return y, y


def sigmoid_backward(dy, cache):
    """forward was y = sigmoid(z), so dz = dy * y (1 - y)."""
    y = cache
    if is_half(dy.dtype):
        return array_namespace(dy).astype(sigmoid_backward(wide(dy), wide(y)), dy.dtype)
    return dy * y * (1.0 - y)


def se_gate_forward(x, w1, w2):
    """x (B, N, D), w1 (D/r, D), w2 (D, D/r) -> y (B, N, D).

    cache = (x, gate, fc1 cache, relu cache, fc2 cache, sigmoid cache)
    """
    xp = array_namespace(x)
    s = xp.astype(xp.mean(wide(x), axis=1), x.dtype)  # (B, D) squeeze, summed in float32
    z1, fc1_cache = linear_forward(s, w1)  # (B, D/r)
    a, relu_cache = relu_forward(z1)
    z2, fc2_cache = linear_forward(a, w2)  # (B, D)
    gate, sigmoid_cache = sigmoid_forward(z2)  # (B, D) in (0, 1)
    y = x * gate[:, None, :]  # (B, N, D) excite
    return y, (x, gate, fc1_cache, relu_cache, fc2_cache, sigmoid_cache)


def se_gate_backward(dy, cache):
    """dy (B, N, D) -> (dx (B, N, D), dw1, dw2).

    forward was y = x * g(mean_N x): x reaches y twice, directly and through the gate, so
    dx = dy * g + (the gate's gradient, spread evenly back over the N tokens the mean read).
    """
    xp = array_namespace(dy)
    x, gate, fc1_cache, relu_cache, fc2_cache, sigmoid_cache = cache
    N = x.shape[1]
    dgate = xp.astype(xp.sum(wide(dy * x), axis=1), dy.dtype)  # (B, D): each gate scaled
    # all N tokens' channel (summed in float32)
    dz2 = sigmoid_backward(dgate, sigmoid_cache)  # (B, D)
    da, dw2, _ = linear_backward(dz2, fc2_cache)  # (B, D/r)
    dz1 = relu_backward(da, relu_cache)
    ds, dw1, _ = linear_backward(dz1, fc1_cache)  # (B, D)
    dx = dy * gate[:, None, :]  # (B, N, D) the direct path
    ds *= 1.0 / N  # in place: the dtype stays
    dx += ds[:, None, :]  # the mean's backward: 1/N to every token
    return dx, dw1, dw2


def se_attention_forward(x, params, num_heads, scale, *, proj_drop=0.0, rng=None,
                         training=False):
    """The SE attention of t2t_vit_se.py: multi-head attention and its proj, then the gate,
    then the proj dropout (the official order: the gate sits between proj and proj_drop).

    params: those of self_attention ('qkv.weight', 'proj.weight', 'proj.bias') and the
    gate's 'se_layer.fc.0.weight' (D/16, D), 'se_layer.fc.2.weight' (D, D/16).
    x (B, N, D) -> (B, N, D). cache = (attention cache, gate cache, dropout cache)
    """
    a, attn_cache = self_attention_forward(x, params, num_heads, scale)  # (B, N, D) no dropout
    y, gate_cache = se_gate_forward(a, params["se_layer.fc.0.weight"],
                                    params["se_layer.fc.2.weight"])
    y, drop_cache = dropout_forward(y, proj_drop, rng, training)
    return y, (attn_cache, gate_cache, drop_cache)


def se_attention_backward(dout, cache):
    """dout (B, N, D) -> (dx (B, N, D), grads under the params' names)."""
    attn_cache, gate_cache, drop_cache = cache
    dy = dropout_backward(dout, drop_cache)
    da, dw1, dw2 = se_gate_backward(dy, gate_cache)
    dx, grads = self_attention_backward(da, attn_cache)
    grads["se_layer.fc.0.weight"], grads["se_layer.fc.2.weight"] = dw1, dw2
    return dx, grads
