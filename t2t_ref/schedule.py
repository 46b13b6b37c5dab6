"""Learning-rate schedule: linear warmup, then a cosine down to a floor, per optimizer step.

The official recipe uses timm's CosineLRScheduler per *epoch* (warmup 10 epochs from 1e-6,
cosine over 300 epochs to 1e-5, 10 cooldown epochs at the floor). Here the same curve is
evaluated per optimizer *step*, so a short run or a small dataset still gets a smooth warmup.
`step` counts optimizer steps from 0: lr_at(s) is the learning rate of the (s+1)-th update.

    W = warmup_steps, T = total_steps, lr0 = warmup_lr, lr = base_lr, lo = min_lr

    warmup    0 <= s < W:  lr0 + (lr - lr0) * s / W                 linear, s = 0 gives lr0
    cosine    W <= s < T:  lo + (lr - lo) * (1 + cos(pi * t / L)) / 2
                           t = s - W, L = T - W   (warmup_prefix=True: the cosine starts at
                                                   lr when the warmup ends, the default)
                           t = s,     L = T       (warmup_prefix=False: timm's default and the
                                                   official recipe's: the warmup overwrites
                                                   the first W steps of one cosine over T)
    floor     s >= T:      lo                                      the cooldown

Edge cases, exactly: s = 0 gives warmup_lr when W > 0, and base_lr when W = 0 (no warmup);
s = W gives base_lr with warmup_prefix=True; the last scheduled step s = T - 1 is still a little
above min_lr (cos(pi (L-1)/L) > -1), as in timm; W = T means warmup then straight to the floor.
"""

import math
import numbers
from dataclasses import dataclass


def lr_at(step, *, base_lr, total_steps, warmup_steps, warmup_lr=1e-6, min_lr=1e-5,
          warmup_prefix=True):
    """The learning rate for optimizer step `step` (0-based); see the module docstring."""
    if not (isinstance(step, numbers.Integral) and step >= 0):
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got warmup_steps "
                         f"{warmup_steps!r}, total_steps {total_steps!r}")
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    if warmup_prefix:
        t, length = step - warmup_steps, total_steps - warmup_steps
    else:
        t, length = step, total_steps
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / length))


@dataclass(frozen=True)
class CosineSchedule:
    """lr_at with its settings bound: schedule = CosineSchedule(5e-4, total_steps=..., ...);
    lr = schedule(step). Kept in the checkpoint's configuration as a plain dict (asdict)."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_prefix: bool = True

    def __call__(self, step):
        return lr_at(step, base_lr=self.base_lr, total_steps=self.total_steps,
                     warmup_steps=self.warmup_steps, warmup_lr=self.warmup_lr,
                     min_lr=self.min_lr, warmup_prefix=self.warmup_prefix)
