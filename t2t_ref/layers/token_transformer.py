"""T2T layer, transformer kind (official Token_transformer): used by T2T-ViT_t-14/19/24.

    x (B, N, Din) -> x1 = v + proj(softmax(q k^T * Din^-0.5) v),  q, k, v from Linear(LN1(x))
    out = x1 + MLP(LN2(x1))            single head, qkv without bias, MLP hidden width = E
The scale uses the *input* width Din (147 or 576), not the head width 64: the official code
computes head_dim from `dim`, the input. The skip goes through v since Din != E.
"""

from ..ops.attention import self_attention_backward, self_attention_forward
from ..ops.layernorm import layernorm_backward, layernorm_forward
from ..ops.mlp import mlp_backward, mlp_forward
from . import add_prefix, sub_dict


def token_transformer_forward(x, params, *, rng=None, training=False):
    """x (B, N, Din) -> (B, N, E). No dropout: the official T2T module builds it with 0."""
    p = params
    d_in = x.shape[-1]
    u, ln1_cache = layernorm_forward(x, p["norm1.weight"], p["norm1.bias"])  # (B, N, Din)
    x1, attn_cache = self_attention_forward(u, sub_dict(p, "attn."), num_heads=1,
                                            scale=d_in ** -0.5, value_skip=True)  # (B, N, E)
    u2, ln2_cache = layernorm_forward(x1, p["norm2.weight"], p["norm2.bias"])
    m, mlp_cache = mlp_forward(u2, p["mlp.fc1.weight"], p["mlp.fc1.bias"],
                               p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return x1 + m, (ln1_cache, attn_cache, ln2_cache, mlp_cache)


def token_transformer_backward(dout, cache):
    """dout (B, N, E) -> (dx (B, N, Din), grads under the params' names)."""
    ln1_cache, attn_cache, ln2_cache, mlp_cache = cache
    g = {}
    du2, g["mlp.fc1.weight"], g["mlp.fc1.bias"], g["mlp.fc2.weight"], g["mlp.fc2.bias"] = \
        mlp_backward(dout, mlp_cache)
    dx1, g["norm2.weight"], g["norm2.bias"] = layernorm_backward(du2, ln2_cache)
    dx1 = dx1 + dout  # out = x1 + MLP(LN2(x1)): both paths
    du, attn_grads = self_attention_backward(dx1, attn_cache)  # the v skip is handled inside
    g.update(add_prefix(attn_grads, "attn."))
    dx, g["norm1.weight"], g["norm1.bias"] = layernorm_backward(du, ln1_cache)
    return dx, g
