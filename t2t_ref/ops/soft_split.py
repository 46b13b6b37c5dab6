"""Soft split: unfold (im2col) and its adjoint fold (col2im), as torch.nn.Unfold / nn.Fold.

T2T-ViT's soft split cuts an image (B, C, H, W) into overlapping k x k windows moved by
`stride` over the zero-padded image. Each window becomes one token of C*k*k values, ordered
channel-major like torch.nn.Unfold: index c*k*k + i*k + j for channel c, window row i, column j.

Instead of looping over windows, we loop over the k*k *offsets* (i, j) inside a window: the
(i, j)-th value of every window is one strided slice of the padded image. k*k slices of a
whole grid beat Ho*Wo slices of a tiny window, and the twin in naive.py does the latter.
"""

from ..backend import array_namespace, device_of


def output_size(size, kernel, stride, padding):
    """Number of window positions along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def unfold(x, kernel, stride, padding):
    """x (B, C, H, W) -> columns (B, C*k*k, L), L = Ho*Wo windows in row-major order."""
    xp = array_namespace(x)
    B, C, H, W = x.shape
    k, s, p = kernel, stride, padding
    Ho, Wo = output_size(H, k, s, p), output_size(W, k, s, p)
    padded = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=x.dtype, device=device_of(x))
    padded[:, :, p:p + H, p:p + W] = x
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


def soft_split_forward(x, kernel, stride, padding):
    """Image (B, C, H, W) -> tokens (B, L, C*k*k): unfold, then tokens along axis 1.

    The tokens are a contiguous copy, not a transposed view of unfold's columns: every op
    after the split then reads contiguous memory (LayerNorm on the transposed view ran about 2x
    slower), and one transposing copy is cheaper than building the tokens' layout directly.
    cache = (image_size, kernel, stride, padding)
    """
    xp = array_namespace(x)
    cols = unfold(x, kernel, stride, padding)  # (B, C*k*k, L)
    B, CKK, L = cols.shape
    tokens = xp.reshape(xp.permute_dims(cols, (0, 2, 1)), (B, L, CKK), copy=True)  # (B, L, CKK)
    return tokens, (tuple(x.shape[2:]), kernel, stride, padding)


def soft_split_backward(dtokens, cache):
    """dtokens (B, L, C*k*k) -> dx (B, C, H, W): the transpose undone, then fold."""
    xp = array_namespace(dtokens)
    image_size, kernel, stride, padding = cache
    dcols = xp.permute_dims(dtokens, (0, 2, 1))  # (B, C*k*k, L)
    return fold(dcols, image_size, kernel, stride, padding)
