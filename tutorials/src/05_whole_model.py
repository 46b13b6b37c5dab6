# %% [markdown]
# # 5. The whole model, shape by shape
#
# Notebooks 1 to 4 built the pieces. Here we assemble T2T-ViT-7 by hand from the project's ops
# and layers, walk a photograph through it printing every shape, and check that the result is
# the very same logits as `model.forward`. Then we count: parameters and multiply-accumulates
# (MACs), layer by layer, for every official variant, against the official table; and we put the
# deep-narrow T2T-ViT-14 next to the shallow-wide variant the paper compared it with.
#
# Shape letters: B batch, N tokens, D backbone width, h heads, K classes.

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from skimage import data

import t2t_ref
from t2t_ref.data import eval_transform
from t2t_ref.layers import sub_dict
from t2t_ref.layers.block import block_forward
from t2t_ref.layers.token_performer import token_performer_forward
from t2t_ref.model import SOFT_SPLITS, TOKEN_DIM
from t2t_ref.ops.layernorm import layernorm_forward
from t2t_ref.ops.linear import linear_forward
from t2t_ref.ops.soft_split import soft_split_forward
from t2t_ref.variants import VARIANTS

plt.rcParams.update({"figure.dpi": 80})

# %% [markdown]
# ## A photograph through T2T-ViT-7
# The image goes through the project's evaluation transform (resize to 248, centre crop 224,
# ImageNet mean and std), then through a freshly initialised T2T-ViT-7 with 1000 classes. Every
# line below is one step of `T2TViT.forward` (t2t_ref/model.py), spelled out.

# %%
model = t2t_ref.create_model("t2t_vit_7", num_classes=1000, img_size=224, seed=0).eval()
p, buffers, variant = model.params, model.buffers, model.variant
photo = Image.fromarray(data.astronaut())
x = eval_transform(photo, 224)[None]                       # (B, 3, 224, 224) float32


def show(step, array, note=""):
    print(f"{step:46s} {str(tuple(array.shape)):>20}  {note}")


def t2t_layer_params(layer):
    """The params and fixed buffers of one T2T layer, without their checkpoint prefix."""
    prefix = f"tokens_to_token.{layer}."
    return {**sub_dict(p, prefix), **sub_dict(buffers, prefix)}


B = x.shape[0]
show("image", x)
tokens, _ = soft_split_forward(x, *SOFT_SPLITS[0])
show("soft split 0 (k7 s4 p2)", tokens, "56x56 tokens of 3*7*7")
token_images = []
for i, layer in ((1, "attention1"), (2, "attention2")):
    tokens, _ = token_performer_forward(tokens, t2t_layer_params(layer))
    show(f"T2T layer {i} (performer)", tokens, f"width {TOKEN_DIM}")
    side = math.isqrt(tokens.shape[1])
    image = np.transpose(tokens, (0, 2, 1)).reshape(B, TOKEN_DIM, side, side)
    token_images.append(image)
    show("re-structurize: tokens -> image", image)
    tokens, _ = soft_split_forward(image, *SOFT_SPLITS[i])
    show(f"soft split {i} (k3 s2 p1)", tokens, f"{side // 2}x{side // 2} tokens of 64*3*3")
tokens, _ = linear_forward(tokens, p["tokens_to_token.project.weight"], p["tokens_to_token.project.bias"])
show("project Linear(576 -> D)", tokens)
cls = np.broadcast_to(p["cls_token"], (B, 1, variant.embed_dim))
h = np.concatenate([cls, tokens], axis=1)
show("prepend the class token", h)
h = h + buffers["pos_embed"]
show("+ position table (fixed sinusoids)", h, f"pos_embed {tuple(buffers['pos_embed'].shape)}")
for i in range(variant.depth):
    h, cache = block_forward(h, sub_dict(p, f"blocks.{i}."), num_heads=variant.num_heads, scale=model.scale)
    if i == 0:
        q, k, v, attention_map, _ = cache[1][3]              # the attention cache inside block 0
        show("  block 0: q, k, v (per head)", q, f"{variant.num_heads} heads of width {q.shape[-1]}")
        show("  block 0: attention map", attention_map)
        show("  block 0: MLP hidden", cache[4][0][0] @ p["blocks.0.mlp.fc1.weight"].T,
             f"mlp ratio {variant.mlp_ratio}")
    show(f"block {i}", h)
h, _ = layernorm_forward(h, p["norm.weight"], p["norm.bias"])
show("final LayerNorm", h)
show("class token", h[:, 0])
logits, _ = linear_forward(h[:, 0], p["head.weight"], p["head.bias"])
show("head Linear(D -> K)", logits)

reference = model.forward(x)
print("\nthe walk's logits are bit-for-bit model.forward's:", np.array_equal(logits, reference))
assert np.array_equal(logits, reference), "the walk's logits differ from model.forward's"

# %% [markdown]
# The re-structurized token images are worth a look even untrained: each T2T layer maps every
# token on its own (LayerNorm, Linear, MLP) plus a weak global mix (at initialisation q and k are
# small, so the performer's attention is nearly uniform), so the 64 channels still show the
# photograph's layout.

# %%
fig, axes = plt.subplots(2, 6, figsize=(16, 5.8))
for row, (image, title) in enumerate(zip(token_images, ("after T2T layer 1: 56x56", "after T2T layer 2: 28x28"))):
    for col, channel in enumerate([0, 1, 2, 3, 4, 5]):
        ax = axes[row, col]
        ax.imshow(image[0, channel], cmap="gray")
        ax.set(title=f"{title}\nchannel {channel}", xlabel="token column", ylabel="token row")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** at initialisation the T2T module is close to a token-wise map of overlapping
# windows: layer 1's channels are mixed, blurred versions of the photograph on the 56x56 grid,
# and after layer 2 (576 inputs mixed by random weights) the layout is still there, fainter;
# training turns these channels into feature detectors (notebook 6).

# %% [markdown]
# ## Counting parameters
# Every parameter, by formula, from the architecture (the official models/t2t_vit.py). For a T2T
# layer of input width $d_{in}$ and output width $E = 64$:
#
# - performer: $W$ fixed (32 x 64); LN1 $2 d_{in}$; kqv $3E d_{in} + 3E$; proj $E^2 + E$; LN2 $2E$;
#   MLP $2(E^2 + E)$;
# - transformer: the same, but qkv has no bias and there is no $W$.
#
# Then project $576 D + D$, class token $D$, position table $(N + 1) D$ (fixed), and per block
# $2 \cdot 2D$ (two LayerNorms) $+ 3D^2$ (qkv, no bias) $+ D^2 + D$ (proj)
# $+ 2 r D^2 + rD + D$ (MLP), then the final LayerNorm $2D$ and the head $DK + K$.

# %%
def count_parameters(variant, img_size=224, num_classes=1000):
    """(trained, fixed) parameter counts per component, by formula."""
    E, m, D, r = TOKEN_DIM, 32, variant.embed_dim, variant.mlp_ratio
    performer = variant.tokens_type == "performer"
    parts = {}
    for name, d_in in (("T2T layer 1", 147), ("T2T layer 2", 576)):
        qkv = 3 * E * d_in + (3 * E if performer else 0)
        parts[name] = (2 * d_in + qkv + E * E + E + 2 * E + 2 * (E * E + E), m * E if performer else 0)
    parts["project"] = (576 * D + D, 0)
    tokens = (img_size // 16) ** 2 + 1
    parts["class token, positions"] = (D, tokens * D)
    hidden = int(D * r)
    parts["blocks"] = (variant.depth * (4 * D + 3 * D * D + D * D + D + 2 * D * hidden + hidden + D), 0)
    parts["norm, head"] = (2 * D + D * num_classes + num_classes, 0)
    return parts


OFFICIAL = {  # (all, trained) parameters of the official models, counted in the official code
    "t2t_vit_7": (4_310_222, 4_255_694), "t2t_vit_10": (5_889_230, 5_834_702),
    "t2t_vit_12": (6_941_902, 6_887_374), "t2t_vit_14": (21_545_550, 21_465_806),
    "t2t_vit_19": (39_177_422, 39_085_070), "t2t_vit_24": (64_105_934, 64_000_974),
    "t2t_vit_t_14": (21_541_070, 21_465_422), "t2t_vit_t_19": (39_172_942, 39_084_686),
    "t2t_vit_t_24": (64_101_454, 64_000_590), "t2t_vit_14_resnext": (21_545_550, 21_465_806),
    "t2t_vit_14_wide": (25_156_302, 25_000_910)}

parts = count_parameters(variant)
print("T2T-ViT-7, by component (trained + fixed):")
for name, (trained, fixed) in parts.items():
    print(f"  {name:24s} {trained:>10,} + {fixed:>7,} fixed")
trained = sum(t for t, _ in parts.values())
total = trained + sum(f for _, f in parts.values())
print(f"  {'total':24s} {trained:>10,} trained, {total:,} in all")
print(f"model.num_parameters(): {model.num_parameters(trainable_only=True):,} trained, "
      f"{model.num_parameters():,} in all\n")
assert (trained, total) == (model.num_parameters(trainable_only=True), model.num_parameters()), "parameter formula != model.num_parameters()"

print(f"{'variant':20s} {'formula (all)':>14} {'official (all)':>15} {'formula (trained)':>18} {'official':>11}")
for name, official in OFFICIAL.items():
    parts = count_parameters(VARIANTS[name])
    trained = sum(t for t, _ in parts.values())
    total = trained + sum(f for _, f in parts.values())
    match = "ok" if (total, trained) == official else "MISMATCH"
    print(f"{name:20s} {total:>14,} {official[0]:>15,} {trained:>18,} {official[1]:>11,}  {match}")
    assert match == "ok", f"{name}: the formula's parameter count differs from the official one"

# %% [markdown]
# ## Counting multiply-accumulates
# The usual convention (and the one that reproduces the official table) counts the
# multiply-accumulates of the **matrix products**: Linear layers, $QK^\top$ and $PV$, the
# performer's products; elementwise work (softmax, LayerNorm, GELU, exp) is left out. An
# (n x k) @ (k x m) product costs $nkm$ MACs. Per image:
#
# - a T2T layer on N tokens: $N(3E d_{in} + 3E^2)$ for its Linears (qkv, proj, two MLP
#   layers); plus $2N^2E$ for full attention ($QK^\top$ and $PV$), or $N(4Em + m)$ for the
#   performer ($\phi(Q)$, $\phi(K)$, $\phi(K)^\top V$, the numerator, the denominator);
# - a block on N tokens: $N(3D^2 + D^2 + 2rD^2)$ for its Linears, $2N^2D$ for attention.

# %%
def count_macs(variant, img_size=224, num_classes=1000):
    """Multiply-accumulates of the matrix products of one forward pass of one image, by component."""
    E, m, D, r = TOKEN_DIM, 32, variant.embed_dim, variant.mlp_ratio
    parts = {}
    for name, N, d_in in (("T2T layer 1", (img_size // 4) ** 2, 147), ("T2T layer 2", (img_size // 8) ** 2, 576)):
        linears = N * 3 * E * d_in + N * E * E + 2 * N * E * E            # qkv, proj, 2 MLP layers
        if variant.tokens_type == "performer":
            attention = 2 * N * E * m + N * m + N * E * m + N * m * E    # phi(q), phi(k), denominator, K^T V, numerator
        else:
            attention = 2 * N * N * E                                    # Q K^T and P V
        parts[name] = linears + attention
    N = (img_size // 16) ** 2
    parts["project"] = N * 576 * D
    N += 1
    parts["blocks: Linears"] = variant.depth * N * (3 * D * D + D * D + 2 * int(r * D) * D)
    parts["blocks: attention"] = variant.depth * 2 * N * N * D
    parts["head"] = D * num_classes
    return parts

# %% [markdown]
# A formula is only as good as its check. `t2t_ref`'s ops all take their matrix product from the
# array namespace (`xp.matmul`), so for one forward pass we can wrap NumPy's `matmul` in the
# array-API namespace with a counter and let the real model count for us. Two kinds of call are
# not the layers' multiply-adds and are left out: LayerNorm's and softmax's row sums, which
# `ops/rows.py` computes as 2-D matrix-vector products (a single row or column out; the model's
# own 2-D products have B*N rows and at least 2 columns here: a batch of 2 in one thread).

# %%
import array_api_compat.numpy as xp_numpy


def measured_macs(model, x):
    """Run model.forward(x) with xp.matmul counting n*k*m for every matrix product; MACs per
    image. x needs at least 2 images; the model runs it whole, in one thread."""
    original, macs = xp_numpy.matmul, []

    def counting_matmul(a, b, **kwargs):
        out = original(a, b, **kwargs)
        if not (out.ndim == 2 and 1 in out.shape):              # not a row or column sum
            macs.append(math.prod(out.shape) * a.shape[-1])
        return out

    xp_numpy.matmul = counting_matmul
    try:
        model.forward(x)
    finally:
        xp_numpy.matmul = original
    return sum(macs) // x.shape[0]


small_t = t2t_ref.create_model("t2t_vit_t_14", num_classes=10, img_size=64, seed=0).eval()
for name, m_, x_, size, classes in (("t2t_vit_7", model, np.concatenate([x, x]), 224, 1000),
                                     ("t2t_vit_t_14", small_t, np.zeros((2, 3, 64, 64), np.float32), 64, 10)):
    formula, counted = sum(count_macs(VARIANTS[name], size, classes).values()), measured_macs(m_, x_)
    print(f"{name} at {size}x{size}: formula {formula:,} MACs, counted in a real forward {counted:,}")
    assert counted == formula, "the formula misses some products"

# %%
PAPER_GMACS = {  # the official release's table (ImageNet, 224x224)
    "t2t_vit_7": 1.1, "t2t_vit_10": 1.5, "t2t_vit_12": 1.8, "t2t_vit_14": 4.8, "t2t_vit_19": 8.5,
    "t2t_vit_24": 13.8, "t2t_vit_t_14": 6.1, "t2t_vit_t_19": 9.8, "t2t_vit_t_24": 15.0}
print(f"{'variant':14s} {'ours (G)':>9} {'official (G)':>13} {'params':>8}")
for name, paper in PAPER_GMACS.items():
    ours = sum(count_macs(VARIANTS[name]).values()) / 1e9
    print(f"{name:14s} {ours:9.2f} {paper:13.1f} {OFFICIAL[name][0] / 1e6:7.1f}M")
    # the table rounds to 0.1 G: ours must round to its figure, but for T2T-ViT-24 (13.66)
    if name == "t2t_vit_24":
        assert abs(ours - paper) / paper < 0.011, f"{name}: {ours:.3f} G against {paper}"
    else:
        assert round(ours, 1) == paper, f"{name}: {ours:.3f} G does not round to {paper}"

names = list(PAPER_GMACS)
components = list(count_macs(VARIANTS["t2t_vit_7"]))
fig, (ax_cmp, ax_parts) = plt.subplots(1, 2, figsize=(15, 4.8))
positions = np.arange(len(names))
ax_cmp.bar(positions - 0.2, [sum(count_macs(VARIANTS[n]).values()) / 1e9 for n in names], 0.4, label="counted here")
ax_cmp.bar(positions + 0.2, [PAPER_GMACS[n] for n in names], 0.4, label="official table")
ax_cmp.set_xticks(positions, [n.replace("t2t_vit_", "") for n in names])
ax_cmp.set(title="GMACs per 224x224 image", xlabel="variant (t2t_vit_...)", ylabel="GMACs")
ax_cmp.legend()
bottom = np.zeros(len(names))
for component in components:
    values = np.array([count_macs(VARIANTS[n])[component] / 1e9 for n in names])
    ax_parts.bar(positions, values, 0.6, bottom=bottom, label=component)
    bottom += values
ax_parts.set_xticks(positions, [n.replace("t2t_vit_", "") for n in names])
ax_parts.set(title="where the MACs go", xlabel="variant (t2t_vit_...)", ylabel="GMACs")
ax_parts.legend(fontsize=8)
for ax in (ax_cmp, ax_parts):
    ax.grid(alpha=0.3, axis="y")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** counting only matrix products reproduces the official table: rounded to one
# decimal as the table is, eight of the nine variants give its figure, and T2T-ViT-24 comes to
# 13.66 against its 13.8 (1% apart). In the performer models the T2T module costs little,
# while the transformer kind (`_t_`) pays about 1.3 GMACs for the first layer's 3136 x 3136
# attention.

# %% [markdown]
# ## Deep-narrow vs shallow-wide
# For the same budget, the paper's exploration found a *deep-narrow* backbone (small D, many
# blocks) better than a *shallow-wide* one, and T2T-ViT follows it. `t2t_vit_14_wide` is the
# shallow-wide counterpart of T2T-ViT-14: D = 768 with 4 blocks instead of D = 384 with 14. What
# the two cost, counted and measured (forward of one 224x224 image on this machine's CPU;
# accuracy needs ImageNet training and is not reproduced here):

# %%
pair = {}
for name in ("t2t_vit_14", "t2t_vit_14_wide"):
    v = VARIANTS[name]
    m_ = t2t_ref.create_model(name, num_classes=1000, img_size=224, seed=0).eval()
    started = time.perf_counter()
    m_.forward(x)
    seconds = time.perf_counter() - started
    pair[name] = (count_parameters(v), count_macs(v), seconds)
    params = sum(t for t, _ in pair[name][0].values())
    print(f"{name:16s} D = {v.embed_dim:3d}, depth {v.depth:2d}, heads {v.num_heads:2d}: "
          f"{params / 1e6:5.1f}M trained parameters, {sum(pair[name][1].values()) / 1e9:4.2f} GMACs, "
          f"forward {seconds * 1e3:5.0f} ms")
    del m_

fig, (ax_p, ax_m) = plt.subplots(1, 2, figsize=(13, 4.4))
for ax, index, unit in ((ax_p, 0, "trained parameters (millions)"), (ax_m, 1, "GMACs per image")):
    left = np.zeros(2)
    for component in pair["t2t_vit_14"][index]:
        values = []
        for name in pair:
            value = pair[name][index][component]
            values.append((value[0] if index == 0 else value) / (1e6 if index == 0 else 1e9))
        ax.barh([0, 1], values, left=left, label=component)
        left += np.array(values)
    ax.set_yticks([0, 1], ["deep-narrow\nT2T-ViT-14", "shallow-wide\nT2T-ViT-14-wide"])
    ax.set(xlabel=unit, title=unit.split(" (")[0] + " by component")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=3)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** the shallow-wide model spends more parameters and more MACs (a block's cost
# grows with $D^2$, so 4 blocks at 768 outweigh 14 at 384); the deep-narrow one is cheaper and,
# per the paper, the more accurate of the two.
#
# ## What we saw
# - T2T-ViT's forward is a short list of the project's ops; walking it by hand gives exactly
#   `model.forward`'s logits.
# - Parameter counts follow from the architecture by formula and match the official ones for
#   all eleven variants.
# - Counting matrix-product MACs reproduces the official GMACs; the count was checked by
#   instrumenting `matmul` in a real forward pass.
#
# Next, [notebook 6](06_training_and_looking_inside.ipynb): train a model and look inside it.
