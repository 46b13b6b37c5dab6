"""The backbone transformer block (official/timm Block), pre-norm:

    x = x + DropPath(Attn(LN1(x)));   x = x + DropPath(MLP(LN2(x)))
Attn: qkv Linear (no bias unless qkv_bias), h heads, scale (D/h)^-0.5 unless qk_scale,
proj Linear + Dropout(drop_rate). MLP: Linear, GELU, Dropout, Linear, Dropout.
"""

from ..ops.attention import self_attention_backward, self_attention_forward
from ..ops.dropout import drop_path_backward, drop_path_forward
from ..ops.layernorm import layernorm_backward, layernorm_forward
from ..ops.mlp import mlp_backward, mlp_forward
from . import add_prefix, sub_dict


def block_forward(x, params, *, num_heads, scale, drop=0.0, drop_path=0.0, rng=None,
                  training=False):
    """x (B, N, D) -> (B, N, D). cache holds each step's cache."""
    p = params
    u, ln1_cache = layernorm_forward(x, p["norm1.weight"], p["norm1.bias"])  # (B, N, D)
    a, attn_cache = self_attention_forward(u, sub_dict(p, "attn."), num_heads, scale,
                                           proj_drop=drop, rng=rng, training=training)
    a, dp1_cache = drop_path_forward(a, drop_path, rng, training)
    x = x + a  # (B, N, D)
    u, ln2_cache = layernorm_forward(x, p["norm2.weight"], p["norm2.bias"])
    m, mlp_cache = mlp_forward(u, p["mlp.fc1.weight"], p["mlp.fc1.bias"], p["mlp.fc2.weight"],
                               p["mlp.fc2.bias"], hidden_drop=drop, out_drop=drop, rng=rng,
                               training=training)  # (B, N, D)
    m, dp2_cache = drop_path_forward(m, drop_path, rng, training)
    return x + m, (ln1_cache, attn_cache, dp1_cache, ln2_cache, mlp_cache, dp2_cache)


def block_backward(dout, cache):
    """dout (B, N, D) -> (dx (B, N, D), grads under the params' names).

    Each residual x + f(x) passes dout straight through and adds f's backward.
    """
    ln1_cache, attn_cache, dp1_cache, ln2_cache, mlp_cache, dp2_cache = cache
    g = {}
    dm = drop_path_backward(dout, dp2_cache)
    du, g["mlp.fc1.weight"], g["mlp.fc1.bias"], g["mlp.fc2.weight"], g["mlp.fc2.bias"] = \
        mlp_backward(dm, mlp_cache)
    dx, g["norm2.weight"], g["norm2.bias"] = layernorm_backward(du, ln2_cache)
    dx = dx + dout
    da = drop_path_backward(dx, dp1_cache)
    du, attn_grads = self_attention_backward(da, attn_cache)
    g.update(add_prefix(attn_grads, "attn."))
    dx1, g["norm1.weight"], g["norm1.bias"] = layernorm_backward(du, ln1_cache)
    return dx + dx1, g
