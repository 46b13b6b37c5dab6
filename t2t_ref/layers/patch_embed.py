"""ViT's stem (timm's PatchEmbed): hard, non-overlapping 16x16 patches, each embedded by one
Linear map, image -> (B, G*G, D).

    image (B, 3, S, S)
    unfold k16 s16 p0                 -> (B, G*G, 768)     G = S/16, 3*16*16 values a patch
    Linear(768 -> D)                  -> (B, G*G, D)

timm writes it as Conv2d(3, D, kernel 16, stride 16): the same map, since a convolution whose
stride equals its kernel reads each patch once. Its weight is stored as the convolution's
(D, 3, 16, 16), whose flattening (channel, row, column) is the unfold's channel-major order,
so a reshape turns it into the Linear's (D, 768).
"""

from ..backend import array_namespace
from ..init import conv_default
from ..ops.linear import linear_backward, linear_forward
from ..ops.soft_split import soft_split_backward, soft_split_forward

PATCH = 16
PREFIX = "patch_embed.proj."


def patch_embed_specs(D, in_chans=3):
    """The conv's entries; left at PyTorch's default conv init by timm's original ViT init
    (its _init_vit_weights touches Linear and LayerNorm only)."""
    fan_in = in_chans * PATCH * PATCH
    return [(PREFIX + "weight", (D, in_chans, PATCH, PATCH), conv_default(fan_in)),
            (PREFIX + "bias", (D,), conv_default(fan_in))]


def patch_embed_forward(x, params):
    """x (B, 3, S, S) -> tokens (B, (S/16)^2, D). params: 'weight' (D, 3, 16, 16), 'bias'.
    cache = (split cache, linear cache, the conv weight's shape)"""
    xp = array_namespace(x)
    weight = params["weight"]
    patches, split_cache = soft_split_forward(x, PATCH, PATCH, 0)  # (B, G*G, 768)
    matrix = xp.reshape(weight, (weight.shape[0], -1))  # (D, 768)
    tokens, linear_cache = linear_forward(patches, matrix, params["bias"])  # (B, G*G, D)
    return tokens, (split_cache, linear_cache, weight.shape)


def patch_embed_backward(dtokens, cache):
    """dtokens (B, G*G, D) -> (dx (B, 3, S, S), grads {'weight', 'bias'})."""
    xp = array_namespace(dtokens)
    split_cache, linear_cache, weight_shape = cache
    dpatches, dmatrix, dbias = linear_backward(dtokens, linear_cache)
    grads = {"weight": xp.reshape(dmatrix, weight_shape), "bias": dbias}  # back to (D, 3, 16, 16)
    return soft_split_backward(dpatches, split_cache), grads
