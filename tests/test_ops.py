"""Every op, forward and backward, against PyTorch autograd.

Each backward gets a *random* upstream gradient g (loss = sum(out * g), never out.sum(): an
all-ones gradient hides softmax and LayerNorm backward bugs). float64 must agree to a relative
error of 1e-10, float32 to 1e-4 (max|a-b| / max(|a|+|b|), see conftest.rel_error).

The last part runs a subset of the ops on every backend (numpy, array_api_strict, cupy where a
GPU exists) to prove the code uses only the array API standard.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import scipy.special

from conftest import assert_close, on
from t2t_ref import gaps, to_numpy
from t2t_ref.backend import array_namespace, backend_name
from t2t_ref.gaps import erf, make_rng
from t2t_ref.layers.block import block_backward, block_forward
from t2t_ref.layers.token_performer import token_performer_backward, token_performer_forward
from t2t_ref.layers.token_transformer import (token_transformer_backward,
                                              token_transformer_forward)
from t2t_ref.ops.attention import (scaled_dot_product_attention_backward,
                                   scaled_dot_product_attention_forward,
                                   self_attention_backward, self_attention_forward)
from t2t_ref.ops.cross_entropy import cross_entropy
from t2t_ref.ops.dropout import (drop_path_backward, drop_path_forward, dropout_backward,
                                 dropout_forward)
from t2t_ref.ops.gelu import gelu_backward, gelu_forward
from t2t_ref.ops.layernorm import layernorm_backward, layernorm_forward
from t2t_ref.ops.linear import linear_backward, linear_forward
from t2t_ref.ops.mlp import mlp_backward, mlp_forward
from t2t_ref.ops.performer import (performer_attention_backward, performer_attention_forward,
                                   random_features_backward, random_features_forward)
from t2t_ref.ops import soft_split
from t2t_ref.ops.soft_split import fold, soft_split_backward, soft_split_forward, unfold
from t2t_ref.ops.softmax import softmax_backward, softmax_forward
from t2t_ref.torch_port import Attention, Block, Mlp, Token_performer, Token_transformer, TokenAttention

# (dtype, tolerance): the bounds
DTYPES = [pytest.param("float64", 1e-10, id="float64"), pytest.param("float32", 1e-4, id="float32")]

# The soft-split geometries: the T2T ones, then the corners (non-square, stride > kernel,
# padding 0, kernel = stride).  (B, C, H, W, kernel, stride, padding)
SPLITS = [
    pytest.param(2, 3, 12, 12, 7, 4, 2, id="t2t-7-4-2"),
    pytest.param(2, 4, 8, 8, 3, 2, 1, id="t2t-3-2-1"),
    pytest.param(1, 2, 7, 5, 3, 2, 1, id="t2t-3-2-1-odd-nonsquare"),
    pytest.param(2, 2, 5, 7, 3, 1, 0, id="nonsquare-3-1-0"),
    pytest.param(1, 3, 8, 7, 2, 3, 0, id="stride>kernel-2-3-0"),
    pytest.param(2, 2, 7, 9, 3, 2, 0, id="pad0-3-2-0"),
    pytest.param(1, 2, 8, 8, 4, 4, 0, id="hard-split-4-4-0"),
]


def rand(rng, *shape, dtype="float64", scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def tt(a, grad=False):
    """NumPy -> torch tensor of the same dtype (a copy), optionally tracking gradients."""
    return torch.tensor(np.asarray(a), requires_grad=grad)


def tn(t):
    return t.detach().numpy()


def torch_dtype(dtype):
    return getattr(torch, dtype)


# ---------------------------------------------------------------------------
# Elementwise / per-row ops
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape,bias", [((2, 3, 5), True), ((2, 3, 5), False), ((4, 5), True)])
def test_linear_vs_torch(dtype, tol, shape, bias):
    rng = np.random.default_rng(0)
    x, w = rand(rng, *shape, dtype=dtype), rand(rng, 4, shape[-1], dtype=dtype)
    b = rand(rng, 4, dtype=dtype) if bias else None
    y, cache = linear_forward(x, w, b)
    g = rand(rng, *y.shape, dtype=dtype)
    dx, dw, db = linear_backward(g, cache)

    xt, wt = tt(x, True), tt(w, True)
    bt = tt(b, True) if bias else None
    yt = F.linear(xt, wt, bt)
    (yt * tt(g)).sum().backward()
    assert y.dtype == np.dtype(dtype)
    assert_close(y, tn(yt), tol, "y")
    assert_close(dx, tn(xt.grad), tol, "dx")
    assert_close(dw, tn(wt.grad), tol, "dW")
    if bias:
        assert_close(db, tn(bt.grad), tol, "db")
    else:
        assert db is None


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape,offset", [((2, 3, 8), 0.0), ((5, 16), 3.0), ((3, 50, 147), 3.0)])
def test_layernorm_vs_torch(dtype, tol, shape, offset):
    rng = np.random.default_rng(1)
    x = rand(rng, *shape, dtype=dtype) + np.asarray(offset, dtype=dtype)  # a non-zero mean too
    w = (1.0 + rand(rng, shape[-1], scale=0.5)).astype(dtype)
    b = rand(rng, shape[-1], dtype=dtype)
    y, cache = layernorm_forward(x, w, b)
    g = rand(rng, *y.shape, dtype=dtype)
    dx, dw, db = layernorm_backward(g, cache)

    xt, wt, bt = tt(x, True), tt(w, True), tt(b, True)
    yt = F.layer_norm(xt, (shape[-1],), wt, bt, eps=1e-5)
    (yt * tt(g)).sum().backward()
    assert y.dtype == np.dtype(dtype)
    assert_close(y, tn(yt), tol, "y")
    assert_close(dx, tn(xt.grad), tol, "dx")
    assert_close(dw, tn(wt.grad), tol, "dweight")
    assert_close(db, tn(bt.grad), tol, "dbias")


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 300, 257)], ids=["small", "several-chunks"])
def test_gelu_vs_torch(dtype, tol, shape):
    rng = np.random.default_rng(2)
    x = rand(rng, *shape, dtype=dtype, scale=3.0)  # well into both tails
    y, cache = gelu_forward(x)
    g = rand(rng, *x.shape, dtype=dtype)
    dx = gelu_backward(g, cache)

    xt = tt(x, True)
    yt = F.gelu(xt, approximate="none")
    (yt * tt(g)).sum().backward()
    assert y.dtype == np.dtype(dtype)
    assert_close(y, tn(yt), tol, "y")
    assert_close(dx, tn(xt.grad), tol, "dx")


def test_in_chunks_equals_the_whole_evaluation():
    """gaps.in_chunks on NumPy: the same bits as calling fn on the whole arrays, for several
    inputs, a size that is not a multiple of the chunk, and a non-contiguous input."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 401, 129)).astype(np.float32)  # 155,187 elements: 3 chunks
    b = rng.standard_normal((3, 129, 401)).astype(np.float32).transpose(0, 2, 1)  # a view
    fn = lambda x, y: np.exp(x * y) - x / (1.0 + y * y)  # noqa: E731
    assert a.size > 2 * gaps.CHUNK and a.size % gaps.CHUNK
    chunked = gaps.in_chunks(fn, a, b)
    assert chunked.shape == a.shape and chunked.dtype == np.float32
    assert np.array_equal(chunked, fn(a, b)), "in_chunks changed the result"
    with pytest.raises(ValueError, match="one shape"):
        gaps.in_chunks(fn, a, a[:, :, :1].repeat(2, axis=2))


@pytest.mark.parametrize("backend_name_", ["numpy", "array_api_strict"])
def test_erf_float32_within_a_few_ulp(backend_name_):
    """float32 erf is a rational approximation (gaps.erf_float32), on NumPy evaluated in
    chunks: against SciPy's double-precision erf over the whole line, in and past the clamp at
    +-4, on more elements than one chunk (and not a multiple of it)."""
    x = np.concatenate([np.linspace(-6.0, 6.0, 200_001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0]])
    x = x.astype(np.float32)
    exact = scipy.special.erf(x.astype(np.float64))
    ours = to_numpy(erf(on(backend_name_, x)))
    assert ours.dtype == np.float32 and ours.shape == x.shape
    worst = np.argmax(np.abs(ours - exact))
    assert np.abs(ours - exact).max() <= 1e-6, \
        f"erf({x[worst]!r}) = {ours[worst]!r}, exact {exact[worst]!r}"
    assert np.all(np.sign(ours) == np.sign(exact)), "erf lost the sign of its argument"


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (20.0, 500.0)], ids=["plain", "large"])
def test_softmax_vs_torch(dtype, tol, scale, offset):
    """The 'large' case (logits ~ 500 +- 60) overflows exp() without the max shift."""
    rng = np.random.default_rng(3)
    x = (rand(rng, 2, 3, 6, scale=scale) + offset).astype(dtype)
    p, cache = softmax_forward(x)
    g = rand(rng, *x.shape, dtype=dtype)
    dx = softmax_backward(g, cache)

    xt = tt(x, True)
    pt = torch.softmax(xt, dim=-1)
    (pt * tt(g)).sum().backward()
    assert np.all(np.isfinite(p))
    assert_close(np.sum(p, axis=-1), np.ones(p.shape[:-1]), tol, "row sums")
    assert_close(p, tn(pt), tol, "p")
    assert_close(dx, tn(xt.grad), tol, "dx")


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_mlp_vs_oracle(dtype, tol):
    torch.manual_seed(4)
    module = Mlp(6, hidden_features=10, out_features=5).to(torch_dtype(dtype)).eval()
    perturb(module)
    rng = np.random.default_rng(4)
    x = rand(rng, 2, 3, 6, dtype=dtype)
    p = state(module)
    y, cache = mlp_forward(x, p["fc1.weight"], p["fc1.bias"], p["fc2.weight"], p["fc2.bias"])
    g = rand(rng, *y.shape, dtype=dtype)
    dx, dw1, db1, dw2, db2 = mlp_backward(g, cache)

    xt = tt(x, True)
    yt = module(xt)
    (yt * tt(g)).sum().backward()
    assert_close(y, tn(yt), tol, "y")
    assert_close(dx, tn(xt.grad), tol, "dx")
    for name, ours in [("fc1.weight", dw1), ("fc1.bias", db1), ("fc2.weight", dw2),
                       ("fc2.bias", db2)]:
        assert_close(ours, tn(dict(module.named_parameters())[name].grad), tol, name)


# ---------------------------------------------------------------------------
# Soft split: unfold / fold against torch's nn.Unfold / nn.Fold
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("B,C,H,W,k,s,p", SPLITS)
def test_unfold_and_fold_vs_torch(dtype, tol, B, C, H, W, k, s, p):
    rng = np.random.default_rng(5)
    x = rand(rng, B, C, H, W, dtype=dtype)
    cols = unfold(x, k, s, p)
    expected = F.unfold(tt(x), kernel_size=k, stride=s, padding=p)
    assert_close(cols, tn(expected), tol, "unfold")

    y = rand(rng, *cols.shape, dtype=dtype)
    image = fold(y, (H, W), k, s, p)
    expected = F.fold(tt(y), output_size=(H, W), kernel_size=k, stride=s, padding=p)
    assert_close(image, tn(expected), tol, "fold")


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("B,C,H,W,k,s,p", SPLITS)
def test_soft_split_vs_torch(dtype, tol, B, C, H, W, k, s, p):
    rng = np.random.default_rng(6)
    x = rand(rng, B, C, H, W, dtype=dtype)
    tokens, cache = soft_split_forward(x, k, s, p)
    g = rand(rng, *tokens.shape, dtype=dtype)
    dx = soft_split_backward(g, cache)

    xt = tt(x, True)
    tokens_t = F.unfold(xt, kernel_size=k, stride=s, padding=p).transpose(1, 2)  # (B, L, Ckk)
    (tokens_t * tt(g)).sum().backward()
    assert_close(tokens, tn(tokens_t), tol, "tokens")
    assert_close(dx, tn(xt.grad), tol, "dx")


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("B,h,N,d", [(2, 1, 5, 4), (2, 3, 4, 6)])
def test_scaled_dot_product_attention_vs_torch(dtype, tol, B, h, N, d):
    rng = np.random.default_rng(7)
    q, k, v = (rand(rng, B, h, N, d, dtype=dtype) for _ in range(3))
    scale = d ** -0.5
    out, cache = scaled_dot_product_attention_forward(q, k, v, scale)
    g = rand(rng, *out.shape, dtype=dtype)
    dq, dk, dv = scaled_dot_product_attention_backward(g, cache)

    qt, kt, vt = tt(q, True), tt(k, True), tt(v, True)
    out_t = torch.softmax(qt @ kt.transpose(-2, -1) * scale, dim=-1) @ vt
    (out_t * tt(g)).sum().backward()
    assert_close(out, tn(out_t), tol, "out")
    assert_close(dq, tn(qt.grad), tol, "dq")
    assert_close(dk, tn(kt.grad), tol, "dk")
    assert_close(dv, tn(vt.grad), tol, "dv")


def perturb(module, scale=0.3):
    """Move every trainable parameter off its init (LayerNorm 1/0, zero biases) so that a
    gradient that ignores a weight or a bias cannot pass by accident."""
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn_like(param))


def state(module):
    return {name: value.detach().numpy().copy() for name, value in module.state_dict().items()}


def check_grads(grads, module, tol):
    """Our grads dict has exactly the trainable parameters' names, and each matches autograd."""
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert set(grads) == set(trainable), f"grad names {sorted(grads)} != {sorted(trainable)}"
    for name, param in trainable.items():
        assert_close(grads[name], tn(param.grad), tol, f"grad {name}")


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("num_heads,qkv_bias", [(1, False), (2, False), (4, True)])
def test_self_attention_vs_oracle_attention(dtype, tol, num_heads, qkv_bias):
    """The backbone's multi-head attention (official Attention, scale (D/h)^-0.5)."""
    torch.manual_seed(8)
    D = 8
    module = Attention(D, num_heads=num_heads, qkv_bias=qkv_bias).to(torch_dtype(dtype)).eval()
    perturb(module)
    rng = np.random.default_rng(8)
    x = rand(rng, 2, 5, D, dtype=dtype)
    out, cache = self_attention_forward(x, state(module), num_heads, module.scale)
    g = rand(rng, *out.shape, dtype=dtype)
    dx, grads = self_attention_backward(g, cache)

    xt = tt(x, True)
    out_t = module(xt)
    (out_t * tt(g)).sum().backward()
    assert_close(out, tn(out_t), tol, "out")
    assert_close(dx, tn(xt.grad), tol, "dx")
    check_grads(grads, module, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_self_attention_value_skip_vs_oracle_token_attention(dtype, tol):
    """The token transformer's attention: Din -> E, scale Din^-0.5, out = v + proj(attn).
    v is used twice (attention and skip), so its gradient must be the sum of both."""
    torch.manual_seed(9)
    d_in, E = 10, 6
    module = TokenAttention(d_in, num_heads=1, in_dim=E).to(torch_dtype(dtype)).eval()
    perturb(module)
    rng = np.random.default_rng(9)
    x = rand(rng, 2, 5, d_in, dtype=dtype)
    out, cache = self_attention_forward(x, state(module), 1, d_in ** -0.5, value_skip=True)
    g = rand(rng, *out.shape, dtype=dtype)
    dx, grads = self_attention_backward(g, cache)

    xt = tt(x, True)
    out_t = module(xt)
    (out_t * tt(g)).sum().backward()
    assert out.shape == (2, 5, E)
    assert_close(out, tn(out_t), tol, "out")
    assert_close(dx, tn(xt.grad), tol, "dx")
    check_grads(grads, module, tol)


# ---------------------------------------------------------------------------
# Performer
# ---------------------------------------------------------------------------
def orthogonal_features(rng, m, d, dtype="float64"):
    """(m, d), m <= d: orthonormal rows scaled by sqrt(m), as the official init."""
    q, _ = np.linalg.qr(rng.standard_normal((d, m)))
    return (q.T * math.sqrt(m)).astype(dtype)


def torch_random_features(z, w):
    m = w.shape[0]
    return torch.exp(z @ w.T - (z * z).sum(-1, keepdim=True) / 2) / math.sqrt(m)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_random_features_vs_torch(dtype, tol):
    rng = np.random.default_rng(10)
    z, w = rand(rng, 2, 5, 8, dtype=dtype, scale=0.5), orthogonal_features(rng, 4, 8, dtype)
    phi, cache = random_features_forward(z, w)
    g = rand(rng, *phi.shape, dtype=dtype)
    dz = random_features_backward(g, cache)

    zt = tt(z, True)
    phi_t = torch_random_features(zt, tt(w))
    (phi_t * tt(g)).sum().backward()
    assert_close(phi, tn(phi_t), tol, "phi")
    assert_close(dz, tn(zt.grad), tol, "dz")


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("d,e,m", [(8, 8, 4), (6, 5, 3)])
def test_performer_attention_vs_torch(dtype, tol, d, e, m):
    """y = qp (kp^T v) / (qp . sum_t kp_t + eps), written directly in torch."""
    rng = np.random.default_rng(11)
    q, k = rand(rng, 2, 7, d, dtype=dtype, scale=0.5), rand(rng, 2, 7, d, dtype=dtype, scale=0.5)
    v, w = rand(rng, 2, 7, e, dtype=dtype), orthogonal_features(rng, m, d, dtype)
    y, cache = performer_attention_forward(q, k, v, w)
    g = rand(rng, *y.shape, dtype=dtype)
    dq, dk, dv = performer_attention_backward(g, cache)

    qt, kt, vt, wt = tt(q, True), tt(k, True), tt(v, True), tt(w)
    qp, kp = torch_random_features(qt, wt), torch_random_features(kt, wt)
    denom = qp @ kp.sum(dim=1)[:, :, None] + 1e-8  # (B, N, 1)
    y_t = qp @ (kp.transpose(1, 2) @ vt) / denom
    (y_t * tt(g)).sum().backward()
    assert_close(y, tn(y_t), tol, "y")
    assert_close(dq, tn(qt.grad), tol, "dq")
    assert_close(dk, tn(kt.grad), tol, "dk")
    assert_close(dv, tn(vt.grad), tol, "dv")


# ---------------------------------------------------------------------------
# Layers against the oracle modules (eval mode: dropouts off)
# ---------------------------------------------------------------------------
def run_layer(module, forward, backward, x, dtype, tol, seed, **kwargs):
    rng = np.random.default_rng(seed)
    out, cache = forward(x, state(module), **kwargs)
    g = rand(rng, *out.shape, dtype=dtype)
    dx, grads = backward(g, cache)

    xt = tt(x, True)
    out_t = module(xt)
    (out_t * tt(g)).sum().backward()
    assert out.dtype == np.dtype(dtype)
    assert_close(out, tn(out_t), tol, "out")
    assert_close(dx, tn(xt.grad), tol, "dx")
    check_grads(grads, module, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_token_performer_vs_oracle(dtype, tol):
    torch.manual_seed(12)
    d_in, E = 12, 8  # m = 4 random features
    module = Token_performer(d_in, E).to(torch_dtype(dtype)).eval()
    perturb(module, scale=0.1)
    x = rand(np.random.default_rng(12), 2, 6, d_in, dtype=dtype)
    run_layer(module, token_performer_forward, token_performer_backward, x, dtype, tol, 13)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_token_transformer_vs_oracle(dtype, tol):
    torch.manual_seed(14)
    d_in, E = 12, 8
    module = Token_transformer(d_in, E, num_heads=1, mlp_ratio=1.0).to(torch_dtype(dtype)).eval()
    perturb(module)
    x = rand(np.random.default_rng(14), 2, 6, d_in, dtype=dtype)
    run_layer(module, token_transformer_forward, token_transformer_backward, x, dtype, tol, 15)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("num_heads", [1, 2])
def test_block_vs_oracle(dtype, tol, num_heads):
    torch.manual_seed(16)
    D = 8
    module = Block(D, num_heads=num_heads, mlp_ratio=2.0, drop=0.1,
                   drop_path=0.1).to(torch_dtype(dtype)).eval()
    perturb(module)
    x = rand(np.random.default_rng(16), 2, 5, D, dtype=dtype)
    run_layer(module, block_forward, block_backward, x, dtype, tol, 17, num_heads=num_heads,
              scale=module.attn.scale, drop=0.1, drop_path=0.1, rng=make_rng(np, 0),
              training=False)


# ---------------------------------------------------------------------------
# Dropout and drop path
# ---------------------------------------------------------------------------
N_STAT = 100_000


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dropout_mask_statistics(p, dtype):
    rng = make_rng(np, 0)
    x = (1.0 + np.random.default_rng(18).random((100, N_STAT // 100))).astype(dtype)  # > 0
    y, mask = dropout_forward(x, p, rng, training=True)
    assert y.dtype == np.dtype(dtype) and mask.shape == x.shape
    dropped = y == 0
    # binomial fraction: 5 standard deviations (about 0.005 at p = 0.5)
    assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / N_STAT), dropped.mean()
    kept_scale = np.asarray(1.0 / (1.0 - p), dtype=dtype)
    assert_close(y[~dropped], x[~dropped] * kept_scale, 1e-7 if dtype == "float32" else 1e-15,
                 "kept entries")
    assert set(np.unique(mask).tolist()) == {0.0, float(kept_scale)}


def test_dropout_draws_fresh_masks_and_is_reproducible():
    x = np.ones((50, 40))
    rng = make_rng(np, 7)
    first, _ = dropout_forward(x, 0.3, rng, training=True)
    second, _ = dropout_forward(x, 0.3, rng, training=True)
    again, _ = dropout_forward(x, 0.3, make_rng(np, 7), training=True)
    assert not np.array_equal(first, second)
    assert np.array_equal(first, again)


@pytest.mark.parametrize("forward,backward", [(dropout_forward, dropout_backward),
                                              (drop_path_forward, drop_path_backward)],
                         ids=["dropout", "drop_path"])
@pytest.mark.parametrize("p,training", [(0.5, False), (0.0, True), (0.0, False)])
def test_dropout_identity_when_inactive(forward, backward, p, training):
    rng = np.random.default_rng(19)
    x, g = rng.standard_normal((4, 3, 5)), rng.standard_normal((4, 3, 5))
    y, cache = forward(x, p, make_rng(np, 0), training=training)
    assert cache is None
    assert np.array_equal(y, x)
    assert np.array_equal(backward(g, cache), g)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("forward,backward", [(dropout_forward, dropout_backward),
                                              (drop_path_forward, drop_path_backward)],
                         ids=["dropout", "drop_path"])
def test_dropout_backward_vs_torch_same_mask(dtype, tol, forward, backward):
    """Given the mask our forward drew, torch's y = x * mask must agree forward and backward."""
    rng = np.random.default_rng(20)
    x, g = rand(rng, 6, 4, 5, dtype=dtype), rand(rng, 6, 4, 5, dtype=dtype)
    y, mask = forward(x, 0.4, make_rng(np, 3), training=True)
    dx = backward(g, mask)
    assert 0 < np.count_nonzero(mask) < mask.size  # something dropped, something kept

    xt = tt(x, True)
    y_t = xt * tt(mask)
    (y_t * tt(g)).sum().backward()
    assert_close(y, tn(y_t), tol, "y")
    assert_close(dx, tn(xt.grad), tol, "dx")
    assert np.all(dx[y == 0] == 0)  # no gradient flows to a dropped entry


def test_drop_path_drops_whole_samples():
    p, B = 0.3, 20_000
    x = 1.0 + np.random.default_rng(21).random((B, 3, 4))
    y, mask = drop_path_forward(x, p, make_rng(np, 1), training=True)
    assert mask.shape == (B, 1, 1)
    per_sample_zero = (y == 0).reshape(B, -1)
    # each sample is all dropped or all kept, never partly
    assert np.all(per_sample_zero.all(axis=1) | ~per_sample_zero.any(axis=1))
    dropped = per_sample_zero.all(axis=1)
    assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / B), dropped.mean()
    assert_close(y[~dropped], x[~dropped] / (1 - p), 1e-15, "kept samples")


# ---------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["labels", "probabilities"])
def test_cross_entropy_vs_torch(dtype, tol, smoothing, kind):
    rng = np.random.default_rng(22)
    B, K = 6, 5
    logits = rand(rng, B, K, dtype=dtype, scale=2.0)
    if kind == "labels":
        targets = rng.integers(0, K, size=B)
        targets_t = torch.tensor(targets)
    else:  # rows summing to 1, as mixup / cutmix make them
        raw = rng.random((B, K))
        targets = (raw / raw.sum(axis=1, keepdims=True)).astype(dtype)
        targets_t = tt(targets)
    loss, dlogits = cross_entropy(logits, targets, smoothing=smoothing)

    logits_t = tt(logits, True)
    loss_t = F.cross_entropy(logits_t, targets_t, label_smoothing=smoothing)
    loss_t.backward()
    assert np.ndim(loss) == 0
    assert_close(np.asarray(loss), tn(loss_t), tol, "loss")
    assert_close(dlogits, tn(logits_t.grad), tol, "dlogits")


# ---------------------------------------------------------------------------
# Portability: the same ops on every backend (array_api_strict catches NumPy-only calls and
# hidden host transfers; cupy runs where a GPU exists).
# ---------------------------------------------------------------------------
def assert_on_backend(array, backend):
    assert backend_name(array_namespace(array)) == backend, type(array)


def _case_linear(rng, put):
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    y, cache = linear_forward(put(x), put(w), put(b))
    g = rng.standard_normal(y.shape)
    grads = linear_backward(put(g), cache)
    xt, wt, bt = tt(x, True), tt(w, True), tt(b, True)
    return (y, *grads), F.linear(xt, wt, bt), g, (xt, wt, bt)


def _case_layernorm(rng, put):
    x, w, b = rng.standard_normal((2, 3, 6)), rng.standard_normal(6), rng.standard_normal(6)
    y, cache = layernorm_forward(put(x), put(w), put(b))
    g = rng.standard_normal(y.shape)
    grads = layernorm_backward(put(g), cache)
    xt, wt, bt = tt(x, True), tt(w, True), tt(b, True)
    return (y, *grads), F.layer_norm(xt, (6,), wt, bt), g, (xt, wt, bt)


def _case_gelu(rng, put):
    x = 2 * rng.standard_normal((3, 7))
    y, cache = gelu_forward(put(x))
    g = rng.standard_normal(y.shape)
    xt = tt(x, True)
    return (y, gelu_backward(put(g), cache)), F.gelu(xt), g, (xt,)


def _case_softmax(rng, put):
    x = 3 * rng.standard_normal((2, 4, 5))
    y, cache = softmax_forward(put(x))
    g = rng.standard_normal(y.shape)
    xt = tt(x, True)
    return (y, softmax_backward(put(g), cache)), torch.softmax(xt, -1), g, (xt,)


def _case_attention(rng, put):
    q, k, v = (rng.standard_normal((2, 2, 4, 3)) for _ in range(3))
    y, cache = scaled_dot_product_attention_forward(put(q), put(k), put(v), 0.5)
    g = rng.standard_normal(y.shape)
    grads = scaled_dot_product_attention_backward(put(g), cache)
    qt, kt, vt = tt(q, True), tt(k, True), tt(v, True)
    return (y, *grads), torch.softmax(qt @ kt.transpose(-2, -1) * 0.5, -1) @ vt, g, (qt, kt, vt)


def _case_self_attention(rng, put):
    x = rng.standard_normal((2, 4, 6))
    params = {"qkv.weight": rng.standard_normal((12, 6)), "qkv.bias": rng.standard_normal(12),
              "proj.weight": rng.standard_normal((4, 4)), "proj.bias": rng.standard_normal(4)}
    scale = 0.3
    y, cache = self_attention_forward(put(x), {n: put(a) for n, a in params.items()}, 2, scale,
                                      value_skip=False)
    g = rng.standard_normal(y.shape)
    dx, grads = self_attention_backward(put(g), cache)
    xt = tt(x, True)
    pt = {n: tt(a, True) for n, a in params.items()}
    qkv = F.linear(xt, pt["qkv.weight"], pt["qkv.bias"])
    qkv = qkv.reshape(2, 4, 3, 2, 2).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
    att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * scale, -1) @ qkv[2]
    y_t = F.linear(att.transpose(1, 2).reshape(2, 4, 4), pt["proj.weight"], pt["proj.bias"])
    names = sorted(params)
    return ((y, dx, *(grads[n] for n in names)), y_t, g, (xt, *(pt[n] for n in names)))


def _case_performer(rng, put):
    q, k = 0.5 * rng.standard_normal((2, 5, 6)), 0.5 * rng.standard_normal((2, 5, 6))
    v, w = rng.standard_normal((2, 5, 4)), orthogonal_features(rng, 3, 6)
    y, cache = performer_attention_forward(put(q), put(k), put(v), put(w))
    g = rng.standard_normal(y.shape)
    grads = performer_attention_backward(put(g), cache)
    qt, kt, vt, wt = tt(q, True), tt(k, True), tt(v, True), tt(w)
    qp, kp = torch_random_features(qt, wt), torch_random_features(kt, wt)
    y_t = qp @ (kp.transpose(1, 2) @ vt) / (qp @ kp.sum(1)[:, :, None] + 1e-8)
    return (y, *grads), y_t, g, (qt, kt, vt)


def _case_soft_split(rng, put):
    x = rng.standard_normal((2, 2, 7, 6))
    y, cache = soft_split_forward(put(x), 3, 2, 1)
    g = rng.standard_normal(y.shape)
    xt = tt(x, True)
    y_t = F.unfold(xt, 3, padding=1, stride=2).transpose(1, 2)
    return (y, soft_split_backward(put(g), cache)), y_t, g, (xt,)


def _case_mlp(rng, put):
    x = rng.standard_normal((2, 3, 4))
    w1, b1 = rng.standard_normal((6, 4)), rng.standard_normal(6)
    w2, b2 = rng.standard_normal((3, 6)), rng.standard_normal(3)
    y, cache = mlp_forward(put(x), put(w1), put(b1), put(w2), put(b2))
    g = rng.standard_normal(y.shape)
    grads = mlp_backward(put(g), cache)
    ts = [tt(a, True) for a in (x, w1, b1, w2, b2)]
    y_t = F.linear(F.gelu(F.linear(ts[0], ts[1], ts[2])), ts[3], ts[4])
    return (y, *grads), y_t, g, tuple(ts)


BACKEND_CASES = {"linear": _case_linear, "layernorm": _case_layernorm, "gelu": _case_gelu,
                 "softmax": _case_softmax, "attention": _case_attention,
                 "self_attention": _case_self_attention, "performer": _case_performer,
                 "soft_split": _case_soft_split, "mlp": _case_mlp}


@pytest.mark.parametrize("op", list(BACKEND_CASES))
def test_op_on_backend(backend, op):
    """float64 on the backend: results stay on it and match torch autograd to 1e-10."""
    rng = np.random.default_rng(23)
    results, y_t, g, inputs_t = BACKEND_CASES[op](rng, lambda a: on(backend, a, "float64"))
    (y_t * tt(g)).sum().backward()
    expected = (tn(y_t),) + tuple(tn(t.grad) for t in inputs_t)
    assert len(results) == len(expected)
    for i, (ours, ref) in enumerate(zip(results, expected)):
        assert_on_backend(ours, backend)
        assert_close(to_numpy(ours), ref, 1e-10, f"{op} output {i}")


def test_row_and_column_sums_on_backend(backend):
    """rows.py's sums against NumPy's, on non-contiguous rows too; the cached ones row of
    column_sum is not changed by a call."""
    from t2t_ref.ops.rows import column_sum, row_dots, row_mean, row_sum
    rng = np.random.default_rng(26)
    a = rng.standard_normal((3, 5, 7))
    xa = on(backend, a, "float64")
    xb = on(backend, rng.standard_normal((3, 5, 14)), "float64")[..., ::2]
    b = to_numpy(xb)
    assert_close(to_numpy(row_dots(xa, xb)), np.sum(a * b, -1, keepdims=True), 1e-14, "row_dots")
    assert_close(to_numpy(row_sum(xa)), np.sum(a, -1, keepdims=True), 1e-14, "row_sum")
    assert_close(to_numpy(row_mean(xa)), np.mean(a, -1, keepdims=True), 1e-14, "row_mean")
    for _ in range(2):  # the second call reuses the first one's row of ones
        assert_close(to_numpy(column_sum(xa)), a.reshape(-1, 7).sum(0), 1e-14, "column_sum")


def test_unfold_fold_on_backend(backend):
    rng = np.random.default_rng(24)
    x, y = rng.standard_normal((1, 2, 8, 8)), rng.standard_normal((1, 2 * 49, 4))
    cols = unfold(on(backend, x, "float32"), 7, 4, 2)
    image = fold(on(backend, y, "float32"), (8, 8), 7, 4, 2)
    assert_on_backend(cols, backend)
    assert_on_backend(image, backend)
    assert_close(to_numpy(cols), tn(F.unfold(tt(x), 7, padding=2, stride=4)), 1e-6, "unfold")
    assert_close(to_numpy(image), tn(F.fold(tt(y), (8, 8), 7, padding=2, stride=4)), 1e-6, "fold")


@pytest.mark.parametrize("B,C,H,W,k,s,p", SPLITS)
def test_soft_split_as_gathers_equals_the_slices(backend, B, C, H, W, k, s, p):
    """tokens_by_gather and fold_by_gather (the GPU's soft split) against unfold and fold (its
    definition), on every backend: the same token values exactly, and the same sums (integer
    values in float64: exact whatever the order of the adds). The index arrays are cached: a
    second call reuses them."""
    rng = np.random.default_rng(27)
    x = rng.integers(-8, 8, size=(B, C, H, W)).astype(np.float64)
    Ho, Wo = soft_split.output_size(H, k, s, p), soft_split.output_size(W, k, s, p)
    g = rng.integers(-8, 8, size=(B, Ho * Wo, C * k * k)).astype(np.float64)
    tokens = np.transpose(tn(F.unfold(tt(x), k, padding=p, stride=s)), (0, 2, 1))
    image = tn(F.fold(tt(np.transpose(g, (0, 2, 1))), (H, W), k, padding=p, stride=s))
    for _ in range(2):
        ours = soft_split.tokens_by_gather(on(backend, x, "float64"), k, s, p)
        assert_on_backend(ours, backend)
        np.testing.assert_array_equal(to_numpy(ours), tokens)
        ours = soft_split.fold_by_gather(on(backend, g, "float64"), (H, W), k, s, p)
        assert_on_backend(ours, backend)
        np.testing.assert_array_equal(to_numpy(ours), image)


def test_a_model_with_gathered_soft_splits_is_the_same_model(monkeypatch):
    """T2T-ViT-7 (three soft splits) with both gathers on NumPy, against the slices in both
    directions: logits, input gradient and every weight gradient (float64, to float
    rounding)."""
    from t2t_ref import create_model
    rng = np.random.default_rng(28)
    x = rng.standard_normal((2, 3, 32, 32))
    g = rng.standard_normal((2, 10))

    def run():
        model = create_model("t2t_vit_7", num_classes=10, img_size=32, dtype="float64",
                             seed=3)
        logits = model.forward(x)
        return logits, model.backward(g), dict(model.grads)

    monkeypatch.setattr(soft_split, "GATHER_FORWARD", ())
    monkeypatch.setattr(soft_split, "GATHER_BACKWARD", ())
    plain = run()
    monkeypatch.setattr(soft_split, "GATHER_FORWARD", ("numpy",))
    monkeypatch.setattr(soft_split, "GATHER_BACKWARD", ("numpy",))
    gathered = run()
    assert_close(gathered[0], plain[0], 1e-13, "logits")
    assert_close(gathered[1], plain[1], 1e-13, "dx")
    assert plain[2].keys() == gathered[2].keys()
    for key in plain[2]:
        assert_close(gathered[2][key], plain[2][key], 1e-12, key)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_on_backend(backend, smoothing):
    rng = np.random.default_rng(25)
    logits, labels = rng.standard_normal((4, 5)), rng.integers(0, 5, size=4)
    loss, dlogits = cross_entropy(on(backend, logits, "float64"), on(backend, labels), smoothing)
    assert_on_backend(dlogits, backend)
    logits_t = tt(logits, True)
    loss_t = F.cross_entropy(logits_t, torch.tensor(labels), label_smoothing=smoothing)
    loss_t.backward()
    assert_close(to_numpy(loss), tn(loss_t), 1e-10, "loss")
    assert_close(to_numpy(dlogits), tn(logits_t.grad), 1e-10, "dlogits")


@pytest.mark.parametrize("forward", [dropout_forward, drop_path_forward],
                         ids=["dropout", "drop_path"])
def test_dropout_on_backend(backend, forward):
    xp_x = on(backend, np.ones((400, 50)), "float32")
    xp_rng = make_rng(array_namespace(xp_x), 5)
    y, mask = forward(xp_x, 0.25, xp_rng, training=True)
    assert_on_backend(y, backend)
    assert y.dtype == xp_x.dtype
    y = to_numpy(y)
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / 0.75)}
    dropped = y[:, 0] == 0 if forward is drop_path_forward else y == 0  # per sample / entry
    frac = dropped.mean()
    assert abs(frac - 0.25) < 5 * math.sqrt(0.25 * 0.75 / dropped.size), frac
