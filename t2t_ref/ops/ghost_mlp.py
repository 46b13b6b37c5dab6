"""Ghost MLP (official Mlp_ghost of t2t_vit_ghost.py): one D -> D layer, two cheap copies.

    x1 = GELU(fc1(x))             (B, N, D)     fc1 Linear(D -> D), where the plain MLP has 3D
    x2 = GELU(c2 * x1)            (B, N, D)     cheap operations: per-channel scales
    x3 = GELU(c3 * x1)
    h  = Dropout([x1, x2, x3])    (B, N, 3D)    concatenated on the channel axis
    y  = Dropout(fc2(h))          (B, N, D)     fc2 Linear(3D -> D)

The official fc2 takes int(D * mlp_ratio) inputs while the concatenation has 3D: the module
works only at mlp_ratio 3 (variants.Variant refuses any other for a ghost backbone). GELU runs
twice on the copies' path: once in x1, again after the scale.
"""

from ..backend import array_namespace
from .cheap_operation import cheap_operation_backward, cheap_operation_forward
from .dropout import dropout_backward, dropout_forward
from .gelu import gelu_backward, gelu_forward
from .linear import linear_backward, linear_forward


def ghost_mlp_forward(x, params, *, drop=0.0, rng=None, training=False):
    """x (B, N, D) -> y (B, N, D).

    params: 'fc1.weight' (D, D), 'fc1.bias', 'fc2.weight' (D, 3D), 'fc2.bias',
    'cheap_operation2.weight', 'cheap_operation3.weight' (D, 1, 1).
    cache = (fc1, GELU 1, [(cheap, GELU) for x2, x3], hidden dropout, fc2, out dropout caches)
    """
    xp = array_namespace(x)
    h1, fc1_cache = linear_forward(x, params["fc1.weight"], params["fc1.bias"])  # (B, N, D)
    x1, gelu1_cache = gelu_forward(h1)
    parts, copies = [x1], []
    for name in ("cheap_operation2", "cheap_operation3"):
        scaled, cheap_cache = cheap_operation_forward(x1, params[f"{name}.weight"])
        copy, gelu_cache = gelu_forward(scaled)  # (B, N, D)
        parts.append(copy)
        copies.append((cheap_cache, gelu_cache))
    hidden = xp.concat(parts, axis=-1)  # (B, N, 3D)
    hidden, hidden_drop_cache = dropout_forward(hidden, drop, rng, training)
    y, fc2_cache = linear_forward(hidden, params["fc2.weight"], params["fc2.bias"])  # (B, N, D)
    y, out_drop_cache = dropout_forward(y, drop, rng, training)
    return y, (fc1_cache, gelu1_cache, copies, hidden_drop_cache, fc2_cache, out_drop_cache)


def ghost_mlp_backward(dy, cache):
    """dy (B, N, D) -> (dx (B, N, D), grads under the params' names).

    x1 is used three times (in the concatenation and by both cheap copies): its gradient is
    the sum of the three.
    """
    fc1_cache, gelu1_cache, copies, hidden_drop_cache, fc2_cache, out_drop_cache = cache
    grads = {}
    dy = dropout_backward(dy, out_drop_cache)
    dhidden, grads["fc2.weight"], grads["fc2.bias"] = linear_backward(dy, fc2_cache)
    dhidden = dropout_backward(dhidden, hidden_drop_cache)  # (B, N, 3D)
    D = dhidden.shape[-1] // 3
    dx1 = dhidden[..., :D]
    for i, (name, (cheap_cache, gelu_cache)) in enumerate(
            zip(("cheap_operation2", "cheap_operation3"), copies), start=1):
        dscaled = gelu_backward(dhidden[..., i * D:(i + 1) * D], gelu_cache)
        dx1_part, grads[f"{name}.weight"] = cheap_operation_backward(dscaled, cheap_cache)
        dx1 = dx1 + dx1_part
    dh1 = gelu_backward(dx1, gelu1_cache)
    dx, grads["fc1.weight"], grads["fc1.bias"] = linear_backward(dh1, fc1_cache)
    return dx, grads
