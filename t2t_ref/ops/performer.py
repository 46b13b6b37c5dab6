"""Performer attention: softmax attention approximated with positive random features.

The softmax kernel exp(q . k) is approximated by phi(q) . phi(k) with m random features
    phi(z) = exp(z W^T - |z|^2 / 2) / sqrt(m),   W (m, d) fixed (orthogonal rows * sqrt(m)).
Then attention needs no N x N map: with kp = phi(k), qp = phi(q) (B, N, m),
    y = qp (kp^T v) / (qp . sum_t kp_t + eps)
costs O(N m d) instead of O(N^2 d). This mirrors the official Token_performer.single_attn,
whose random-feature step it calls prm_exp.

In half precision (precision.py) the whole attention runs on float32 copies: in float16 the
exponent z W^T overflows past 11 (exp > 65504) and the epsilon 1e-8 is below float16's
smallest step (6e-8), so the denominator can be 0: the official code's NaNs (its issues #19,
#26, #65, #69). Tutorial 4 shows the numbers.
"""

import math

from ..backend import array_namespace
from ..gaps import is_half, matmul, wide
from .rows import row_dots, row_sum

EPS = 1e-8  # the official code's epsilon, "for stable in division"


def random_features_forward(z, w):
    """z (B, N, d), w (m, d) -> phi (B, N, m). cache = (z, w, phi)."""
    xp = array_namespace(z)
    m = w.shape[0]
    half_sq_norm = row_dots(z, z) * 0.5  # (B, N, 1)
    wz = _rows_matmul(z, xp.matrix_transpose(w))  # (B, N, m)
    wz -= half_sq_norm
    phi = xp.exp(wz)
    phi *= 1.0 / math.sqrt(m)  # (B, N, m)
    return phi, (z, w, phi)


def random_features_backward(dphi, cache):
    """dphi (B, N, m) -> dz (B, N, d). W is fixed and gets no gradient.

    forward was phi = exp(z W^T - |z|^2/2) / sqrt(m); with g = dphi * phi (the gradient at the
    exponent), dz = g W - sum_m(g) z, since d(|z|^2/2)/dz = z.
    """
    z, w, phi = cache
    g = dphi * phi  # (B, N, m)
    dz = _rows_matmul(g, w)  # (B, N, d)
    dz -= row_sum(g) * z
    return dz


def _rows_matmul(x, matrix):
    """x (B, N, a) @ matrix (a, b) -> (B, N, b) as one 2-D product over all B*N rows: one BLAS
    call instead of NumPy's loop over B (see linear.py)."""
    xp = array_namespace(x)
    B, N, a = x.shape
    return xp.reshape(matmul(xp.reshape(x, (B * N, a)), matrix), (B, N, matrix.shape[1]))


def performer_attention_forward(q, k, v, w, eps=EPS):
    """q, k (B, N, d), v (B, N, e), w (m, d) -> y (B, N, e).

    cache = the random-feature caches and the intermediates named below.
    """
    xp = array_namespace(q)
    if is_half(q.dtype):  # a float32 island; y back in the half type
        y, cache = performer_attention_forward(wide(q), wide(k), wide(v), wide(w), eps)
        return xp.astype(y, q.dtype), cache
    kp, kp_cache = random_features_forward(k, w)  # (B, N, m)
    qp, qp_cache = random_features_forward(q, w)  # (B, N, m)
    kp_sum = xp.sum(kp, axis=1)  # (B, m)
    denom = matmul(qp, kp_sum[:, :, None]) + eps  # (B, N, 1) qp . sum_t kp_t
    kptv = matmul(xp.matrix_transpose(v), kp)  # (B, e, m) sum_t v_t kp_t^T
    y = matmul(qp, xp.matrix_transpose(kptv))  # (B, N, e) the numerator, for now
    y /= denom  # (B, N, e)
    return y, (kp_cache, qp_cache, v, kp, qp, kp_sum, denom, kptv, y)


def performer_attention_backward(dy, cache):
    """dy (B, N, e) -> (dq, dk, dv).

    forward was y = numer / denom with numer = qp kptv^T, kptv = v^T kp, denom = qp kp_sum + eps:
      dnumer = dy / denom;  ddenom = -sum_e(dy * y) / denom
      dqp = dnumer kptv + ddenom kp_sum;  dkptv = dnumer^T qp
      dv = kp dkptv^T;  dkp = v dkptv + (sum_t ddenom_t qp_t) broadcast over tokens
    and kp, qp flow back through the random features.
    """
    if is_half(dy.dtype):  # the float32 island's backward
        xp = array_namespace(dy)
        return tuple(xp.astype(g, dy.dtype)
                     for g in performer_attention_backward(wide(dy), cache))
    kp_cache, qp_cache, v, kp, qp, kp_sum, denom, kptv, y = cache
    xp = array_namespace(dy)
    dnumer = dy / denom  # (B, N, e)
    ddenom = -row_dots(dy, y) / denom  # (B, N, 1)
    dqp = matmul(dnumer, kptv)  # (B, N, m)
    dqp += ddenom * kp_sum[:, None, :]
    dkptv = matmul(xp.matrix_transpose(dnumer), qp)  # (B, e, m)
    dv = matmul(kp, xp.matrix_transpose(dkptv))  # (B, N, e)
    dkp_sum = xp.sum(ddenom * qp, axis=1)  # (B, m)
    dkp = matmul(v, dkptv)  # (B, N, m)
    dkp += dkp_sum[:, None, :]
    dq = random_features_backward(dqp, qp_cache)
    dk = random_features_backward(dkp, kp_cache)
    return dq, dk, dv
