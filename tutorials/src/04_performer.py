# %% [markdown]
# # 4. The performer: attention without the N x N map
#
# Notebook 3 ended at a wall: softmax attention stores an N x N map, 38 MiB per head and image
# at 3136 tokens. T2T-ViT-7/10/12/14/19/24 replace the attention of their two T2T layers by a
# **performer** (Choromanski et al., 2021), which approximates the softmax kernel with random
# features and never builds the map. This notebook:
#
# 1. derives why random features estimate $\exp(q \cdot k)$, and checks it;
# 2. plots the approximation error against the number of features $m$ (T2T-ViT uses 32);
# 3. derives and checks the performer's backward pass;
# 4. measures time and memory of performer vs full attention as N grows;
# 5. shows why the official performer gives NaN in float16, and how t2t_ref's precision policy
#    avoids it.
#
# Shape letters: B batch, N tokens, d the width of q and k, e the width of v, m the number of
# random features.

# %%
import inspect
import time
import tracemalloc

import matplotlib.pyplot as plt
import numpy as np

from t2t_ref.init import performer_features
from t2t_ref.layers.token_performer import token_performer_backward, token_performer_forward
from t2t_ref.ops.attention import (scaled_dot_product_attention_backward,
                                   scaled_dot_product_attention_forward)
from t2t_ref.ops.performer import (performer_attention_backward, performer_attention_forward,
                                   random_features_backward, random_features_forward)
from t2t_ref.ops.softmax import softmax_forward

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
    `entries` random ones. Returns (indices, values)."""
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
# ## Random features for the softmax kernel
# Softmax attention (with the scale folded into q and k) is
# $y_i = \sum_j \kappa(q_i, k_j)\, v_j \,/\, \sum_j \kappa(q_i, k_j)$ with the kernel
# $\kappa(q, k) = \exp(q \cdot k)$. For a Gaussian vector $w \sim \mathcal N(0, I_d)$ the moment
# generating function gives $\mathbb E[e^{w \cdot x}] = e^{|x|^2/2}$; with $x = q + k$,
#
# $$\mathbb E_w\Big[e^{w\cdot q - |q|^2/2}\; e^{w \cdot k - |k|^2/2}\Big]
#   = e^{|q + k|^2/2 - |q|^2/2 - |k|^2/2} = e^{q \cdot k}.$$
#
# So with $m$ draws $w_1 \dots w_m$ stacked in $W$ (m, d) and the **positive random features**
#
# $$\phi(z) = \frac{1}{\sqrt m}\, \exp\!\big(W z - |z|^2/2\big) \in \mathbb R^m,$$
#
# $\phi(q) \cdot \phi(k)$ is an unbiased estimate of $\exp(q \cdot k)$ (and always positive,
# unlike $\sin/\cos$ features, so the normaliser never goes negative). Then attention is a
# product that can be **re-associated**:
#
# $$Y = \frac{\phi(Q)\,\big(\phi(K)^\top V\big)}{\phi(Q)\,\big(\phi(K)^\top \mathbf 1\big)}
#   \qquad \text{(row-wise division)},$$
#
# where $\phi(K)^\top V$ is only (m, e): cost $O(N m e)$ instead of $O(N^2 e)$, and no N x N
# array ever exists. First, a numerical check of the kernel estimate, with the project's
# `random_features_forward`, for one pair q, k and growing m:

# %%
d = 64
q = rng.normal(size=(1, 1, d)) * 0.15                      # (B, N, d) with B = N = 1
k = rng.normal(size=(1, 1, d)) * 0.15
exact = float(np.exp(q[0, 0] @ k[0, 0]))
for m in (16, 256, 4096, 65536):
    W = rng.normal(size=(m, d))                             # iid Gaussian features
    estimate = float(random_features_forward(q, W)[0][0, 0] @ random_features_forward(k, W)[0][0, 0])
    print(f"m = {m:6d}: phi(q).phi(k) = {estimate:.5f}   exp(q.k) = {exact:.5f}   "
          f"error {abs(estimate - exact) / exact:.4f}")
assert abs(estimate - exact) / exact < 0.05, f"m = {m}: the random-feature estimate is off exp(q.k)"

# %% [markdown]
# ## Approximation error against the number of features
# Now whole attention maps: 256 tokens, $q, k$ with entries of standard deviation 0.15, and the
# relative (Frobenius) error of the performer's implied map $\phi(Q)\phi(K)^\top$, row-normalised,
# against the exact softmax map. Two kinds of $W$:
#
# - **iid**: Gaussian rows, as in the derivation; the error should fall like $1/\sqrt m$.
# - **orthogonal**: blocks of $d$ mutually orthogonal rows, each rescaled to a Gaussian-like
#   length (chi-distributed). Still unbiased, and orthogonal directions cover the sphere more
#   evenly, so the variance is lower.
#
# And the matrix T2T-ViT actually uses, `t2t_ref.init.performer_features(rng, 32, 64)`, as the
# official code builds it: orthonormal rows times $\sqrt m$. The right panel shows the error's
# other driver: the length of q and k (the estimator's variance grows like $e^{|q + k|^2}$),
# which is why q and k come out of a LayerNorm and a small Linear, and why `exp` overflows in
# float16.

# %%
def orthogonal_features(rng, m, d):
    """Blocks of d orthogonal rows, each row rescaled to a chi(d)-distributed length."""
    blocks = []
    for _ in range(-(-m // d)):
        basis, _ = np.linalg.qr(rng.normal(size=(d, d)))    # orthonormal columns
        blocks.append(basis.T * np.sqrt(rng.chisquare(d, size=(d, 1))))
    return np.concatenate(blocks)[:m]


def map_error(q, k, W):
    """Relative Frobenius error of the performer's row-normalised map vs softmax(q k^T)."""
    exact_map, _ = softmax_forward(q[0] @ k[0].T)           # (N, N)
    qp, kp = random_features_forward(q, W)[0][0], random_features_forward(k, W)[0][0]
    approx = qp @ kp.T                                       # (N, N), only for this check
    approx /= approx.sum(-1, keepdims=True)
    return np.linalg.norm(approx - exact_map) / np.linalg.norm(exact_map)


N, seeds = 256, 4
kinds = {"iid Gaussian": lambda r, m: r.normal(size=(m, d)), "orthogonal": lambda r, m: orthogonal_features(r, m, d)}
features = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
q, k = (rng.normal(size=(1, N, d)) * 0.15 for _ in range(2))
errors = {name: [np.mean([map_error(q, k, make(np.random.default_rng(s), m)) for s in range(seeds)])
                 for m in features] for name, make in kinds.items()}
t2t_error = np.mean([map_error(q, k, performer_features(np.random.default_rng(s), 32, d)) for s in range(seeds)])

stds = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
by_length = {name: [] for name in list(kinds) + ["T2T-ViT's W"]}
for std in stds:
    qs, ks = (rng.normal(size=(1, N, d)) * std for _ in range(2))
    for name, make in list(kinds.items()) + [("T2T-ViT's W", lambda r, m: performer_features(r, m, d))]:
        by_length[name].append(np.mean([map_error(qs, ks, make(np.random.default_rng(s), 32)) for s in range(seeds)]))

fig, (ax_m, ax_s) = plt.subplots(1, 2, figsize=(13, 4.6))
for name, values in errors.items():
    ax_m.loglog(features, values, "o-", label=name)
ax_m.loglog(features, errors["iid Gaussian"][0] * np.sqrt(features[0] / np.array(features)), "--",
            color="gray", label="$\\propto 1/\\sqrt{m}$")
ax_m.loglog([32], [t2t_error], "*", ms=16, color="tab:red", label="T2T-ViT's W (m = 32)")
ax_m.axvline(32, color="tab:red", lw=0.8, alpha=0.5)
ax_m.set(title="performer vs softmax attention map (N = 256, d = 64)", xlabel="random features m",
         ylabel="relative error of the attention map")
for name, values in by_length.items():
    ax_s.semilogy(np.array(stds) * np.sqrt(d), values, "o-", label=name,
                  color="tab:red" if name.startswith("T2T") else None)
ax_s.set(title="error at m = 32 against the length of q and k", xlabel="typical |q| = |k|",
         ylabel="relative error of the attention map")
for ax in (ax_m, ax_s):
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** the error falls roughly like $1/\sqrt m$ (orthogonal features a little lower),
# so m = 32 is a coarse approximation (tens of percent of the map), and it worsens fast as q
# and k get longer; T2T-ViT accepts that, because the layer is trained through the
# approximation and only has to produce useful tokens, not exact softmax attention.

# %% [markdown]
# ### T2T-ViT's W estimates a tempered kernel
# Why is the red star *below* the unbiased curves? T2T-ViT's rows have length $\sqrt m = \sqrt{32}$,
# not the $\approx\sqrt d = 8$ of a Gaussian vector. For $w$ of length $\sqrt m$ in a random
# direction, $w \cdot x$ is close to $\mathcal N(0, \tfrac md |x|^2)$, so the same computation as
# above gives
#
# $$\mathbb E\big[\phi(q)\cdot\phi(k)\big] \approx
#   \exp\!\Big(\tfrac md\, q\cdot k - \big(1 - \tfrac md\big)\tfrac{|q|^2 + |k|^2}{2}\Big):$$
#
# for m = 32, d = 64, a softmax at **half the temperature**, with long keys down-weighted (the
# $|q|^2$ factor cancels in the row normalisation). Shorter features mean lower variance, and on
# these nearly flat maps the bias costs little, hence the lower error against exact softmax. The
# network is trained with this kernel, so nothing is wrong; it is simply not $\exp(q\cdot k)$.
# Averaging the estimate over many draws of W checks the formula:

# %%
qa, ka = (rng.normal(size=(1, 5, 64)) * 0.15 for _ in range(2))
mean_estimate = np.zeros((5, 5))
draws = 2000
for s in range(draws):
    W = performer_features(np.random.default_rng(s), 32, 64)
    mean_estimate += random_features_forward(qa, W)[0][0] @ random_features_forward(ka, W)[0][0].T / draws
r = 32 / 64
tempered = np.exp(r * qa[0] @ ka[0].T - (1 - r) * ((qa[0] ** 2).sum(-1)[:, None] + (ka[0] ** 2).sum(-1)[None]) / 2)
print(f"mean over {draws} draws of T2T-ViT's W vs the tempered formula: largest relative deviation "
      f"{np.abs(mean_estimate / tempered - 1).max():.3f}; vs exp(q.k): {np.abs(mean_estimate / np.exp(qa[0] @ ka[0].T) - 1).max():.3f}")
assert np.abs(mean_estimate / tempered - 1).max() < 0.1, "T2T-ViT's W does not estimate the tempered kernel"
assert np.abs(mean_estimate / np.exp(qa[0] @ ka[0].T) - 1).max() > 0.3, "the tempered kernel should differ from exp(q.k)"

# %% [markdown]
# ### What the approximation looks like
# The exact map and the performer's for 48 tokens with some structure (three groups of similar
# keys), at m = 32 and m = 2048:

# %%
centres = rng.normal(size=(3, d)) * 0.35
groups = np.repeat(np.arange(3), 16)                        # token t belongs to group t // 16
qg = (centres[groups] + rng.normal(size=(48, d)) * 0.1)[None]  # (1, 48, d)
kg = (centres[groups] + rng.normal(size=(48, d)) * 0.1)[None]
exact_map, _ = softmax_forward(qg[0] @ kg[0].T)
panels = [("exact softmax", exact_map)]
for m in (32, 2048):
    W = orthogonal_features(np.random.default_rng(1), m, d)
    qp, kp = random_features_forward(qg, W)[0][0], random_features_forward(kg, W)[0][0]
    approx = qp @ kp.T
    panels.append((f"performer, m = {m} (orthogonal)", approx / approx.sum(-1, keepdims=True)))
fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
vmax = exact_map.max()
for ax, (title, A) in zip(axes, panels):
    im = ax.imshow(A, cmap="viridis", vmin=0, vmax=vmax)
    ax.set(title=title, xlabel="key token", ylabel="query token")
    fig.colorbar(im, ax=ax, fraction=0.046, label="attention weight")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** with 32 features the block structure (who attends to whom) survives but the
# weights are noisy; with 2048 the map is close to exact, at which point the performer would no
# longer be cheaper.

# %% [markdown]
# ## The performer's backward
# The forward, as `performer_attention_forward` computes it, with $\phi_q = \phi(Q)$,
# $\phi_k = \phi(K)$ (N, m):
#
# $$s = \sum_t \phi_{k,t} \;(m),\quad \text{den} = \phi_q\, s + \varepsilon \;(N, 1),\quad
#   C = V^\top \phi_k \;(e, m),\quad \text{num} = \phi_q C^\top \;(N, e),\quad Y = \text{num} / \text{den}.$$
#
# Backward, last line first (each line a Linear-like product or a quotient rule):
#
# $$d\text{num} = dY / \text{den},\qquad d\text{den} = -\textstyle\sum_e (dY \odot Y) / \text{den},$$
# $$d\phi_q = d\text{num}\; C + d\text{den}\; s^\top,\qquad dC = d\text{num}^\top \phi_q,\qquad
#   dV = \phi_k\, dC^\top,\qquad d\phi_k = V\, dC + \mathbf 1 \big(\textstyle\sum_t d\text{den}_t\, \phi_{q,t}\big)^\top .$$
#
# $s$ is a sum over tokens that every token's denominator uses, so $d\phi_k$ gets the same
# vector added on every row. Finally through the features: with
# $\phi = \exp(zW^\top - |z|^2/2)/\sqrt m$ and $G = d\phi \odot \phi$ (the gradient at the
# exponent), $dz = G\,W - \mathrm{rowsum}(G)\, z$. $W$ is fixed and gets no gradient.

# %%
print(inspect.getsource(random_features_backward))
print(inspect.getsource(performer_attention_backward))

# %%
B, N, d, e, m = 2, 6, 4, 3, 8
q, k = (rng.normal(size=(B, N, d)) * 0.5 for _ in range(2))
v = rng.normal(size=(B, N, e))
W = performer_features(rng, m, d)
y, cache = performer_attention_forward(q, k, v, W)
g = rng.normal(size=y.shape)
ours = performer_attention_backward(g, cache)
theirs = None
if torch is not None:
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tW = torch.tensor(W)
    phi = lambda z: torch.exp(z @ tW.T - (z * z).sum(-1, keepdim=True) / 2) / m ** 0.5
    qp, kp = phi(tq), phi(tk)
    ty = (qp @ (kp.transpose(1, 2) @ tv)) / (qp @ kp.sum(1, keepdim=True).transpose(1, 2) + 1e-8)
    (ty * torch.tensor(g)).sum().backward()
    theirs = [tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()]
    print(f"forward vs PyTorch: {rel_error(y, ty.detach().numpy()):.1e}")
    assert rel_error(y, ty.detach().numpy()) < 1e-12, "performer forward differs from PyTorch's"
f = lambda: performer_attention_forward(q, k, v, W)[0]
for i, (name, x) in enumerate(zip(("dq", "dk", "dv"), (q, k, v))):
    _, numeric = numeric_grad(f, x, g)
    ag = "autograd skipped" if theirs is None else f"vs autograd {rel_error(ours[i], theirs[i]):.1e}"
    print(f"{name}: vs central differences {rel_error(ours[i].reshape(-1), numeric):.1e}, {ag}")
    assert rel_error(ours[i].reshape(-1), numeric) < 1e-6, f"performer {name} vs central differences"
    assert theirs is None or rel_error(ours[i], theirs[i]) < 1e-12, f"performer {name} vs autograd"

# %% [markdown]
# ## The T2T performer layer
# The layer T2T-ViT-7 uses twice: LayerNorm, one Linear producing **k, q, v in that order**
# (the official code's order), performer attention, `proj`, and the same v skip as the
# transformer layer of notebook 3 (input width 147 or 576, output 64), then an MLP with its own
# residual. A spot check of its backward by finite differences, on random parameters under the
# checkpoint's names (prefix `tokens_to_token.attention1.`):

# %%
D_in, E = 147, 64
shapes = {"w": (32, E), "kqv.weight": (3 * E, D_in), "kqv.bias": (3 * E,), "proj.weight": (E, E),
          "proj.bias": (E,), "norm1.weight": (D_in,), "norm1.bias": (D_in,), "norm2.weight": (E,),
          "norm2.bias": (E,), "mlp.0.weight": (E, E), "mlp.0.bias": (E,), "mlp.2.weight": (E, E),
          "mlp.2.bias": (E,)}
params = {name: rng.normal(size=shape) * (0.05 if len(shape) == 2 else 0.5) for name, shape in shapes.items()}
params["w"] = performer_features(rng, 32, E)                # fixed, not trained
x = rng.normal(size=(2, 16, D_in))
out, cache = token_performer_forward(x, params)             # eval mode: no dropout
g = rng.normal(size=out.shape)
dx, grads = token_performer_backward(g, cache)
print("x", x.shape, "-> out", out.shape, "| gradients for", sorted(grads), "(none for w)")
f = lambda: token_performer_forward(x, params)[0]
for name, array, analytic in [("x", x, dx)] + [(n, params[n], grads[n]) for n in shapes if n != "w"]:
    indices, numeric = numeric_grad(f, array, g, entries=10)
    error = rel_error([analytic[i] for i in indices], numeric)
    print(f"d{name:14s} 10 entries vs central differences: {error:.1e}")
    assert error < 1e-6, f"T2T performer layer d{name}: relative error {error:.1e} vs central differences"

# %% [markdown]
# ## Time and memory as N grows
# Forward plus backward of one head, one image, float32, d = e = 64, for full softmax attention
# and for the performer with m = 32; peak memory of the forward from `tracemalloc`. Full attention
# stops at 3136 tokens (the first T2T layer at 224); the performer goes on to 12544 (448x448).

# %%
def cost(kind, N, d=64, m=32):
    """(seconds for forward + backward, peak forward bytes) of one head on (1, N, d) inputs."""
    q, k, v = (rng.normal(size=(1, N, d)).astype(np.float32) * 0.2 for _ in range(3))
    W = performer_features(rng, m, d).astype(np.float32)
    tracemalloc.start()
    started = time.perf_counter()
    if kind == "full":
        y, cache = scaled_dot_product_attention_forward(q[:, None], k[:, None], v[:, None], 1.0)
    else:
        y, cache = performer_attention_forward(q, k, v, W)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if kind == "full":
        scaled_dot_product_attention_backward(y, cache)
    else:
        performer_attention_backward(y, cache)
    return time.perf_counter() - started, peak

sizes = [196, 392, 784, 1568, 3136, 6272, 12544]
repeats = lambda N: 5 if N <= 1568 else 2                  # best of a few: timings on a busy machine are noisy
full = {N: min(cost("full", N) for _ in range(repeats(N))) for N in sizes if N <= 3136}
perf = {N: min(cost("performer", N) for _ in range(repeats(N))) for N in sizes}
for N in sizes:
    f_text = f"full {full[N][0] * 1e3:7.1f} ms {full[N][1] / 2**20:7.1f} MiB" if N in full else "full        (skipped)"
    print(f"N = {N:5d}: {f_text} | performer {perf[N][0] * 1e3:6.1f} ms {perf[N][1] / 2**20:6.2f} MiB")

# %%
fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.5))
for ax, index, unit, scale in ((ax_t, 0, "milliseconds", 1e3), (ax_m, 1, "MiB (forward peak)", 2.0**-20)):
    ax.loglog(list(full), [c[index] * scale for c in full.values()], "o-", label="full softmax attention")
    ax.loglog(list(perf), [c[index] * scale for c in perf.values()], "s-", label="performer, m = 32")
    ax.axvline(3136, color="tab:red", lw=0.8, alpha=0.6)
    ax.text(3136 * 1.05, ax.get_ylim()[0] * 2, "3136 tokens (224x224)", rotation=90, color="tab:red", fontsize=8)
    ax.set(xlabel="tokens N", ylabel=unit)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
ax_t.set_title("forward + backward time, one head, one image")
ax_m.set_title("memory of the forward, one head, one image")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** the performer's time and memory grow linearly in N while full attention's grow
# quadratically; at 3136 tokens the performer is one to two orders of magnitude cheaper, which
# is what lets T2T-ViT run its first T2T layer on 56x56 tokens at all.
#
# ## Why the performer NaNs in float16
# Mixed precision computes in 16-bit floats. Users of the official code who turn it on get NaN
# losses (its issues #19, #26, #65, #69), and the performer is the reason. Its features are
# $\exp(w_i \cdot z - |z|^2/2)/\sqrt m$, and its output divides by
# $D = \phi(q) \cdot \sum_t \phi(k_t) + 10^{-8}$. Two numbers decide what float16 makes of
# that: its largest value, 65504 ($= e^{11.1}$), and its smallest, $6 \cdot 10^{-8}$
# ($= e^{-16.6}$); $10^{-8}$ itself rounds to 0. Real activations: the photograph through a
# T2T-ViT-7's first soft split, LayerNorm and `kqv` Linear, with the initial weights, and
# with the `kqv` weights three times as large (training grows them; the keys' norms grow
# with them, to about 7 here).

# %%
import t2t_ref
from PIL import Image
from skimage import data

from t2t_ref.data import eval_transform
from t2t_ref.ops.layernorm import layernorm_forward
from t2t_ref.ops.linear import linear_forward
from t2t_ref.ops.soft_split import soft_split_forward

t2t7 = t2t_ref.create_model("t2t_vit_7", num_classes=10, img_size=224, seed=0)
p1 = {k.removeprefix("tokens_to_token.attention1."): v for k, v in t2t7.params.items()
      if k.startswith("tokens_to_token.attention1.")}
W1 = t2t7.buffers["tokens_to_token.attention1.w"]                  # (32, 64)
photo = eval_transform(Image.fromarray(data.astronaut()), 224)[None]
tokens, _ = soft_split_forward(photo, 7, 4, 2)                     # (1, 3136, 147)
u, _ = layernorm_forward(tokens, p1["norm1.weight"], p1["norm1.bias"])

FP16_MAX, FP16_TINY = float(np.finfo(np.float16).max), float(np.finfo(np.float16).smallest_subnormal)


def performer_numbers(kqv_scale, dtype):
    """The performer of T2T layer 1 on the photograph, in dtype: the exponents' range, the
    smallest denominator, and how many outputs are not finite."""
    kqv, _ = linear_forward(u, p1["kqv.weight"] * kqv_scale, p1["kqv.bias"])
    k, q, v = (a.astype(dtype) for a in (kqv[..., :64], kqv[..., 64:128], kqv[..., 128:]))
    exponent = k @ W1.T.astype(dtype) - (k * k).sum(-1, keepdims=True) / dtype(2)  # (1, N, 32)
    kp = np.exp(exponent) / dtype(np.sqrt(32))
    qp = np.exp(q @ W1.T.astype(dtype) - (q * q).sum(-1, keepdims=True) / dtype(2)) / dtype(np.sqrt(32))
    denominator = qp @ kp.sum(axis=1)[0] + dtype(1e-8)            # (1, N)
    with np.errstate(divide="ignore", invalid="ignore"):          # 0/0 is what we look for
        y = (qp @ (v.transpose(0, 2, 1) @ kp).transpose(0, 2, 1)) / denominator[..., None]
    return (float(exponent.min()), float(exponent.max()), float(denominator.min()),
            int((~np.isfinite(y)).sum()), y.size)


rows = []
for scale in (1.0, 3.0):
    for dtype in (np.float32, np.float16):
        low, high, smallest, bad, total = performer_numbers(scale, dtype)
        rows.append((scale, dtype.__name__, low, high, smallest))
        print(f"kqv x{scale:.0f}, {dtype.__name__:7s}: exponents {low:7.1f} .. {high:5.1f}, "
              f"smallest denominator {smallest:.1e}, {bad} of {total} outputs not finite")

# %% [markdown]
# With the initial weights every exponent is small and float16 agrees with float32. With the
# longer keys the exponent $-|z|^2/2$ wins: for some tokens *every* feature is below
# $e^{-16.6}$, so in float16 all of them are 0, the denominator is $0 + 0$ ($10^{-8}$ rounded),
# and $0/0$ is NaN; float32 still holds $e^{-39}$, and its denominator stays near $10^{-8}$.
# (Keys aligned with a row of $w$ and of norm near $\sqrt m \approx 5.7$ give the other
# failure: exponents up to $+16$, features past 65504, inf / inf.) The plot puts these
# numbers beside the three formats' ranges.

# %%
import ml_dtypes

formats = {"float32": np.finfo(np.float32), "bfloat16": ml_dtypes.finfo(ml_dtypes.bfloat16),
           "float16": np.finfo(np.float16)}
fig, ax = plt.subplots(figsize=(10, 3.6))
for row, (label, info) in enumerate(formats.items()):
    tiny, normal, biggest = float(info.smallest_subnormal), float(info.smallest_normal), float(info.max)
    ax.plot([np.log(tiny), np.log(biggest)], [row, row], lw=8, color="tab:blue", alpha=0.35)
    ax.plot([np.log(normal), np.log(biggest)], [row, row], lw=8, color="tab:blue")
    ax.text(np.log(biggest) + 3, row, f"{label}: {tiny:.0e} .. {biggest:.0e}", va="center", fontsize=8)
for scale, name, low, high, smallest in rows:
    if name == "float32":
        y = -0.6 * scale / 3.0 - 0.6                               # one row per kqv scale
        ax.plot([low, high], [y, y], "|-", color="tab:red", lw=2)
        ax.text(high + 3, y, f"the exponents, kqv x{scale:.0f}", va="center", fontsize=8)
ax.axvline(np.log(1e-8), color="gray", ls=":")
ax.text(np.log(1e-8) + 2, 2.45, "eps = 1e-8", fontsize=8)
ax.set(yticks=[], xlabel="natural log of the value (pale: subnormal numbers)", xlim=(-120, 150),
       ylim=(-1.6, 2.7), title="what each format can hold, and the performer's exponents")
plt.show()

# %% [markdown]
# **Takeaway:** bfloat16 has float32's exponent range and would hold these numbers (with 3
# significant digits); float16's range is far narrower, and the performer's exponentials leave
# it at both ends. Two fixes: (1) compute the random-feature map, the key sum, the denominator
# and its epsilon in float32 (a "float32 island"), then round the output to float16: what
# t2t_ref's `precision="fp16"` does (`t2t_ref/precision.py` lists every island); (2) an
# epsilon float16 can hold (say $10^{-4}$) turns $0/0$ into $0$, but not inf / inf, and it
# changes the function. The first fix, on the same keys:

# %%
from t2t_ref.ops.performer import performer_attention_forward as performer

kqv, _ = linear_forward(u, p1["kqv.weight"] * 3.0, p1["kqv.bias"])
k, q, v = (a.astype(np.float16) for a in (kqv[..., :64], kqv[..., 64:128], kqv[..., 128:]))
island, _ = performer(q, k, v, W1)                                 # float16 in, float32 inside
reference, _ = performer(*(a.astype(np.float32) for a in (q, k, v)), W1)
print(f"float16 in, float32 island: {island.dtype}, all finite: {bool(np.isfinite(island).all())}, "
      f"largest difference to float32: {float(np.max(np.abs(island - reference))):.1e} "
      f"(values up to {float(np.max(np.abs(reference))):.1f})")
assert np.isfinite(island).all()
assert np.max(np.abs(island - reference)) < 1e-2, "the float32 island's output is far from float32's"

# %% [markdown]
# ## What we saw
# - $\phi(q)\cdot\phi(k)$ with positive random features is an unbiased estimate of
#   $\exp(q\cdot k)$; re-associating the product removes the N x N map.
# - The error falls like $1/\sqrt m$ and grows with the length of q and k; T2T-ViT's m = 32 is a
#   coarse approximation that the network is trained through.
# - The backward is a chain of small products and two quotient rules; checked against finite
#   differences and autograd.
# - Cost: linear in N instead of quadratic.
# - In float16 its exponentials under- and overflow and its epsilon rounds to 0: computed in a
#   float32 island, it stays finite.
#
# Next, [notebook 5](05_whole_model.ipynb): the whole model, shape by shape.
