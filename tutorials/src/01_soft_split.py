# %% [markdown]
# # 1. The soft split: im2col by hand
#
# Plain ViT cuts an image into hard 16x16 patches. T2T-ViT instead cuts it into **overlapping
# windows** and does so three times, shrinking the token grid step by step:
# 224x224 pixels -> 56x56 -> 28x28 -> 14x14 tokens. The operation is `unfold`, better known as
# *im2col*: every k x k window of a zero-padded image becomes one column (one token).
#
# In this notebook, on a real photograph:
#
# 1. cut one window out by hand and find it in `t2t_ref`'s `unfold`;
# 2. follow the token grid through the three soft splits, and see how much of the image one
#    token covers at each stage;
# 3. show that `fold` is the **adjoint** of `unfold` (the dot-product test), which is why the
#    backward pass of the soft split is a fold, and why overlapping windows **sum** gradients;
# 4. put ViT's hard 16x16 patches next to T2T's soft split.
#
# Shape letters: B batch, C channels, H/W height/width, k kernel (window side), s stride,
# p padding, L number of windows (tokens).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image

from t2t_ref.model import SOFT_SPLITS          # ((7, 4, 2), (3, 2, 1), (3, 2, 1)): (k, s, p)
from t2t_ref.naive import fold_loops, unfold_loops
from t2t_ref.ops.soft_split import fold, output_size, soft_split_backward, unfold

plt.rcParams.update({"figure.dpi": 80, "image.interpolation": "nearest"})
print("soft splits (kernel, stride, padding):", SOFT_SPLITS)

# %% [markdown]
# ## A photograph
# scikit-image ships a few photographs inside the package (nothing is downloaded). We resize
# the astronaut to 224x224, T2T-ViT's input size, and keep it in float64 so that the checks
# below are exact to the last bits.

# %%
from skimage import data

photo = np.asarray(Image.fromarray(data.astronaut()).resize((224, 224), Image.Resampling.BICUBIC))
x = photo.transpose(2, 0, 1)[None].astype(np.float64) / 255.0   # (B, C, H, W) = (1, 3, 224, 224)
print("photo", photo.shape, photo.dtype, "-> x", x.shape, x.dtype)

# %% [markdown]
# ## One window, by hand
# The first soft split uses kernel $k=7$, stride $s=4$, padding $p=2$. Pad the image with 2 rows
# and columns of zeros on every side; window $(r, c)$ of the grid is then the block of padded
# rows $4r \dots 4r+6$ and columns $4c \dots 4c+6$, in all 3 channels: $3 \cdot 7 \cdot 7 = 147$
# numbers. Flattened **channel-major**, entry $(ch, i, j)$ of the window lands at index
# $ch \cdot k^2 + i \cdot k + j$, the order of `torch.nn.Unfold` (and so of the official
# checkpoints). The number of window positions along a side is
#
# $$ H_{out} = \left\lfloor \frac{H + 2p - k}{s} \right\rfloor + 1 = \left\lfloor \frac{224 + 4 - 7}{4} \right\rfloor + 1 = 56 .$$

# %%
k, s, p = SOFT_SPLITS[0]
padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))       # (1, 3, 228, 228)
r, c = 20, 30                                              # one window: grid row 20, column 30
window = padded[0, :, r * s:r * s + k, c * s:c * s + k]    # (3, 7, 7)
token_by_hand = window.reshape(-1)                         # (147,) channel-major

cols = unfold(x, k, s, p)                                  # (B, C*k*k, L) = (1, 147, 3136)
side = output_size(224, k, s, p)
print(f"grid {side} x {side} = {side * side} windows; unfold gives {cols.shape}")
print("column", r * side + c, "of unfold equals the window cut by hand:",
      np.array_equal(cols[0, :, r * side + c], token_by_hand))
assert np.array_equal(cols[0, :, r * side + c], token_by_hand), "unfold's column differs from the window cut by hand"

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1, 1, 1.6]})
y0, x0 = r * s - p - 4, c * s - p - 4                       # a 24x24 crop around the windows
axes[0].imshow(photo)
axes[0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), 24, 24, fill=False, ec="yellow", lw=2))
axes[0].set(title="the photograph (224 x 224)", xlabel="pixel column", ylabel="pixel row")
axes[1].imshow(photo[y0:y0 + 24, x0:x0 + 24], extent=(x0 - .5, x0 + 23.5, y0 + 23.5, y0 - .5))
colours = ["tab:red", "tab:cyan", "tab:orange"]
for n, colour in enumerate(colours):                       # windows (20, 30), (20, 31), (20, 32)
    top, left = r * s - p, (c + n) * s - p                  # in image pixels (padding removed)
    axes[1].add_patch(Rectangle((left - .5 + .15 * n, top - .5 + .15 * n), k, k, fill=False,
                                ec=colour, lw=2.5, label=f"window ({r}, {c + n})"))
axes[1].legend(loc="lower left", fontsize=8)
axes[1].set(title="three neighbouring 7x7 windows, stride 4", xlabel="pixel column",
            ylabel="pixel row")
for n, colour in enumerate(colours):
    axes[2].plot(cols[0, :, r * side + c + n], color=colour, lw=1.2, label=f"token ({r}, {c + n})")
for ch, name in enumerate("RGB"):
    axes[2].axvspan(ch * 49, ch * 49 + 49, color="rgb"[ch], alpha=0.06)
    axes[2].text(ch * 49 + 24.5, 1.02, name + " channel", ha="center", color="rgb"[ch])
axes[2].set(title="the same three windows as tokens (147 numbers each)",
            xlabel="token entry  ch*49 + i*7 + j", ylabel="pixel value", ylim=(0, 1.1))
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** a token is a 7x7x3 window flattened channel-major; two neighbouring windows
# share 3 of their 7 columns, so the same pixel appears in up to four tokens.

# %% [markdown]
# ## The fast unfold and its slow twin
# `t2t_ref.naive.unfold_loops` visits every window, exactly as the formula reads. The real
# `unfold` turns the loop inside out: it loops over the $k^2 = 49$ *offsets* $(i, j)$ inside a
# window, and the $(i, j)$-th pixel of every window is one strided slice of the padded image.
# 49 big slices beat 3136 tiny ones.

# %%
started = time.perf_counter()
cols_loops = unfold_loops(x, k, s, p)
t_loops = time.perf_counter() - started
started = time.perf_counter()
cols_fast = unfold(x, k, s, p)
t_fast = time.perf_counter() - started
print(f"loop twin {t_loops * 1e3:.1f} ms, strided unfold {t_fast * 1e3:.1f} ms; "
      f"identical: {np.array_equal(cols_loops, cols_fast)}")
assert np.array_equal(cols_loops, cols_fast), "strided unfold differs from its loop twin"

# %% [markdown]
# ## The token grid of each split
# T2T-ViT splits three times. Between splits, a small transformer layer (notebooks 3 and 4)
# maps each token to 64 numbers, and the token sequence is reshaped back into a 64-channel
# image (*re-structurization*). The grids follow the formula above:

# %%
def grids(size):
    """Per soft split: (input side, k, s, p, output side) for an input image of `size`."""
    rows = []
    for k_, s_, p_ in SOFT_SPLITS:
        out = output_size(size, k_, s_, p_)
        rows.append((size, k_, s_, p_, out))
        size = out
    return rows

channels = [3, 64, 64]                                      # what each split cuts
print(f"{'split':>5} {'input':>11} {'k':>3} {'s':>3} {'p':>3} {'grid':>9} {'tokens':>7} {'width':>6}")
for n, ((size, k_, s_, p_, out), ch) in enumerate(zip(grids(224), channels)):
    print(f"{n:>5} {f'{ch}x{size}x{size}':>11} {k_:>3} {s_:>3} {p_:>3} {f'{out}x{out}':>9}"
          f" {out * out:>7} {ch * k_ * k_:>6}")
for size in (64, 384):
    print(f"at {size}: " + " -> ".join(str(g[0]) for g in grids(size)) + f" -> {grids(size)[-1][-1]}")

# %% [markdown]
# To *see* the three grids on the photograph, replace each T2T layer by the simplest possible
# token map, "average your window, per channel", and reshape the tokens back into an image after
# every split. That is the real data path of T2T-ViT with the learned layers taken out.

# %%
def average_split(image, k_, s_, p_):
    """Soft split, then each token -> its per-channel mean, reshaped back to an image."""
    B, C, H, W = image.shape
    out = output_size(H, k_, s_, p_)
    tokens = unfold(image, k_, s_, p_)                      # (B, C*k*k, L)
    return tokens.reshape(B, C, k_ * k_, out, out).mean(axis=2)   # (B, C, out, out)

stages = [x]
for k_, s_, p_ in SOFT_SPLITS:
    stages.append(average_split(stages[-1], k_, s_, p_))
vit_patches = average_split(x, 16, 16, 0)                  # ViT: 16x16 patches, no overlap

fig, axes = plt.subplots(1, 5, figsize=(17, 3.8))
titles = ["input 224x224", "after split 0: 56x56", "after split 1: 28x28",
          "after split 2: 14x14", "ViT hard split: 14x14"]
for ax, image, title in zip(axes, stages + [vit_patches], titles):
    ax.imshow(image[0].transpose(1, 2, 0))
    ax.set(title=title, xlabel="token column", ylabel="token row")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** each soft split shrinks the grid 4x, 2x, 2x; after three of them T2T-ViT has the
# same 14x14 = 196 tokens as ViT/16, but its tokens are blurred by overlapping windows rather
# than cut out as disjoint squares.

# %% [markdown]
# ## How much of the image does one token see?
# A token of split 2 is a 3x3 window of split-1 tokens, each of which is a 3x3 window of split-0
# tokens, each a 7x7 window of pixels. To trace a token back to the pixels, run the splits
# **backwards**: put a 1 on the token, and spread it over the window it was read from, down to
# the pixels. "Spread a token over its window, and add where windows overlap" is exactly `fold`,
# so the footprint is `fold(fold(fold(one-hot)))`, and each pixel's value counts the paths by
# which it reaches the token. (This is the footprint of the windows only: the T2T layers'
# attention is global and mixes all tokens.)

# %%
def footprint(level, i, j, size=224, splits=SOFT_SPLITS):
    """(size, size) map: through how many window paths each pixel reaches token (i, j) of the
    grid after `level` soft splits."""
    sides = [size]
    for k_, s_, p_ in splits:
        sides.append(output_size(sides[-1], k_, s_, p_))
    m = np.zeros((1, 1, sides[level], sides[level]))
    m[0, 0, i, j] = 1.0
    for lvl in reversed(range(level)):                      # level lvl+1 -> level lvl
        k_, s_, p_ = splits[lvl]
        window_cols = np.repeat(m.reshape(1, 1, -1), k_ * k_, axis=1)  # (1, k*k, L): copy to every cell
        m = fold(window_cols, (sides[lvl], sides[lvl]), k_, s_, p_)
    return m[0, 0]

maps = [footprint(1, 28, 28), footprint(2, 14, 14), footprint(3, 7, 7),
        footprint(1, 7, 7, splits=[(16, 16, 0)])]
titles = ["split 0 token (28, 28)", "split 1 token (14, 14)", "split 2 token (7, 7)",
          "ViT patch (7, 7)"]
fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
for ax, m, title in zip(axes, maps, titles):
    rows, columns = np.nonzero(m)
    im = ax.imshow(m, cmap="magma")
    ax.set(xlim=(96, 144), ylim=(144, 96), xlabel="pixel column", ylabel="pixel row",
           title=f"{title}\n{np.ptp(rows) + 1}x{np.ptp(columns) + 1} pixels, {int(m.sum())} paths")
    fig.colorbar(im, ax=ax, fraction=0.046, label="window paths to the token")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** after the three soft splits one token sees a 31x31-pixel patch, weighted towards
# its centre, and neighbouring tokens (16 pixels apart) overlap by 15 pixels; a ViT token sees
# exactly its own 16x16 square and nothing of its neighbours.

# %% [markdown]
# ## fold is the adjoint of unfold
# `unfold` is linear: $\mathrm{cols} = U x$ with $U$ a 0/1 matrix of shape
# $(C k^2 L) \times (C H W)$ whose every row picks one pixel (or nothing, where the window
# hangs over the zero padding). Its **adjoint** $U^\top$ is defined by
#
# $$\langle U x,\, y\rangle = \langle x,\, U^\top y\rangle \quad \text{for all } x, y,$$
#
# and $U^\top y$ takes every entry of $y$ back to the pixel it was read from and **adds** it
# there. That is `fold`. Backpropagation needs exactly this map: if a loss $\ell$ depends on
# $x$ only through $\mathrm{cols} = Ux$, the chain rule gives
#
# $$\frac{\partial \ell}{\partial x} = U^\top \frac{\partial \ell}{\partial\, \mathrm{cols}}
#   = \mathrm{fold}\!\left(\frac{\partial \ell}{\partial\, \mathrm{cols}}\right).$$
#
# A pixel read by $n$ windows feeds $n$ entries of `cols`, and its gradient is the **sum** of
# the $n$ gradients that come back (the multivariable chain rule sums over every use of a
# variable). Let us build $U$ for a tiny 1-channel 6x6 image and see it.

# %%
H = W = 6
kt, st, pt = 3, 2, 1                                       # split 1 and 2's geometry
basis = np.eye(H * W).reshape(H * W, 1, H, W)              # every one-pixel image
U = unfold(basis, kt, st, pt).reshape(H * W, -1).T         # (k*k*L, H*W) = (81, 36)
y_small = np.random.default_rng(0).normal(size=(1, kt * kt, U.shape[0] // (kt * kt)))
print("U", U.shape, "entries in {0, 1}:", set(np.unique(U)) <= {0.0, 1.0},
      "| fold(y) == U^T y:", np.allclose(fold(y_small, (H, W), kt, st, pt).reshape(-1), U.T @ y_small.reshape(-1)))
assert set(np.unique(U)) <= {0.0, 1.0}, "U has entries other than 0 and 1"
assert np.allclose(fold(y_small, (H, W), kt, st, pt).reshape(-1), U.T @ y_small.reshape(-1)), "fold(y) != U^T y"

fig, (ax_u, ax_n) = plt.subplots(1, 2, figsize=(13, 4.3), gridspec_kw={"width_ratios": [2.2, 1]})
ax_u.imshow(U.T, cmap="Greys", aspect="auto")
ax_u.set(title="$U^T$: which column entry (x axis) reads which pixel (y axis)",
         xlabel="entry of cols: (i*3 + j)*9 + window", ylabel="pixel index (row*6 + col)")
im = ax_n.imshow(U.sum(axis=0).reshape(H, W), cmap="viridis")
ax_n.set(title="windows reading each pixel", xlabel="pixel column",
         ylabel="pixel row")
fig.colorbar(im, ax=ax_n, label="number of windows")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** $U$ is a sparse 0/1 matrix and `fold` multiplies by its transpose; the pixels
# on even rows and columns are read by up to 4 windows, so they will collect up to 4 gradients.

# %% [markdown]
# ### The dot-product test
# The standard check that a hand-written backward (adjoint) fits its forward: draw random $x$ and
# $y$ and compare $\langle \mathrm{unfold}(x), y\rangle$ with $\langle x, \mathrm{fold}(y)\rangle$.
# They must agree to float64 round-off (~1e-16 relative) for every geometry.

# %%
rng = np.random.default_rng(0)
geometries = {"split 0 (k7 s4 p2) on 3x224x224": (3, 224, 7, 4, 2),
              "split 1 (k3 s2 p1) on 64x56x56": (64, 56, 3, 2, 1),
              "split 2 (k3 s2 p1) on 64x28x28": (64, 28, 3, 2, 1),
              "ViT (k16 s16 p0) on 3x224x224": (3, 224, 16, 16, 0)}
for name, (C, size, k_, s_, p_) in geometries.items():
    out = output_size(size, k_, s_, p_)
    xr = rng.normal(size=(2, C, size, size))                       # (B, C, H, W)
    yr = rng.normal(size=(2, C * k_ * k_, out * out))              # (B, C*k*k, L)
    lhs = np.sum(unfold(xr, k_, s_, p_) * yr)
    rhs = np.sum(xr * fold(yr, (size, size), k_, s_, p_))
    same_as_loops = np.allclose(fold(yr, (size, size), k_, s_, p_),
                                fold_loops(yr, (size, size), k_, s_, p_))
    print(f"{name:34s} <Ux,y> = {lhs:+.10e}  <x,U^T y> = {rhs:+.10e}  "
          f"rel. diff {abs(lhs - rhs) / abs(lhs):.1e}  fold == loop twin: {same_as_loops}")
    assert abs(lhs - rhs) < 1e-12 * abs(lhs), f"{name}: dot-product test failed, <Ux,y> != <x,U^T y>"
    assert same_as_loops, f"{name}: fold differs from its loop twin"

# %% [markdown]
# ## Overlapping windows sum their gradients
# With an all-ones upstream gradient, $\partial \ell / \partial x = U^\top \mathbf 1$ counts the
# windows that read each pixel: this is also what `fold(unfold(x))` multiplies $x$ by. Below,
# the first split's count map, and a finite-difference check that the soft split's backward
# (`soft_split_backward`, a transpose and a fold) really is the gradient, with a *random*
# upstream gradient $g$ and $\ell = \sum \mathrm{tokens} \cdot g$.

# %%
ones = np.ones((1, 3, 224, 224))
count = fold(unfold(ones, 7, 4, 2), (224, 224), 7, 4, 2)[0, 0]      # (224, 224)
count_vit = fold(unfold(ones, 16, 16, 0), (224, 224), 16, 16, 0)[0, 0]
values, pixels = np.unique(count, return_counts=True)
print("split 0: " + ", ".join(f"{p} pixels read by {int(v)} window{'s' * int(v > 1)}"
                               for v, p in zip(values, pixels)),
      f"| mean {count.mean():.3f}, under 147*3136 / (3*224*224) = {147 * 3136 / (3 * 224 * 224):.4f}: "
      "the windows' reads of the zero padding are not pixels")
# the same total counted from the windows: window r covers padded rows 4r .. 4r+6, of which
# those in 2 .. 225 are image rows; rows and columns alike, so a channel's reads are its square
image_rows = sum(len(set(range(4 * r, 4 * r + 7)) & set(range(2, 226))) for r in range(56))
assert count.sum() == image_rows ** 2 < 147 * 3136 / 3, "split 0: reads of image pixels miscounted"
assert set(values) == {1, 2, 4}, f"split 0: pixels read by {values} windows"
print("ViT: windows per pixel", np.unique(count_vit), "-> fold(unfold(x)) == x:",
      np.array_equal(fold(unfold(x, 16, 16, 0), (224, 224), 16, 16, 0), x))
assert np.array_equal(fold(unfold(x, 16, 16, 0), (224, 224), 16, 16, 0), x), "ViT: fold(unfold(x)) != x"

fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
im = axes[0].imshow(count[:24, :24], cmap="viridis", extent=(-.5, 23.5, 23.5, -.5))
axes[0].set(title="split 0: windows reading each pixel (top-left corner)",
            xlabel="pixel column", ylabel="pixel row")
fig.colorbar(im, ax=axes[0], label="windows = gradient terms summed")
axes[1].plot(count[100, :40], "o-", label="soft split k7 s4 p2 (row 100)")
axes[1].plot(count_vit[100, :40], "s-", label="hard split k16 s16 (row 100)")
axes[1].set(title="along one row", xlabel="pixel column", ylabel="windows reading the pixel",
            ylim=(0, 4.5))
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** with k=7 and s=4 a pixel is read by 1, 2 or 4 windows (3 of every 4 rows and
# columns overlap), so its gradient is a sum of up to 4 terms; a hard split reads every pixel
# exactly once, and its fold is simply the inverse.

# %%
from t2t_ref.ops.soft_split import soft_split_forward

xs = rng.normal(size=(1, 2, 9, 9))                           # small: every entry is checked
tokens, cache = soft_split_forward(xs, 3, 2, 1)             # (B, L, C*k*k) = (1, 25, 18)
g = rng.normal(size=tokens.shape)                           # random upstream gradient
analytic = soft_split_backward(g, cache)                    # (1, 2, 9, 9)
numeric = np.zeros_like(xs)
h = 1e-6
for index in np.ndindex(xs.shape):                          # central differences of sum(tokens * g)
    bump = np.zeros_like(xs)
    bump[index] = h
    plus = np.sum(soft_split_forward(xs + bump, 3, 2, 1)[0] * g)
    minus = np.sum(soft_split_forward(xs - bump, 3, 2, 1)[0] * g)
    numeric[index] = (plus - minus) / (2 * h)
rel = np.max(np.abs(analytic - numeric)) / np.max(np.abs(analytic) + np.abs(numeric))
print(f"soft split backward vs central differences: relative error {rel:.1e}")
assert rel < 1e-6, f"soft split backward: relative error {rel:.1e}"

# %% [markdown]
# ## Hard patches (ViT) and soft windows (T2T), side by side
# ViT's patch embedding is the same `unfold` with $k = s = 16$ and $p = 0$, followed by one
# Linear layer: the tokens are disjoint squares, and an edge that crosses a patch border is cut
# in two. T2T's tokens after three soft splits sit on the same 16-pixel grid but each sees 31
# pixels, so every border region belongs to two tokens.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
axes[0].imshow(photo)
for t in range(0, 225, 16):
    axes[0].axhline(t - .5, color="white", lw=0.6)
    axes[0].axvline(t - .5, color="white", lw=0.6)
for n, colour in enumerate(["tab:red", "tab:cyan", "tab:orange"]):
    axes[0].add_patch(Rectangle((16 * (5 + n) - .5, 16 * 4 - .5), 16, 16, fill=False, ec=colour, lw=3))
axes[0].set(title="ViT: 14x14 hard 16x16 patches (three marked)", xlabel="pixel column",
            ylabel="pixel row")
axes[1].imshow(photo)
for n, colour in enumerate(["tab:red", "tab:cyan", "tab:orange"]):
    m = footprint(3, 4, 5 + n)
    rows, columns = np.nonzero(m)
    axes[1].add_patch(Rectangle((columns.min() - .5 + n * .6, rows.min() - .5 + n * .6),
                                np.ptp(columns) + 1, np.ptp(rows) + 1, fill=False, ec=colour, lw=3))
axes[1].set(title="T2T: the same three tokens' 31x31 footprints", xlabel="pixel column",
            ylabel="pixel row")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** both models end with 196 tokens on a 16-pixel grid, but a T2T token's window
# spans its neighbours' patches too, so structure that crosses a patch border (an edge, a line)
# is seen whole by some token.
#
# ## What we saw
# - The soft split is `unfold` (im2col): each token is a flattened, channel-major window; with
#   stride < kernel the windows overlap.
# - Three soft splits take 224x224 pixels to 56x56, 28x28 and 14x14 tokens; one final token
#   covers 31x31 pixels.
# - `fold` is `unfold`'s adjoint ($U^\top$), checked by the dot-product test; it is the soft
#   split's backward, and it **sums** the gradients of overlapping windows.
# - ViT's patch embedding is the special case $k = s$, $p = 0$: no overlap, and fold inverts it.
#
# Next, [notebook 2](02_backprop_by_hand.ipynb) derives the backward pass of every other op.
