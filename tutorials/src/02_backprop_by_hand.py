# %% [markdown]
# # 2. Backprop by hand: Linear, LayerNorm, GELU, softmax, cross-entropy
#
# `t2t_ref` has no autograd. Every op has a forward that returns `(out, cache)` and a backward
# that turns the gradient of the loss with respect to `out` into gradients with respect to the
# inputs and parameters. This notebook derives each backward on paper, shows the project's
# code, and then checks it twice:
#
# - against **central finite differences** in float64: for a loss $\ell = \sum \mathrm{out}
#   \odot g$ with a *random* upstream gradient $g$, nudge one input entry by $\pm h$ and compare
#   $(\ell(x + h) - \ell(x - h)) / 2h$ with the analytic gradient;
# - against **PyTorch autograd** on the same numbers (skipped, with a message, without PyTorch).
#
# The errors are reported as $\max|a - b| / \max(|a| + |b|)$: about 1e-8 or less means right,
# 1e-2 means wrong. Notation: the loss is $\ell$, and for any array $y$, $dy$ means
# $\partial \ell / \partial y$, an array of $y$'s shape.

# %%
import inspect

import matplotlib.pyplot as plt
import numpy as np
from scipy.special import erf

from t2t_ref.ops.cross_entropy import cross_entropy
from t2t_ref.ops.gelu import gelu_backward, gelu_forward
from t2t_ref.ops.layernorm import layernorm_backward, layernorm_forward
from t2t_ref.ops.linear import linear_backward, linear_forward
from t2t_ref.ops.softmax import softmax_backward, softmax_forward

plt.rcParams.update({"figure.dpi": 80})
rng = np.random.default_rng(0)

try:
    import torch
    import torch.nn.functional as F
    torch.set_default_dtype(torch.float64)
except ImportError:
    torch = None
    print("PyTorch is not installed: the comparisons with autograd below are skipped "
          "(pip install torch to run them)")

checks = []   # (what, finite-difference error, autograd error or None), for the summary plot


def rel_error(a, b):
    """max|a - b| / max(|a| + |b|): CS231n's relative error."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-300))


def numeric_grad(f, x, g, h=1e-6):
    """Central differences of sum(f() * g) with respect to every entry of the array x.

    f takes no argument and reads x, which is nudged in place and restored."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        old = x[index]
        x[index] = old + h
        plus = np.sum(f() * g)
        x[index] = old - h
        minus = np.sum(f() * g)
        x[index] = old
        grad[index] = (plus - minus) / (2 * h)
    return grad


def autograd(fn, inputs, g):
    """PyTorch's gradients of sum(fn(*inputs) * g) with respect to each input, or None."""
    if torch is None:
        return None
    tensors = [torch.tensor(a, requires_grad=True) for a in inputs]
    (fn(*tensors) * torch.tensor(g)).sum().backward()
    return [t.grad.numpy() for t in tensors]


def report(op, names, ours, numeric, theirs):
    """Print and record the errors of each gradient against finite differences and autograd."""
    for i, name in enumerate(names):
        fd = rel_error(ours[i], numeric[i])
        ag = None if theirs is None else rel_error(ours[i], theirs[i])
        checks.append((f"{op}: {name}", fd, ag))
        ag_text = "autograd skipped (no PyTorch)" if ag is None else f"vs autograd {ag:.1e}"
        print(f"{op:>13} {name:>4}: vs finite differences {fd:.1e}, {ag_text}")
        assert fd < 1e-6, f"{op} {name}: relative error {fd:.1e} vs finite differences"
        assert ag is None or ag < 1e-12, f"{op} {name}: relative error {ag:.1e} vs autograd"

# %% [markdown]
# ## Linear: $y = x W^\top + b$
# With $x$ of shape (M, D_in) (all leading axes flattened into M rows), $W$ (D_out, D_in) as
# PyTorch stores it, and $b$ (D_out,):
#
# $$y_{nj} = \sum_i x_{ni} W_{ji} + b_j .$$
#
# Each input entry appears in a sum, so its gradient collects every term it appears in:
#
# $$dx_{ni} = \sum_j dy_{nj} W_{ji} \;\Rightarrow\; dx = dy\, W, \qquad
#   dW_{ji} = \sum_n dy_{nj} x_{ni} \;\Rightarrow\; dW = dy^\top x, \qquad
#   db_j = \sum_n dy_{nj}.$$
#
# The shapes check themselves: $dy\,W$ is (M, D_out)(D_out, D_in) = (M, D_in), like $x$. The
# bias, added to every row, collects the gradient of every row: a value used many times sums
# its gradients. Here is the project's code:

# %%
print(inspect.getsource(linear_backward))

# %%
x = rng.normal(size=(2, 5, 4))            # (B, N, D_in)
W = rng.normal(size=(3, 4))               # (D_out, D_in)
b = rng.normal(size=3)                    # (D_out,)
y, cache = linear_forward(x, W, b)        # (2, 5, 3)
g = rng.normal(size=y.shape)              # a random upstream gradient dy
ours = linear_backward(g, cache)          # (dx, dW, db)
numeric = [numeric_grad(lambda: linear_forward(x, W, b)[0], a, g) for a in (x, W, b)]
report("Linear", ["dx", "dW", "db"], ours, numeric, autograd(F.linear if torch else None, [x, W, b], g))

# %% [markdown]
# ## Softmax over the last axis
# $p_i = e^{x_i} / \sum_j e^{x_j}$. Differentiating the quotient,
#
# $$\frac{\partial p_i}{\partial x_j} = p_i(\delta_{ij} - p_j)
#   \quad\Rightarrow\quad
#   dx_j = \sum_i dp_i\, p_i (\delta_{ij} - p_j) = p_j \Big(dp_j - \sum_i dp_i\, p_i\Big).$$
#
# The full Jacobian is $\mathrm{diag}(p) - p p^\top$, an N x N matrix, but the backward never
# builds it: one elementwise product and one row sum. (Subtracting the row maximum in the
# forward, to keep `exp` from overflowing, changes no $p_i$ and so nothing here.)

# %%
print(inspect.getsource(softmax_backward))
x = rng.normal(size=(3, 6))
p, cache = softmax_forward(x)
g = rng.normal(size=p.shape)
numeric = [numeric_grad(lambda: softmax_forward(x)[0], x, g)]
report("softmax", ["dx"], [softmax_backward(g, cache)], numeric,
       autograd(lambda t: torch.softmax(t, dim=-1), [x], g))

# %% [markdown]
# ### Why the upstream gradient must be random
# A tempting test is $\ell = \sum p$, i.e. $g = \mathbf 1$. But every row of $p$ sums to 1
# whatever $x$ is, so the true gradient is exactly **zero**, and a backward that returns zeros,
# or forgets a term, can pass. The derivation says it too: with $dp = \mathbf 1$,
# $dx_j = p_j(1 - \sum_i p_i) = 0$. Below, two broken backwards are checked both ways: one
# drops the row-sum term ("$dx = p \odot dp$"), one returns zeros.

# %%
def broken_softmax_backward(dp, p):
    return p * dp                      # forgot "- sum(dp * p)"

def zero_backward(dp, p):
    return np.zeros_like(dp)           # does nothing at all

for name, backward in [("correct", softmax_backward), ("drops the row sum", broken_softmax_backward),
                       ("returns zeros", zero_backward)]:
    errors = []
    for upstream in (np.ones_like(p), g):
        numeric = numeric_grad(lambda: softmax_forward(x)[0], x, upstream)
        errors.append(np.max(np.abs(backward(upstream, p) - numeric)))
    print(f"{name:>18}: max abs error with g = ones {errors[0]:.1e}, with random g {errors[1]:.1e}")
    if name == "correct":
        assert max(errors) < 1e-6, "the correct softmax backward fails the check"
    elif name == "drops the row sum":
        assert min(errors) > 1e-2, "a check missed the backward that drops the row sum"
    else:                              # the lesson: only the random g catches the zero backward
        assert errors[0] < 1e-6 and errors[1] > 1e-2, "g = ones should miss the zero backward, and a random g catch it"

# %% [markdown]
# With $g = \mathbf 1$ the "returns zeros" backward looks perfect (error 1e-10) while it is
# useless; only the random $g$ exposes it. Every check in this project uses a random upstream
# gradient.

# %% [markdown]
# ## LayerNorm over the last axis
# Forward, for one row $x \in \mathbb R^D$:
#
# $$\mu = \tfrac1D \sum_i x_i,\quad \sigma^2 = \tfrac1D \sum_i (x_i - \mu)^2,\quad
#   r = (\sigma^2 + \epsilon)^{-1/2},\quad \hat x_i = (x_i - \mu)\, r,\quad y_i = \hat x_i w_i + b_i .$$
#
# Parameters first: $dw = \sum_{\text{rows}} dy \odot \hat x$ and $db = \sum_{\text{rows}} dy$.
# For $x$, write $g = dy \odot w$ (the gradient at $\hat x$). Using
# $\partial\mu/\partial x_j = 1/D$ and $\partial \sigma^2 / \partial x_j = 2(x_j - \mu)/D$
# (the $\mu$ term drops out because $\sum_i (x_i - \mu) = 0$) and $dr/d\sigma^2 = -r^3/2$:
#
# $$\frac{\partial \hat x_i}{\partial x_j} = r\Big(\delta_{ij} - \frac1D\Big) - \frac{r^3}{D}(x_i - \mu)(x_j - \mu)
#   = \frac{r}{D}\big(D\,\delta_{ij} - 1 - \hat x_i \hat x_j\big),$$
#
# $$dx_j = \sum_i g_i \frac{\partial \hat x_i}{\partial x_j}
#        = r\Big(g_j - \overline{g} - \hat x_j\, \overline{g \hat x}\Big),$$
#
# bars meaning means over the row. The two subtracted terms are projections. $dx$ has no
# component along $\mathbf 1$, because shifting $x$ does not change $\hat x$: $\sum_j dx_j = 0$
# exactly. Scaling $x$ does not change $\hat x$ either, *except through* $\epsilon$, so the
# component along $\hat x$ is not quite zero: summing the formula,
# $\sum_j dx_j \hat x_j = r\,\overline{g \hat x}\,\big(D - \sum_j \hat x_j^2\big)$, and
# $\sum_j \hat x_j^2 = D\sigma^2/(\sigma^2 + \epsilon)$ is $D$ only when $\epsilon = 0$. Both
# predictions are checked below.

# %%
print(inspect.getsource(layernorm_backward))
x = rng.normal(size=(2, 3, 8)) * 3 + 1    # (B, N, D), not normalised to begin with
w = rng.normal(size=8)
bias = rng.normal(size=8)
y, cache = layernorm_forward(x, w, bias)
g = rng.normal(size=y.shape)
ours = layernorm_backward(g, cache)
numeric = [numeric_grad(lambda: layernorm_forward(x, w, bias)[0], a, g) for a in (x, w, bias)]
report("LayerNorm", ["dx", "dw", "db"], ours, numeric,
       autograd(lambda t, tw, tb: F.layer_norm(t, (8,), tw, tb, eps=1e-5), [x, w, bias], g))
xhat, r = cache[0], cache[1]                               # (B, N, D), (B, N, 1)
dx = ours[0]
along_xhat = (dx * xhat).sum(-1)                             # (B, N)
predicted = (r[..., 0] * (g * w * xhat).mean(-1) * (8 - (xhat * xhat).sum(-1)))
print(f"max |sum_j dx_j| = {np.max(np.abs(dx.sum(-1))):.1e} (predicted 0)")
print(f"sum_j dx_j xhat_j: largest {np.max(np.abs(along_xhat)):.2e}, relative error of the "
      f"prediction r*mean(g xhat)*(D - sum xhat^2): {rel_error(along_xhat, predicted):.1e}")
assert np.max(np.abs(dx.sum(-1))) < 1e-10, "LayerNorm: sum_j dx_j is not 0"
assert rel_error(along_xhat, predicted) < 1e-6, "LayerNorm: sum_j dx_j xhat_j differs from the prediction"

# %% [markdown]
# ## GELU, the exact (erf) form
# $y = x\,\Phi(x)$ with $\Phi$ the standard normal CDF, $\Phi(x) = \tfrac12\big(1 + \mathrm{erf}(x/\sqrt2)\big)$,
# and $\phi = \Phi'$ its density. The product rule gives
#
# $$\frac{dy}{dx} = \Phi(x) + x\,\phi(x), \qquad dx = dy \odot \big(\Phi(x) + x\,\phi(x)\big).$$
#
# Unlike ReLU's 0/1, this slope dips **below 0** and rises **above 1**. Where? Its derivative is
# $2\phi(x) + x\phi'(x) = \phi(x)(2 - x^2)$ (since $\phi'(x) = -x\phi(x)$), zero at
# $x = \pm\sqrt 2$: the slope's minimum is $\Phi(-\sqrt2) - \sqrt2\,\phi(\sqrt2) \approx -0.129$
# and its maximum $\Phi(\sqrt2) + \sqrt2\,\phi(\sqrt2) \approx 1.129$.

# %%
print(inspect.getsource(inspect.getmodule(gelu_backward)))   # the whole file: forward, backward, helpers
x = rng.normal(size=(4, 5)) * 2
y, cache = gelu_forward(x)
g = rng.normal(size=y.shape)
numeric = [numeric_grad(lambda: gelu_forward(x)[0], x, g)]
report("GELU", ["dx"], [gelu_backward(g, cache)], numeric, autograd(F.gelu if torch else None, [x], g))

grid = np.linspace(-4, 4, 801)
y_grid, cache = gelu_forward(grid)
slope = gelu_backward(np.ones_like(grid), cache)            # dy/dx: upstream 1 per entry
pdf = lambda t: np.exp(-t * t / 2) / np.sqrt(2 * np.pi)
cdf = lambda t: 0.5 * (1 + erf(t / np.sqrt(2)))
lowest = cdf(-np.sqrt(2)) - np.sqrt(2) * pdf(np.sqrt(2))    # theory: the slope's minimum, at -sqrt 2
highest = cdf(np.sqrt(2)) + np.sqrt(2) * pdf(np.sqrt(2))    # and its maximum, at +sqrt 2
print(f"slope min {slope.min():.4f} at x = {grid[slope.argmin()]:.2f} (theory {lowest:.4f} at "
      f"-{np.sqrt(2):.2f}); max {slope.max():.4f} at x = {grid[slope.argmax()]:.2f} (theory {highest:.4f})")
assert abs(slope.min() - lowest) < 1e-4 and abs(slope.max() - highest) < 1e-4, "GELU slope's extremes differ from theory"

dots = np.linspace(-4, 4, 17)
finite = (gelu_forward(dots + 1e-5)[0] - gelu_forward(dots - 1e-5)[0]) / 2e-5
fig, (ax_y, ax_d) = plt.subplots(1, 2, figsize=(12, 4))
ax_y.plot(grid, y_grid, label="GELU  $x\\,\\Phi(x)$")
ax_y.plot(grid, np.maximum(grid, 0), "--", color="gray", label="ReLU")
ax_y.set(title="GELU forward", xlabel="x", ylabel="y")
ax_d.plot(grid, slope, label="gelu_backward: $\\Phi(x) + x\\,\\phi(x)$")
ax_d.plot(dots, finite, "o", label="central differences")
ax_d.axhline(0, color="gray", lw=0.5)
ax_d.axhline(1, color="gray", lw=0.5)
ax_d.set(title="GELU slope dy/dx", xlabel="x", ylabel="dy/dx")
for ax in (ax_y, ax_d):
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** GELU's slope is a smooth step that overshoots (to 1.13 at $x = \sqrt2$) and
# undershoots (to -0.13 at $x = -\sqrt2$), and the hand-written backward sits on the
# finite-difference dots everywhere.

# %% [markdown]
# ## Softmax cross-entropy with label smoothing
# Logits $z$ (B, K), labels $y_b$. Label smoothing with $\epsilon$ replaces the one-hot target by
# $t_{bk} = (1 - \epsilon)[k = y_b] + \epsilon/K$, and the loss is the batch mean
#
# $$\ell = -\frac1B \sum_b \sum_k t_{bk} \log p_{bk}, \qquad
#   \log p_{bk} = z_{bk} - \log \sum_j e^{z_{bj}} .$$
#
# Since $\partial \log p_{bk} / \partial z_{bj} = \delta_{kj} - p_{bj}$,
#
# $$\frac{\partial \ell}{\partial z_{bj}} = -\frac1B\Big(t_{bj} - p_{bj} \sum_k t_{bk}\Big)
#   = \frac{p_{bj} - t_{bj}}{B} \quad(\text{each row of } t \text{ sums to } 1).$$
#
# The loss and its gradient come out of one function, `cross_entropy(logits, labels, smoothing)`:

# %%
print(inspect.getsource(cross_entropy))

# %%
B, K, eps = 4, 5, 0.1
z = rng.normal(size=(B, K)) * 2
labels = rng.integers(0, K, size=B)
loss, dz = cross_entropy(z, labels, smoothing=eps)
numeric = [numeric_grad(lambda: cross_entropy(z, labels, smoothing=eps)[0], z, np.array(1.0))]
theirs = autograd(lambda t: F.cross_entropy(t, torch.tensor(labels), label_smoothing=eps),
                  [z], np.array(1.0))
report("cross-entropy", ["dz"], [dz], numeric, theirs)
if torch is not None:
    torch_loss = F.cross_entropy(torch.tensor(z), torch.tensor(labels), label_smoothing=eps)
    print(f"loss {float(loss):.12f}, PyTorch {float(torch_loss):.12f}")
    assert abs(float(loss) - float(torch_loss)) < 1e-12, "cross-entropy: loss differs from PyTorch's"

# %% [markdown]
# ### What label smoothing does to the optimum
# Take one example whose logits are $m$ for the true class and 0 for the other $K - 1$. Without
# smoothing the loss keeps falling as the margin $m$ grows: the model is always rewarded for more
# confidence. With smoothing, the gradient $(p - t)/B$ vanishes when $p_{\text{true}} =
# t_{\text{true}} = 1 - \epsilon + \epsilon/K$, i.e. at
#
# $$\frac{e^m}{e^m + K - 1} = 1 - \epsilon + \frac\epsilon K
#   \quad\Rightarrow\quad m^\star = \log\frac{K(1 - \epsilon) + \epsilon}{\epsilon}
#   \;(= \log 91 \approx 4.51 \text{ for } K = 10,\ \epsilon = 0.1).$$

# %%
K = 10
margins = np.linspace(-2, 12, 701)
fig, ax = plt.subplots(figsize=(8, 4.2))
for eps in (0.0, 0.1, 0.3):
    logits = np.zeros((margins.size, K))
    logits[:, 0] = margins
    per_example = [float(cross_entropy(row[None], np.array([0]), smoothing=eps)[0]) for row in logits]
    line, = ax.plot(margins, per_example, label=f"smoothing $\\epsilon$ = {eps}")
    if eps > 0:
        m_star = np.log((K * (1 - eps) + eps) / eps)
        at_star = np.zeros((1, K))
        at_star[0, 0] = m_star
        grad_at_star = cross_entropy(at_star, np.array([0]), smoothing=eps)[1]
        ax.axvline(m_star, ls=":", color=line.get_color())
        print(f"eps = {eps}: numerical minimum at m = {margins[np.argmin(per_example)]:.2f}, "
              f"formula m* = {m_star:.4f}, max |gradient| there = {np.abs(grad_at_star).max():.1e}")
        assert np.abs(grad_at_star).max() < 1e-12, f"eps = {eps}: the gradient at m* is not 0"
        assert abs(margins[np.argmin(per_example)] - m_star) < 0.02, f"eps = {eps}: minimum not at m*"   # grid step 0.02
ax.set(title=f"cross-entropy of one example vs its logit margin (K = {K})",
       xlabel="margin m: true-class logit minus the others", ylabel="loss", ylim=(0, 4))
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# **Takeaway:** with label smoothing the loss has a minimum at a finite margin (dotted lines,
# where the hand-written gradient is zero to round-off), so the model is never pushed towards
# infinite logits; without it the loss only flattens out.

# %% [markdown]
# ## All of it at once: the whole model
# `model.backward` is nothing but these backwards (plus attention, notebook 3, the performer,
# notebook 4, and the soft split's fold, notebook 1) unwound in the reverse order of the
# forward. The check is the same: build a tiny T2T-ViT-7 in float64 (16x16 images, so one
# token reaches the backbone), and compare a few entries of several parameters' gradients, and
# of the input's, with central differences of the loss. `model.eval()` switches the T2T
# layers' dropout off, so that the loss is a deterministic function of the weights.

# %%
import t2t_ref

model = t2t_ref.create_model("t2t_vit_7", num_classes=5, img_size=16, dtype="float64", seed=0).eval()
images = rng.normal(size=(2, 3, 16, 16))
labels = np.array([1, 3])

def loss_now():
    return float(cross_entropy(model.forward(images), labels, smoothing=0.1)[0])

_, dlogits = cross_entropy(model.forward(images), labels, smoothing=0.1)
dimages = model.backward(dlogits)
grads = dict(model.grads)
names = ["cls_token", "tokens_to_token.attention1.kqv.weight", "tokens_to_token.attention1.norm1.weight",
         "tokens_to_token.attention2.proj.weight", "tokens_to_token.project.weight",
         "blocks.0.attn.qkv.weight", "blocks.6.mlp.fc2.bias", "norm.weight", "head.weight"]
h = 1e-5
for name in names + ["input image"]:
    array, analytic = (images, dimages) if name == "input image" else (model.params[name], grads[name])
    picks = [tuple(int(rng.integers(n)) for n in array.shape) for _ in range(4)]
    numeric = []
    for index in picks:
        old = array[index]
        array[index] = old + h
        plus = loss_now()
        array[index] = old - h
        minus = loss_now()
        array[index] = old
        numeric.append((plus - minus) / (2 * h))
    error = rel_error([analytic[i] for i in picks], numeric)
    checks.append((f"model: {name}", error, None))
    print(f"{name:>40}: 4 entries vs central differences, relative error {error:.1e}")
    assert error < 1e-6, f"model {name}: relative error {error:.1e} vs central differences"

# %% [markdown]
# (The test suite compares every gradient of the whole model with the PyTorch port of the
# official code, tensor by tensor; here we keep to a spot check.)
#
# ## Summary of every check in this notebook

# %%
labels_ = [c[0] for c in checks]
fd = [max(c[1], 1e-17) for c in checks]
ag = [np.nan if c[2] is None else max(c[2], 1e-17) for c in checks]
fig, ax = plt.subplots(figsize=(9, 0.32 * len(checks) + 1.2))
rows = np.arange(len(checks))
ax.barh(rows - 0.2, fd, height=0.4, label="vs central differences (float64, h = 1e-6 or 1e-5)")
if torch is not None:
    ax.barh(rows + 0.2, ag, height=0.4, label="vs PyTorch autograd")
ax.axvline(1e-7, color="red", ls="--", label="1e-7: above this, suspect a bug")
ax.set_xscale("log")
ax.set_yticks(rows, labels_)
ax.invert_yaxis()
ax.set(xlabel="relative error  max|a-b| / max(|a|+|b|)", title="hand-written gradients vs references",
       xlim=(1e-18, 1e3))
ax.legend(loc="center right", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Takeaway:** every hand-written gradient agrees with autograd to float64 round-off (~1e-16)
# and with finite differences to ~1e-9, the truncation error of the difference quotient itself;
# a wrong term would show up as 1e-2 or worse.
#
# Next, [notebook 3](03_attention.ipynb): attention, where these pieces meet.
