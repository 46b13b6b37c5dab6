"""The whole model against the PyTorch oracle (t2t_ref/torch_port.py), and its API and errors."""

import sys

import numpy as np
import pytest
import torch

import t2t_ref
from t2t_ref.backend import BackendError, get_namespace
from t2t_ref.gaps import make_rng
from conftest import assert_close, on, rel_error
from t2t_ref.torch_port import create_torch_model, get_sinusoid_encoding

# Both kinds of T2T layer, and a backbone with more than one head.
VARIANTS = ["t2t_vit_7", "t2t_vit_t_14"]
# The backbone explorations at their official shapes, and the plain ViT (vit_small_patch16_224's
# code at T2T-ViT-7's width: the 768-wide original costs 48M float64 parameters a side).
FAMILIES = ["t2t_vit_14_se", "t2t_vit_16_ghost", "t2t_vit_dense", "vit_7_patch16"]
SIZE, CLASSES, BATCH = 32, 10, 2

# The official models at 224 / 1000 classes: (params incl. fixed, trainable, state-dict keys)
COUNTS = {
    "t2t_vit_7": (4_310_222, 4_255_694, 111),
    "t2t_vit_10": (5_889_230, 5_834_702, 144),
    "t2t_vit_12": (6_941_902, 6_887_374, 166),
    "t2t_vit_14": (21_545_550, 21_465_806, 188),
    "t2t_vit_19": (39_177_422, 39_085_070, 243),
    "t2t_vit_24": (64_105_934, 64_000_974, 298),
    "t2t_vit_t_14": (21_541_070, 21_465_422, 184),
    "t2t_vit_t_19": (39_172_942, 39_084_686, 239),
    "t2t_vit_t_24": (64_101_454, 64_000_590, 294),
    "t2t_vit_14_resnext": (21_545_550, 21_465_806, 188),
    "t2t_vit_14_wide": (25_156_302, 25_000_910, 78),
    "t2t_vit_dense": (23_647_062, 23_617_750, 287),
    "t2t_vit_14_se": (21_803_598, 21_723_854, 216),
    "t2t_vit_16_ghost": (16_253_262, 16_173_518, 322),
    # timm's vit_small_patch16_224: 48,754,408, nothing fixed (its position table is learned)
    "vit_small_patch16_224": (48_754_408, 48_754_408, 96),
    "vit_7_patch16": (4_189_416, 4_189_416, 85),
}


def oracle_pair(name, backend="numpy", dtype="float64", size=SIZE, **kwargs):
    """A torch oracle and a t2t_ref model holding the same weights (copied by state_dict)."""
    torch.manual_seed(0)
    oracle = create_torch_model(name, num_classes=CLASSES, img_size=size, **kwargs).double()
    model = t2t_ref.create_model(name, num_classes=CLASSES, img_size=size, backend=backend,
                                 dtype=dtype, seed=1, **kwargs)
    model.load_state_dict({k: v.detach().numpy() for k, v in oracle.state_dict().items()})
    return oracle.eval(), model.eval()


def oracle_forward_backward(oracle, x, g):
    """Logits, d(input) and every parameter's gradient for loss = sum(logits * g)."""
    x = torch.tensor(x, requires_grad=True)
    logits = oracle(x)
    (logits * torch.tensor(g)).sum().backward()
    grads = {k: p.grad.numpy() for k, p in oracle.named_parameters() if p.requires_grad}
    return logits.detach().numpy(), x.grad.numpy(), grads


@pytest.mark.parametrize("name", VARIANTS + FAMILIES)
def test_model_matches_oracle_float64(name, backend):
    """Forward, d(input) and every parameter gradient equal PyTorch autograd's (<= 1e-9)."""
    oracle, model = oracle_pair(name, backend)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 3, SIZE, SIZE))
    g = rng.normal(size=(BATCH, CLASSES))  # a random upstream gradient, never all ones
    want_logits, want_dx, want_grads = oracle_forward_backward(oracle, x, g)

    logits = model.forward(on(backend, x))
    dx = model.backward(on(backend, g))

    assert_close(logits, want_logits, 1e-9, "logits")
    assert_close(dx, want_dx, 1e-9, "d(input)")
    assert sorted(model.grads) == sorted(want_grads), "gradient keys differ from trainable params"
    for key, want in want_grads.items():
        assert_close(model.grads[key], want, 1e-9, key)


@pytest.mark.parametrize("name", VARIANTS + FAMILIES)
def test_model_matches_oracle_float32(name):
    oracle, model = oracle_pair(name, dtype="float32")
    x = np.random.default_rng(0).normal(size=(BATCH, 3, SIZE, SIZE))
    g = np.random.default_rng(1).normal(size=(BATCH, CLASSES))
    want_logits, want_dx, want_grads = oracle_forward_backward(oracle, x, g)
    logits = model.forward(x.astype(np.float32))
    model.backward(g.astype(np.float32))
    assert logits.dtype == np.float32
    assert_close(logits, want_logits, 1e-4, "logits")
    for key in ("cls_token", "head.weight", "blocks.0.norm1.weight", "blocks.0.attn.proj.weight",
                "tokens_to_token.attention1.norm1.weight", "patch_embed.proj.weight"):
        if key in want_grads:
            assert_close(model.grads[key], want_grads[key], 1e-4, key)


def test_qk_scale_option_matches_oracle():
    oracle, model = oracle_pair("t2t_vit_7", qk_scale=256 ** -0.5)
    x = np.random.default_rng(0).normal(size=(BATCH, 3, SIZE, SIZE))
    with torch.no_grad():
        want = oracle(torch.tensor(x)).numpy()
    assert_close(model.forward(x), want, 1e-9, "logits with qk_scale")
    _, default = oracle_pair("t2t_vit_7")
    assert rel_error(default.forward(x), want) > 1e-6, "qk_scale had no effect"


def test_other_image_sizes_build_their_position_table():
    for size in (48, 80):
        oracle, model = oracle_pair("t2t_vit_7", size=size)
        grid = size // 16
        assert model.state_dict()["pos_embed"].shape == (1, grid * grid + 1, 256)
        x = np.random.default_rng(0).normal(size=(1, 3, size, size))
        with torch.no_grad():
            want = oracle(torch.tensor(x)).numpy()
        assert_close(model.forward(x), want, 1e-9, f"logits at {size}")


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_and_key_counts_match_official_table(name):
    model = t2t_ref.create_model(name)  # 224, 1000 classes
    total, trainable, keys = COUNTS[name]
    state = model.state_dict()
    assert len(state) == keys
    assert sum(v.size for v in state.values()) == total
    assert model.num_parameters() == total
    assert model.num_parameters(trainable_only=True) == trainable


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14", "t2t_vit_14_wide",
                                  "t2t_vit_dense", "t2t_vit_14_se", "t2t_vit_16_ghost",
                                  "vit_small_patch16_224"])
def test_state_dict_has_official_names_shapes_and_order(name):
    torch.manual_seed(0)
    oracle = create_torch_model(name)
    model = t2t_ref.create_model(name)
    want = {k: tuple(v.shape) for k, v in oracle.state_dict().items()}
    got = {k: v.shape for k, v in model.state_dict().items()}
    assert list(got) == list(want)
    assert got == want
    fixed = {k for k, p in oracle.named_parameters() if not p.requires_grad}
    assert fixed == set(model.buffers)  # pos_embed and the performer's w; nothing in the ViT


def test_list_models_names_every_model():
    assert t2t_ref.list_models() == list(COUNTS)


def test_every_trainable_parameter_gets_a_gradient_and_fixed_ones_none():
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE,
                                 dtype="float64")
    x = np.random.default_rng(0).normal(size=(BATCH, 3, SIZE, SIZE))
    model.forward(x)
    model.backward(np.random.default_rng(1).normal(size=(BATCH, CLASSES)))
    assert set(model.grads) == set(model.params)
    assert "cls_token" in model.grads and model.grads["cls_token"].shape == (1, 1, 256)
    assert np.abs(model.grads["cls_token"]).max() > 0
    assert "pos_embed" not in model.grads
    assert not any(k.endswith(".w") for k in model.grads)
    for key, grad in model.grads.items():
        assert grad.shape == model.params[key].shape, key


def test_backward_without_forward_raises():
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(np.zeros((1, CLASSES), np.float32))


def test_forward_without_cache_is_inference():
    """keep_cache=False gives the same logits, keeps no activations, and backward refuses."""
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE).eval()
    x = np.random.default_rng(3).random((2, 3, SIZE, SIZE), dtype=np.float32)
    kept = model.forward(x)
    assert model.cache is not None
    dropped = model.forward(x, keep_cache=False)
    assert np.array_equal(kept, dropped), f"logits differ by {np.abs(kept - dropped).max():.2e}"
    assert model.cache is None, "an inference forward left activations behind"
    with pytest.raises(RuntimeError, match="keep_cache=True"):
        model.backward(np.zeros((2, CLASSES), np.float32))


# ---- train / eval -------------------------------------------------------------------------


def loss_in_train_mode(model, x, g, seed):
    """sum(logits * g) with dropout masks drawn from a fixed seed, so they repeat."""
    model.rng = make_rng(model.xp, seed)
    return float(np.sum(model.forward(x) * g))


@pytest.mark.parametrize("name", VARIANTS + FAMILIES)
def test_train_mode_gradients_match_central_differences(name):
    """With dropout and drop path on, a directional derivative over all parameters at once."""
    model = t2t_ref.create_model(name, num_classes=CLASSES, img_size=SIZE, dtype="float64",
                                 drop_rate=0.2, drop_path_rate=0.3).train()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 3, SIZE, SIZE))
    g = rng.normal(size=(BATCH, CLASSES))
    direction = {k: rng.normal(size=v.shape) for k, v in model.params.items()}

    loss_in_train_mode(model, x, g, seed=7)
    model.backward(g)
    analytic = sum(np.sum(model.grads[k] * d) for k, d in direction.items())

    base = {k: v.copy() for k, v in model.params.items()}
    h = 1e-6  # the perturbation moves every parameter: the O(h^2) error is ~1e-8 here
    losses = []
    for sign in (1, -1):
        for k in base:
            model.params[k] = base[k] + sign * h * direction[k]
        losses.append(loss_in_train_mode(model, x, g, seed=7))
    numeric = (losses[0] - losses[1]) / (2 * h)
    assert abs(analytic - numeric) / max(abs(analytic) + abs(numeric), 1e-12) < 1e-6, \
        f"directional derivative: backward {analytic:.10g}, central differences {numeric:.10g}"


def test_dropout_and_drop_path_act_only_in_train_mode():
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE,
                                 dtype="float64", drop_rate=0.3, drop_path_rate=0.3)
    x = np.random.default_rng(0).normal(size=(BATCH, 3, SIZE, SIZE))
    eval_out = model.eval().forward(x)
    assert np.array_equal(model.forward(x), eval_out), "eval mode is not deterministic"
    train_a = model.train().forward(x)
    train_b = model.forward(x)
    assert rel_error(train_a, eval_out) > 1e-3 and rel_error(train_a, train_b) > 1e-3
    assert model.train() is model and model.eval() is model and not model.training


# ---- initialisation -----------------------------------------------------------------------


def test_initialisation_follows_the_official_code():
    model = t2t_ref.create_model("t2t_vit_7", seed=3)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith(".bias"):
            assert not value.any(), key
        elif "norm" in key and key.endswith(".weight"):
            assert (value == 1).all(), key
    weights = np.concatenate([v.ravel() for k, v in state.items()
                              if k.endswith(".weight") and v.ndim == 2]
                             + [state["cls_token"].ravel()])
    assert abs(weights.std() - 0.02) < 2e-4 and abs(weights.mean()) < 2e-4
    w = state["tokens_to_token.attention1.w"].astype(np.float64)  # (32, 64)
    assert np.allclose(w @ w.T, 32 * np.eye(32), atol=1e-4), "performer w rows not orthogonal"
    want = get_sinusoid_encoding(197, 256).numpy()
    assert_close(state["pos_embed"], want, 1e-7, "pos_embed")


@pytest.mark.parametrize("name", ["t2t_vit_dense", "t2t_vit_16_ghost", "vit_7_patch16"])
def test_drop_path_rates_follow_the_official_constructors(name):
    """Linear over the blocks, except the dense model's official quirk: every block of stage s
    gets dpr[s] of linspace(0, rate, 12) (its constructor's default depth), transitions none."""
    oracle = create_torch_model(name, img_size=SIZE, drop_path_rate=0.3)
    model = t2t_ref.create_model(name, img_size=SIZE, drop_path_rate=0.3)
    want = [getattr(getattr(block, "drop_path", None), "drop_prob", 0.0)
            for block in oracle.blocks]
    assert np.allclose(model.drop_path_rates, want, rtol=0, atol=1e-7), \
        f"ours {model.drop_path_rates}, official {want}"
    if name == "t2t_vit_dense":
        assert model.drop_path_rates[4] == pytest.approx(0.3 / 11)  # stage 1, not block 4


def test_initialisation_of_the_vit_and_the_ghost_cheap_operations():
    """ViT: learned pos_embed and class token trunc normal 0.02, the patch conv at PyTorch's
    default U(+-1/sqrt(768)); ghost: the cheap operations' 1x1 depthwise kernels at PyTorch's
    default for a fan-in of 1, U(-1, 1) (the official init touches only Linear and LayerNorm)."""
    vit = t2t_ref.create_model("vit_7_patch16", seed=3).state_dict()
    assert abs(vit["pos_embed"].std() - 0.02) < 1e-3 and abs(vit["cls_token"].std() - 0.02) < 6e-3
    bound = 768 ** -0.5
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        value = vit[key]
        assert np.abs(value).max() <= bound and np.abs(value).max() > 0.9 * bound, key
    ghost = t2t_ref.create_model("t2t_vit_16_ghost", img_size=SIZE, seed=3).state_dict()
    cheap = np.concatenate([v.ravel() for k, v in ghost.items() if "cheap_operation" in k])
    assert cheap.size == 16 * (3 * 192 + 2 * 384)
    assert np.abs(cheap).max() <= 1 and abs(cheap.std() - 3 ** -0.5) < 0.01  # U(-1, 1)


def test_a_variant_of_ones_own_builds_a_model_of_that_shape():
    """create_model takes a Variant: the tutorials' miniature backbones."""
    from dataclasses import replace
    from t2t_ref.variants import Variant, get_variant
    small = replace(get_variant("t2t_vit_dense"), embed_dim=32, growth=16, stages=(2, 1),
                    depth=3, num_heads=2)
    model = t2t_ref.create_model(small, num_classes=CLASSES, img_size=SIZE)
    assert model.name == "custom" and model.num_features == 48
    widths = [(layer.kind, layer.width, layer.out_width) for layer in model.layers]
    assert widths == [("dense", 32, 48), ("dense", 48, 64), ("transition", 64, 32),
                      ("dense", 32, 48)]
    assert model.forward(np.zeros((1, 3, SIZE, SIZE), np.float32)).shape == (1, CLASSES)
    with pytest.raises(ValueError, match="mlp_ratio 3"):
        Variant("performer", 64, 2, 2, 2.0, backbone="ghost")
    with pytest.raises(ValueError, match="stages summing"):
        Variant("performer", 64, 2, 2, 2.0, backbone="dense", growth=8, stages=(1, 2))
    with pytest.raises(ValueError, match=r"divisible by num_heads 3; these are not: \[112, 64\]"):
        replace(small, embed_dim=96, growth=16, num_heads=3)  # widths 96, 112, then 64


def test_same_seed_same_weights_other_seed_other_weights():
    a = t2t_ref.create_model("t2t_vit_7", img_size=SIZE, seed=5).state_dict()
    b = t2t_ref.create_model("t2t_vit_7", img_size=SIZE, seed=5).state_dict()
    c = t2t_ref.create_model("t2t_vit_7", img_size=SIZE, seed=6).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head.weight"], c["head.weight"])


def test_same_seed_same_weights_on_every_backend(backend):
    host = t2t_ref.create_model("t2t_vit_t_14", img_size=SIZE, seed=2).state_dict()
    other = t2t_ref.create_model("t2t_vit_t_14", img_size=SIZE, seed=2, backend=backend)
    for key, value in other.state_dict().items():
        assert np.array_equal(value, host[key]), key


# ---- state dicts --------------------------------------------------------------------------


def test_load_state_dict_accepts_anything_numpy_takes():
    model = t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=SIZE)
    state = model.state_dict()
    state["head.bias"] = [1.0, 2.0, 3.0]  # a plain list
    state["head.weight"] = torch.ones(3, 256)  # a torch tensor
    model.load_state_dict(state)
    assert np.array_equal(model.state_dict()["head.bias"], [1, 2, 3])
    assert (model.state_dict()["head.weight"] == 1).all()


def test_load_state_dict_names_every_problem():
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE)
    state = model.state_dict()
    del state["norm.bias"]
    state["blocks.99.attn.qkv.weight"] = np.zeros((3, 3))
    state["head.weight"] = np.zeros((5, 256))
    with pytest.raises(ValueError) as err:
        model.load_state_dict(state)
    message = str(err.value)
    assert "missing keys norm.bias" in message
    assert "unexpected keys blocks.99.attn.qkv.weight" in message
    assert "head.weight: checkpoint (5, 256), model (10, 256)" in message
    assert "\n" not in message


def test_load_state_dict_non_strict_skips_and_reports():
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE)
    state = model.state_dict()
    before = state["head.bias"].copy()
    del state["head.bias"]
    state["extra"] = np.zeros(1)
    state["norm.weight"] = np.full(256, 2.0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["head.bias"] and unexpected == ["extra"]
    assert (model.state_dict()["norm.weight"] == 2).all()
    assert np.array_equal(model.state_dict()["head.bias"], before)


def test_state_dict_round_trip_gives_identical_outputs():
    a = t2t_ref.create_model("t2t_vit_t_14", num_classes=CLASSES, img_size=SIZE, seed=1)
    b = t2t_ref.create_model("t2t_vit_t_14", num_classes=CLASSES, img_size=SIZE, seed=2)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    assert np.array_equal(a.forward(x), b.forward(x))


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="t2t_vit_8"), "unknown model 't2t_vit_8'"),
    (dict(img_size=50), "multiple of 16"),
    (dict(img_size=0), "multiple of 16"),
    (dict(num_classes=0), "num_classes"),
    (dict(dtype="float16"), "unknown dtype"),
    (dict(backend="jax"), "unknown backend 'jax'"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
])
def test_bad_model_arguments_raise_value_error(kwargs, match):
    kwargs = {"name": "t2t_vit_7", **kwargs}
    with pytest.raises(ValueError, match=match):
        t2t_ref.create_model(kwargs.pop("name"), **kwargs)


def test_cupy_backend_without_cupy_or_gpu_says_so():
    try:
        get_namespace("cupy")
        pytest.skip("CuPy and a GPU are present here")
    except ValueError as err:
        message = str(err)
    assert ("CuPy" in message and "not installed" in message) or "GPU" in message
    with pytest.raises(ValueError, match="cupy"):
        t2t_ref.create_model("t2t_vit_7", backend="cupy")


@pytest.mark.parametrize("make_input, match", [
    (lambda: np.zeros((2, 1, SIZE, SIZE), np.float32), r"shape \(B, 3, 32, 32\)"),
    (lambda: np.zeros((3, SIZE, SIZE), np.float32), r"shape \(B, 3, 32, 32\)"),
    (lambda: np.zeros((2, 3, 48, 48), np.float32), "built for 32x32"),
    (lambda: np.zeros((2, 3, SIZE, SIZE), np.float64), "dtype float64 does not match"),
    (lambda: np.zeros((2, 3, SIZE, SIZE), np.int64), "dtype int64 does not match"),
    (lambda: [[0.0]], "array of the numpy backend, got list"),
])
def test_bad_input_raises_clear_value_error(make_input, match):
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE)
    with pytest.raises(ValueError, match=match):
        model.forward(make_input())


def test_input_from_another_backend_is_refused():
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE,
                                 backend="array_api_strict")
    with pytest.raises(ValueError, match="numpy array but the model runs on array_api_strict"):
        model.forward(np.zeros((1, 3, SIZE, SIZE), np.float32))


# ---- --backend cupy's start check, with a stand-in for CuPy (no GPU needed) ------------------

class _FakeCuda:
    """cupy.cuda as seen by backend._working_cupy: one GPU, and a first kernel that fails as
    `failure` says (None: works)."""

    def __init__(self, failure):
        import types
        self.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
        self.failure = failure
        self.Device = lambda *a: types.SimpleNamespace(synchronize=lambda: None)


def _fake_cupy(failure):
    import types
    fake = types.ModuleType("cupy")
    fake.cuda = _FakeCuda(failure)

    def asarray(host):
        if failure is not None:
            raise failure
        return np.asarray(host)
    fake.asarray = asarray
    return fake


def _start_check(monkeypatch, fake, installed):
    from importlib import metadata

    from t2t_ref import backend

    def version(name):
        if name in installed:
            return installed[name]
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    backend._working_cupy.cache_clear()
    try:
        return backend._working_cupy()
    finally:
        backend._working_cupy.cache_clear()


def test_two_cupy_packages_are_refused_in_one_line(monkeypatch):
    with pytest.raises(BackendError) as err:
        _start_check(monkeypatch, _fake_cupy(None),
                     {"cupy-cuda12x": "13.6.0", "cupy-cuda13x": "14.2.0"})
    message = str(err.value)
    assert "two CuPy packages" in message and "cupy-cuda12x 13.6.0" in message \
        and "pip uninstall" in message and "\n" not in message


def test_a_cuda_failure_at_the_first_kernel_names_what_to_install(monkeypatch):
    """CuPy imports and counts a GPU, but its first kernel fails (say NVRTC is missing): one
    line naming the failure and the fix, not a traceback later inside the model."""
    failure = RuntimeError("CuPy failed to load libnvrtc.so.12: cannot open shared object file")
    with pytest.raises(BackendError) as err:
        _start_check(monkeypatch, _fake_cupy(failure), {"cupy-cuda12x": "13.6.0"})
    message = str(err.value)
    assert "CUDA failed on a first kernel" in message and "libnvrtc.so.12" in message
    assert ".[cuda13]" in message and "\n" not in message
