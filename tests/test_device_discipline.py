"""What a GPU punishes, measured without one (GPU issue: no hidden synchronisation, few
launches). On array_api_strict, whose arrays sit on a second device, tests/strict_watch.py
records every device -> host transfer and counts the array calls our code makes."""

import re
from pathlib import Path

import numpy as np
import pytest

import t2t_ref
from t2t_ref.backend import get_namespace, to_device
from t2t_ref.ema import WeightEMA
from t2t_ref.gaps import make_rng
from t2t_ref.guard import StepMonitor
from t2t_ref.layers import sub_dict
from t2t_ref.layers.block import block_backward, block_forward
from t2t_ref.layers.token_performer import token_performer_backward, token_performer_forward
from t2t_ref.layers.token_transformer import token_transformer_backward, \
    token_transformer_forward
from t2t_ref.optim import AdamW, clip_grad_norm
from t2t_ref.parallel import DataParallel
from t2t_ref.train import train_step

from strict_watch import array_calls, host_transfers

STRICT = "array_api_strict"


def _training_run(name, clip):
    """train.train_step, the training loop's step, on array_api_strict."""
    xp, device = get_namespace(STRICT)
    model = DataParallel(t2t_ref.create_model(name, num_classes=5, img_size=32, backend=STRICT,
                                              drop_rate=0.1, drop_path_rate=0.1)).train()
    optimizer, ema = AdamW(model.params), WeightEMA(model.params, 0.99)
    monitor = StepMonitor(xp, device, limit=3)
    rng = np.random.default_rng(0)

    def step(i):
        x = to_device(rng.normal(size=(4, 3, 32, 32)).astype(np.float32), xp, device)  # host
        y = to_device(rng.integers(0, 5, 4), xp, device)                    # -> device: free
        model.rng = make_rng(xp, i)
        train_step(model, optimizer, ema, monitor, x, y, i, 1e-3, label_smoothing=0.1,
                   clip_grad=1.0 if clip else None)

    return step, monitor


@pytest.mark.parametrize("name, clip", [("t2t_vit_7", True), ("t2t_vit_t_14", False)])
def test_training_steps_transfer_nothing_to_the_host(name, clip):
    """Forward, loss, backward, clip or norm, the non-finite check, AdamW with its skip flag
    and the EMA: not one transfer to the host in three steps; the logged read is the one."""
    step, monitor = _training_run(name, clip)
    step(0)  # first-step allocations (the gradient buffer, the optimizer's moments) aside
    with host_transfers() as transfers:
        for i in (1, 2, 3):
            step(i)
    assert transfers == [], f"host transfers inside training steps: {transfers}"
    with host_transfers() as transfers:
        read = monitor.read()
    assert transfers and all(where.startswith("backend.py") for where, _ in transfers), \
        transfers  # one to_numpy of one stacked array
    assert np.isfinite(read["loss"]) and read["images"] == 16


def _optimizer_side_calls(name):
    xp, device = get_namespace(STRICT)
    model = t2t_ref.create_model(name, num_classes=5, img_size=32, backend=STRICT)
    optimizer, ema = AdamW(model.params), WeightEMA(model.params, 0.99)
    grads = model.params.zeros_like()
    found_inf = xp.asarray(False, device=device)
    with array_calls() as calls:
        clip_grad_norm(grads, 1.0)
        optimizer.step(model.params, grads, 1e-3, found_inf=found_inf)
        ema.update(model.params, found_inf=found_inf)
    return len(model.params), calls


def test_the_optimizer_side_is_a_fixed_number_of_calls():
    """Clipping, AdamW (with its skip flag) and the EMA over the flat buffers: the same few
    dozen array calls for 108 tensors (T2T-ViT-7) as for 185 (T2T-ViT-14); per tensor it
    would be 13 calls each in AdamW alone."""
    tensors_7, calls_7 = _optimizer_side_calls("t2t_vit_7")
    tensors_14, calls_14 = _optimizer_side_calls("t2t_vit_14")
    assert tensors_14 > tensors_7
    assert calls_14.by_name == calls_7.by_name, (calls_7.by_name, calls_14.by_name)
    assert calls_7.total <= 80, calls_7.by_name


def layer_calls():
    """{layer: (forward calls, backward calls)} of the plain ops, training mode, on strict, in
    the steady state of a run (each layer once first: rows of ones and the dropout hash's
    per-element table are made once per shape and kept)."""
    xp, device = get_namespace(STRICT)
    rng = np.random.default_rng(0)

    def array(*shape):
        return to_device(rng.normal(size=shape).astype(np.float32), xp, device)

    counts = {}
    performer = t2t_ref.create_model("t2t_vit_7", num_classes=5, img_size=32, backend=STRICT)
    transformer = t2t_ref.create_model("t2t_vit_t_14", num_classes=5, img_size=32,
                                       backend=STRICT)
    block_params = sub_dict(performer.params, "blocks.0.")
    for _ in range(2):  # warm, then counted
        with array_calls() as forward:
            y, cache = block_forward(array(2, 5, 256), block_params, num_heads=4, scale=0.125,
                                     drop=0.0, drop_path=0.1, rng=make_rng(xp, 0),
                                     training=True)
        with array_calls() as backward:
            block_backward(array(*y.shape), cache)
    counts["backbone block"] = (forward.total, backward.total)
    for layer, model, fwd, bwd in (
            ("T2T performer layer", performer, token_performer_forward,
             token_performer_backward),
            ("T2T transformer layer", transformer, token_transformer_forward,
             token_transformer_backward)):
        params = {**sub_dict(model.params, "tokens_to_token.attention1."),
                  **sub_dict(model.buffers, "tokens_to_token.attention1.")}
        for _ in range(2):  # warm, then counted
            with array_calls() as forward:
                y, cache = fwd(array(2, 64, 147), params, rng=make_rng(xp, 0), training=True)
            with array_calls() as backward:
                bwd(array(*y.shape), cache)
        counts[layer] = (forward.total, backward.total)
    return counts


def test_benchmarks_lists_the_calls_per_layer():
    """BENCHMARKS.md's table of array calls per layer is what the code makes now."""
    text = (Path(__file__).resolve().parent.parent / "BENCHMARKS.md").read_text()
    listed = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(
        r"^\| (backbone block|T2T performer layer|T2T transformer layer) \| (\d+) \| (\d+) \|",
        text, re.MULTILINE)}
    assert listed == layer_calls(), f"BENCHMARKS.md lists {listed}, the code makes " \
                                    f"{layer_calls()}: update the table"
