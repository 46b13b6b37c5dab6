"""Soft split: unfold (im2col) and its adjoint fold (col2im), as torch.nn.Unfold / nn.Fold.

T2T-ViT's soft split cuts an image (B, C, H, W) into overlapping k x k windows moved by
`stride` over the zero-padded image. Each window becomes one token of C*k*k values, ordered
channel-major like torch.nn.Unfold: index c*k*k + i*k + j for channel c, window row i, column j.

Instead of looping over windows, we loop over the k*k *offsets* (i, j) inside a window: the
(i, j)-th value of every window is one strided slice of the padded image. k*k slices of a
whole grid beat Ho*Wo slices of a tiny window, and the twin in naive.py does the latter.

On a GPU every slice is a kernel launch: fold is k*k read-modify-write passes (49 for the
first split), and unfold's columns are copied once more into the tokens' layout. There the
same maps are one gather each (`tokens_by_gather`, `fold_by_gather`): index arrays, computed
once per shape on the host, say which padded-image element each token value is, and which
token values each pixel's gradient sums (at most ceil(k/s)^2 of them). Tested equal to the
slices on every backend. The forward's gather also serves NumPy: writing the tokens once, in
their layout, timed 2-4x faster than the slices and the transposing copy (the op alone, on the
2-core Xeon of BENCHMARKS.md; about 3% of a T2T-ViT-7 forward there, median of 6 interleaved
forwards, not a bench configuration); the backward's gather reads m times the gradient and was
slower there, so NumPy keeps fold. array_api_strict runs the plain versions.
"""

import math

import numpy as np

from ..backend import array_namespace, backend_name, device_of
from ..device_cache import DeviceCache
from ..gaps import where

GATHER_FORWARD = ("numpy", "cupy")  # backends whose soft split makes tokens by a gather
GATHER_BACKWARD = ("cupy",)  # and whose backward is a gather too (fewer launches)


def output_size(size, kernel, stride, padding):
    """Number of window positions along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def unfold(x, kernel, stride, padding):
    """x (B, C, H, W) -> columns (B, C*k*k, L), L = Ho*Wo windows in row-major order."""
    xp = array_namespace(x)
    B, C, H, W = x.shape
    k, s, p = kernel, stride, padding
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    padded = pad(x, p)
    # the (i, j)-th entry of every window: rows i, i+s, ..., cols j, j+s, ...
    offsets = [padded[:, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s]  # (B, C, Ho, Wo)
               for i in range(k) for j in range(k)]
    cols = xp.stack(offsets, axis=2)  # (B, C, k*k, Ho, Wo)
    return xp.reshape(cols, (B, C * k * k, Ho * Wo))


def fold(cols, image_size, kernel, stride, padding):
    """The adjoint of unfold: columns (B, C*k*k, L) -> image (B, C, H, W).

    Every window adds its values back where unfold read them. Windows overlap when
    stride < kernel, so a pixel read by several windows receives the *sum* of their
    gradients; the padding border is cut off at the end.
    """
    xp = array_namespace(cols)
    H, W = image_size
    k, s, p = kernel, stride, padding
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    B, CKK, L = cols.shape
    C = CKK // (k * k)
    # a copy in this layout (the backward's columns are a transposed view of the tokens): each
    # of the k*k adds below then reads contiguous rows instead of striding over every token
    cols = xp.reshape(cols, (B, C, k * k, Ho, Wo), copy=True)
    padded = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=cols.dtype, device=device_of(cols))
    for i in range(k):
        for j in range(k):
            rows, columns = slice(i, i + s * (Ho - 1) + 1, s), slice(j, j + s * (Wo - 1) + 1, s)
            padded[:, :, rows, columns] += cols[:, :, i * k + j, :, :]
    return padded[:, :, p:p + H, p:p + W]


# ---- the same maps as gathers ------------------------------------------------------------

def pad(x, padding):
    """x (B, C, H, W) -> (B, C, H+2p, W+2p), zeros around."""
    xp = array_namespace(x)
    B, C, H, W = x.shape
    p = padding
    padded = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=x.dtype, device=device_of(x))
    padded[:, :, p:p + H, p:p + W] = x
    return padded


def token_sources(C, H, W, k, s, p):
    """(L*C*k*k,) int: for each value of the tokens (L, C*k*k) of one image, its element in
    the flattened padded image (C, H+2p, W+2p): channel c, row ho*s + i, column wo*s + j."""
    Hp, Wp = H + 2 * p, W + 2 * p
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    ho, wo, c, i, j = np.ix_(np.arange(Ho), np.arange(Wo), np.arange(C), np.arange(k),
                             np.arange(k))
    return (c * (Hp * Wp) + (ho * s + i) * Wp + (wo * s + j)).reshape(-1)  # (Ho,Wo,C,k,k)


def pixel_sources(C, H, W, k, s, p):
    """-> (index (C*H*W*m,) int, valid (C*H*W, m) bool), m = ceil(k/s)^2: for each pixel
    (c, y, x) of one image, the token values (flattened (L, C*k*k)) that unfold made of it,
    padded to m with index 0 where valid is False. Row y + p of the padded image is row i of
    the windows ho with ho*s + i = y + p, 0 <= i < k, 0 <= ho < Ho; columns likewise."""
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    m = math.ceil(k / s)

    def windows(size, count):  # (size, m) window index and offset, and their validity
        y = np.arange(size)[:, None] + p  # padded coordinate
        first = np.maximum(0, -(-(y - (k - 1)) // s))  # the first window reaching y
        window = first + np.arange(m)[None, :]
        offset = y - window * s
        ok = (window < count) & (offset >= 0) & (offset < k)
        return np.where(ok, window, 0), np.where(ok, offset, 0), ok

    ho, i, ok_y = windows(H, Ho)  # (H, m)
    wo, j, ok_x = windows(W, Wo)  # (W, m)
    c = np.arange(C)[:, None, None, None, None]
    # (C, H, W, m, m): token (ho, wo), value c*k*k + i*k + j
    index = ((ho[None, :, None, :, None] * Wo + wo[None, None, :, None, :]) * (C * k * k)
             + c * (k * k) + i[None, :, None, :, None] * k + j[None, None, :, None, :])
    valid = ok_y[None, :, None, :, None] & ok_x[None, None, :, None, :]
    valid = np.broadcast_to(valid, index.shape)
    return np.where(valid, index, 0).reshape(-1), valid.reshape(C * H * W, m * m)


_INDEX = DeviceCache()  # (what, shape...) -> index arrays on the device: made once


def _on_device(xp, device, key, make):
    """make()'s host arrays as arrays of xp on device, kept for the next call with key."""
    return _INDEX.get(xp, device, key, lambda: tuple(
        xp.asarray(a.astype(np.int32 if a.dtype.kind == "i" and a.size and
                            a.max() < 2 ** 31 else a.dtype), device=device)
        for a in make()))


def tokens_by_gather(x, kernel, stride, padding):
    """As soft_split_forward's tokens: x (B, C, H, W) -> tokens (B, L, C*k*k), made by one
    gather from the padded image, straight into the tokens' layout."""
    xp = array_namespace(x)
    B, C, H, W = x.shape
    k, s, p = kernel, stride, padding
    (sources,) = _on_device(xp, device_of(x), ("tokens", C, H, W, k, s, p),
                            lambda: (token_sources(C, H, W, k, s, p),))
    flat = xp.reshape(pad(x, p), (B, -1))  # (B, C*Hp*Wp)
    L = output_size(H, k, s, p) * output_size(W, k, s, p)
    return xp.reshape(xp.take(flat, sources, axis=1), (B, L, C * k * k))


def fold_by_gather(dtokens, image_size, kernel, stride, padding):
    """As soft_split_backward: dtokens (B, L, C*k*k) -> dx (B, C, H, W), each pixel the sum
    of the token values unfold made of it (a gather and a sum over m = ceil(k/s)^2)."""
    xp = array_namespace(dtokens)
    H, W = image_size
    k, s, p = kernel, stride, padding
    B, L, CKK = dtokens.shape
    C = CKK // (k * k)
    sources, valid = _on_device(xp, device_of(dtokens), ("pixels", C, H, W, k, s, p),
                                lambda: pixel_sources(C, H, W, k, s, p))
    flat = xp.reshape(dtokens, (B, L * CKK))
    m = valid.shape[1]
    taken = xp.reshape(xp.take(flat, sources, axis=1), (B, C * H * W, m))
    zero = xp.zeros((), dtype=dtokens.dtype, device=device_of(dtokens))
    taken = where(valid, taken, zero)  # (B, C*H*W, m), in the gradient's dtype
    dx = taken[:, :, 0]
    for a in range(1, m):  # m <= 4 for T2T's splits: adds in the gradient's own dtype, as
        dx = dx + taken[:, :, a]  # fold's, rather than a reduction
    return xp.reshape(dx, (B, C, H, W))


def soft_split_forward(x, kernel, stride, padding):
    """Image (B, C, H, W) -> tokens (B, L, C*k*k): unfold, then tokens along axis 1.

    The tokens are contiguous, not a transposed view of unfold's columns: every op after the
    split then reads contiguous memory (LayerNorm on the transposed view ran about 2x slower).
    NumPy and CuPy build them in that layout directly, with one gather (tokens_by_gather, the
    faster way there: the module docstring); other backends unfold, then copy transposed.
    cache = (image_size, kernel, stride, padding)
    """
    xp = array_namespace(x)
    cache = (tuple(x.shape[2:]), kernel, stride, padding)
    if backend_name(xp) in GATHER_FORWARD:
        return tokens_by_gather(x, kernel, stride, padding), cache
    cols = unfold(x, kernel, stride, padding)  # (B, C*k*k, L)
    B, CKK, L = cols.shape
    tokens = xp.reshape(xp.permute_dims(cols, (0, 2, 1)), (B, L, CKK), copy=True)  # (B, L, CKK)
    return tokens, cache


def soft_split_backward(dtokens, cache):
    """dtokens (B, L, C*k*k) -> dx (B, C, H, W): the transpose undone, then fold (on CuPy
    one gather and a sum over each pixel's windows instead, fold_by_gather)."""
    xp = array_namespace(dtokens)
    image_size, kernel, stride, padding = cache
    if backend_name(xp) in GATHER_BACKWARD:
        return fold_by_gather(dtokens, image_size, kernel, stride, padding)
    dcols = xp.permute_dims(dtokens, (0, 2, 1))  # (B, C*k*k, L)
    return fold(dcols, image_size, kernel, stride, padding)
