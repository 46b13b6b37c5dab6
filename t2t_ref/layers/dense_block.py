"""The dense block of the official t2t_vit_dense.py (DenseNet's dense connection in a
transformer): an ordinary pre-norm block of width d, whose result is squeezed to `growth`
new channels and appended to the block's *input*.

    h   = Block(x)                       (B, N, d)       attention and MLP, as block.py
    new = dense_linear(h)                (B, N, g)       Linear(d -> g), with bias
    out = [x, new]                       (B, N, d + g)   concatenated on the channel axis

So the width grows by g per block, and every later block reads every earlier block's
channels (x itself, not h, is what is kept: the official code concatenates the old x).
"""

from ..backend import array_namespace
from ..ops.linear import linear_backward, linear_forward
from . import sub_dict
from .block import block_backward, block_forward


def dense_block_forward(x, params, *, num_heads, scale, drop=0.0, drop_path=0.0, rng=None,
                        training=False):
    """x (B, N, d) -> (B, N, d + g). cache = (block cache, dense_linear cache, d)."""
    xp = array_namespace(x)
    block_params = {k: v for k, v in params.items() if not k.startswith("dense_linear.")}
    h, block_cache = block_forward(x, block_params, num_heads=num_heads, scale=scale,
                                   drop=drop, drop_path=drop_path, rng=rng,
                                   training=training)  # (B, N, d)
    dense = sub_dict(params, "dense_linear.")
    new, linear_cache = linear_forward(h, dense["weight"], dense["bias"])  # (B, N, g)
    return xp.concat([x, new], axis=-1), (block_cache, linear_cache, x.shape[-1])


def dense_block_backward(dout, cache):
    """dout (B, N, d + g) -> (dx (B, N, d), grads under the params' names).

    forward was out = [x, dense_linear(Block(x))]: the concatenation's backward splits dout
    by channel; x gets its own slice directly plus what flows back through the block.
    """
    block_cache, linear_cache, d = cache
    dh, dweight, dbias = linear_backward(dout[..., d:], linear_cache)  # (B, N, d)
    dx, grads = block_backward(dh, block_cache)
    grads["dense_linear.weight"], grads["dense_linear.bias"] = dweight, dbias
    return dx + dout[..., :d], grads
