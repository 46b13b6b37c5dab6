"""The backbone transformer block (official/timm Block), pre-norm:

    x = x + DropPath(Attn(LN1(x)));   x = x + DropPath(MLP(LN2(x)))
Attn: qkv Linear (no bias unless qkv_bias), h heads, scale (D/h)^-0.5 unless qk_scale,
proj Linear + Dropout(drop_rate). MLP: Linear, GELU, Dropout, Linear, Dropout.

`kind` picks the attention and the MLP of the paper's backbone explorations; the residual
structure around them is the same in all:
    'plain' - as above (T2T-ViT, ViT, and the dense blocks)
    'se'    - the attention's output gated by squeeze-and-excitation (ops/se_gate.py)
    'ghost' - half-width projections and MLP with cheap copies (ops/ghost_attention.py,
              ops/ghost_mlp.py)
"""

from ..ops.attention import self_attention_backward, self_attention_forward
from ..ops.dropout import drop_path_backward, drop_path_forward
from ..ops.ghost_attention import ghost_attention_backward, ghost_attention_forward
from ..ops.ghost_mlp import ghost_mlp_backward, ghost_mlp_forward
from ..ops.layernorm import layernorm_backward, layernorm_forward
from ..ops.mlp import mlp_backward, mlp_forward
from ..ops.se_gate import se_attention_backward, se_attention_forward
from . import add_prefix, sub_dict


def _plain_mlp_forward(x, p, *, drop, rng, training):
    return mlp_forward(x, p["fc1.weight"], p["fc1.bias"], p["fc2.weight"], p["fc2.bias"],
                       hidden_drop=drop, out_drop=drop, rng=rng, training=training)


def _plain_mlp_backward(dy, cache):
    dx, dw1, db1, dw2, db2 = mlp_backward(dy, cache)
    return dx, {"fc1.weight": dw1, "fc1.bias": db1, "fc2.weight": dw2, "fc2.bias": db2}


# kind -> (attention forward, backward, MLP forward, backward); a flat tuple of functions, so
# that bench.py's profiler can time them through this table
KINDS = {
    "plain": (self_attention_forward, self_attention_backward,
              _plain_mlp_forward, _plain_mlp_backward),
    "se": (se_attention_forward, se_attention_backward, _plain_mlp_forward, _plain_mlp_backward),
    "ghost": (ghost_attention_forward, ghost_attention_backward,
              ghost_mlp_forward, ghost_mlp_backward),
}


def block_forward(x, params, *, num_heads, scale, drop=0.0, drop_path=0.0, rng=None,
                  training=False, kind="plain"):
    """x (B, N, D) -> (B, N, D). cache holds each step's cache, then the kind."""
    attn_forward, _, mlp_forward_, _ = KINDS[kind]
    p = params
    u, ln1_cache = layernorm_forward(x, p["norm1.weight"], p["norm1.bias"])  # (B, N, D)
    a, attn_cache = attn_forward(u, sub_dict(p, "attn."), num_heads, scale, proj_drop=drop,
                                 rng=rng, training=training)
    a, dp1_cache = drop_path_forward(a, drop_path, rng, training)
    x = x + a  # (B, N, D)
    u, ln2_cache = layernorm_forward(x, p["norm2.weight"], p["norm2.bias"])
    m, mlp_cache = mlp_forward_(u, sub_dict(p, "mlp."), drop=drop, rng=rng,
                                training=training)  # (B, N, D)
    m, dp2_cache = drop_path_forward(m, drop_path, rng, training)
    return x + m, (ln1_cache, attn_cache, dp1_cache, ln2_cache, mlp_cache, dp2_cache, kind)


def block_backward(dout, cache):
    """dout (B, N, D) -> (dx (B, N, D), grads under the params' names).

    Each residual x + f(x) passes dout straight through and adds f's backward.
    """
    ln1_cache, attn_cache, dp1_cache, ln2_cache, mlp_cache, dp2_cache, kind = cache
    _, attn_backward, _, mlp_backward_ = KINDS[kind]
    g = {}
    dm = drop_path_backward(dout, dp2_cache)
    du, mlp_grads = mlp_backward_(dm, mlp_cache)
    g.update(add_prefix(mlp_grads, "mlp."))
    dx, g["norm2.weight"], g["norm2.bias"] = layernorm_backward(du, ln2_cache)
    dx = dx + dout
    da = drop_path_backward(dx, dp1_cache)
    du, attn_grads = attn_backward(da, attn_cache)
    g.update(add_prefix(attn_grads, "attn."))
    dx1, g["norm1.weight"], g["norm1.bias"] = layernorm_backward(du, ln1_cache)
    return dx + dx1, g
