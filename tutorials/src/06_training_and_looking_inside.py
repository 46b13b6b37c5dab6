# %% [markdown]
# # 6. Training, and looking inside
#
# Time to learn something. We train T2T-ViT-7 for a few hundred steps on the built-in shapes
# dataset (drawn by `t2t_ref.data`, nothing to download) with an explicit loop made of the
# project's pieces: `cross_entropy`, `model.backward`, `clip_grad_norm`, `AdamW` and
# `CosineSchedule`. For comparison we take the **plain ViT** baseline, built from the same ops:
# the same backbone, same initial weights, but a hard 16x16 patch split instead of the T2T module. Then we look
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
from t2t_ref.layers import sub_dict
from t2t_ref.layers.patch_embed import patch_embed_forward
from t2t_ref.layers.token_performer import token_performer_forward
from t2t_ref.model import SOFT_SPLITS
from t2t_ref.ops.soft_split import soft_split_forward
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
# followed by one Linear layer (timm writes it as a 16x16 convolution with stride 16, the same
# map). `t2t_ref` has the plain ViT as a model of its own, built from the same ops
# (`layers/patch_embed.py`): `vit_small_patch16_224` is the paper's ViT-S/16 baseline, and
# `vit_7_patch16` is its small sibling with **T2T-ViT-7's backbone** (D = 256, 7 blocks, 4
# heads, MLP ratio 2). We copy everything past the stem, the class token, the position table,
# the seven blocks, the norm and the head, **from a T2T-ViT-7 created with the same seed**, so
# both models start from the same backbone weights and differ only in the tokenizer (and in
# ViT's position table being trained, where T2T-ViT's sinusoid stays fixed; it starts from the
# same sinusoid here). Both end with 2x2 = 4 tokens (plus the class token) at 32x32.

# %%
def plain_vit_like(t2t_model, dtype="float32"):
    """vit_7_patch16 holding t2t_model's weights past the stem (its own seeded patch embedding)."""
    vit = t2t_ref.create_model("vit_7_patch16", num_classes=t2t_model.num_classes, img_size=t2t_model.img_size,
                               dtype=dtype, seed=0)
    backbone = {k: v for k, v in t2t_model.state_dict().items() if not k.startswith("tokens_to_token.")}
    missing, unexpected = vit.load_state_dict(backbone, strict=False)
    assert missing == ["patch_embed.proj.weight", "patch_embed.proj.bias"] and not unexpected
    return vit


print(t2t_ref.summary("vit_7_patch16", SIZE, CLASSES))

# %% [markdown]
# Its backward is tested against PyTorch in the project's test suite; a gradient check by
# central differences, float64, a few entries of a few parameters, shows it here too (the
# patch embedding's weight is the convolution's (256, 3, 16, 16); the position table is
# trained, so it has a gradient).

# %%
check = plain_vit_like(t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE, dtype="float64", seed=0),
                       dtype="float64")
xc = to_input(val_images[:2]).astype(np.float64)
yc = val_labels[:2]
check.backward(t2t_ref.cross_entropy(check.forward(xc), yc, 0.1)[1])
rng = np.random.default_rng(1)
for name in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight", "head.bias"):
    array, worst = check.params[name], 0.0                                     # a view into the flat buffer
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
    assert worst < 1e-5, f"plain ViT {name}: relative error {worst:.1e} vs central differences"
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
vit = plain_vit_like(t2t)
print(f"T2T-ViT-7: {t2t.num_parameters(trainable_only=True):,} trained parameters; "
      f"plain ViT: {vit.num_parameters(trainable_only=True):,}")
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
# **Takeaway:** both start at chance (loss $\log 4$). In this run T2T-ViT-7's loss falls first
# and it leads at step 100 (near 49% against 39%), but the plain ViT, same backbone and budget,
# catches up: both end near 60%. T2T learns faster early, in the direction the paper claims
# for training from scratch, but with one seed and 250 steps that is an anecdote, not a
# measurement (notebook 9 trains more designs side by side). Neither is solved yet; that takes a
# longer run, e.g. `python -m t2t_ref.train --synthetic-classes 4`.

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
    depth = len(model.layers)
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
    tokens, _ = patch_embed_forward(x, sub_dict(model.params, "patch_embed.proj."))  # unfold k16 s16, Linear
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
fresh_vit = plain_vit_like(fresh_t2t)
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
# - A plain ViT is the same backbone behind a hard split: `t2t_ref`'s ViT models are built from
#   the same ops; its backward passed the same finite-difference check.
# - The class token's attention and the pixel gradients show what the prediction depends on;
#   the T2T layers' channels, on a mosaic, show local structure, mostly there from the start.
# - What this short run did *not* show: the paper's dead and saturated ViT channels.
#
# Next, [notebook 7](07_gpu.ipynb): the same code on a GPU.
