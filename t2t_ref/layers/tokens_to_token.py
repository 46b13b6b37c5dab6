"""The tokens-to-token module (official T2T_module): T2T-ViT's stem, image -> (B, G*G, D).

Shapes for a 224 x 224 input (at size S the grids are S/4, S/8, S/16):

    image (B, 3, 224, 224)
    soft split 0: unfold k7 s4 p2     -> (B, 3136, 147)      56 x 56 tokens of 3*7*7 values
    T2T layer 1 (performer/transformer) -> (B, 3136, 64)
    re-structurize                    -> (B, 64, 56, 56)
    soft split 1: unfold k3 s2 p1     -> (B, 784, 576)       28 x 28 tokens of 64*3*3
    T2T layer 2                       -> (B, 784, 64) -> (B, 64, 28, 28)
    soft split 2: unfold k3 s2 p1     -> (B, 196, 576)       14 x 14 tokens
    project Linear(576 -> D)          -> (B, 196, D)
"""

import math

from ..backend import array_namespace
from ..init import linear_specs, norm_specs
from ..ops.linear import linear_backward, linear_forward
from ..ops.soft_split import soft_split_backward, soft_split_forward
from . import add_prefix, sub_dict, token_performer, token_transformer

TOKEN_DIM = 64  # width of the T2T layers' output tokens
PERFORMER_FEATURES = 32  # m = int(TOKEN_DIM * kernel_ratio 0.5)
# (kernel, stride, padding) of the three soft splits; together they shrink the grid 16x
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
T2T_LAYERS = {  # tokens_type -> (forward, backward) of the T2T layer kind
    "performer": (token_performer.token_performer_forward,
                  token_performer.token_performer_backward),
    "transformer": (token_transformer.token_transformer_forward,
                    token_transformer.token_transformer_backward),
}
PREFIX = "tokens_to_token."


def tokens_to_token_specs(tokens_type, D):
    """(name, shape, how to initialise) of the module's state-dict entries, official order."""
    E, specs = TOKEN_DIM, []
    for layer, d_in in (("attention1", 3 * 7 * 7), ("attention2", E * 3 * 3)):
        p = f"{PREFIX}{layer}."
        if tokens_type == "performer":
            specs += ([(p + "w", (PERFORMER_FEATURES, E), "orthogonal")]
                      + linear_specs(p + "kqv.", d_in, 3 * E) + linear_specs(p + "proj.", E, E)
                      + norm_specs(p + "norm1.", d_in) + norm_specs(p + "norm2.", E)
                      + linear_specs(p + "mlp.0.", E, E) + linear_specs(p + "mlp.2.", E, E))
        else:
            specs += (norm_specs(p + "norm1.", d_in)
                      + linear_specs(p + "attn.qkv.", d_in, 3 * E, bias=False)
                      + linear_specs(p + "attn.proj.", E, E) + norm_specs(p + "norm2.", E)
                      + linear_specs(p + "mlp.fc1.", E, E) + linear_specs(p + "mlp.fc2.", E, E))
    return specs + linear_specs(PREFIX + "project.", E * 3 * 3, D)


def is_fixed(name):
    """The performers' random features `w` are fixed (stored, never trained)."""
    return name.startswith(PREFIX) and name.endswith(".w")


def tokens_to_token_forward(x, params, tokens_type, *, rng=None, training=False):
    """x (B, 3, S, S) -> tokens (B, (S/16)^2, D).

    params: every tensor under 'tokens_to_token.' (the fixed `w` too), prefix removed.
    cache: {'split0': ..., 'attention1': ..., 'split1': ..., ..., 'project': ...}
    """
    t2t_forward = T2T_LAYERS[tokens_type][0]
    cache = {}
    tokens, cache["split0"] = soft_split_forward(x, *SOFT_SPLITS[0])  # (B, S/4^2, 147)
    for i, layer in ((1, "attention1"), (2, "attention2")):
        tokens, cache[layer] = t2t_forward(tokens, sub_dict(params, f"{layer}."), rng=rng,
                                           training=training)  # (B, N, 64)
        image = tokens_to_image(tokens)  # (B, 64, side, side) re-structurize
        tokens, cache[f"split{i}"] = soft_split_forward(image, *SOFT_SPLITS[i])  # (B, N/4, 576)
    tokens, cache["project"] = linear_forward(tokens, params["project.weight"],
                                              params["project.bias"])  # (B, G*G, D)
    cache["tokens_type"] = tokens_type
    return tokens, cache


def tokens_to_token_backward(dtokens, cache):
    """dtokens (B, G*G, D) -> (dx (B, 3, S, S), grads under the local names; `w` gets none)."""
    t2t_backward = T2T_LAYERS[cache["tokens_type"]][1]
    g = {}
    dtokens, g["project.weight"], g["project.bias"] = linear_backward(dtokens, cache["project"])
    for i, layer in ((2, "attention2"), (1, "attention1")):
        dimage = soft_split_backward(dtokens, cache[f"split{i}"])  # (B, 64, side, side)
        dtokens = image_to_tokens(dimage)  # (B, side*side, 64)
        dtokens, layer_grads = t2t_backward(dtokens, cache[layer])
        g.update(add_prefix(layer_grads, f"{layer}."))
    return soft_split_backward(dtokens, cache["split0"]), g  # (B, 3, S, S)


def tokens_to_image(tokens):
    """Re-structurize: (B, N, C) tokens of a square grid -> image (B, C, sqrt N, sqrt N)."""
    xp = array_namespace(tokens)
    B, N, C = tokens.shape
    side = math.isqrt(N)
    return xp.reshape(xp.permute_dims(tokens, (0, 2, 1)), (B, C, side, side))


def image_to_tokens(image):
    """The inverse of tokens_to_image: (B, C, H, W) -> (B, H*W, C)."""
    xp = array_namespace(image)
    B, C, H, W = image.shape
    return xp.permute_dims(xp.reshape(image, (B, C, H * W)), (0, 2, 1))
