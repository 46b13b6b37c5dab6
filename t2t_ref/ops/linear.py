"""Linear layer: y = x W^T + b, with W stored (out, in) as in PyTorch.

In half precision (precision.py) the products sum in float32 (gaps.matmul); y and dx are
half, the weight and bias gradients float32, as they go into the float32 gradient buffer.
"""

from ..backend import array_namespace
from ..gaps import matmul, wide_dtype
from .rows import column_sum


def linear_forward(x, weight, bias=None):
    """x (..., Din), weight (Dout, Din), bias (Dout,) or None -> y (..., Dout).

    cache = (x, weight, has_bias)
    """
    xp = array_namespace(x)
    # One (M, Din) @ (Din, Dout) product over all leading dims at once: a single BLAS call.
    # (A batched (B, N, Din) @ (Din, Dout) makes NumPy loop over B, slowly when W^T is a view.)
    rows = xp.reshape(x, (-1, x.shape[-1]))  # (M, Din)
    y = xp.reshape(matmul(rows, xp.matrix_transpose(weight)),
                   (*x.shape[:-1], weight.shape[0]))  # (..., Dout)
    if bias is not None:
        y += bias  # in place: y is the product just made
    return y, (x, weight, bias is not None)


def linear_backward(dy, cache):
    """dy (..., Dout) -> (dx (..., Din), dweight (Dout, Din), dbias (Dout,) or None).

    forward was y = x W^T + b, so dx = dy W, dW = sum over all rows of dy^T x, db = sum of dy.
    """
    x, weight, has_bias = cache
    xp = array_namespace(dy)
    d_out, d_in = weight.shape
    dy_rows = xp.reshape(dy, (-1, d_out))  # (M, Dout), M = all leading dims
    x_rows = xp.reshape(x, (-1, d_in))  # (M, Din)
    dx = xp.reshape(matmul(dy_rows, weight), x.shape)  # (..., Din)
    dweight = matmul(xp.matrix_transpose(dy_rows), x_rows,
                     out_dtype=wide_dtype(weight))  # (Dout, Din)
    dbias = column_sum(dy_rows) if has_bias else None  # (Dout,)
    return dx, dweight, dbias
