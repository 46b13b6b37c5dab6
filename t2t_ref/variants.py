"""The official T2T-ViT variants (models/t2t_vit.py of the official release)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    tokens_type: str  # 'performer' or 'transformer': the kind of the two T2T layers
    embed_dim: int  # D, the backbone width
    depth: int  # number of backbone blocks
    num_heads: int  # h
    mlp_ratio: float  # MLP hidden width = mlp_ratio * D


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
    "t2t_vit_14_resnext": Variant("performer", 384, 14, 32, 3.0),  # more heads, ResNeXt-style
    "t2t_vit_14_wide": Variant("performer", 768, 4, 12, 3.0),  # shallow-wide, for comparison
}


def list_models():
    """The names create_model accepts, in the official order."""
    return list(VARIANTS)


def get_variant(name):
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
