"""Slow, obvious twins of the fast ops, for tests and for reading.

Each loops the way the math is written: unfold visits every window, fold adds every window
back, attention computes one query row at a time. The fast versions must agree with these.
They use plain NumPy on purpose: nothing clever to get wrong.
"""

import numpy as np

from .ops.soft_split import output_size


def unfold_loops(x, kernel, stride, padding):
    """x (B, C, H, W) -> (B, C*k*k, Ho*Wo), one window at a time."""
    B, C, H, W = x.shape
    k, s, p = kernel, stride, padding
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    padded = np.zeros((B, C, H + 2 * p, W + 2 * p), dtype=x.dtype)
    padded[:, :, p:p + H, p:p + W] = x
    cols = np.zeros((B, C * k * k, Ho * Wo), dtype=x.dtype)
    for oh in range(Ho):
        for ow in range(Wo):
            window = padded[:, :, oh * s:oh * s + k, ow * s:ow * s + k]  # (B, C, k, k)
            cols[:, :, oh * Wo + ow] = window.reshape(B, C * k * k)  # channel-major order
    return cols


def fold_loops(cols, image_size, kernel, stride, padding):
    """(B, C*k*k, Ho*Wo) -> (B, C, H, W), adding each window back where it was read."""
    H, W = image_size
    k, s, p = kernel, stride, padding
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    B, CKK, _ = cols.shape
    C = CKK // (k * k)
    padded = np.zeros((B, C, H + 2 * p, W + 2 * p), dtype=cols.dtype)
    for oh in range(Ho):
        for ow in range(Wo):
            window = cols[:, :, oh * Wo + ow].reshape(B, C, k, k)
            padded[:, :, oh * s:oh * s + k, ow * s:ow * s + k] += window
    return padded[:, :, p:p + H, p:p + W]


def attention_loops(q, k, v, scale):
    """q, k, v (B, h, N, d) -> (B, h, N, d), one query at a time with its own softmax."""
    B, h, N, d = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for head in range(h):
            for i in range(N):
                scores = np.array([q[b, head, i] @ k[b, head, j] * scale for j in range(N)])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, head, i] = sum(weights[j] * v[b, head, j] for j in range(N))
    return out
