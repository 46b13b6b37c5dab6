"""T2T layer, performer kind (official Token_performer): used by T2T-ViT-7/10/12/14/19/24.

    x (B, N, Din) -> u = LN1(x) -> k, q, v = split(Linear(u))     (k, q, v order!)
    x1 = v + Dropout(proj(performer_attention(q, k, v)))          (skip through v: Din != E)
    out = x1 + MLP(LN2(x1))                     MLP: Linear, GELU, Linear, Dropout
Its two dropouts are 0.1 in the official code, whatever the model's drop_rate.
"""

from ..backend import array_namespace
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.layernorm import layernorm_backward, layernorm_forward
from ..ops.linear import linear_backward, linear_forward
from ..ops.mlp import mlp_backward, mlp_forward
from ..ops.performer import performer_attention_backward, performer_attention_forward

DROPOUT = 0.1  # dp1 and dp2 of the official Token_performer


def token_performer_forward(x, params, *, rng=None, training=False):
    """x (B, N, Din) -> (B, N, E), E = 64 in T2T-ViT. cache holds each step's cache."""
    p = params
    E = p["proj.weight"].shape[0]
    u, ln1_cache = layernorm_forward(x, p["norm1.weight"], p["norm1.bias"])  # (B, N, Din)
    kqv, kqv_cache = linear_forward(u, p["kqv.weight"], p["kqv.bias"])  # (B, N, 3E)
    k, q, v = kqv[..., :E], kqv[..., E:2 * E], kqv[..., 2 * E:]  # (B, N, E) each
    y, perf_cache = performer_attention_forward(q, k, v, p["w"])  # (B, N, E)
    y, proj_cache = linear_forward(y, p["proj.weight"], p["proj.bias"])  # (B, N, E)
    y, drop_cache = dropout_forward(y, DROPOUT, rng, training)
    x1 = v + y  # (B, N, E)
    u2, ln2_cache = layernorm_forward(x1, p["norm2.weight"], p["norm2.bias"])
    m, mlp_cache = mlp_forward(u2, p["mlp.0.weight"], p["mlp.0.bias"], p["mlp.2.weight"],
                               p["mlp.2.bias"], out_drop=DROPOUT, rng=rng, training=training)
    out = x1 + m  # (B, N, E)
    return out, (ln1_cache, kqv_cache, perf_cache, proj_cache, drop_cache, ln2_cache, mlp_cache)


def token_performer_backward(dout, cache):
    """dout (B, N, E) -> (dx (B, N, Din), grads under the params' names).

    'w' is fixed and gets no gradient."""
    xp = array_namespace(dout)
    ln1_cache, kqv_cache, perf_cache, proj_cache, drop_cache, ln2_cache, mlp_cache = cache
    g = {}
    # out = x1 + MLP(LN2(x1)): x1 reaches out twice, so its gradient is the sum
    du2, g["mlp.0.weight"], g["mlp.0.bias"], g["mlp.2.weight"], g["mlp.2.bias"] = \
        mlp_backward(dout, mlp_cache)
    dx1, g["norm2.weight"], g["norm2.bias"] = layernorm_backward(du2, ln2_cache)
    dx1 = dx1 + dout
    # x1 = v + Dropout(proj(y)): v gets the skip's gradient on top of the attention's
    dy = dropout_backward(dx1, drop_cache)
    dy, g["proj.weight"], g["proj.bias"] = linear_backward(dy, proj_cache)
    dq, dk, dv = performer_attention_backward(dy, perf_cache)
    dv = dv + dx1
    dkqv = xp.concat([dk, dq, dv], axis=-1)  # (B, N, 3E) in the forward's k, q, v order
    du, g["kqv.weight"], g["kqv.bias"] = linear_backward(dkqv, kqv_cache)
    dx, g["norm1.weight"], g["norm1.bias"] = layernorm_backward(du, ln1_cache)
    return dx, g
