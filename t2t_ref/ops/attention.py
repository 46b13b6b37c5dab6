"""Multi-head self-attention, forward and backward.

Two levels, each with its backward right below it:
- scaled_dot_product_attention: softmax(q k^T * scale) v on per-head arrays (B, h, N, d).
- self_attention: the module of the official code: qkv Linear, split heads, attention,
  merge heads, proj Linear, dropout; and, for T2T's token transformer, the "v skip".

The N x N attention map is what makes the first T2T layer expensive: at 224 it has
3136 x 3136 entries per image. The performer (performer.py) avoids it.
"""

from ..backend import array_namespace
from ..gaps import matmul
from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward
from .softmax import softmax_backward, softmax_forward


def scaled_dot_product_attention_forward(q, k, v, scale):
    """q, k, v (B, h, N, d) -> out (B, h, N, d). cache = (q, k, v, p, scale)."""
    xp = array_namespace(q)
    scores = matmul(q, xp.matrix_transpose(k))  # (B, h, N, N)
    scores *= scale
    p, _ = softmax_forward(scores)  # (B, h, N, N) each row a distribution over keys
    out = matmul(p, v)  # (B, h, N, d)
    return out, (q, k, v, p, scale)


def scaled_dot_product_attention_backward(dout, cache):
    """dout (B, h, N, d) -> (dq, dk, dv), each (B, h, N, d).

    forward was out = p v with p = softmax(s), s = q k^T * scale; so
    dv = p^T dout, dp = dout v^T, ds = softmax backward of dp, dq = ds k * scale,
    dk = ds^T q * scale.
    The two products with a transposed N x N matrix are computed as the transpose of the
    product the other way round, p^T dout = (dout^T p)^T: only the small (N, d) operand is
    transposed. (CuPy's batched matmul copies a transposed operand into a contiguous array
    first: for p at N = 3136 that is a copy of gigabytes.)
    """
    q, k, v, p, scale = cache
    xp = array_namespace(dout)
    t = xp.matrix_transpose
    dv = t(matmul(t(dout), p))  # (B, h, N, d) = p^T dout
    dp = matmul(dout, t(v))  # (B, h, N, N)
    dscores = softmax_backward(dp, p)  # (B, h, N, N)
    dscores *= scale
    dq = matmul(dscores, k)  # (B, h, N, d)
    dk = t(matmul(t(q), dscores))  # (B, h, N, d) = dscores^T q
    return dq, dk, dv


def split_heads(qkv, num_heads):
    """qkv (B, N, 3*E) -> q, k, v, each (B, h, N, E/h), as the official reshape/permute."""
    xp = array_namespace(qkv)
    B, N, E3 = qkv.shape
    head_dim = E3 // (3 * num_heads)
    qkv = xp.reshape(qkv, (B, N, 3, num_heads, head_dim))
    qkv = xp.permute_dims(qkv, (2, 0, 3, 1, 4))  # (3, B, h, N, d)
    return qkv[0, ...], qkv[1, ...], qkv[2, ...]


def merge_heads(x):
    """x (B, h, N, d) -> (B, N, h*d): heads side by side, the inverse of split_heads' layout."""
    xp = array_namespace(x)
    B, h, N, d = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (B, N, h * d))


def unmerge_heads(x, num_heads):
    """x (B, N, h*d) -> (B, h, N, d): the adjoint (and inverse) of merge_heads."""
    xp = array_namespace(x)
    B, N, E = x.shape
    return xp.permute_dims(xp.reshape(x, (B, N, num_heads, E // num_heads)), (0, 2, 1, 3))


def self_attention_forward(x, params, num_heads, scale, *, value_skip=False,
                           proj_drop=0.0, rng=None, training=False):
    """x (B, N, Din) -> out (B, N, E), E = proj width (= Din in the backbone).

    params: 'qkv.weight' (3E, Din), optional 'qkv.bias' (3E,), 'proj.weight' (E, E),
    'proj.bias' (E,): the official module's names.
    value_skip: out = v + proj(attention); T2T's token transformer uses it because its input
    width Din differs from E, so x itself cannot be the residual.
    cache = (qkv Linear's cache, num_heads, value_skip, attention's cache, proj's cache,
    dropout's cache).
    """
    qkv, qkv_cache = linear_forward(x, params["qkv.weight"], params.get("qkv.bias"))  # (B, N, 3E)
    q, k, v = split_heads(qkv, num_heads)  # (B, h, N, d) each
    attended, attn_cache = scaled_dot_product_attention_forward(q, k, v, scale)  # (B, h, N, d)
    merged = merge_heads(attended)  # (B, N, E)
    projected, proj_cache = linear_forward(merged, params["proj.weight"], params["proj.bias"])
    out, drop_cache = dropout_forward(projected, proj_drop, rng, training)  # (B, N, E)
    if value_skip:
        out = out + merge_heads(v)
    cache = (qkv_cache, num_heads, value_skip, attn_cache, proj_cache, drop_cache)
    return out, cache


def self_attention_backward(dout, cache):
    """dout (B, N, E) -> (dx (B, N, Din), grads dict with the params' names)."""
    xp = array_namespace(dout)
    qkv_cache, num_heads, value_skip, attn_cache, proj_cache, drop_cache = cache
    dprojected = dropout_backward(dout, drop_cache)
    dmerged, grads_proj_w, grads_proj_b = linear_backward(dprojected, proj_cache)
    dq, dk, dv = scaled_dot_product_attention_backward(unmerge_heads(dmerged, num_heads),
                                                       attn_cache)  # (B, h, N, d) each
    if value_skip:  # v was used twice: in the attention and as the residual; sum both
        dv = dv + unmerge_heads(dout, num_heads)
    dqkv = xp.stack([dq, dk, dv], axis=0)  # (3, B, h, N, d)
    B, N = dout.shape[0], dout.shape[1]
    dqkv = xp.reshape(xp.permute_dims(dqkv, (1, 3, 0, 2, 4)), (B, N, -1))  # (B, N, 3E)
    dx, grad_qkv_w, grad_qkv_b = linear_backward(dqkv, qkv_cache)
    grads = {"qkv.weight": grad_qkv_w, "proj.weight": grads_proj_w, "proj.bias": grads_proj_b}
    if grad_qkv_b is not None:
        grads["qkv.bias"] = grad_qkv_b
    return dx, grads
