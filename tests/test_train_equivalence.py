"""A few training steps with t2t_ref and with the PyTorch oracle, from identical weights and
batches, in float64: the losses and every weight afterwards agree to 1e-8 relative.

Both sides use the recipe's pieces: label smoothing 0.1, AdamW (weight decay 0.05, none on
biases, norm weights and the class token), a cosine schedule with 2 warmup steps, and in one
case gradient clipping. t2t_ref runs its own cross_entropy, backward, clip_grad_norm, AdamW;
torch runs F.cross_entropy, autograd, clip_grad_norm_, torch.optim.AdamW, with the schedule's
learning rates set on its param groups (the schedule itself is checked against torch's
schedulers in test_optim.py). Both models are in eval mode: the performer T2T layer has fixed
0.1 dropouts that would draw different masks on the two sides in train mode.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import t2t_ref
from t2t_ref.optim import AdamW, clip_grad_norm
from t2t_ref.schedule import lr_at

from conftest import assert_close
from t2t_ref.torch_port import create_torch_model

STEPS, WARMUP, BASE_LR, WD, SMOOTHING = 5, 2, 1e-3, 0.05, 0.1
BATCH, IMG, CLASSES = 4, 32, 5


def torch_param_groups(model, weight_decay):
    """The official recipe's AdamW groups (timm's add_weight_decay), written for torch."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # pos_embed and the performers' w are fixed
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name in model.no_weight_decay()
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@pytest.mark.parametrize("name,max_norm", [
    ("t2t_vit_7", None),  # performer T2T layers, no clipping
    ("t2t_vit_t_14", 1.0),  # transformer T2T layers, gradients clipped at norm 1
])
def test_training_steps_match_torch(name, max_norm):
    model = t2t_ref.create_model(name, num_classes=CLASSES, img_size=IMG, dtype="float64",
                                 seed=0).eval()
    xp = model.xp
    oracle = create_torch_model(name, num_classes=CLASSES, img_size=IMG).double().eval()
    oracle.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    opt = AdamW(model.params, weight_decay=WD)
    torch_opt = torch.optim.AdamW(torch_param_groups(oracle, WD), lr=BASE_LR,
                                  betas=(0.9, 0.999), eps=1e-8)

    rng = np.random.default_rng(0)
    clipped = []
    for step in range(STEPS):
        x = rng.standard_normal((BATCH, 3, IMG, IMG))  # (B, 3, S, S)
        y = rng.integers(0, CLASSES, BATCH)  # (B,)
        lr = lr_at(step, base_lr=BASE_LR, total_steps=STEPS, warmup_steps=WARMUP)

        loss, dlogits = t2t_ref.cross_entropy(model.forward(xp.asarray(x)), xp.asarray(y),
                                              smoothing=SMOOTHING)
        model.backward(dlogits)
        if max_norm is not None:
            norm = clip_grad_norm(model.grads, max_norm)
        opt.step(model.params, model.grads, lr)

        torch_opt.zero_grad()
        torch_loss = F.cross_entropy(oracle(torch.from_numpy(x)), torch.from_numpy(y),
                                     label_smoothing=SMOOTHING)
        torch_loss.backward()
        if max_norm is not None:
            torch_norm = torch.nn.utils.clip_grad_norm_(oracle.parameters(), max_norm)
            assert_close(norm, torch_norm.numpy(), 1e-8, f"step {step} gradient norm")
            clipped.append(float(torch_norm) > max_norm)
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()

        assert_close(loss, torch_loss.detach().numpy(), 1e-8, f"step {step} loss")

    if max_norm is not None:
        assert any(clipped), "max_norm too large: clipping never acted, so it was not tested"
    ours = model.state_dict()
    for key, tensor in oracle.state_dict().items():
        assert_close(ours[key], tensor.numpy(), 1e-8, f"{key} after {STEPS} steps")
