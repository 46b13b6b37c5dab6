# %% [markdown]
# # 3. Attention: forward, backward, and the N x N memory wall
#
# Self-attention lets every token look at every other token. This notebook:
#
# 1. derives the backward pass of scaled dot-product attention and checks it against a loop
#    twin, finite differences and PyTorch autograd;
# 2. splits it into heads, and watches attention at work on the photograph's tokens;
# 3. builds the T2T transformer layer, whose residual connection goes through **v** (the
#    *v skip*), and shows why that makes $v$'s gradient a sum;
# 4. measures the memory of the N x N attention map against the number of tokens: 3136 tokens
#    at 224x224 is why T2T-ViT normally uses the performer of notebook 4.
#
# Shape letters: B batch, h heads, N tokens, d head width, E = h d the attention width,
# D_in the layer's input width.

# %%
import inspect
import time
import tracemalloc

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from t2t_ref.layers.token_transformer import token_transformer_backward, token_transformer_forward
from t2t_ref.naive import attention_loops
from t2t_ref.ops.attention import (merge_heads, scaled_dot_product_attention_backward,
                                   scaled_dot_product_attention_forward, self_attention_backward,
                                   self_attention_forward, split_heads, unmerge_heads)
from t2t_ref.ops.layernorm import layernorm_forward
from t2t_ref.ops.soft_split import soft_split_forward

plt.rcParams.update({"figure.dpi": 80})
rng = np.random.default_rng(0)

try:
    import torch
    torch.set_default_dtype(torch.float64)
except ImportError:
    torch = None
    print("PyTorch is not installed: the comparisons with autograd below are skipped "
          "(pip install torch to run them)")


def rel_error(a, b):
    """max|a - b| / max(|a| + |b|)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-300))


def numeric_grad(f, x, g, h=1e-6, entries=None):
    """Central differences of sum(f() * g) w.r.t. x (nudged in place), at every entry or at
    `entries` of them drawn at random. Returns (indices, values)."""
    indices = list(np.ndindex(x.shape))
    if entries is not None:
        indices = [indices[i] for i in rng.choice(len(indices), entries, replace=False)]
    values = []
    for index in indices:
        old = x[index]
        x[index] = old + h
        plus = np.sum(f() * g)
        x[index] = old - h
        minus = np.sum(f() * g)
        x[index] = old
        values.append((plus - minus) / (2 * h))
    return indices, np.array(values)

# %% [markdown]
# ## Scaled dot-product attention
# For one head, with queries, keys and values $Q, K, V$ of shape (N, d):
#
# $$S = Q K^\top \cdot \text{scale}, \qquad P = \mathrm{softmax}_{\text{rows}}(S), \qquad O = P V .$$
#
# Row $i$ of $P$ is a probability distribution over the N keys: how much query $i$ takes from
# each value. Backward, one line of the forward at a time, from the last:
#
# - $O = PV$ is a matrix product, so (as for Linear) $dV = P^\top dO$ and $dP = dO\, V^\top$;
# - $P = \mathrm{softmax}(S)$ row by row, so $dS = P \odot \big(dP - \mathrm{rowsum}(dP \odot P)\big)$
#   (notebook 2);
# - $S = QK^\top \cdot \text{scale}$: $dQ = dS\, K \cdot \text{scale}$ and
#   $dK = dS^\top Q \cdot \text{scale}$.
#
# Every line works on (B, h, N, d) arrays at once: the matrix products batch over B and h.

# %%
print(inspect.getsource(scaled_dot_product_attention_backward))

# %%
B, h, N, d = 2, 2, 5, 3
q, k, v = (rng.normal(size=(B, h, N, d)) for _ in range(3))
scale = d ** -0.5
out, cache = scaled_dot_product_attention_forward(q, k, v, scale)
print("forward vs the loop twin (one query at a time):",
      f"{rel_error(out, attention_loops(q, k, v, scale)):.1e}")
assert rel_error(out, attention_loops(q, k, v, scale)) < 1e-12, "attention forward differs from its loop twin"
g = rng.normal(size=out.shape)                                  # random upstream gradient
ours = scaled_dot_product_attention_backward(g, cache)          # dq, dk, dv
f = lambda: scaled_dot_product_attention_forward(q, k, v, scale)[0]
theirs = None
if torch is not None:
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tp = torch.softmax(tq @ tk.transpose(-1, -2) * scale, dim=-1)
    ((tp @ tv) * torch.tensor(g)).sum().backward()
    theirs = [tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()]
for i, (name, x) in enumerate(zip(("dq", "dk", "dv"), (q, k, v))):
    _, numeric = numeric_grad(f, x, g)
    ag = "autograd skipped" if theirs is None else f"vs autograd {rel_error(ours[i], theirs[i]):.1e}"
    print(f"{name}: vs central differences {rel_error(ours[i].reshape(-1), numeric):.1e}, {ag}")
    assert rel_error(ours[i].reshape(-1), numeric) < 1e-6, f"attention {name} vs central differences"
    assert theirs is None or rel_error(ours[i], theirs[i]) < 1e-12, f"attention {name} vs autograd"

# %% [markdown]
# ## Heads
# A multi-head attention module computes all of $Q, K, V$ for all heads with one Linear layer
# (D -> 3E), then *reshapes*: the 3E outputs of each token are read as (3, h, d), and the axes
# are permuted so that each head gets its own (N, d) block. Heads never mix inside the
# attention; `merge_heads` puts their outputs side by side again, and a last Linear (`proj`)
# mixes them. The shapes, for T2T-ViT-7's backbone at 224 (197 tokens, D = 256, 4 heads):

# %%
B, N, D, heads = 1, 197, 256, 4
qkv = rng.normal(size=(B, N, 3 * D)).astype(np.float32)         # (B, N, 3E) from the qkv Linear
q, k, v = split_heads(qkv, heads)                               # (B, h, N, d) each
print("qkv", qkv.shape, "-> q, k, v", q.shape, "each")
o, _ = scaled_dot_product_attention_forward(q, k, v, (D // heads) ** -0.5)   # (B, h, N, d)
print("attention out", o.shape, "-> merge_heads", merge_heads(o).shape,
      "| unmerge_heads(merge_heads(o)) == o:", np.array_equal(unmerge_heads(merge_heads(o), heads), o))
assert np.array_equal(unmerge_heads(merge_heads(o), heads), o), "unmerge_heads does not undo merge_heads"
# head 2 alone, from its own slice of the qkv columns: the same numbers
d = D // heads
q2, k2, v2 = (qkv[..., part * D + 2 * d: part * D + 3 * d] for part in range(3))   # (B, N, d)
o2, _ = scaled_dot_product_attention_forward(q2[:, None], k2[:, None], v2[:, None], d ** -0.5)
print("head 2 computed on its own equals head 2 of the batched call:", np.allclose(o2[:, 0], o[:, 2]))
assert np.allclose(o2[:, 0], o[:, 2]), "head 2 on its own differs from head 2 of the batched call"

# %% [markdown]
# ### Attention on real tokens
# What does a row of $P$ look like? Take the photograph at 112x112, soft-split it
# (k7 s4 p2: 28x28 = 784 tokens of 147 numbers), LayerNorm each token, and use the tokens
# themselves as queries, keys and values (no learned projections). Then $P_{ij}$ is large when
# token $j$ looks like token $i$: attention is a soft, content-based lookup over the whole
# image. (Two details: with LayerNormed tokens $q_i \cdot q_i = 147$ beats every other score,
# so we use a softer scale, $4/147$, and blank out each query's weight on itself in the plots.)

# %%
from skimage import data

photo = np.asarray(Image.fromarray(data.astronaut()).resize((112, 112), Image.Resampling.BICUBIC))
x = photo.transpose(2, 0, 1)[None].astype(np.float32) / 255.0    # (1, 3, 112, 112)
tokens, _ = soft_split_forward(x, 7, 4, 2)                        # (1, 784, 147)
u, _ = layernorm_forward(tokens, np.ones(147, np.float32), np.zeros(147, np.float32))
_, cache = scaled_dot_product_attention_forward(u[:, None], u[:, None], u[:, None], 4 / 147)
P = cache[3][0, 0]                                                # (784, 784): the attention map
print("attention map", P.shape, "rows sum to 1:", np.allclose(P.sum(-1), 1, atol=1e-5))
assert np.allclose(P.sum(-1), 1, atol=1e-5), "the attention map's rows do not sum to 1"

queries = {"suit (flat orange)": (17, 5), "flag (vertical stripes)": (5, 1),
           "shuttle edge (diagonal)": (10, 23)}
fig, axes = plt.subplots(1, 4, figsize=(17, 4.3))
axes[0].imshow(photo)
for (name, (r, c)), colour in zip(queries.items(), ["tab:orange", "tab:cyan", "tab:red"]):
    axes[0].plot(c * 4 + 1.5, r * 4 + 1.5, "o", ms=10, mec="white", color=colour, label=name)
axes[0].legend(loc="lower right", fontsize=8)
axes[0].set(title="query tokens", xlabel="pixel column", ylabel="pixel row")
for ax, (name, (r, c)) in zip(axes[1:], queries.items()):
    row = P[r * 28 + c].copy()
    row[r * 28 + c] = np.nan                                      # the query itself, blanked
    im = ax.imshow(row.reshape(28, 28), cmap="inferno")
    ax.plot(c, r, "c+", ms=12, mew=2)
    ax.set(title=f"row of P: {name}", xlabel="key token column", ylabel="key token row")
    fig.colorbar(im, ax=ax, fraction=0.046, label="attention weight")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** even with no learned weights, a query spreads its attention over the tokens that
# look like it, anywhere in the image (the suit over the suit, a vertical stripe over other
# vertical edges): global, content-based mixing that a convolution cannot do in one layer.

# %% [markdown]
# ## The T2T transformer layer and its v skip
# A transformer layer normally adds its attention output to its input: $x + \mathrm{Attn}(x)$.
# In a T2T layer the input tokens are 147 (or 576) wide but the output is 64 wide, so $x$
# cannot be the residual. The official code uses **v**, which is already 64 wide:
#
# $$u = \mathrm{LN}_1(x),\quad [q, k, v] = u W_{qkv}^\top,\quad
#   x_1 = v + \mathrm{proj}\big(\mathrm{softmax}(q k^\top D_{in}^{-1/2})\, v\big),\quad
#   \mathrm{out} = x_1 + \mathrm{MLP}(\mathrm{LN}_2(x_1)).$$
#
# (One head; the scale uses the *input* width $D_{in}$, a quirk of the official code.)
# Now $v$ is used twice, in the attention and in the skip, so its gradient is the **sum** of the
# two paths:
#
# $$dv = \underbrace{P^\top d(\text{attention out})}_{\text{through the attention}} + \underbrace{dx_1}_{\text{through the skip}} .$$
#
# In the code it is one line, `dv = dv + unmerge_heads(dout, num_heads)`:

# %%
source = inspect.getsource(self_attention_backward)
print("\n".join(line for line in source.splitlines() if "value_skip" in line or "dv =" in line))

# %% [markdown]
# The layer's parameters, under the names they have in a checkpoint after the prefix
# `tokens_to_token.attention1.` (T2T-ViT_t-14/19/24), for the first T2T layer (D_in = 147,
# E = 64, MLP hidden width 64):

# %%
D_in, E = 147, 64
shapes = {"norm1.weight": (D_in,), "norm1.bias": (D_in,), "attn.qkv.weight": (3 * E, D_in),
          "attn.proj.weight": (E, E), "attn.proj.bias": (E,), "norm2.weight": (E,),
          "norm2.bias": (E,), "mlp.fc1.weight": (E, E), "mlp.fc1.bias": (E,),
          "mlp.fc2.weight": (E, E), "mlp.fc2.bias": (E,)}
params = {name: rng.normal(size=shape) * (0.2 if len(shape) == 2 else 1.0)
          for name, shape in shapes.items()}                    # float64, for the checks
for name, shape in shapes.items():
    print(f"  {name:18s} {shape}")
print("parameters:", sum(np.prod(s) for s in shapes.values()))

x = rng.normal(size=(2, 16, D_in))                              # (B, N, D_in): 16 tokens
out, cache = token_transformer_forward(x, params)               # (B, N, E)
print("x", x.shape, "-> out", out.shape)
g = rng.normal(size=out.shape)
dx, grads = token_transformer_backward(g, cache)
f = lambda: token_transformer_forward(x, params)[0]
for name, array, analytic in [("x", x, dx)] + [(n, params[n], grads[n]) for n in shapes]:
    indices, numeric = numeric_grad(f, array, g, entries=12)
    error = rel_error([analytic[i] for i in indices], numeric)
    print(f"d{name:18s} 12 entries vs central differences: {error:.1e}")
    assert error < 1e-6, f"T2T transformer layer d{name}: relative error {error:.1e} vs central differences"

# %% [markdown]
# What if the skip's share of $dv$ were forgotten? Re-run the backward with a cache that says
# there was no skip: the gradients of everything before $v$ (the qkv weights, LayerNorm 1, the
# input) come out wrong by tens of percent, while the layers after it stay right. This is why
# the tests check exactly the places where a value is used twice.

# %%
ln1, attn_cache, ln2, mlp_cache = cache
qkv_cache, num_heads, value_skip, *rest = attn_cache
no_skip_cache = (ln1, (qkv_cache, num_heads, False, *rest), ln2, mlp_cache)
dx_wrong, grads_wrong = token_transformer_backward(g, no_skip_cache)
for name in ("mlp.fc2.weight", "attn.proj.weight", "attn.qkv.weight", "norm1.weight"):
    print(f"d{name:18s} without the skip's gradient: relative error {rel_error(grads_wrong[name], grads[name]):.2f}")
print(f"dx                  without the skip's gradient: relative error {rel_error(dx_wrong, dx):.2f}")
assert rel_error(dx_wrong, dx) > 0.05, "dropping the skip's gradient should make dx wrong"

# %% [markdown]
# ## The N x N memory wall
# $P$ has $N^2$ entries per head and per image, and the backward needs it, so it is kept in the
# cache until then. In T2T-ViT the first T2T layer sees 3136 tokens at 224x224 (notebook 1), so
# one attention map is $3136^2 \times 4$ bytes $\approx$ 39 MB in float32, per image. Let us
# measure the memory the forward allocates (NumPy reports its allocations to Python's
# `tracemalloc`) and the time of forward plus backward, for growing N, with one head of width 64.

# %%
def attention_cost(N, d=64):
    """(peak bytes during the forward, bytes kept in the cache, seconds for forward + backward)."""
    q, k, v = (rng.normal(size=(1, 1, N, d)).astype(np.float32) for _ in range(3))
    tracemalloc.start()
    started = time.perf_counter()
    out, cache = scaled_dot_product_attention_forward(q, k, v, d ** -0.5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    scaled_dot_product_attention_backward(out, cache)
    seconds = time.perf_counter() - started
    return peak, cache[3].nbytes, seconds

sizes = [196, 392, 784, 1568, 2352, 3136]
costs = [attention_cost(N) for N in sizes]
for N, (peak, kept, seconds) in zip(sizes, costs):
    print(f"N = {N:5d}: attention map {N * N * 4 / 2**20:7.1f} MiB, forward peak {peak / 2**20:7.1f} MiB, "
          f"kept for backward {kept / 2**20:7.1f} MiB, forward + backward {seconds * 1e3:6.1f} ms")

# %%
fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(13, 4.5))
n_line = np.geomspace(100, 10000, 50)
ax_m.loglog(n_line, n_line ** 2 * 4 / 2**20, "--", color="gray", label="$4N^2$ bytes: one float32 map")
ax_m.loglog(sizes, [c[0] / 2**20 for c in costs], "o-", label="measured peak of the forward")
ax_m.loglog(sizes, [c[1] / 2**20 for c in costs], "s", label="measured: map kept for the backward")
for N, what in [(197, "backbone (197)"), (784, "T2T layer 2 (784)"), (3136, "T2T layer 1 (3136)")]:
    ax_m.axvline(N, color="tab:red", lw=0.8, alpha=0.6)
    ax_m.text(N * 1.05, 2e-2, what, rotation=90, color="tab:red", fontsize=8)
ax_m.set(title="memory of one attention head, one image", xlabel="tokens N", ylabel="MiB")
ax_t.loglog(sizes, [c[2] * 1e3 for c in costs], "o-", label="measured forward + backward")
fit = np.median([c[2] / N ** 2 for N, c in zip(sizes, costs)])    # seconds per N^2
ax_t.loglog(n_line, fit * 1e3 * n_line ** 2, "--", color="gray", label="$c \\cdot N^2$, c fitted")
ax_t.set(title="time of one attention head, one image", xlabel="tokens N", ylabel="milliseconds")
for ax in (ax_m, ax_t):
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** memory and time grow as $N^2$: at 3136 tokens one map is 38 MiB and the
# forward briefly needs about three maps' worth; a batch of 64 images keeps 2.4 GiB for the first
# T2T layer's map alone, which is what makes the T2T transformer layer expensive and motivates
# the performer.
#
# ## What we saw
# - Attention's backward is three matrix products and a softmax backward; checked against a
#   loop twin, finite differences and autograd.
# - Heads are a reshape: they run side by side and never mix until `proj`.
# - The T2T transformer layer's residual goes through $v$, so $v$ collects two gradients; drop
#   one and every gradient before it is wrong.
# - The N x N map costs $4N^2$ bytes per head and image: 38 MiB at 3136 tokens.
#
# Next, [notebook 4](04_performer.ipynb): the performer, which never builds the map.
