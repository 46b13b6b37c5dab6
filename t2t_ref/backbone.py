"""The backbone: the layers between the position table and the final LayerNorm, for each
family of the paper's backbone study, with their state-dict entries, their cost, and their
forward and backward.

Every layer is a `blocks.i` of the official state dict:
    plain, se, ghost : `depth` blocks of width D (layers/block.py, by kind)
    dense            : stages of dense blocks, each adding `growth` channels, with a
                       transition halving the width between two stages (layers/dense_block.py,
                       ops/transition.py); `blocks` is one list, transitions included, so at
                       (3, 6, 6, 4) the transitions are blocks 3, 10 and 17.

Drop path grows linearly from 0 at the first block to drop_path_rate at the last, as
torch.linspace(0, rate, depth) in the official code, except in the dense backbone, where the
official constructor gives every block of stage s the rate dpr[s] of
dpr = linspace(0, rate, 12): its own `depth` argument, left at its default 12, not the number
of blocks (19). Reproduced here, as the official code trains it. (The official dense
constructor also prints its end width, and its reset_classifier builds a head of the start
width 128 instead of the end width 584; t2t_ref has neither: a new head is always made for
the model's `num_features`.)
"""

from dataclasses import dataclass

from .init import conv_default, linear_specs, norm_specs
from .layers.block import block_backward, block_forward
from .layers.dense_block import dense_block_backward, dense_block_forward
from .ops.transition import transition_backward, transition_forward

SE_REDUCTION = 16  # the SELayer's reduction: the gate's hidden width is D // 16
DENSE_DPR_POINTS = 12  # the dense constructor's default depth, which spaces its drop path rates


@dataclass(frozen=True)
class Layer:
    """One entry of `blocks`: what it is and its widths."""
    kind: str  # 'plain', 'se', 'ghost' (blocks), 'dense' (a dense block), 'transition'
    index: int  # i of blocks.i
    width: int  # input width
    out_width: int
    num_heads: int = 0
    hidden: int = 0  # the MLP's hidden width (ghost: 3D, the concatenation fc2 reads)
    scale: float = 0.0  # the attention's q k^T scale
    drop_path: float = 0.0

    @property
    def prefix(self):
        return f"blocks.{self.index}."


def backbone_layers(variant, drop_path_rate=0.0, qk_scale=None):
    """The layers of a Variant's backbone, in order."""
    def scale(width):  # the official `qk_scale or head_dim ** -0.5`, per block
        return qk_scale if qk_scale is not None else (width // variant.num_heads) ** -0.5

    h, r, depth = variant.num_heads, variant.mlp_ratio, variant.depth
    if variant.backbone != "dense":
        D = variant.embed_dim
        hidden = 3 * D if variant.backbone == "ghost" else int(D * r)
        return [Layer(variant.backbone, i, D, D, h, hidden, scale(D),
                      drop_path_rate * i / (depth - 1) if depth > 1 else 0.0)
                for i in range(depth)]
    dpr = [drop_path_rate * i / (DENSE_DPR_POINTS - 1) for i in range(DENSE_DPR_POINTS)]
    layers, width, g = [], variant.embed_dim, variant.growth
    for stage, blocks in enumerate(variant.stages):
        for _ in range(blocks):
            layers.append(Layer("dense", len(layers), width, width + g, h, int(width * r),
                                scale(width), dpr[stage]))
            width += g
        if stage < len(variant.stages) - 1:
            layers.append(Layer("transition", len(layers), width, width // 2))
            width //= 2
    return layers


# ---- state-dict entries: (name, shape, how to initialise) in the official order ------------

def layer_specs(layer):
    p, d = layer.prefix, layer.width
    if layer.kind == "transition":
        return linear_specs(p + "linear.", d, layer.out_width)
    if layer.kind == "ghost":
        half = d // 2
        attn = [(f"{p}attn.{n}.weight", (half, d), "trunc_normal") for n in "qkv"]
        attn += [(f"{p}attn.cheap_operation_{n}.weight", (half, 1, 1), conv_default(1))
                 for n in "qkv"]  # a depthwise 1x1 kernel has fan-in 1: uniform in +-1
        mlp = (linear_specs(p + "mlp.fc1.", d, d) + linear_specs(p + "mlp.fc2.", 3 * d, d)
               + [(f"{p}mlp.cheap_operation{i}.weight", (d, 1, 1), conv_default(1))
                  for i in (2, 3)])
    else:
        attn = linear_specs(p + "attn.qkv.", d, 3 * d, bias=False)
        mlp = linear_specs(p + "mlp.fc1.", d, layer.hidden) + \
            linear_specs(p + "mlp.fc2.", layer.hidden, d)
    attn += linear_specs(p + "attn.proj.", d, d)
    if layer.kind == "se":
        attn += linear_specs(p + "attn.se_layer.fc.0.", d, d // SE_REDUCTION, bias=False)
        attn += linear_specs(p + "attn.se_layer.fc.2.", d // SE_REDUCTION, d, bias=False)
    specs = norm_specs(p + "norm1.", d) + attn + norm_specs(p + "norm2.", d) + mlp
    if layer.kind == "dense":
        specs += linear_specs(p + "dense_linear.", d, layer.out_width - d)
    return specs


# ---- cost ---------------------------------------------------------------------------------

def layer_macs(layer, N):
    """Multiply-accumulates of the layer's matrix products for one image of N tokens.
    Elementwise work (LayerNorm, GELU, softmax, the cheap operations' and the SE gate's
    per-channel scales, the SE mean) is not counted, as everywhere in t2t_ref."""
    d = layer.width
    if layer.kind == "transition":
        return N * d * layer.out_width
    attention = 2 * N * N * d  # q k^T and P v, all heads together
    if layer.kind == "ghost":
        linears = N * (3 * d * (d // 2) + d * d + d * d + 3 * d * d)  # q k v, proj, fc1, fc2
    else:
        linears = N * (3 * d * d + d * d + 2 * d * layer.hidden)  # qkv, proj, fc1, fc2
    extra = 0
    if layer.kind == "se":
        extra = 2 * d * (d // SE_REDUCTION)  # the gate's two Linears, once per image
    elif layer.kind == "dense":
        extra = N * d * (layer.out_width - d)  # dense_linear
    return linears + attention + extra


# ---- forward and backward -----------------------------------------------------------------

def layer_forward(layer, h, params, *, drop=0.0, rng=None, training=False):
    """h (B, N, width) -> (B, N, out_width); params under the layer's local names."""
    if layer.kind == "transition":
        return transition_forward(h, params["linear.weight"], params["linear.bias"])
    options = dict(num_heads=layer.num_heads, scale=layer.scale, drop=drop,
                   drop_path=layer.drop_path, rng=rng, training=training)
    if layer.kind == "dense":
        return dense_block_forward(h, params, **options)
    return block_forward(h, params, kind=layer.kind, **options)


def layer_backward(layer, dout, cache):
    """dout (B, N, out_width) -> (dh (B, N, width), grads under the layer's local names)."""
    if layer.kind == "transition":
        dh, dweight, dbias = transition_backward(dout, cache)
        return dh, {"linear.weight": dweight, "linear.bias": dbias}
    if layer.kind == "dense":
        return dense_block_backward(dout, cache)
    return block_backward(dout, cache)
