"""Ghost attention (official Attention_ghost of t2t_vit_ghost.py): half the projections, the
other half made by cheap operations.

    q0 = x Wq^T               (B, N, D/2)    Wq (D/2, D), no bias; likewise k0, v0
    q  = [q0, c_q * q0]       (B, N, D)      cheap copy concatenated on the channel axis
    out = Dropout(proj(attention(q, k, v)))  multi-head, scale (D/h)^-0.5, as the backbone's

An official quirk to know when reading attention maps: the heads are cut from the
concatenated channels, so with h heads the first h/2 heads see the projected q0, k0, v0 and
the last h/2 only their per-channel rescaled copies (D/2 must be a multiple of D/h for a head
not to straddle both halves; at D = 384, h = 6 it is).
"""

from ..backend import array_namespace
from .attention import (merge_heads, scaled_dot_product_attention_backward,
                        scaled_dot_product_attention_forward, unmerge_heads)
from .cheap_operation import cheap_operation_backward, cheap_operation_forward
from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward

PROJECTIONS = ("q", "k", "v")


def ghost_attention_forward(x, params, num_heads, scale, *, proj_drop=0.0, rng=None,
                            training=False):
    """x (B, N, D) -> out (B, N, D).

    params: 'q.weight', 'k.weight', 'v.weight' (D/2, D), 'cheap_operation_q.weight' (and _k,
    _v) (D/2, 1, 1), 'proj.weight' (D, D), 'proj.bias' (D,).
    cache = (per projection: (linear cache, cheap cache), num_heads, attention's cache,
    proj's cache, dropout's cache).
    """
    xp = array_namespace(x)
    halves, heads = {}, []
    for name in PROJECTIONS:
        z, linear_cache = linear_forward(x, params[f"{name}.weight"])  # (B, N, D/2)
        copy, cheap_cache = cheap_operation_forward(z, params[f"cheap_operation_{name}.weight"])
        halves[name] = (linear_cache, cheap_cache)
        heads.append(unmerge_heads(xp.concat([z, copy], axis=-1), num_heads))  # (B, h, N, d)
    attended, attn_cache = scaled_dot_product_attention_forward(*heads, scale)  # (B, h, N, d)
    projected, proj_cache = linear_forward(merge_heads(attended), params["proj.weight"],
                                           params["proj.bias"])  # (B, N, D)
    out, drop_cache = dropout_forward(projected, proj_drop, rng, training)
    return out, (halves, num_heads, attn_cache, proj_cache, drop_cache)


def ghost_attention_backward(dout, cache):
    """dout (B, N, D) -> (dx (B, N, D), grads under the params' names).

    Each projection z0 reaches the attention twice, as itself and through its cheap copy
    c * z0, so dz0 = (gradient of the first half) + c * (gradient of the second half); and x
    feeds all three projections, so dx is the sum of their three backwards.
    """
    halves, num_heads, attn_cache, proj_cache, drop_cache = cache
    grads = {}
    dprojected = dropout_backward(dout, drop_cache)
    dmerged, grads["proj.weight"], grads["proj.bias"] = linear_backward(dprojected, proj_cache)
    dheads = scaled_dot_product_attention_backward(unmerge_heads(dmerged, num_heads),
                                                   attn_cache)  # dq, dk, dv (B, h, N, d)
    dx = None
    for name, dhead in zip(PROJECTIONS, dheads):
        linear_cache, cheap_cache = halves[name]
        dcat = merge_heads(dhead)  # (B, N, D)
        half = dcat.shape[-1] // 2
        dz, grads[f"cheap_operation_{name}.weight"] = cheap_operation_backward(
            dcat[..., half:], cheap_cache)  # the copy's share, (B, N, D/2)
        dz = dz + dcat[..., :half]  # plus z0's own
        dx_part, grads[f"{name}.weight"], _ = linear_backward(dz, linear_cache)  # (B, N, D)
        dx = dx_part if dx is None else dx + dx_part
    return dx, grads
