"""The ops of the paper's backbone explorations (SE gate, cheap operation, ghost attention and
MLP, dense block, transition) and the three blocks built from them, forward and backward:

- against PyTorch autograd on the official modules (t2t_ref/torch_port.py), with a random
  upstream gradient: float64 to 1e-10, float32 to 1e-4;
- against central differences in float64 (tests/test_gradcheck.py's check);
- on every backend (numpy, array_api_strict, cupy where a GPU exists), float64 to 1e-10.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, on
from test_gradcheck import check
from test_ops import DTYPES, assert_on_backend, check_grads, perturb, rand, run_layer, state, \
    tn, torch_dtype, tt
from t2t_ref import to_numpy
from t2t_ref.gaps import make_rng
from t2t_ref.layers.block import block_backward, block_forward
from t2t_ref.layers.dense_block import dense_block_backward, dense_block_forward
from t2t_ref.ops.cheap_operation import cheap_operation_backward, cheap_operation_forward
from t2t_ref.ops.ghost_attention import ghost_attention_backward, ghost_attention_forward
from t2t_ref.ops.ghost_mlp import ghost_mlp_backward, ghost_mlp_forward
from t2t_ref.ops.se_gate import (relu_backward, relu_forward, se_attention_backward,
                                 se_attention_forward, se_gate_backward, se_gate_forward,
                                 sigmoid_backward, sigmoid_forward)
from t2t_ref.ops.transition import transition_backward, transition_forward
from t2t_ref.torch_port import (AttentionGhost, AttentionSE, BlockDense, BlockGhost, BlockSE, MlpGhost,
                       SELayer, Transition)

D, HEADS = 32, 4  # a gate of width 32 / 16 = 2; ghost halves of 16, 4 heads of 8


# ---------------------------------------------------------------------------
# SE: the gate and the attention around it
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_se_gate_vs_oracle(dtype, tol):
    torch.manual_seed(30)
    module = SELayer(D).to(torch_dtype(dtype)).eval()
    perturb(module, scale=1.0)  # pre-activations on both sides of ReLU's kink
    p = state(module)
    rng = np.random.default_rng(30)
    x = rand(rng, 2, 5, D, dtype=dtype)
    y, cache = se_gate_forward(x, p["fc.0.weight"], p["fc.2.weight"])
    g = rand(rng, *y.shape, dtype=dtype)
    dx, dw1, dw2 = se_gate_backward(g, cache)

    xt = tt(x, True)
    yt = module(xt)
    (yt * tt(g)).sum().backward()
    assert y.dtype == np.dtype(dtype)
    assert_close(y, tn(yt), tol, "y")
    assert_close(dx, tn(xt.grad), tol, "dx")
    check_grads({"fc.0.weight": dw1, "fc.2.weight": dw2}, module, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_se_attention_vs_oracle(dtype, tol):
    torch.manual_seed(31)
    module = AttentionSE(D, num_heads=HEADS).to(torch_dtype(dtype)).eval()
    perturb(module)
    x = rand(np.random.default_rng(31), 2, 5, D, dtype=dtype)
    run_layer(module, se_attention_forward, se_attention_backward, x, dtype, tol, 32,
                   num_heads=HEADS, scale=module.scale)


def test_sigmoid_is_finite_far_out_and_matches_torch():
    """The two-branch sigmoid: no overflow at +-1000, and its backward equals autograd's."""
    z = np.array([-1000.0, -40.0, -1.0, 0.0, 1e-3, 2.0, 40.0, 1000.0])
    with np.errstate(over="raise", invalid="raise"):  # an overflow in exp would raise here
        y, cache = sigmoid_forward(z)
    g = np.random.default_rng(33).normal(size=z.shape)
    zt = tt(z, True)
    (torch.sigmoid(zt) * tt(g)).sum().backward()
    assert_close(y, tn(torch.sigmoid(zt)), 1e-15, "sigmoid")
    assert_close(sigmoid_backward(g, cache), tn(zt.grad), 1e-15, "dsigmoid")


def test_relu_passes_gradient_only_where_positive():
    z = np.array([-2.0, -0.0, 0.0, 1e-12, 3.0])
    y, cache = relu_forward(z)
    assert np.array_equal(y, [0.0, 0.0, 0.0, 1e-12, 3.0])
    assert np.array_equal(relu_backward(np.full(5, 7.0), cache), [0.0, 0.0, 0.0, 7.0, 7.0])


# ---------------------------------------------------------------------------
# Ghost: the cheap operation, the attention and the MLP
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_cheap_operation_vs_torch_conv1d(dtype, tol):
    """A depthwise 1x1 Conv1d without bias over the transposed tokens is a channel scale."""
    rng = np.random.default_rng(34)
    x, w = rand(rng, 2, 5, 6, dtype=dtype), rand(rng, 6, 1, 1, dtype=dtype)
    y, cache = cheap_operation_forward(x, w)
    g = rand(rng, *y.shape, dtype=dtype)
    dx, dw = cheap_operation_backward(g, cache)

    xt, wt = tt(x, True), tt(w, True)
    yt = F.conv1d(xt.transpose(1, 2), wt, groups=6).transpose(1, 2)
    (yt * tt(g)).sum().backward()
    assert_close(y, tn(yt), tol, "y")
    assert_close(dx, tn(xt.grad), tol, "dx")
    assert_close(dw, tn(wt.grad), tol, "dweight")


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_ghost_attention_vs_oracle(dtype, tol):
    """Each half-width projection is used twice (itself and its cheap copy): both summed."""
    torch.manual_seed(35)
    module = AttentionGhost(D, num_heads=HEADS).to(torch_dtype(dtype)).eval()
    perturb(module)
    x = rand(np.random.default_rng(35), 2, 5, D, dtype=dtype)
    run_layer(module, ghost_attention_forward, ghost_attention_backward, x, dtype, tol,
                   36, num_heads=HEADS, scale=module.scale)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_ghost_mlp_vs_oracle(dtype, tol):
    torch.manual_seed(37)
    module = MlpGhost(D, hidden_features=3 * D).to(torch_dtype(dtype)).eval()
    perturb(module)
    x = rand(np.random.default_rng(37), 2, 5, D, dtype=dtype)
    run_layer(module, ghost_mlp_forward, ghost_mlp_backward, x, dtype, tol, 38)


# ---------------------------------------------------------------------------
# Dense: the transition and the dense block
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_transition_vs_oracle(dtype, tol):
    torch.manual_seed(39)
    module = Transition(12, 6).to(torch_dtype(dtype)).eval()
    perturb(module)
    p = state(module)
    rng = np.random.default_rng(39)
    x = rand(rng, 2, 5, 12, dtype=dtype)
    y, cache = transition_forward(x, p["linear.weight"], p["linear.bias"])
    g = rand(rng, *y.shape, dtype=dtype)
    dx, dw, db = transition_backward(g, cache)

    xt = tt(x, True)
    yt = module(xt)
    (yt * tt(g)).sum().backward()
    assert y.shape == (2, 5, 6)
    assert_close(y, tn(yt), tol, "y")
    assert_close(dx, tn(xt.grad), tol, "dx")
    check_grads({"linear.weight": dw, "linear.bias": db}, module, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_dense_block_vs_oracle(dtype, tol):
    """The block's input x reaches the output twice: as the first d channels of the
    concatenation and through the block: dx sums both."""
    torch.manual_seed(40)
    d, growth = 16, 8
    module = BlockDense(growth, d, num_heads=2, mlp_ratio=2.0).to(torch_dtype(dtype)).eval()
    perturb(module)
    x = rand(np.random.default_rng(40), 2, 5, d, dtype=dtype)
    run_layer(module, dense_block_forward, dense_block_backward, x, dtype, tol, 41,
                   num_heads=2, scale=module.attn.scale)


# ---------------------------------------------------------------------------
# The SE and ghost blocks (layers/block.py's kinds), with dropout and drop path set (eval mode)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind", ["se", "ghost"])
def test_block_kinds_vs_oracle(dtype, tol, kind):
    torch.manual_seed(42)
    block = {"se": BlockSE, "ghost": BlockGhost}[kind]
    module = block(D, num_heads=HEADS, mlp_ratio=3.0, drop=0.1,
                   drop_path=0.1).to(torch_dtype(dtype)).eval()
    perturb(module)
    x = rand(np.random.default_rng(42), 2, 5, D, dtype=dtype)
    run_layer(module, block_forward, block_backward, x, dtype, tol, 43, num_heads=HEADS,
                   scale=module.attn.scale, drop=0.1, drop_path=0.1, rng=make_rng(np, 0),
                   training=False, kind=kind)


# ---------------------------------------------------------------------------
# Central differences, float64
# ---------------------------------------------------------------------------
def _params(rng, shapes, scale=0.5):
    return {name: scale * rng.standard_normal(shape) for name, shape in shapes.items()}


def _dict_op(forward, **options):
    """forward(x, params) -> (out, cache) as check() wants: inputs [x, params]."""
    return lambda x, params: forward(x, params, **options)


def _flatten_grads(backward, names):
    """backward -> (dx, grads dict) made into the sequence check() compares, in names' order."""
    def flat(g, cache):
        dx, grads = backward(g, cache)
        return [dx] + [grads[n.partition(".")[2]] for n in names[1:]]
    return flat


def test_se_gate_gradcheck():
    rng = np.random.default_rng(50)
    x = rng.standard_normal((2, 4, 32))
    w1, w2 = rng.standard_normal((2, 32)), rng.standard_normal((32, 2))
    check(se_gate_forward, se_gate_backward, [x, w1, w2], ["0", "1", "2"])


def test_cheap_operation_gradcheck():
    rng = np.random.default_rng(51)
    check(cheap_operation_forward, cheap_operation_backward,
          [rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 1, 1))], ["0", "1"])


def test_transition_gradcheck():
    rng = np.random.default_rng(52)
    check(transition_forward, transition_backward,
          [rng.standard_normal((2, 3, 6)), rng.standard_normal((3, 6)), rng.standard_normal(3)],
          ["0", "1", "2"])


GHOST_ATTN = {"q.weight": (4, 8), "k.weight": (4, 8), "v.weight": (4, 8),
              "cheap_operation_q.weight": (4, 1, 1), "cheap_operation_k.weight": (4, 1, 1),
              "cheap_operation_v.weight": (4, 1, 1), "proj.weight": (8, 8), "proj.bias": (8,)}
GHOST_MLP = {"fc1.weight": (8, 8), "fc1.bias": (8,), "fc2.weight": (8, 24), "fc2.bias": (8,),
             "cheap_operation2.weight": (8, 1, 1), "cheap_operation3.weight": (8, 1, 1)}
SE_ATTN = {"qkv.weight": (48, 16), "proj.weight": (16, 16), "proj.bias": (16,),
           "se_layer.fc.0.weight": (1, 16), "se_layer.fc.2.weight": (16, 1)}
DENSE = {"norm1.weight": (8,), "norm1.bias": (8,), "attn.qkv.weight": (24, 8),
         "attn.proj.weight": (8, 8), "attn.proj.bias": (8,), "norm2.weight": (8,),
         "norm2.bias": (8,), "mlp.fc1.weight": (16, 8), "mlp.fc1.bias": (16,),
         "mlp.fc2.weight": (8, 16), "mlp.fc2.bias": (8,), "dense_linear.weight": (4, 8),
         "dense_linear.bias": (4,)}


@pytest.mark.parametrize("forward,backward,shapes,width,options", [
    (ghost_attention_forward, ghost_attention_backward, GHOST_ATTN, 8,
     dict(num_heads=2, scale=0.5)),
    (ghost_mlp_forward, ghost_mlp_backward, GHOST_MLP, 8, {}),
    (se_attention_forward, se_attention_backward, SE_ATTN, 16, dict(num_heads=2, scale=0.35)),
    (dense_block_forward, dense_block_backward, DENSE, 8, dict(num_heads=2, scale=0.5)),
], ids=["ghost_attention", "ghost_mlp", "se_attention", "dense_block"])
def test_composite_gradcheck(forward, backward, shapes, width, options):
    rng = np.random.default_rng(53)
    x, params = rng.standard_normal((2, 3, width)), _params(rng, shapes)
    if "norm1.weight" in params:
        params["norm1.weight"] += 1.0
        params["norm2.weight"] += 1.0
    names = ["0"] + [f"1.{n}" for n in shapes]
    check(_dict_op(forward, **options), _flatten_grads(backward, names), [x, params], names)


# ---------------------------------------------------------------------------
# Every backend: float64, results on the backend, equal to torch autograd
# ---------------------------------------------------------------------------
def _on_backend_case(backend, module, forward, x, **kwargs):
    """Run forward/backward with every input on the backend; compare with the module."""
    rng = np.random.default_rng(60)
    params = {k: on(backend, v, "float64") for k, v in state(module).items()}
    out, cache = forward(on(backend, x, "float64"), params, **kwargs)
    g = rng.standard_normal(tuple(out.shape))
    return out, cache, g


BACKEND_MODULES = {
    "se_attention": (lambda: AttentionSE(D, num_heads=HEADS), se_attention_forward,
                     se_attention_backward, dict(num_heads=HEADS, scale=(D // HEADS) ** -0.5)),
    "ghost_attention": (lambda: AttentionGhost(D, num_heads=HEADS), ghost_attention_forward,
                        ghost_attention_backward, dict(num_heads=HEADS,
                                                       scale=(D // HEADS) ** -0.5)),
    "ghost_mlp": (lambda: MlpGhost(D, hidden_features=3 * D), ghost_mlp_forward,
                  ghost_mlp_backward, {}),
    "dense_block": (lambda: BlockDense(8, D, num_heads=HEADS, mlp_ratio=2.0),
                    dense_block_forward, dense_block_backward,
                    dict(num_heads=HEADS, scale=(D // HEADS) ** -0.5)),
}


@pytest.mark.parametrize("op", list(BACKEND_MODULES))
def test_backbone_op_on_backend(backend, op):
    make, forward, backward, options = BACKEND_MODULES[op]
    torch.manual_seed(61)
    module = make().double().eval()
    perturb(module)
    x = np.random.default_rng(61).standard_normal((2, 5, D))
    out, cache, g = _on_backend_case(backend, module, forward, x, **options)
    dx, grads = backward(on(backend, g, "float64"), cache)

    xt = tt(x, True)
    (module(xt) * tt(g)).sum().backward()
    for ours in [out, dx, *grads.values()]:
        assert_on_backend(ours, backend)
    assert_close(to_numpy(out), tn(module(tt(x))), 1e-10, f"{op} out")
    assert_close(to_numpy(dx), tn(xt.grad), 1e-10, f"{op} dx")
    check_grads({k: to_numpy(v) for k, v in grads.items()}, module, 1e-10)


def test_transition_and_cheap_operation_on_backend(backend):
    rng = np.random.default_rng(62)
    x, w, b = rng.standard_normal((2, 3, 6)), rng.standard_normal((3, 6)), rng.standard_normal(3)
    y, cache = transition_forward(*(on(backend, a, "float64") for a in (x, w, b)))
    g = rng.standard_normal(tuple(y.shape))
    grads = transition_backward(on(backend, g, "float64"), cache)
    ts = [tt(a, True) for a in (x, w, b)]
    (F.gelu(F.linear(*ts)) * tt(g)).sum().backward()
    for ours, t in zip(grads, ts):
        assert_on_backend(ours, backend)
        assert_close(to_numpy(ours), tn(t.grad), 1e-10, "transition gradient")

    c = rng.standard_normal((6, 1, 1))
    y, cache = cheap_operation_forward(on(backend, x, "float64"), on(backend, c, "float64"))
    dx, dc = cheap_operation_backward(on(backend, np.ones((2, 3, 6)), "float64"), cache)
    assert_on_backend(dc, backend)
    assert_close(to_numpy(y), x * c[:, 0, 0], 1e-15, "cheap operation")
    assert_close(to_numpy(dc), x.sum(axis=(0, 1))[:, None, None], 1e-14, "dweight")
