"""The models create_model builds by name: the official T2T-ViT variants (models/t2t_vit.py),
the paper's backbone explorations (models/t2t_vit_se.py, t2t_vit_ghost.py, t2t_vit_dense.py)
and the plain ViT it compares against (models/vit.py, timm's vit_small_patch16_224).

A Variant is the whole shape of a model. Build one of your own (dataclasses.replace on an
official one is the easy way) and hand it to create_model for a model of another size: the
backbone study in miniature (tutorial 9) does that.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    tokens_type: str  # the stem: 'performer' or 'transformer' (T2T layers), 'patch' (ViT's)
    embed_dim: int  # D, the backbone width (dense: the width it starts at)
    depth: int  # number of backbone blocks (dense: of dense blocks, transitions not counted)
    num_heads: int  # h
    mlp_ratio: float  # MLP hidden width = mlp_ratio * D
    backbone: str = "plain"  # 'plain', 'se' (SENet), 'ghost' (GhostNet), 'dense' (DenseNet)
    growth: int = 0  # dense: channels each dense block adds
    stages: tuple = ()  # dense: dense blocks per stage, a transition between two stages

    def __post_init__(self):
        if self.tokens_type not in ("performer", "transformer", "patch"):
            raise ValueError(f"tokens_type must be 'performer', 'transformer' or 'patch', "
                             f"got {self.tokens_type!r}")
        if self.backbone not in ("plain", "se", "ghost", "dense"):
            raise ValueError(f"backbone must be 'plain', 'se', 'ghost' or 'dense', "
                             f"got {self.backbone!r}")
        if self.backbone == "dense":
            if not (self.growth > 0 and self.stages and sum(self.stages) == self.depth):
                raise ValueError(f"a dense backbone needs growth > 0 and stages summing to "
                                 f"depth {self.depth}, got growth {self.growth}, stages "
                                 f"{self.stages}")
            odd = [w for w in dense_widths(self) if w % self.num_heads]
            if odd:
                raise ValueError(f"every dense block's width must be divisible by num_heads "
                                 f"{self.num_heads}; these are not: {odd}")
        elif self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.backbone == "ghost" and (self.mlp_ratio != 3 or self.embed_dim % 2):
            # the official Mlp_ghost concatenates three D-wide copies into fc2, which takes
            # int(D * mlp_ratio) inputs: it runs only at ratio 3; its attention halves D
            raise ValueError(f"a ghost backbone needs mlp_ratio 3 and an even embed_dim, got "
                             f"{self.mlp_ratio} and {self.embed_dim}")


def dense_widths(variant):
    """The input widths of a dense backbone's blocks: each adds `growth` channels, and a
    transition between two stages halves the width (rounding down)."""
    widths, width = [], variant.embed_dim
    for stage, blocks in enumerate(variant.stages):
        for _ in range(blocks):
            widths.append(width)
            width += variant.growth
        if stage < len(variant.stages) - 1:
            width //= 2
    return widths


def dense(embed_dim, growth, stages, num_heads, mlp_ratio):
    return Variant("performer", embed_dim, sum(stages), num_heads, mlp_ratio, backbone="dense",
                   growth=growth, stages=tuple(stages))


VARIANTS = {
    "t2t_vit_7": Variant("performer", 256, 7, 4, 2.0),
    "t2t_vit_10": Variant("performer", 256, 10, 4, 2.0),
    "t2t_vit_12": Variant("performer", 256, 12, 4, 2.0),
    "t2t_vit_14": Variant("performer", 384, 14, 6, 3.0),
    "t2t_vit_19": Variant("performer", 448, 19, 7, 3.0),
    "t2t_vit_24": Variant("performer", 512, 24, 8, 3.0),
    "t2t_vit_t_14": Variant("transformer", 384, 14, 6, 3.0),
    "t2t_vit_t_19": Variant("transformer", 448, 19, 7, 3.0),
    "t2t_vit_t_24": Variant("transformer", 512, 24, 8, 3.0),
    # the backbone explorations (the paper's Section 4.2 and Table 6)
    "t2t_vit_14_resnext": Variant("performer", 384, 14, 32, 3.0),  # more heads, as ResNeXt
    "t2t_vit_14_wide": Variant("performer", 768, 4, 12, 3.0),  # shallow-wide, as Wide-ResNet
    "t2t_vit_dense": dense(128, 64, (3, 6, 6, 4), 8, 2.0),  # dense connections, as DenseNet
    "t2t_vit_14_se": Variant("performer", 384, 14, 6, 3.0, backbone="se"),  # as SENet
    # the official code builds it 16 deep (the paper's Table 6 says 14)
    "t2t_vit_16_ghost": Variant("performer", 384, 16, 6, 3.0, backbone="ghost"),  # as GhostNet
    # the plain ViT baseline: hard 16x16 patches, learned positions (the paper's ViT-S/16)
    "vit_small_patch16_224": Variant("patch", 768, 8, 8, 3.0),
    # a smaller plain ViT for small-image experiments: T2T-ViT-7's backbone under ViT's stem
    "vit_7_patch16": Variant("patch", 256, 7, 4, 2.0),
}


def list_models():
    """The names create_model accepts: the official T2T-ViTs in the official order, then the
    ViT baselines."""
    return list(VARIANTS)


def get_variant(name):
    """The Variant of a name; a Variant given is returned as it is."""
    if isinstance(name, Variant):
        return name
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
