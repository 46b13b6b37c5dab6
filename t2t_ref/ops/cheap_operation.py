"""GhostNet's "cheap operation" as the official t2t_vit_ghost.py writes it: a depthwise 1x1
convolution without bias over the tokens' channels,

    nn.Conv1d(C, C, kernel_size=1, groups=C, bias=False) on x.transpose(1, 2)

Each output channel sees one input channel through one 1x1 kernel: it is a per-channel scale,
y[b, n, c] = w[c] x[b, n, c], with the weight stored as the convolution's (C, 1, 1). Ghost
modules use it to make a second set of features from the first for next to nothing.
"""

from ..backend import array_namespace
from ..gaps import wide


def cheap_operation_forward(x, weight):
    """x (B, N, C), weight (C, 1, 1) -> y (B, N, C). cache = (x, weight)."""
    xp = array_namespace(x)
    scale = xp.reshape(weight, (weight.shape[0],))  # (C,)
    return x * scale, (x, weight)


def cheap_operation_backward(dy, cache):
    """dy (B, N, C) -> (dx (B, N, C), dweight (C, 1, 1)).

    forward was y = x * w per channel, so dx = dy * w and dw[c] = the sum over every token of
    dy[..., c] x[..., c].
    """
    xp = array_namespace(dy)
    x, weight = cache
    C = weight.shape[0]
    dx = dy * xp.reshape(weight, (C,))
    dweight = xp.reshape(xp.sum(wide(dy * x), axis=(0, 1)), weight.shape)  # (C, 1, 1) summed
    # in float32 for half precision
    return dx, dweight
