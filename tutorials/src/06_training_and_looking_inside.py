# %% [markdown]
# # 6. Training, and looking inside
#
# Time to learn something. We train T2T-ViT-7 for a few hundred steps on the built-in shapes
# dataset (drawn by `t2t_ref.data`, nothing to download) with an explicit loop made of the
# project's pieces: `cross_entropy`, `model.backward`, `clip_grad_norm`, `AdamW` and
# `CosineSchedule`. For comparison we build a **plain ViT** from the same ops: the same backbone,
# same initial weights, but a hard 16x16 patch split instead of the T2T module. Then we look
# inside both: the class token's attention over the image, the gradient of the prediction with
# respect to the pixels, and the channels of the tokenizers' outputs, the analysis the paper uses
# to argue that T2T learns local structure.
#
# Everything is sized to run on two CPU cores in a minute or two: 32x32 images, four classes,
# 250 steps of 32 images. Expect modest accuracy: this is a glimpse of training, not a result.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import t2t_ref
from t2t_ref.data import IMAGENET_MEAN, IMAGENET_STD, SHAPE_CLASSES, make_shapes_splits
from t2t_ref.init import trunc_normal
from t2t_ref.layers import add_prefix, sub_dict
from t2t_ref.layers.block import block_backward, block_forward
from t2t_ref.layers.token_performer import token_performer_forward
from t2t_ref.model import SOFT_SPLITS
from t2t_ref.ops.layernorm import layernorm_backward, layernorm_forward
from t2t_ref.ops.linear import linear_backward, linear_forward
from t2t_ref.ops.soft_split import soft_split_backward, soft_split_forward
from t2t_ref.optim import AdamW, clip_grad_norm
from t2t_ref.schedule import CosineSchedule

plt.rcParams.update({"figure.dpi": 80})
SIZE, CLASSES, STEPS, BATCH, LR = 32, 4, 250, 32, 5e-4
print("classes:", SHAPE_CLASSES[:CLASSES])

# %% [markdown]
# ## The data
# `make_shapes_splits` draws every image fresh: one shape in two random colours (the shape in
# the lighter one) plus noise, so only the outline tells the class. We use the first four
# classes (disc, ring, square, hollow square: round or square, filled or hollow) and draw
# exactly as many training images as the run consumes, so no image is seen twice and no
# augmentation is needed.

# %%
(train_images, train_labels), (val_images, val_labels), names = make_shapes_splits(
    STEPS * BATCH, 512, SIZE, seed=0, num_classes=CLASSES)
print("train", train_images.shape, train_images.dtype, "| validation", val_images.shape)

MEAN = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.asarray(IMAGENET_STD, np.float32)[:, None, None]


def to_input(images):
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S), normalised as the official recipe."""
    return (images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - MEAN) / STD


fig, axes = plt.subplots(2, 8, figsize=(15, 4.2))
for ax, image, label in zip(axes.flat, val_images, val_labels):
    ax.imshow(image)
    ax.set(title=names[label], xticks=[], yticks=[])
axes[1, 0].set(xlabel="32 pixels", ylabel="32 pixels")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** colours and positions are random and independent of the class, so a model can
# only succeed by learning outlines: edges and their arrangement.

# %% [markdown]
# ## A plain-ViT baseline from the same ops
# ViT's patch embedding is the soft split's special case $k = s = 16$, $p = 0$ (notebook 1)
# followed by one Linear layer. Everything after it, the class token, the position table, the
# seven blocks, the norm and the head, we take **from a T2T-ViT-7 created with the same seed**,
# so both models start from the same backbone weights and differ only in the tokenizer. Both end
# with 2x2 = 4 tokens (plus the class token) at 32x32. The backward unwinds the forward, exactly
# as `T2TViT.backward` does.

# %%
class PlainViT:
    """ViT with a hard 16x16 patch split, built from t2t_ref's ops around a T2T-ViT's backbone."""

    def __init__(self, t2t_model, patch=16, seed=0):
        v = t2t_model.variant
        self.patch, self.depth, self.num_heads, self.scale = patch, v.depth, v.num_heads, t2t_model.scale
        self.params = {name: array.copy() for name, array in t2t_model.params.items()
                       if not name.startswith("tokens_to_token.")}      # backbone, cls, norm, head
        rng = np.random.default_rng(seed)
        self.params["patch_embed.weight"] = trunc_normal(rng, (v.embed_dim, 3 * patch * patch)).astype(t2t_model.dtype)
        self.params["patch_embed.bias"] = np.zeros(v.embed_dim, dtype=t2t_model.dtype)
        self.pos_embed = t2t_model.buffers["pos_embed"]
        self.grads, self.cache = {}, None

    def forward(self, x):
        """x (B, 3, S, S) -> logits (B, K)."""
        p, c = self.params, {}
        tokens, c["split"] = soft_split_forward(x, self.patch, self.patch, 0)    # (B, G*G, 768)
        tokens, c["embed"] = linear_forward(tokens, p["patch_embed.weight"], p["patch_embed.bias"])
        cls = np.broadcast_to(p["cls_token"], (x.shape[0], 1, tokens.shape[2]))
        h = np.concatenate([cls, tokens], axis=1) + self.pos_embed             # (B, G*G+1, D)
        for i in range(self.depth):
            h, c[f"block{i}"] = block_forward(h, sub_dict(p, f"blocks.{i}."), num_heads=self.num_heads,
                                              scale=self.scale)
        h, c["norm"] = layernorm_forward(h, p["norm.weight"], p["norm.bias"])
        logits, c["head"] = linear_forward(h[:, 0], p["head.weight"], p["head.bias"])
        c["shape"] = h.shape
        self.cache = c
        return logits

    def backward(self, dlogits):
        """dlogits (B, K) -> dx (B, 3, S, S); fills self.grads."""
        c, g = self.cache, {}
        dcls, g["head.weight"], g["head.bias"] = linear_backward(dlogits, c["head"])
        dh = np.zeros(c["shape"], dtype=dlogits.dtype)
        dh[:, 0] = dcls                                                        # only the class token fed the head
        dh, g["norm.weight"], g["norm.bias"] = layernorm_backward(dh, c["norm"])
        for i in reversed(range(self.depth)):
            dh, block_grads = block_backward(dh, c[f"block{i}"])
            g.update(add_prefix(block_grads, f"blocks.{i}."))
        g["cls_token"] = dh[:, :1].sum(axis=0, keepdims=True)                  # broadcast over the batch: sum
        dtokens, g["patch_embed.weight"], g["patch_embed.bias"] = linear_backward(dh[:, 1:], c["embed"])
        self.grads = g
        return soft_split_backward(dtokens, c["split"])

    def train(self, mode=True):
        return self                                                            # no dropout here

    def eval(self):
        return self

# %% [markdown]
# A new model with a hand-written backward deserves a gradient check before it is trusted:
# float64, a few entries of a few parameters, central differences.

# %%
check = PlainViT(t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE, dtype="float64", seed=0))
xc = to_input(val_images[:2]).astype(np.float64)
yc = val_labels[:2]
check.backward(t2t_ref.cross_entropy(check.forward(xc), yc, 0.1)[1])
rng = np.random.default_rng(1)
for name in ("patch_embed.weight", "cls_token", "blocks.0.attn.qkv.weight", "head.bias"):
    array, worst = check.params[name], 0.0
    for _ in range(3):
        index = tuple(int(rng.integers(n)) for n in array.shape)
        old = array[index]
        array[index] = old + 1e-5
        plus = float(t2t_ref.cross_entropy(check.forward(xc), yc, 0.1)[0])
        array[index] = old - 1e-5
        minus = float(t2t_ref.cross_entropy(check.forward(xc), yc, 0.1)[0])
        array[index] = old
        numeric, analytic = (plus - minus) / 2e-5, check.grads[name][index]
        worst = max(worst, abs(numeric - analytic) / max(abs(numeric) + abs(analytic), 1e-12))
    print(f"{name:26s} 3 entries vs central differences: relative error {worst:.1e}")
del check

# %% [markdown]
# ## The training loop
# One step: forward, loss and its gradient, backward, clip the global gradient norm to 1, one
# AdamW update with the learning rate of a cosine schedule with a 10% linear warmup. That is all
# `python -m t2t_ref.train` does too, plus data loading, checkpoints and resuming.

# %%
def train(model, steps=STEPS, batch=BATCH, lr=LR, evaluate_every=50):
    """Train in place; return {'loss': per step, 'val_step': [...], 'val_accuracy': [...]}."""
    optimizer = AdamW(model.params, weight_decay=0.05)
    schedule = CosineSchedule(lr, total_steps=steps, warmup_steps=steps // 10)
    val_x = to_input(val_images)
    history = {"loss": [], "val_step": [], "val_accuracy": []}
    for step in range(steps):
        x = to_input(train_images[step * batch:(step + 1) * batch])            # (B, 3, S, S)
        y = train_labels[step * batch:(step + 1) * batch]                      # (B,)
        model.train()
        loss, dlogits = t2t_ref.cross_entropy(model.forward(x), y, smoothing=0.1)
        model.backward(dlogits)                                                # fills model.grads
        clip_grad_norm(model.grads, max_norm=1.0)
        optimizer.step(model.params, model.grads, schedule(step))
        history["loss"].append(float(loss))
        if (step + 1) % evaluate_every == 0:
            model.eval()
            accuracy = float(np.mean(np.argmax(model.forward(val_x), axis=1) == val_labels))
            history["val_step"].append(step + 1)
            history["val_accuracy"].append(accuracy)
    return history


# both models compute each batch in one thread (t2t_ref.parallel.DataParallel would run the
# pieces of a batch on every core; the commands use it)
t2t = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE, seed=0)
vit = PlainViT(t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE, seed=0))
print(f"T2T-ViT-7: {t2t.num_parameters(trainable_only=True):,} trained parameters; "
      f"plain ViT: {sum(a.size for a in vit.params.values()):,}")
histories, seconds = {}, {}
for name, model in (("T2T-ViT-7", t2t), ("plain ViT/16", vit)):
    started = time.perf_counter()
    histories[name] = train(model)
    seconds[name] = time.perf_counter() - started
    print(f"{name}: {STEPS} steps in {seconds[name]:.0f} s, validation accuracy "
          f"{histories[name]['val_accuracy'][-1]:.1%} (chance {1 / CLASSES:.0%})")

# %%
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.3))
for name, history in histories.items():
    loss = np.array(history["loss"])
    smooth = np.convolve(loss, np.ones(20) / 20, mode="valid")
    line, = ax_loss.plot(loss, alpha=0.25)
    ax_loss.plot(np.arange(19, len(loss)), smooth, color=line.get_color(), label=f"{name} (20-step mean)")
    ax_acc.plot(history["val_step"], np.array(history["val_accuracy"]) * 100, "o-", label=name)
ax_loss.axhline(np.log(CLASSES), color="gray", ls=":", label=f"chance: log {CLASSES}")
ax_loss.set(title="training loss", xlabel="step (32 images each)", ylabel="cross-entropy (label smoothing 0.1)")
ax_acc.axhline(100 / CLASSES, color="gray", ls=":", label="chance")
ax_acc.set(title="validation accuracy (512 images)", xlabel="step", ylabel="top-1 accuracy (%)", ylim=(0, 100))
for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** both start at chance (loss $\log 4$). In this run T2T-ViT-7 ends near 60% and
# the plain ViT, same backbone and budget, near 57%: T2T ahead, as the paper claims for training
# from scratch, but with one seed and 250 steps that is an anecdote, not a measurement. Neither
# is solved yet; that takes a longer run, e.g. `python -m t2t_ref.train --synthetic-classes 4`.

# %% [markdown]
# ## Where does the class token look?
# The prediction is read from the class token after the last block, so the last block's
# attention row *from* the class token *to* the image tokens shows which parts of the image it
# gathered. `model.cache` keeps every block's attention map $P$ (B, h, N, N) from the last
# forward: row 0 is the class token. At 32x32 the backbone has only 2x2 image tokens, so the map
# is coarse; at 224 it would be 14x14.
#
# A finer view comes from the backward pass itself: the gradient of the predicted class's logit
# with respect to the input pixels ("saliency"), through every hand-written backward down to the
# soft split's fold.

# %%
def class_token_attention(model, x):
    """Forward x; return the last block's class-token attention over the image tokens, averaged
    over heads, as (B, G, G) maps, and the logits."""
    model.eval()
    logits = model.forward(x)
    depth = model.depth if isinstance(model, PlainViT) else model.variant.depth
    cache = model.cache
    p = cache[f"block{depth - 1}"][1][3][3]                                    # (B, h, N, N)
    row = p[:, :, 0, 1:].mean(axis=1)                                          # (B, G*G)
    side = int(np.sqrt(row.shape[1]))
    return row.reshape(-1, side, side), logits


def saliency(model, x):
    """|d(logit of the predicted class) / d(pixels)|, max over colour channels: (B, S, S)."""
    model.eval()
    logits = model.forward(x)
    onehot = np.zeros_like(logits)
    onehot[np.arange(len(x)), np.argmax(logits, axis=1)] = 1.0
    return np.abs(model.backward(onehot)).max(axis=1)


examples = val_images[:6]
x = to_input(examples)
rows = []
for name, model in (("T2T-ViT-7", t2t), ("plain ViT/16", vit)):
    attention, logits = class_token_attention(model, x)
    rows.append((f"{name}\nclass-token attention", attention, np.argmax(logits, axis=1)))
    rows.append((f"{name}\n|d logit / d pixels|", saliency(model, x), None))
fig, axes = plt.subplots(1 + len(rows), len(examples), figsize=(14, 12.5))
for c in range(len(examples)):
    axes[0, c].imshow(examples[c])
    axes[0, c].set_title(f"true: {names[val_labels[c]]}", fontsize=9)
    for r, (title, maps, predicted) in enumerate(rows, start=1):
        axes[r, c].imshow(maps[c], cmap="inferno", extent=(-0.5, SIZE - 0.5, SIZE - 0.5, -0.5))
        if predicted is not None:
            axes[r, c].set_title(f"predicts {names[predicted[c]]}", fontsize=9)
for r, title in enumerate(["image"] + [row[0] for row in rows]):
    axes[r, 0].set_ylabel(title, fontsize=9)
for ax in axes.flat:
    ax.set(xticks=[], yticks=[])
axes[-1, 0].set_xlabel("32 pixels (bright = more)")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** after so short a run both views are rough: the class token weighs the four
# quadrants unevenly (a 2x2 map by construction at 32x32), and the pixel gradients are noisy and
# gathered in a quadrant or two. The tokenizers show through: the plain ViT's gradients fill
# exact 16x16 squares (each patch is embedded on its own), while T2T-ViT's spill across the
# patch borders, because its overlapping windows tie neighbouring regions together.

# %% [markdown]
# ## What did the tokenizers learn? Channels of the T2T layers vs ViT's patch embedding
# The paper's Figure 2 argument: reshape a tokenizer's output tokens back into an image grid and
# look at each channel. T2T's first layers show local structure (edges, lines), while ViT's patch
# embedding shows many channels that are dead (near zero everywhere) or saturated (dominated by
# a few huge values).
#
# At 32x32 the grids are tiny (8x8 after T2T layer 1, 2x2 for ViT). But the T2T module and the
# patch embedding do not depend on the image size (only the position table after them does), so
# we can run them, with the trained weights, on a 128x128 **mosaic of 16 validation images**:
# each tile has exactly the training scale, and the grids become 32x32 (T2T layer 1), 16x16
# (T2T layer 2) and 8x8 (ViT).

# %%
def t2t_module(model, x):
    """The trained T2T layers on x of any size: [(B, 64, S/4, S/4), (B, 64, S/8, S/8)]."""
    model.eval()
    outputs, tokens = [], soft_split_forward(x, *SOFT_SPLITS[0])[0]
    for i, layer in ((1, "attention1"), (2, "attention2")):
        prefix = f"tokens_to_token.{layer}."
        params = {**sub_dict(model.params, prefix), **sub_dict(model.buffers, prefix)}
        tokens, _ = token_performer_forward(tokens, params)                    # (B, N, 64), eval: no dropout
        side = int(np.sqrt(tokens.shape[1]))
        image = tokens.transpose(0, 2, 1).reshape(len(x), 64, side, side)
        outputs.append(image)
        tokens = soft_split_forward(image, *SOFT_SPLITS[i])[0]
    return outputs


def vit_embedding(model, x):
    """The trained patch embedding on x of any size: (B, D, S/16, S/16)."""
    tokens, _ = soft_split_forward(x, 16, 16, 0)
    tokens, _ = linear_forward(tokens, model.params["patch_embed.weight"], model.params["patch_embed.bias"])
    side = int(np.sqrt(tokens.shape[1]))
    return tokens.transpose(0, 2, 1).reshape(len(x), -1, side, side)


tiles = val_images[16:32]                                                     # 16 images
mosaic = tiles.reshape(4, 4, SIZE, SIZE, 3).transpose(0, 2, 1, 3, 4).reshape(4 * SIZE, 4 * SIZE, 3)
xm = to_input(mosaic[None])                                                   # (1, 3, 128, 128)
layer1, layer2 = t2t_module(t2t, xm)
embedding = vit_embedding(vit, xm)
print("mosaic", xm.shape, "-> T2T layer 1", layer1.shape, "| T2T layer 2", layer2.shape,
      "| ViT patch embedding", embedding.shape)

fresh_t2t = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE, seed=0)  # the initial weights
fresh_vit = PlainViT(fresh_t2t)
panels = [("T2T layer 1, trained\n32x32 tokens", layer1), ("T2T layer 1, initial\n32x32 tokens", t2t_module(fresh_t2t, xm)[0]),
          ("T2T layer 2, trained\n16x16 tokens", layer2), ("ViT patch embedding,\ntrained, 8x8 tokens", embedding)]
fig, axes = plt.subplots(len(panels), 9, figsize=(16, 7.6))
for r, (title, maps) in enumerate(panels):
    axes[r, 0].imshow(mosaic)
    axes[r, 0].set_ylabel(title, fontsize=9)
    for c in range(1, 9):
        axes[r, c].imshow(maps[0, c - 1], cmap="gray")
        axes[r, c].set_title(f"channel {c - 1}", fontsize=8)
for ax in axes.flat:
    ax.set(xticks=[], yticks=[])
axes[0, 0].set_title("input mosaic 128x128", fontsize=8)
fig.suptitle("channels of the tokenizers' outputs on a mosaic of 16 validation images (grey: low to high)")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** T2T layer 1's channels trace the shapes' outlines and edges tile by tile, while
# ViT's 8x8 grid gives each tile 2x2 values per channel, too coarse to show any outline. But
# compare the first two rows: the initial weights already did this. Overlapping windows with a
# LayerNorm per window turn even random projections into local contrast (edge) detectors, and
# 250 steps changed them little; the architecture, more than this short training, is what gives
# T2T its local structure here.

# %% [markdown]
# ### Dead and saturated channels, counted
# Over the 512 validation images (at their real 32x32 size), take each channel's values at every
# token position, and compare channels by their standard deviation: a channel whose spread is
# below 10% of the typical (median) channel's carries almost nothing (*dead*); one whose largest
# value exceeds 20 typical spreads is dominated by rare huge values (*saturated*). The same for
# the models before training, to separate what training did from what initialisation gave.

# %%
def channel_statistics(maps):
    """maps (B, C, H, W) -> (std per channel / median std, max |value| per channel / median std)."""
    values = maps.transpose(1, 0, 2, 3).reshape(maps.shape[1], -1)           # (C, B*H*W)
    values = values - values.mean(axis=1, keepdims=True)
    spread = values.std(axis=1)
    typical = np.median(spread)
    return spread / typical, np.abs(values).max(axis=1) / typical


val_x = to_input(val_images)
initial, trained = t2t_module(fresh_t2t, val_x), t2t_module(t2t, val_x)
outputs = {"T2T layer 1": (initial[0], trained[0]), "T2T layer 2": (initial[1], trained[1]),
           "ViT patch embedding": (vit_embedding(fresh_vit, val_x), vit_embedding(vit, val_x))}
fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
for ax, (name, (before, after)) in zip(axes, outputs.items()):
    for label, maps, marker in (("initial", before, "x"), ("trained", after, "o")):
        spread, peak = channel_statistics(maps)
        dead, saturated = np.mean(spread < 0.1), np.mean(peak > 20)
        ax.scatter(spread, peak, marker=marker, s=18, alpha=0.7,
                   label=f"{label}: {dead:.0%} dead, {saturated:.0%} saturated")
        print(f"{name:20s} {label:8s}: {maps.shape[1]} channels, {dead:.0%} dead (spread < 0.1 median), "
              f"{saturated:.0%} saturated (peak > 20 median spreads)")
    ax.axvline(0.1, color="gray", ls=":")
    ax.axhline(20, color="gray", ls=":")
    ax.set(xscale="log", yscale="log", title=f"{name}: {before.shape[1]} channels",
           xlabel="channel spread / median channel spread", ylabel="largest |value| / median spread")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** by these criteria neither tokenizer has dead or saturated channels, before or
# after training (the printed percentages above): the paper's observation concerns ViT models
# trained for hundreds of epochs on ImageNet, and a 250-step run on toy images does not
# reproduce it. The mosaic above is the more telling picture here.
#
# ## What we saw
# - A training step is forward, `cross_entropy`, `backward`, clip, `AdamW.step`: five lines with
#   the project's pieces.
# - A plain ViT is the same backbone behind a hard split, and needs only a page of code with the
#   same ops; its backward passed the same finite-difference check.
# - The class token's attention and the pixel gradients show what the prediction depends on;
#   the T2T layers' channels, on a mosaic, show local structure, mostly there from the start.
# - What this short run did *not* show: the paper's dead and saturated ViT channels.
#
# Next, [notebook 7](07_gpu.ipynb): the same code on a GPU.
