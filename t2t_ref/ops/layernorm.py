"""LayerNorm over the last axis: y = (x - mean) / sqrt(var + eps) * weight + bias.

Speed notes (the math is the textbook one; only how it is evaluated is tuned):
- Every per-row sum is a matrix-vector product with a constant column, x @ (1/D, ..., 1/D),
  instead of xp.mean(x, axis=-1): BLAS does it on every core in one pass, while a NumPy
  reduction over a short last axis runs on one core at a fraction of the memory bandwidth.
- Fresh temporaries are updated in place (xc *= rstd), so each step touches memory once.
  Only arrays this function made itself are ever written to, never the caller's.
"""

from ..backend import array_namespace, device_of

EPS = 1e-5  # PyTorch's nn.LayerNorm default, used by the official T2T-ViT


def _row_dot(x, column):
    """x (..., D) @ column (D, 1) -> (..., 1): one dot product per row, as a BLAS call."""
    xp = array_namespace(x)
    rows = xp.reshape(x, (-1, x.shape[-1]))  # (M, D)
    return xp.reshape(xp.matmul(rows, column), (*x.shape[:-1], 1))


def _column_sum(x):
    """x (..., D) -> (D,): the sum over every row, as a BLAS call ones (1, M) @ x (M, D)."""
    xp = array_namespace(x)
    rows = xp.reshape(x, (-1, x.shape[-1]))  # (M, D)
    ones = xp.ones((1, rows.shape[0]), dtype=x.dtype, device=device_of(x))
    return xp.reshape(xp.matmul(ones, rows), (x.shape[-1],))


def layernorm_forward(x, weight, bias, eps=EPS):
    """x (..., D), weight (D,), bias (D,) -> y (..., D).

    cache = (xhat, rstd, weight): the normalised input and 1/std, all the backward needs.
    """
    xp = array_namespace(x)
    D = x.shape[-1]
    mean_column = xp.full((D, 1), 1.0 / D, dtype=x.dtype, device=device_of(x))  # row means
    mean = _row_dot(x, mean_column)  # (..., 1)
    xhat = x - mean  # (..., D) centred for now
    var = _row_dot(xhat * xhat, mean_column)  # (..., 1) biased, as PyTorch
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat *= rstd  # (..., D) now normalised
    y = xhat * weight
    y += bias
    return y, (xhat, rstd, weight)


def layernorm_backward(dy, cache):
    """dy (..., D) -> (dx (..., D), dweight (D,), dbias (D,)).

    forward was y = xhat * w + b with xhat = (x - mean) * rstd. Write g = dy * w, the gradient
    w.r.t. xhat; then dx = rstd * (g - mean(g) - xhat * mean(g * xhat)): the two means remove
    the directions that the mean and the variance normalisation took out of x.
    Both means are row dots with w / D: mean(g) = dy . (w / D), mean(g * xhat) = (dy * xhat)
    . (w / D), so g * xhat is never formed, and dy * xhat is shared with dweight.
    """
    xhat, rstd, weight = cache
    xp = array_namespace(dy)
    D = dy.shape[-1]
    w_column = xp.reshape(weight, (D, 1)) / D  # (D, 1)
    dy_xhat = dy * xhat  # (..., D)
    dweight = _column_sum(dy_xhat)  # (D,)
    dbias = _column_sum(dy)  # (D,)
    g_mean = _row_dot(dy, w_column)  # (..., 1) mean(g)
    gx_mean = _row_dot(dy_xhat, w_column)  # (..., 1) mean(g * xhat)
    dx = dy * weight  # (..., D) g
    dx -= g_mean
    dx -= xhat * gx_mean
    dx *= rstd
    return dx, dweight, dbias
