"""The dense backbone's transition (official Transition of t2t_vit_dense.py): between two
stages of dense blocks, halve the width the last stage grew to.

    y = GELU(x W^T + b)       x (B, N, w) -> y (B, N, w // 2)

DenseNet's transitions halve the channels with a 1x1 convolution; here a Linear over each
token does the same, and GELU follows it (the official forward runs linear, then act).
"""

from .gelu import gelu_backward, gelu_forward
from .linear import linear_backward, linear_forward


def transition_forward(x, weight, bias):
    """x (B, N, w), weight (w // 2, w), bias (w // 2,) -> y (B, N, w // 2).
    cache = (linear cache, GELU cache)"""
    h, linear_cache = linear_forward(x, weight, bias)  # (B, N, w // 2)
    y, gelu_cache = gelu_forward(h)
    return y, (linear_cache, gelu_cache)


def transition_backward(dy, cache):
    """dy (B, N, w // 2) -> (dx (B, N, w), dweight, dbias): GELU's backward, then Linear's."""
    linear_cache, gelu_cache = cache
    return linear_backward(gelu_backward(dy, gelu_cache), linear_cache)
