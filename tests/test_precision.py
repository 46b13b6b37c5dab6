"""The precision policy (precision.py): bf16 and fp16 against float32, the performer's float16
failure and its fix, and the policy's errors. NumPy computes float16 and ml_dtypes' bfloat16,
so all of this runs without a GPU."""

import contextlib
import sys

import numpy as np
import pytest
import torch

import t2t_ref
from t2t_ref.gaps import matmul, make_rng
from t2t_ref.layers.token_performer import token_performer_forward
from t2t_ref.parallel import DataParallel
from t2t_ref.precision import PrecisionError
from t2t_ref.instrument import is_op, wrapped
from t2t_ref.torch_port import Token_performer

from conftest import rel_error
from reliability import tried

# relative error (max|a-b| / max(|a|+|b|)) against float32 that each policy stays within
TOLERANCE = {"bf16": {"logits": 1e-2, "dx": 2e-2, "grads": 3e-2},
             "fp16": {"logits": 2e-3, "dx": 3e-3, "grads": 5e-3}}


def _forward_backward(model, x, g):
    logits = model.forward(x)
    dx = model.backward(g)
    return logits, dx, {k: v.copy() for k, v in model.grads.items()}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])  # performer, transformer
def test_logits_and_every_gradient_stay_near_float32(name, precision):
    """Same weights, same batch: the half-precision model's logits, input gradient and every
    parameter's gradient (float32, into the master buffer) within the policy's tolerance."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    g = (0.25 * rng.normal(size=(4, 10))).astype(np.float32)
    results = {}
    for policy in ("float32", precision):
        model = t2t_ref.create_model(name, num_classes=10, img_size=32, precision=policy)
        results[policy] = _forward_backward(model.eval(), x, g)
        assert results[policy][0].dtype == np.float32 and results[policy][1].dtype == np.float32
        assert model.grads.flat.dtype == np.float32, "gradients stay float32"
    (logits, dx, grads), (ref_logits, ref_dx, ref_grads) = results[precision], results["float32"]
    tol = TOLERANCE[precision]
    assert rel_error(logits, ref_logits) <= tol["logits"], rel_error(logits, ref_logits)
    assert rel_error(dx, ref_dx) <= tol["dx"], rel_error(dx, ref_dx)
    errors = {k: rel_error(grads[k], ref_grads[k]) for k in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol["grads"], f"{worst}: {errors[worst]:.1e} > {tol['grads']}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_activations_are_stored_in_the_half_type(precision):
    """What the forward keeps for the backward is half precision, but the float32 islands."""
    model = t2t_ref.create_model("t2t_vit_7", num_classes=10, img_size=32, precision=precision)
    model.train().forward(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(
        np.float32))
    sizes = {}

    def walk(node):
        if isinstance(node, np.ndarray):
            sizes[node.dtype.name] = sizes.get(node.dtype.name, 0) + node.size
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (tuple, list)):
            for value in node:
                walk(value)
    walk(model.cache)
    half = "bfloat16" if precision == "bf16" else "float16"
    assert sizes[half] > 10 * sizes.get("float32", 0), sizes


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_layernorm_takes_the_float32_master_weights_and_the_rest_half(name):
    """Under bf16 the forward's parameters are the half copy, but for the LayerNorms' weights
    and biases: their island computes in float32, with the master values themselves (a weight
    of 1 + 2^-10 would round to 1 in bfloat16), as torch.autocast's LayerNorm does."""
    model = t2t_ref.create_model(name, num_classes=10, img_size=32, precision="bf16")
    model.params.flat[...] += np.float32(2.0 ** -10)  # values bfloat16 cannot hold
    p = model.compute_params()
    assert set(p) == set(model.params)
    norms = [n for n in p if "." in n and n.rsplit(".", 2)[-2].startswith("norm")]
    # a weight and a bias for norm1 and norm2 of every block and T2T layer, and for norm
    assert len(norms) == 4 * model.variant.depth + 4 * 2 + 2, norms
    for n in p:
        if n in norms:
            assert p[n].dtype == np.float32 and np.array_equal(p[n], model.params[n]), n
        else:
            assert p[n].dtype.name == "bfloat16", n
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    model.forward(x)
    model.backward(np.ones((2, 10), np.float32))
    assert all(model.grads[n].dtype == np.float32 for n in norms)


def _cupy_typed_where(where):
    """xp.where as CuPy 14 types it: no bfloat16 loop, so bfloat16 operands come out float32
    (the first loop bfloat16 casts to safely); float16 has its loop."""
    def typed(condition, x, y):
        out = where(condition, x, y)
        return xp_float32(out) if str(out.dtype) == "bfloat16" else out
    xp_float32 = lambda a: a.astype(np.float32)  # noqa: E731
    return typed


@contextlib.contextmanager
def _gradients_checked_against_outputs(failures):
    """Every t2t_ref.ops X_forward that returns (output, cache) has its output's dtype noted
    under its cache; X_backward(gradient, cache) then appends to failures when the gradient's
    dtype differs. (CuPy's fused kernels read a gradient and a cache as one dtype: a gradient
    that changed dtype reads garbage there, while NumPy's plain ops compute on.)"""
    noted, kept, running = {}, [], set()

    def wrap(function):
        name = function.__name__

        def checked(*args, **kwargs):
            if name in running:  # a half-precision op running itself on float32 copies
                return function(*args, **kwargs)  # (its float32 island): not checked
            if name.endswith("_backward") and len(args) >= 2 and id(args[1]) in noted:
                expected = noted[id(args[1])]
                if hasattr(args[0], "dtype") and args[0].dtype != expected:
                    failures.append(f"{name}: gradient {args[0].dtype}, output was {expected}")
            running.add(name)
            try:
                out = function(*args, **kwargs)
            finally:
                running.discard(name)
            if (name.endswith("_forward") and isinstance(out, tuple) and len(out) == 2
                    and hasattr(out[0], "dtype")):
                noted[id(out[1])] = out[0].dtype
                kept.append(out[1])  # (ids stay unique while the cache lives)
            return out
        return checked

    with wrapped(is_op, wrap):
        yield


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14", "t2t_vit_14_se"])
def test_gradients_keep_their_outputs_dtype_with_cupys_where(name, precision, monkeypatch):
    """Each op's backward gets a gradient of its forward output's dtype, with where typed as
    CuPy 14 types it (bfloat16 in, float32 out) and the soft split's backward done by
    gathers, as on CuPy. The first GPU run's bf16 T2T-ViT-t-14 gradients were 0.6-0.8 off,
    moving between runs: the soft split's where had turned the gradient float32, and the
    fused softmax backward read the bf16 attention map as float32."""
    import array_api_compat.numpy as xp_numpy
    from t2t_ref.ops import soft_split
    monkeypatch.setattr(xp_numpy, "where", _cupy_typed_where(xp_numpy.where))
    monkeypatch.setattr(soft_split, "GATHER_BACKWARD", ("numpy",))
    model = t2t_ref.create_model(name, num_classes=10, img_size=32, precision=precision)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    failures = []
    with _gradients_checked_against_outputs(failures):
        model.eval().forward(x)
        dx = model.backward(np.ones((2, 10), np.float32))
    assert failures == [], failures[:5]
    assert dx.dtype == np.float32


def test_the_official_performer_is_not_finite_in_float16_and_ours_is():
    """The official Token_performer (the project's PyTorch port) run in float16: once the keys
    reach a norm of about 10 (kqv weights twice their initial size), exp(w k - |k|^2/2)
    underflows for every feature, the denominator is 0 + 1e-8, and 1e-8 is 0 in float16:
    0/0. The same layer under t2t_ref's fp16 policy (the performer in float32) is finite
    and within float16's rounding of the float32 result."""
    torch.manual_seed(0)
    layer = Token_performer(dim=147, in_dim=64).eval()
    with torch.no_grad():
        layer.kqv.weight *= 2.0
    x = np.random.default_rng(0).normal(size=(2, 64, 147)).astype(np.float32)
    with torch.no_grad():
        official_fp32 = layer(torch.from_numpy(x)).numpy()
        official_fp16 = layer.half()(torch.from_numpy(x).half()).float().numpy()
    assert np.isfinite(official_fp32).all()
    assert not np.isfinite(official_fp16).all(), "the naive float16 performer stayed finite"

    params = {k: v.detach().float().numpy() for k, v in layer.state_dict().items()}
    half_params = {k: (v if k == "w" else v.astype(np.float16)) for k, v in params.items()}
    ours, _ = token_performer_forward(x.astype(np.float16), half_params, rng=make_rng(np, 0))
    assert ours.dtype == np.float16 and np.isfinite(ours).all()
    assert rel_error(ours, official_fp32) < 5e-3, rel_error(ours, official_fp32)


def test_half_products_sum_in_float32():
    """gaps.matmul on float16 operands: the exact product of the half values, rounded once."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 4096)).astype(np.float16)
    b = rng.normal(size=(4096, 3)).astype(np.float16)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = matmul(a, b)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, exact.astype(np.float32).astype(np.float16))
    assert matmul(a, b, out_dtype=np.float32).dtype == np.float32


def test_two_threads_equal_one_under_bf16():
    """Each piece rounds its own half copy of the parameters: the pieces' sum is the batch's."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    g = rng.normal(size=(4, 10)).astype(np.float32)
    results = []
    for threads in (1, 2):
        model = DataParallel(t2t_ref.create_model("t2t_vit_7", num_classes=10, img_size=32,
                                                  precision="bf16", drop_rate=0.1),
                             threads=threads).train()
        model.rng = make_rng(np, 5)
        results.append(_forward_backward(model, x, g))
    assert rel_error(results[1][0], results[0][0]) < 1e-6
    assert rel_error(results[1][2]["head.weight"], results[0][2]["head.weight"]) < 1e-5


@pytest.mark.parametrize("kwargs, says", [
    (dict(precision="fp8"), "unknown precision 'fp8'"),
    (dict(precision="bf16", dtype="float64"), "keeps float32 master weights"),
    (dict(precision="fp16", backend="array_api_strict"), "does not have"),
])
def test_precision_mistakes_say_what_to_do(kwargs, says):
    with pytest.raises(PrecisionError, match=says) as err:
        t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=32, **kwargs)
    assert "\n" not in str(err.value)


def _fake_cupy_namespace(monkeypatch, capability, has_bfloat16):
    """A stand-in CuPy (no GPU needed): its device's compute capability, and whether it can
    make bfloat16 arrays; and an array namespace that backend_name takes for CuPy's."""
    import types

    def zeros(shape, dtype):
        if not has_bfloat16:
            raise TypeError(f"Unsupported dtype {dtype}")
        return np.zeros(shape, dtype)
    fake = types.ModuleType("cupy")
    fake.__version__ = "13.6.0"
    fake.zeros, fake.float32 = zeros, np.float32
    fake.cuda = types.SimpleNamespace(
        Device=lambda *a: types.SimpleNamespace(compute_capability=capability))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return types.SimpleNamespace(__name__="array_api_compat.cupy", float32=np.float32,
                                 float16=np.float16)


@tried("command line", "`--precision bf16 --backend cupy` on a GPU before Ampere (a T4: 7.5)",
       "one line: bf16 needs compute capability 8.0 or newer, this one is 7.5: use "
       "--precision fp16")
@pytest.mark.parametrize("capability, has_bfloat16, says", [
    ("75", True, "compute capability 8.0 or newer (A100, RTX 30xx, H100 and later), and this "
                 "one is 7.5: use --precision fp16"),
    ("90", False, "a CuPy with bfloat16 arrays (CuPy 14 or newer, with NumPy 2.1.2 or newer), "
                  "and this is CuPy 13.6.0"),
    ("90", True, None)])
def test_bf16_on_a_gpu_that_cannot_do_it_is_refused_in_one_line(monkeypatch, capability,
                                                                 has_bfloat16, says):
    from t2t_ref.precision import compute_dtype
    xp = _fake_cupy_namespace(monkeypatch, capability, has_bfloat16)
    if says is None:
        assert compute_dtype(xp, "bf16", xp.float32).__name__ == "bfloat16"
        assert compute_dtype(xp, "fp16", xp.float32) is np.float16  # fp16 runs everywhere
        return
    with pytest.raises(PrecisionError) as err:
        compute_dtype(xp, "bf16", xp.float32)
    assert says in str(err.value) and "\n" not in str(err.value)


# ---- training under each policy ---------------------------------------------------------------

BARS = (7, 8)  # the built-in set's "hbars" and "vbars"


def _train_and_score(precision, steps=200, batch=32, lr=5e-4):
    """A small T2T-ViT (2 blocks of width 64) trained with train.train_step, the training
    loop's step, on two classes of the built-in shapes (horizontal and vertical bars, 32 x
    32), to the plateau (about 97%): early in training, runs whose numbers differ in the last
    bits drift apart by several points, which would hide what precision does. Validation
    top-1 in % on 600 images.

    Even at the plateau, rounding alone moves a run by a point or two: the same float32 run
    cut into 1 piece instead of 2 (another summation order, nothing else) scored 98.3% instead
    of 97.3%, and fp16's 95.8% instead of 97.0% (2.5 points from float32's: with 1 piece this
    test would fail on this machine, on rounding alone). So the batch is always cut into 2
    pieces, whatever the machine's BLAS thread count (which would otherwise choose the
    pieces), and the comparison is of one fixed computation."""
    from t2t_ref.data import make_shapes_splits
    from t2t_ref.data.transforms import normalize
    from t2t_ref.guard import StepMonitor
    from t2t_ref.loss_scale import DynamicLossScale
    from t2t_ref.optim import AdamW
    from t2t_ref.train import train_step
    from t2t_ref.variants import Variant
    keep = np.array(BARS)
    (train_x, train_y), (val_x, val_y), _ = make_shapes_splits(5 * batch * 30, 3000, 32,
                                                               seed=3, num_classes=10)

    def bars(x, y):
        rows = np.isin(y, keep)
        return normalize(x[rows].transpose(0, 3, 1, 2)), np.searchsorted(keep, y[rows])
    (train_x, train_y), (val_x, val_y) = bars(train_x, train_y), bars(val_x, val_y)
    tiny = Variant(tokens_type="performer", embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
    model = DataParallel(t2t_ref.create_model(tiny, num_classes=2, img_size=32, seed=0,
                                              precision=precision), threads=2).train()
    optimizer = AdamW(model.params, weight_decay=0.05)
    monitor = StepMonitor(np, "cpu", limit=3)
    scaler = DynamicLossScale(np, "cpu") if precision == "fp16" else None
    order = np.random.default_rng(0).permutation(len(train_y))
    for step in range(steps):
        rows = order[(step * batch) % len(order):][:batch]
        model.rng = make_rng(np, step)
        train_step(model, optimizer, None, monitor, train_x[rows], train_y[rows], step,
                   lr * min(1.0, (step + 1) / 20), label_smoothing=0.1, scaler=scaler)
    assert monitor.read()["skipped"] <= 2, "only the loss scale's first overflows may skip"
    logits = model.eval().forward(val_x, keep_cache=False)
    return 100.0 * float(np.mean(np.argmax(logits, axis=1) == val_y))


def test_short_training_runs_under_bf16_and_fp16_score_as_float32():
    """200 steps from the same seed: bf16 and fp16 reach validation accuracy within 2 points
    of float32's, at the plateau (above 90%; chance is 50%)."""
    scores = {p: _train_and_score(p) for p in ("float32", "bf16", "fp16")}
    assert scores["float32"] > 90, scores
    for precision in ("bf16", "fp16"):
        assert abs(scores[precision] - scores["float32"]) <= 2.0, scores


# ---- the training command under fp16 ---------------------------------------------------------

TINY = ["--synthetic-train", "96", "--synthetic-val", "40", "--batch-size", "32", "--img-size",
        "32", "--workers", "0", "--warmup-epochs", "0.5"]


def _final(out):
    from t2t_ref.checkpoint import load_checkpoint
    return load_checkpoint(out / "last.safetensors")


def test_fp16_training_resumes_with_its_loss_scale(tmp_path, capsys):
    """--precision fp16 keeps its loss scale in the checkpoint; stopped and resumed, the run
    ends with the uninterrupted run's weights, bit for bit, and its scale."""
    from t2t_ref import train
    args = TINY + ["--epochs", "2", "--precision", "fp16", "--drop-path", "0.1"]
    assert train.main(args + ["--out", str(tmp_path / "straight")]) == 0
    assert train.main(args + ["--out", str(tmp_path / "cut"), "--stop-after", "4"]) == 130
    stopped = _final(tmp_path / "cut")[1]
    assert stopped["loss_scale"]["scale"] == 2.0 ** 16 and stopped["config"]["precision"] == "fp16"
    assert train.main(["--resume", str(tmp_path / "cut" / "last.safetensors")]) == 0
    capsys.readouterr()
    (w1, meta1, *_), (w2, meta2, *_) = _final(tmp_path / "straight"), _final(tmp_path / "cut")
    for key in w1:
        np.testing.assert_array_equal(w1[key], w2[key], err_msg=key)
    assert meta1["loss_scale"] == meta2["loss_scale"]


@tried("faults", "`--precision fp16` whose loss scale falls below 1 (gradients overflow "
       "float16 even unscaled)", "exit 3: `error: the fp16 loss scale fell to ...: train with "
       "--precision bf16 ...`; the last finished epoch's checkpoint kept")
def test_a_collapsed_loss_scale_stops_the_run_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys, monkeypatch):
    """If the gradients overflow float16 even at a scale below 1, the run stops with one line
    (exit 3) naming bf16 as the way out; the checkpoint of the last finished epoch stays."""
    from t2t_ref import loss_scale, train

    class Collapsing(loss_scale.DynamicLossScale):
        """Backs off at every step after the first epoch's three: as if each overflowed."""

        def __init__(self, xp, device):
            super().__init__(xp, device, init_scale=4.0)
            self.steps = 0

        def update(self, found_inf):
            self.steps += 1
            if self.steps > 3:
                self.scale = self.scale * 0.25

    monkeypatch.setattr(train, "DynamicLossScale", Collapsing)
    out = tmp_path / "run"
    code = train.main(TINY + ["--epochs", "3", "--precision", "fp16", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3, err
    line = [x for x in err.splitlines() if "loss scale" in x]
    assert line and "fell to" in line[0] and "--precision bf16" in line[0], err
    weights, meta, *_ = _final(out)
    assert meta["epoch"] == 1 and all(np.isfinite(v).all() for v in weights.values())


@tried("command line", "`train --precision bf16 --dtype float64`",
       "exit 2: `error: --precision bf16: precision bf16 keeps float32 master weights: use "
       "dtype float32 with it`")
def test_precision_is_refused_where_it_cannot_run(tmp_path, capsys):
    from t2t_ref import train
    code = train.main(TINY + ["--precision", "bf16", "--dtype", "float64",
                              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "keeps float32 master weights" in err and "Traceback" not in err
