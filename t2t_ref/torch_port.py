"""PyTorch T2T-ViT: the numerical oracle of the tests and the benchmark's peer model.

Part of the package (the benchmark runs it against t2t_ref on any install), but never part of
the compute path: it needs PyTorch (the test extra, or pip install 't2t_ref[torch]') and only
the tests, the benchmark and the checkpoint tools import it.

A from-scratch re-implementation of the official T2T-ViT release
(yitu-opensource/T2T-ViT: models/t2t_vit.py, token_performer.py,
token_transformer.py, transformer_block.py; the backbone explorations
t2t_vit_se.py, t2t_vit_ghost.py, t2t_vit_dense.py; and the ViT of vit.py,
timm's) with no timm dependency.
Module and parameter names mirror the official code, so ``state_dict()`` keys
are exactly the official checkpoint keys (``tokens_to_token.attention1.w``,
``blocks.3.attn.qkv.weight``, ``head.weight``, ...), and construction consumes
the random number generator in the official order.

Deviations from the official code (all marked ``DEVIATION`` below):
- the performer does not cast to float32 (``x.float()``), so ``model.double()``
  runs entirely in float64;
- ``pos_embed`` is built in the default dtype (``.double()`` converts it);
- the factory ignores the official ``pretrained`` path and its
  ``qk_scale = D ** -0.5`` override (``qk_scale`` stays an explicit option);
- no ``print`` calls, no ``default_cfg``, and an image size that is not a
  multiple of 16 is refused up front.
"""
import math

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "DropPath", "Mlp", "Attention", "Block", "get_sinusoid_encoding",
    "Token_performer", "TokenAttention", "Token_transformer", "T2T_module",
    "T2T_ViT", "TORCH_VARIANTS", "create_torch_model",
    "SELayer", "AttentionSE", "BlockSE", "MlpGhost", "AttentionGhost", "BlockGhost",
    "Transition", "BlockDense", "T2T_ViT_Backbones", "PatchEmbed", "VisionTransformer",
    "BACKBONE_VARIANTS", "create_torch_backbone_model",
]


# ---------------------------------------------------------------------------
# transformer_block.py (timm-derived pieces)
# ---------------------------------------------------------------------------
class DropPath(nn.Module):
    """Per-sample stochastic depth, as timm's ``drop_path``: keep or zero whole
    samples, scale the kept ones by 1/keep_prob."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep_prob) * mask


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf) -> Dropout -> fc2 -> Dropout (one shared Dropout)."""

    def __init__(self, in_features, hidden_features=None, out_features=None,
                 act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """Backbone multi-head self-attention; qkv has no bias by default."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale  # official order: scale after the product
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN x)), x + DropPath(MLP(LN x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio),
                       act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def get_sinusoid_encoding(n_position, d_hid):
    """Sinusoid table (1, n_position, d_hid): angle p / 10000^(2*(j//2)/d_hid),
    sin on even channels, cos on odd. Computed in float64 NumPy as official;
    DEVIATION: returned in the default dtype instead of torch.FloatTensor."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(d_hid)
    table = pos / np.power(10000, 2 * (j // 2) / d_hid)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.get_default_dtype()).unsqueeze(0)


# ---------------------------------------------------------------------------
# token_performer.py
# ---------------------------------------------------------------------------
class Token_performer(nn.Module):
    """Single-head performer T2T layer (``dim`` = input width, ``in_dim`` = token width 64)."""

    def __init__(self, dim, in_dim, head_cnt=1, kernel_ratio=0.5, dp1=0.1, dp2=0.1):
        super().__init__()
        self.emb = in_dim * head_cnt
        self.kqv = nn.Linear(dim, 3 * self.emb)  # with bias, split order k, q, v
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.head_cnt = head_cnt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, 1 * self.emb),
            nn.GELU(),
            nn.Linear(1 * self.emb, self.emb),
            nn.Dropout(dp2),
        )
        self.m = int(self.emb * kernel_ratio)
        # Official: randn then orthogonal_ (both draw from the RNG), scaled by sqrt(m); fixed.
        w = torch.randn(self.m, self.emb)
        self.w = nn.Parameter(nn.init.orthogonal_(w) * math.sqrt(self.m), requires_grad=False)

    def prm_exp(self, x):
        # Positive random features: exp(w^T x - |x|^2 / 2) / sqrt(m); x (B,T,emb) -> (B,T,m).
        xd = ((x * x).sum(dim=-1, keepdim=True)).repeat(1, 1, self.m) / 2
        wtx = torch.einsum("bti,mi->btm", x, self.w)  # DEVIATION: official uses x.float()
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x):
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B,T,m)
        D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)  # (B,T,1)
        kptv = torch.einsum("bin,bim->bnm", v, kp)  # (B,emb,m); DEVIATION: official uses v.float()
        y = torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, self.emb) + self.epsilon)
        return v + self.dp(self.proj(y))  # skip connection through v (widths differ)

    def forward(self, x):
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------
# token_transformer.py
# ---------------------------------------------------------------------------
class TokenAttention(nn.Module):
    """The ``Attention`` of token_transformer.py (renamed here only to avoid a clash
    with the backbone Attention): qkv maps ``dim`` -> 3*``in_dim``, the scale comes
    from the *input* width (head_dim = dim // num_heads), and v is the skip."""

    def __init__(self, dim, num_heads=8, in_dim=None, qkv_bias=False, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.in_dim = in_dim
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, in_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.in_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # official order: scale q first
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.in_dim)
        x = self.proj_drop(self.proj(x))
        return v.squeeze(1) + x  # skip through v (single head)


class Token_transformer(nn.Module):
    def __init__(self, dim, in_dim, num_heads, mlp_ratio=1.0, qkv_bias=False, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = TokenAttention(dim, in_dim=in_dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                   qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(in_dim)
        self.mlp = Mlp(in_features=in_dim, hidden_features=int(in_dim * mlp_ratio),
                       out_features=in_dim, act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = self.attn(self.norm1(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------
# t2t_vit.py
# ---------------------------------------------------------------------------
class T2T_module(nn.Module):
    """Tokens-to-Token: soft split (7/4/2), T2T layer, soft split (3/2/1), T2T layer,
    soft split (3/2/1), project 64*9 -> embed_dim. ('convolution' type omitted.)"""

    def __init__(self, img_size=224, tokens_type="performer", in_chans=3, embed_dim=768, token_dim=64):
        super().__init__()
        self.soft_split0 = nn.Unfold(kernel_size=(7, 7), stride=(4, 4), padding=(2, 2))
        self.soft_split1 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.soft_split2 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        if tokens_type == "transformer":
            self.attention1 = Token_transformer(dim=in_chans * 7 * 7, in_dim=token_dim, num_heads=1, mlp_ratio=1.0)
            self.attention2 = Token_transformer(dim=token_dim * 3 * 3, in_dim=token_dim, num_heads=1, mlp_ratio=1.0)
        elif tokens_type == "performer":
            self.attention1 = Token_performer(dim=in_chans * 7 * 7, in_dim=token_dim, kernel_ratio=0.5)
            self.attention2 = Token_performer(dim=token_dim * 3 * 3, in_dim=token_dim, kernel_ratio=0.5)
        else:
            raise ValueError(f"unknown tokens_type {tokens_type!r}")
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.num_patches = (img_size // (4 * 2 * 2)) * (img_size // (4 * 2 * 2))

    def forward(self, x):
        x = self.soft_split0(x).transpose(1, 2)
        for attention, split in ((self.attention1, self.soft_split1), (self.attention2, self.soft_split2)):
            x = attention(x)  # re-structurization
            B, new_HW, C = x.shape
            side = int(np.sqrt(new_HW))
            x = x.transpose(1, 2).reshape(B, C, side, side)
            x = split(x).transpose(1, 2)  # soft split
        return self.project(x)


class T2T_ViT(nn.Module):
    def __init__(self, img_size=224, tokens_type="performer", in_chans=3, num_classes=1000,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False,
                 qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=nn.LayerNorm, token_dim=64):
        super().__init__()
        if img_size % 16:  # DEVIATION: official fails later with a shape mismatch
            raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim

        self.tokens_to_token = T2T_module(img_size=img_size, tokens_type=tokens_type, in_chans=in_chans,
                                          embed_dim=embed_dim, token_dim=token_dim)
        num_patches = self.tokens_to_token.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(get_sinusoid_encoding(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                  norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.cls_token, std=0.02)  # same algorithm/bounds (+-2) as timm's
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self):
        return {"cls_token"}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=""):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        B = x.shape[0]
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]  # class token

    def forward(self, x):
        return self.head(self.forward_features(x))


def _v(tokens_type, embed_dim, depth, num_heads, mlp_ratio):
    return dict(tokens_type=tokens_type, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, mlp_ratio=mlp_ratio)


# The eleven official registered models (t2t_vit.py), name -> T2T_ViT kwargs.
TORCH_VARIANTS = {
    "t2t_vit_7": _v("performer", 256, 7, 4, 2.0),
    "t2t_vit_10": _v("performer", 256, 10, 4, 2.0),
    "t2t_vit_12": _v("performer", 256, 12, 4, 2.0),
    "t2t_vit_14": _v("performer", 384, 14, 6, 3.0),
    "t2t_vit_19": _v("performer", 448, 19, 7, 3.0),
    "t2t_vit_24": _v("performer", 512, 24, 8, 3.0),
    "t2t_vit_t_14": _v("transformer", 384, 14, 6, 3.0),
    "t2t_vit_t_19": _v("transformer", 448, 19, 7, 3.0),
    "t2t_vit_t_24": _v("transformer", 512, 24, 8, 3.0),
    "t2t_vit_14_resnext": _v("performer", 384, 14, 32, 3.0),
    "t2t_vit_14_wide": _v("performer", 768, 4, 12, 3.0),
}


def create_torch_model(name, *, num_classes=1000, img_size=224, drop_rate=0.0,
                       drop_path_rate=0.0, qk_scale=None, **kwargs):
    """Build an official variant by name. DEVIATION: no ``pretrained`` path and no
    qk_scale override; extra ``kwargs`` (e.g. in_chans, attn_drop_rate) go to T2T_ViT."""
    if name in BACKBONE_VARIANTS:  # the backbone explorations and the ViTs (below)
        return create_torch_backbone_model(name, num_classes=num_classes, img_size=img_size,
                                           drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                           qk_scale=qk_scale, **kwargs)
    if name not in TORCH_VARIANTS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(TORCH_VARIANTS)}")
    return T2T_ViT(num_classes=num_classes, img_size=img_size, drop_rate=drop_rate,
                   drop_path_rate=drop_path_rate, qk_scale=qk_scale,
                   **TORCH_VARIANTS[name], **kwargs)


# ---------------------------------------------------------------------------
# t2t_vit_se.py: squeeze-and-excitation inside the attention
# ---------------------------------------------------------------------------
class SELayer(nn.Module):
    """Channel gate: mean over the tokens, Linear (no bias), ReLU, Linear (no bias), sigmoid,
    then every token's channels times the gate. DEVIATION: ReLU not in place (same values)."""

    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):  # x: (B, N, C)
        x = torch.transpose(x, 1, 2)  # (B, C, N)
        b, c, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1)
        x = x * y.expand_as(x)
        return torch.transpose(x, 1, 2)


class AttentionSE(Attention):
    """The official SE Attention: the gate between proj and proj_drop."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.se_layer = SELayer(dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.se_layer(self.proj(x)))


# ---------------------------------------------------------------------------
# t2t_vit_ghost.py: cheap operations in the attention and the MLP
# ---------------------------------------------------------------------------
class MlpGhost(nn.Module):
    """Official Mlp_ghost: fc1 D -> D, two depthwise 1x1 Conv1d copies, concat, fc2 3D -> D."""

    def __init__(self, in_features, hidden_features=None, out_features=None,
                 act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.ratio = hidden_features // in_features
        self.cheap_operation2 = nn.Conv1d(in_features, in_features, kernel_size=1,
                                          groups=in_features, bias=False)
        self.cheap_operation3 = nn.Conv1d(in_features, in_features, kernel_size=1,
                                          groups=in_features, bias=False)

    def forward(self, x):  # x: (B, N, C)
        x1 = self.act(self.fc1(x))
        x2 = self.act(self.cheap_operation2(x1.transpose(1, 2)).transpose(1, 2))
        x3 = self.act(self.cheap_operation3(x1.transpose(1, 2)).transpose(1, 2))
        x = self.drop(torch.cat((x1, x2, x3), dim=2))  # (B, N, 3C)
        return self.drop(self.fc2(x))


class AttentionGhost(nn.Module):
    """Official Attention_ghost: q, k, v of width D/2, each concatenated with its cheap copy."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        half_dim = int(0.5 * dim)
        self.q = nn.Linear(dim, half_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, half_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, half_dim, bias=qkv_bias)
        self.cheap_operation_q = nn.Conv1d(half_dim, half_dim, kernel_size=1, groups=half_dim, bias=False)
        self.cheap_operation_k = nn.Conv1d(half_dim, half_dim, kernel_size=1, groups=half_dim, bias=False)
        self.cheap_operation_v = nn.Conv1d(half_dim, half_dim, kernel_size=1, groups=half_dim, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        q1 = self.cheap_operation_q(q.transpose(1, 2)).transpose(1, 2)
        k1 = self.cheap_operation_k(k.transpose(1, 2)).transpose(1, 2)
        v1 = self.cheap_operation_v(v.transpose(1, 2)).transpose(1, 2)
        q = torch.cat((q, q1), dim=2).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = torch.cat((k, k1), dim=2).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = torch.cat((v, v1), dim=2).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class BlockSE(Block):
    """Block with the SE attention (official t2t_vit_se.Block)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                         drop_path, act_layer, norm_layer)
        self.attn = AttentionSE(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                attn_drop=attn_drop, proj_drop=drop)


class BlockGhost(Block):
    """Block with the ghost attention and MLP (official t2t_vit_ghost.Block)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                         drop_path, act_layer, norm_layer)
        self.attn = AttentionGhost(dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                   qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.mlp = MlpGhost(in_features=dim, hidden_features=int(dim * mlp_ratio),
                            act_layer=act_layer, drop=drop)


# ---------------------------------------------------------------------------
# t2t_vit_dense.py: dense connections
# ---------------------------------------------------------------------------
class Transition(nn.Module):
    """Linear then GELU: halves the width between two stages."""

    def __init__(self, in_features, out_features, act_layer=nn.GELU):
        super().__init__()
        self.act = act_layer()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.act(self.linear(x))


class BlockDense(Block):
    """Official dense Block: an ordinary block, then dense_linear to `growth_rate` channels,
    concatenated to the block's input x (not to its output)."""

    def __init__(self, growth_rate, dim, num_heads, mlp_ratio=4.0, qkv_bias=False,
                 qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                         drop_path, act_layer, norm_layer)
        self.dense_linear = nn.Linear(dim, growth_rate)

    def forward(self, x):
        new_x = x + self.drop_path(self.attn(self.norm1(x)))
        new_x = new_x + self.drop_path(self.mlp(self.norm2(new_x)))
        return torch.cat([x, self.dense_linear(new_x)], 2)


class T2T_ViT_Backbones(T2T_ViT):
    """T2T_ViT_SE, T2T_ViT_Ghost and T2T_ViT_Dense of the official code in one class: the T2T
    module, class token and sinusoid table of T2T_ViT, with `backbone` choosing the blocks.
    Dense quirks kept: stage i's blocks all get dpr[i] of linspace(0, rate, depth), depth
    the constructor's (12 by default, not the block count).
    DEVIATION: one class for the official three (their constructors differ only in the
    blocks), built on T2T_ViT, so it draws from the RNG in another order (the tests copy
    weights by state dict); no print of the end width."""

    def __init__(self, backbone, img_size=224, tokens_type="performer", num_classes=1000,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False,
                 qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 growth_rate=32, block_config=(3, 4, 6, 3)):
        super().__init__(img_size=img_size, tokens_type=tokens_type, num_classes=num_classes,
                         embed_dim=embed_dim, depth=1, num_heads=num_heads,
                         mlp_ratio=mlp_ratio)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        common = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate)
        self.pos_drop = nn.Dropout(p=drop_rate)
        if backbone == "dense":
            self.blocks = nn.ModuleList()
            start_dim = embed_dim
            for i, num_layers in enumerate(block_config):
                for j in range(num_layers):
                    new_dim = start_dim + j * growth_rate
                    self.blocks.append(BlockDense(growth_rate, new_dim, drop_path=dpr[i], **common))
                if i != len(block_config) - 1:
                    self.blocks.append(Transition(new_dim + growth_rate, (new_dim + growth_rate) // 2))
                    start_dim = int((new_dim + growth_rate) // 2)
            out_dim = new_dim + growth_rate
        else:
            block = {"se": BlockSE, "ghost": BlockGhost}[backbone]
            self.blocks = nn.ModuleList([block(embed_dim, drop_path=dpr[i], **common)
                                         for i in range(depth)])
            out_dim = embed_dim
        self.norm = nn.LayerNorm(out_dim)
        self.head = nn.Linear(out_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)


# ---------------------------------------------------------------------------
# vit.py: timm's VisionTransformer as the official repository copies it (vit_small_patch16_224)
# ---------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv2d(3, D, 16, stride 16), flattened to (B, G*G, D)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def _init_linear_and_norm(m):
    """timm's original _init_vit_weights: Linear trunc normal 0.02 and zero bias, LayerNorm 1
    and 0; anything else (the patch conv) keeps PyTorch's default."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class VisionTransformer(nn.Module):
    """The parts of timm's VisionTransformer that vit_small_patch16_224 uses: no distillation
    token, no representation layer, the original (non-jax) init: trunc normal 0.02 on the
    Linears (the head too), the class token and the learned pos_embed; the conv left at
    PyTorch's default. norm_layer is nn.LayerNorm (eps 1e-5): vit_small_patch16_224 passes it,
    overriding the class's default eps of 1e-6."""

    def __init__(self, img_size=224, patch_size=16, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(*[
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                  norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


# The backbone explorations and the ViTs, name -> constructor and kwargs.
BACKBONE_VARIANTS = {
    "t2t_vit_dense": ("dense", dict(growth_rate=64, block_config=(3, 6, 6, 4), embed_dim=128,
                                    num_heads=8, mlp_ratio=2.0)),
    "t2t_vit_14_se": ("se", dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)),
    "t2t_vit_16_ghost": ("ghost", dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0)),
    "vit_small_patch16_224": ("vit", dict(patch_size=16, embed_dim=768, depth=8, num_heads=8,
                                          mlp_ratio=3.0, qkv_bias=False)),
    "vit_7_patch16": ("vit", dict(patch_size=16, embed_dim=256, depth=7, num_heads=4,
                                  mlp_ratio=2.0, qkv_bias=False)),
}


def create_torch_backbone_model(name=None, *, backbone=None, num_classes=1000, img_size=224,
                                drop_rate=0.0, drop_path_rate=0.0, qk_scale=None, **kwargs):
    """A backbone exploration or a ViT by name, or by backbone ('se', 'ghost', 'dense',
    'vit') with the shape in kwargs (the small models of the tests)."""
    if name is not None:
        backbone, shape = BACKBONE_VARIANTS[name]
        kwargs = {**shape, **kwargs}
    common = dict(num_classes=num_classes, img_size=img_size, drop_rate=drop_rate,
                  drop_path_rate=drop_path_rate, qk_scale=qk_scale)
    if backbone == "vit":
        return VisionTransformer(**common, **kwargs)
    return T2T_ViT_Backbones(backbone, **common, **kwargs)
