"""AdamW, gradient clipping and the learning-rate schedule against PyTorch, in float64.

torch.optim.AdamW with two parameter groups (decay / no decay, built here by the official
recipe's rule) is the oracle for t2t_ref.optim.AdamW; torch.nn.utils.clip_grad_norm_ for
clip_grad_norm; torch's LinearLR then CosineAnnealingLR, and a formula written another way,
for the schedule.
"""

import math
import warnings

import numpy as np
import pytest
import torch

import t2t_ref
from t2t_ref.backend import array_namespace, backend_name, get_namespace, to_numpy
from t2t_ref.flat import FlatTensors
from t2t_ref.optim import AdamW, clip_grad_norm, decays
from t2t_ref.schedule import CosineSchedule, lr_at

from conftest import assert_close, on
from t2t_ref.torch_port import create_torch_model

# A small stand-in for a model: one tensor of every kind the decay rule sorts.
SHAPES = {
    "cls_token": (1, 1, 4),  # 3-D, but listed in no_weight_decay: no decay
    "blocks.0.norm1.weight": (4,),  # LayerNorm weight, 1-D: no decay
    "blocks.0.norm1.bias": (4,),
    "blocks.0.attn.qkv.weight": (12, 4),  # linear weights: decay
    "blocks.0.mlp.fc1.weight": (6, 4),
    "blocks.0.mlp.fc1.bias": (6,),
    "blocks.0.mlp.fc2.weight": (200, 401),  # > gaps.CHUNK elements: updated piece by piece
    "head.weight": (3, 4),
    "head.bias": (3,),
}
DECAYED = {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
           "head.weight"}
LRS = [1e-3, 3e-3, 2e-2, 5e-4, 1e-1, 0.0, 7e-3]  # a changing learning rate, one per step
WD = 0.05


def host_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def host_grads(step):
    """Gradients for one step; one tensor much smaller, so eps in the denominator matters."""
    rng = np.random.default_rng(100 + step)
    grads = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads["head.bias"] = grads["head.bias"] * 1e-8
    return grads


def torch_adamw(params_host, weight_decay=WD):
    """torch params and torch.optim.AdamW with the recipe's two groups, written out here."""
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params_host.items()}
    no_decay = [p for k, p in params.items() if p.ndim == 1 or k == "cls_token"]
    decay = [p for k, p in params.items() if not (p.ndim == 1 or k == "cls_token")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    return params, opt


def torch_step(params, opt, grads_host, lr):
    for k, p in params.items():
        p.grad = torch.tensor(grads_host[k])
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()


# ---- AdamW ----------------------------------------------------------------------------------

def test_adamw_matches_torch(backend):
    """Several steps with a changing lr: every parameter, m and v within 1e-12 of torch."""
    xp, _ = get_namespace(backend)
    start = host_params()
    params = {k: on(backend, v, "float64") for k, v in start.items()}
    opt = AdamW(params, weight_decay=WD)
    tparams, topt = torch_adamw(start)
    for step, lr in enumerate(LRS):
        grads = {k: on(backend, v, "float64") for k, v in host_grads(step).items()}
        opt.step(params, grads, lr)
        torch_step(tparams, topt, host_grads(step), lr)
    for k, p in tparams.items():
        assert backend_name(array_namespace(params[k])) == backend_name(xp)
        assert_close(params[k], p.detach().numpy(), 1e-12, k)
        state = topt.state[p]
        assert_close(opt.exp_avg[k], state["exp_avg"].numpy(), 1e-12, f"exp_avg {k}")
        assert_close(opt.exp_avg_sq[k], state["exp_avg_sq"].numpy(), 1e-12, f"exp_avg_sq {k}")
        assert opt.step_count == int(state["step"]) == len(LRS)


def test_weight_decay_only_where_it_belongs():
    """With zero gradients Adam moves nothing (m = v = 0), so one step is the decay alone:
    p * (1 - lr * wd) for the linear weights, unchanged for the rest."""
    start = host_params()
    params = {k: v.copy() for k, v in start.items()}  # the step updates them in place
    opt = AdamW(params, weight_decay=0.3)
    opt.step(params, {k: np.zeros(s) for k, s in SHAPES.items()}, lr=0.5)
    for k, v in start.items():
        expected = v * (1 - 0.5 * 0.3) if k in DECAYED else v
        np.testing.assert_array_equal(params[k], expected, err_msg=k)


def test_step_updates_in_place():
    """The parameter, m and v arrays are updated where they are (the model's dict keeps its
    arrays): after a step the same objects hold the new values."""
    params = {k: v.copy() for k, v in host_params().items()}
    before = {k: v.copy() for k, v in params.items()}
    arrays = {k: id(v) for k, v in params.items()}
    opt = AdamW(params, weight_decay=0.1)
    moments = {k: (id(opt.exp_avg[k]), id(opt.exp_avg_sq[k])) for k in params}
    opt.step(params, host_grads(0), lr=1e-2)
    for k in params:
        assert id(params[k]) == arrays[k], f"{k}: replaced by a new array"
        assert (id(opt.exp_avg[k]), id(opt.exp_avg_sq[k])) == moments[k], f"{k}: new moments"
        assert not np.array_equal(params[k], before[k]), f"{k}: not updated"


def test_adamw_refuses_mismatched_dicts():
    params = {k: np.asarray(v) for k, v in host_params().items()}
    opt = AdamW(params)
    grads = host_grads(0)
    del grads["head.bias"]
    with pytest.raises(ValueError, match="missing \\['head.bias'\\]"):
        opt.step(params, grads, 1e-3)
    grads = host_grads(0)
    grads["head.weight"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match="head.weight \\(4, 3\\)"):
        opt.step(params, grads, 1e-3)


def test_state_dict_round_trip(backend):
    """Save after 3 steps, load into a fresh optimizer, go on: identical to never stopping."""
    start = {k: on(backend, v, "float64") for k, v in host_params().items()}
    straight, straight_opt = dict(start), AdamW(start, weight_decay=WD)
    for step, lr in enumerate(LRS):
        straight_opt.step(straight, {k: on(backend, v) for k, v in host_grads(step).items()}, lr)

    resumed, first = dict(start), AdamW(start, weight_decay=WD)
    for step, lr in enumerate(LRS[:3]):
        first.step(resumed, {k: on(backend, v) for k, v in host_grads(step).items()}, lr)
    state = first.state_dict()
    assert state["step"] == 3
    assert all(isinstance(a, np.ndarray) for part in ("exp_avg", "exp_avg_sq")
               for a in state[part].values()), "state_dict must hold host NumPy arrays"
    second = AdamW(resumed, weight_decay=0.0, eps=1.0)  # hyperparameters come from the state
    second.load_state_dict(state)
    assert (second.weight_decay, second.eps) == (WD, 1e-8)
    for step, lr in enumerate(LRS[3:], start=3):
        second.step(resumed, {k: on(backend, v) for k, v in host_grads(step).items()}, lr)
    for k in SHAPES:
        np.testing.assert_array_equal(to_numpy(resumed[k]), to_numpy(straight[k]), err_msg=k)
        np.testing.assert_array_equal(to_numpy(second.exp_avg_sq[k]),
                                      to_numpy(straight_opt.exp_avg_sq[k]), err_msg=k)


def test_load_state_dict_names_what_does_not_fit():
    params = {k: np.asarray(v) for k, v in host_params().items()}
    state = AdamW(params).state_dict()
    state["exp_avg"]["head.weight"] = np.zeros((5, 4))
    del state["exp_avg_sq"]["cls_token"]
    with pytest.raises(ValueError) as err:
        AdamW(params).load_state_dict(state)
    assert "head.weight (5, 4)" in str(err.value) and "missing ['cls_token']" in str(err.value)


# ---- the same on flat buffers (flat.py: what the model's params and grads are) -------------

LAYOUTS = {"matrices first": sorted(SHAPES, key=lambda k: len(SHAPES[k]) <= 1),  # the model's
           "interleaved": list(SHAPES)}  # decayed and not decayed tensors alternate


def flat_on(backend, host, order):
    xp, device = get_namespace(backend)
    flat = FlatTensors(xp, SHAPES, xp.float64, device, order=order)
    for k, v in host.items():
        flat[k] = on(backend, v, "float64")
    return flat


@pytest.mark.parametrize("layout", LAYOUTS)
def test_adamw_on_flat_buffers_matches_torch(backend, layout):
    """The flat update (one pass over the buffer, decay on its decayed stretches) gives what
    torch gives, within 1e-12, and updates the buffer in place."""
    start = host_params()
    params = flat_on(backend, start, LAYOUTS[layout])
    buffer = params.flat
    opt = AdamW(params, weight_decay=WD)
    assert isinstance(opt.exp_avg, FlatTensors) and opt.exp_avg.same_layout(params)
    expected_runs = 1 if layout == "matrices first" else 2
    assert len(opt.decay_runs) == expected_runs, opt.decay_runs
    tparams, topt = torch_adamw(start)
    for step, lr in enumerate(LRS):
        opt.step(params, flat_on(backend, host_grads(step), LAYOUTS[layout]), lr)
        torch_step(tparams, topt, host_grads(step), lr)
    assert params.flat is buffer
    for k, p in tparams.items():
        assert_close(params[k], p.detach().numpy(), 1e-12, k)
        assert_close(opt.exp_avg[k], topt.state[p]["exp_avg"].numpy(), 1e-12, f"exp_avg {k}")
        assert_close(opt.exp_avg_sq[k], topt.state[p]["exp_avg_sq"].numpy(), 1e-12,
                     f"exp_avg_sq {k}")


def test_flat_and_per_tensor_updates_are_identical():
    """NumPy, one thread and two: the flat path computes each element exactly as the
    per-tensor path does (same operations in the same order), bit for bit."""
    start = host_params()
    for threads in (1, 2):
        flat = flat_on("numpy", start, LAYOUTS["interleaved"])
        dicts = {k: v.copy() for k, v in start.items()}
        flat_opt, dict_opt = AdamW(flat, threads=threads), AdamW(dicts, threads=threads)
        for step, lr in enumerate(LRS):
            grads = host_grads(step)
            flat_opt.step(flat, flat_on("numpy", grads, LAYOUTS["interleaved"]), lr)
            dict_opt.step(dicts, grads, lr)
        for k in SHAPES:
            np.testing.assert_array_equal(flat[k], dicts[k], err_msg=f"{k}, {threads} threads")


def test_flat_state_dict_is_per_tensor():
    """A flat optimizer's state_dict has the per-tensor names and values (checkpoints do not
    change), and loads into a per-tensor optimizer and back."""
    flat = flat_on("numpy", host_params(), LAYOUTS["interleaved"])
    opt = AdamW(flat, weight_decay=WD)
    opt.step(flat, flat_on("numpy", host_grads(0), LAYOUTS["interleaved"]), 1e-2)
    state = opt.state_dict()
    assert sorted(state["exp_avg"]) == sorted(SHAPES)
    dicts = {k: v.copy() for k, v in host_params().items()}
    other = AdamW(dicts)
    other.load_state_dict(state)
    again = AdamW(flat_on("numpy", host_params(), LAYOUTS["matrices first"]))
    again.load_state_dict(other.state_dict())
    for k in SHAPES:
        np.testing.assert_array_equal(again.exp_avg_sq[k], opt.exp_avg_sq[k], err_msg=k)


# ---- which parameters decay ------------------------------------------------------------------

def timm_no_decay(torch_model):
    """timm.optim.optim_factory.add_weight_decay as the official recipe calls it, returning
    (decay names, no-decay names) of the trainable parameters."""
    skip = torch_model.no_weight_decay()
    decay, no_decay = set(), set()
    for name, param in torch_model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip:
            no_decay.add(name)
        else:
            decay.add(name)
    return decay, no_decay


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_decays_rule_on_model_keys(name):
    model = t2t_ref.create_model(name, num_classes=5, img_size=32, dtype="float64")
    decay = {k for k, p in model.params.items() if decays(k, p.shape)}
    no_decay = set(model.params) - decay
    # fixed tensors are not parameters at all, so the optimizer never sees them
    assert "pos_embed" not in model.params and not any(k.endswith(".w") for k in model.params)
    norm_weight = ("norm1.weight", "norm2.weight", "norm.weight")
    assert no_decay == {k for k in model.params
                        if k == "cls_token" or k.endswith(".bias") or k.endswith(norm_weight)}
    assert all(len(model.params[k].shape) == 2 and k.endswith(".weight") for k in decay)
    for key in ("tokens_to_token.project.weight", "blocks.0.attn.qkv.weight",
                "blocks.0.mlp.fc2.weight", "head.weight"):
        assert key in decay, key
    for key in ("cls_token", "head.bias", "norm.weight", "blocks.0.norm2.weight",
                "tokens_to_token.attention1.norm1.weight"):
        assert key in no_decay, key
    if name == "t2t_vit_7":  # the official split on the torch oracle gives the same sets
        assert timm_no_decay(create_torch_model(name, num_classes=5, img_size=32)) == \
            (decay, no_decay)


@pytest.mark.parametrize("name", ["t2t_vit_14_se", "t2t_vit_16_ghost", "t2t_vit_dense",
                                  "vit_7_patch16"])
def test_decays_rule_matches_timm_on_the_backbone_explorations_and_the_vit(name):
    """The same split as the official recipe's on the oracle: the ViT's learned pos_embed in
    its no_weight_decay(), the ghost's (C, 1, 1) cheap operations decayed (not 1-D)."""
    model = t2t_ref.create_model(name, num_classes=5, img_size=32, dtype="float64")
    decay = {k for k, p in model.params.items() if decays(k, p.shape)}
    want = timm_no_decay(create_torch_model(name, num_classes=5, img_size=32))
    assert (decay, set(model.params) - decay) == want
    if name.startswith("vit"):
        assert "pos_embed" in model.params and "pos_embed" not in decay


# ---- gradient clipping -----------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clips, does not clip
@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
def test_clip_grad_norm_matches_torch(backend, max_norm, flat):
    """Per tensor or on the flat buffer (scaled in place there), torch's numbers."""
    host = host_grads(0)
    grads = (flat_on(backend, host, LAYOUTS["interleaved"]) if flat
             else {k: on(backend, v, "float64") for k, v in host.items()})
    buffer = grads.flat if flat else None
    total = clip_grad_norm(grads, max_norm)
    assert total.shape == () and backend_name(array_namespace(total)) == backend
    assert not flat or grads.flat is buffer, "flat gradients are scaled in place"
    tparams = {k: torch.nn.Parameter(torch.zeros(v.shape, dtype=torch.float64))
               for k, v in host.items()}
    for k, p in tparams.items():
        p.grad = torch.tensor(host[k])
    expected = torch.nn.utils.clip_grad_norm_(list(tparams.values()), max_norm)
    assert_close(total, expected.numpy(), 1e-13, "total norm")
    for k, p in tparams.items():
        assert_close(grads[k], p.grad.numpy(), 1e-13, k)
    after = math.sqrt(sum(float(np.sum(to_numpy(g) ** 2)) for g in grads.values()))
    assert after <= max_norm if max_norm < float(total) else after == pytest.approx(float(total))


# ---- schedule ------------------------------------------------------------------------------

def torch_schedule(base_lr, total_steps, warmup_steps, warmup_lr, min_lr):
    """The same curve from torch's schedulers: LinearLR from warmup_lr, then
    CosineAnnealingLR over the remaining steps; lr of step s = param_groups lr after s steps."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = torch.optim.lr_scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()" noise
        s = sched.SequentialLR(opt, [
            sched.LinearLR(opt, start_factor=warmup_lr / base_lr, end_factor=1.0,
                           total_iters=warmup_steps),
            sched.CosineAnnealingLR(opt, T_max=total_steps - warmup_steps, eta_min=min_lr),
        ], milestones=[warmup_steps])
        lrs = []
        for _ in range(total_steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            s.step()
    return lrs


@pytest.mark.parametrize("base_lr,total,warmup", [(5e-4, 20, 3), (1e-3, 7, 1), (2e-3, 50, 10)])
def test_schedule_matches_torch(base_lr, total, warmup):
    ours = [lr_at(s, base_lr=base_lr, total_steps=total, warmup_steps=warmup)
            for s in range(total)]
    assert_close(np.array(ours), np.array(torch_schedule(base_lr, total, warmup, 1e-6, 1e-5)),
                 1e-12, "lr per step")


@pytest.mark.parametrize("warmup_prefix", [True, False])
@pytest.mark.parametrize("total,warmup", [(30, 5), (12, 0), (6, 6), (1, 0)])
def test_schedule_formula(total, warmup, warmup_prefix):
    """Against the curve written another way: np.interp for the warmup, and the cosine as
    cos^2 (since (1 + cos x) / 2 = cos^2(x / 2)), over the whole array of steps at once."""
    base, lr0, lo = 1e-3, 1e-6, 1e-5
    s = np.arange(total + 5)
    start = warmup if warmup_prefix else 0
    t = (s - start) / (total - start) if total > start else np.ones(len(s))
    expected = lo + (base - lo) * np.cos(np.pi / 2 * t) ** 2
    expected = np.where(s < warmup, np.interp(s, [0, max(warmup, 1)], [lr0, base]), expected)
    expected = np.where(s >= total, lo, expected)
    ours = [lr_at(int(i), base_lr=base, total_steps=total, warmup_steps=warmup,
                  warmup_prefix=warmup_prefix) for i in s]
    assert_close(np.array(ours), expected, 1e-13, "lr per step")


def test_schedule_edges():
    kw = dict(base_lr=1e-3, total_steps=100, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    lrs = [lr_at(s, **kw) for s in range(130)]
    assert lrs[0] == 1e-6  # step 0 is the warmup's start
    assert lrs[10] == 1e-3  # the cosine starts at base_lr
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warmup must rise strictly"
    assert all(a > b for a, b in zip(lrs[10:99], lrs[11:100])), "cosine must fall strictly"
    assert 1e-5 < lrs[99] < 1e-5 + 1e-6  # last scheduled step: just above the floor
    assert lrs[100:] == [1e-5] * 30  # the floor after the end
    assert lr_at(0, **{**kw, "warmup_steps": 0}) == 1e-3  # no warmup: start at base_lr
    # timm's default (warmup_prefix=False): the cosine counts from step 0, so it is already
    # a little below base_lr when the warmup ends
    assert 1e-5 < lr_at(10, **kw, warmup_prefix=False) < 1e-3
    schedule = CosineSchedule(1e-3, total_steps=100, warmup_steps=10)
    assert [schedule(s) for s in range(130)] == lrs
    for bad in (dict(step=-1), dict(step=1.5), dict(step=0, warmup_steps=101)):
        with pytest.raises(ValueError):
            lr_at(**{**kw, **bad})
