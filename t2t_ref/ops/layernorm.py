"""LayerNorm over the last axis: y = (x - mean) / sqrt(var + eps) * weight + bias."""

from ..backend import array_namespace

EPS = 1e-5  # PyTorch's nn.LayerNorm default, used by the official T2T-ViT


def layernorm_forward(x, weight, bias, eps=EPS):
    """x (..., D), weight (D,), bias (D,) -> y (..., D).

    cache = (xhat, rstd, weight): the normalised input and 1/std, all the backward needs.
    """
    xp = array_namespace(x)
    mean = xp.mean(x, axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean  # (..., D)
    var = xp.mean(xc * xc, axis=-1, keepdims=True)  # (..., 1) biased, as PyTorch
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat = xc * rstd  # (..., D)
    y = xhat * weight + bias
    return y, (xhat, rstd, weight)


def layernorm_backward(dy, cache):
    """dy (..., D) -> (dx (..., D), dweight (D,), dbias (D,)).

    forward was y = xhat * w + b with xhat = (x - mean) * rstd. Write g = dy * w; then
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)): the two means remove the directions
    that the mean and the variance normalisation took out of x.
    """
    xhat, rstd, weight = cache
    xp = array_namespace(dy)
    d = dy.shape[-1]
    dweight = xp.sum(xp.reshape(dy * xhat, (-1, d)), axis=0)  # (D,)
    dbias = xp.sum(xp.reshape(dy, (-1, d)), axis=0)  # (D,)
    g = dy * weight  # (..., D) gradient w.r.t. xhat
    g_mean = xp.mean(g, axis=-1, keepdims=True)  # (..., 1)
    gx_mean = xp.mean(g * xhat, axis=-1, keepdims=True)  # (..., 1)
    dx = (g - g_mean - xhat * gx_mean) * rstd  # (..., D)
    return dx, dweight, dbias
