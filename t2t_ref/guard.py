"""Non-finite steps: caught on the device, skipped, counted, and read back only with the logged
loss, so that watching for them costs no host sync per step.

A step is non-finite when its loss or its gradients' global L2 norm is NaN or inf (a diverging
run, a learning rate far too high). Such a step is skipped: AdamW and the EMA are given the
flag and leave every weight and moment as it was (as torch's fused AdamW skips a step under
GradScaler's found_inf). Nothing here is read on the host per step; StepMonitor keeps, on the
device,

    loss_sum, images     the loss summed over the images of finite steps, and their number
    skipped              non-finite steps so far (this epoch)
    run                  non-finite steps in a row, 0 after a finite one
    tripped              the step at which `run` first reached the limit, -1 until then
    last_loss            the loss of the last finite step

and read() brings all of them, with the latest step's loss, to the host in one transfer: the
training loop calls it where it logs (every few steps) and stops the run if `tripped` is set.

All state is float64 0-d arrays (exact for counts and step numbers up to 2**53), so that one
stack makes the one transfer.
"""

import contextlib
import math
import warnings

from .backend import to_numpy
from .optim import global_norm


@contextlib.contextmanager
def quiet_float_warnings():
    """Silence NumPy's 'overflow / invalid value / divide by zero encountered' warnings (in
    every thread: the model's shards run in threads): the training loop and evaluate count the
    non-finite values those warn about, and say so once, in the run's own words."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                                RuntimeWarning)
        yield


def grad_norm(grads):
    """The gradients' global L2 norm, a 0-d array on their device, as clip_grad_norm computes
    it (optim.global_norm: one dot product over the flat gradient buffer)."""
    return global_norm(grads)


class StepMonitor:
    """The non-finite bookkeeping of a training run; see the module docstring.

    limit: non-finite steps in a row after which `tripped` is set. The counters restart from
    `state` (a read() of a saved run) so that a resumed run counts as an uninterrupted one.
    """

    FIELDS = ("loss_sum", "images", "skipped", "run", "tripped", "last_loss", "last_loss_step")

    def __init__(self, xp, device, limit, state=None):
        self.xp, self.limit = xp, limit
        state = {"tripped": -1.0, "last_loss": math.nan, "last_loss_step": -1.0,
                 **(state or {})}
        self.state = {name: xp.asarray(float(state.get(name, 0.0)), dtype=xp.float64,
                                       device=device) for name in self.FIELDS}
        self.loss = xp.asarray(math.nan, dtype=xp.float64, device=device)

    def step(self, step, loss, norm, batch, scaled=False):
        """Record training step `step` (its loss, gradient norm and batch size, the first two
        0-d device arrays). Returns found_inf, a 0-d boolean device array, True when the step
        is not finite and must be skipped.

        scaled: the gradients come from a float16 loss scale (loss_scale.py), where an inf
        gradient with a finite loss is an overflow of the scale, not a diverging run: the
        step is skipped (and counted) as any other, but only a non-finite loss counts towards
        the `limit` in a row (the loss scale backs off instead)."""
        xp, s = self.xp, self.state
        loss = xp.astype(loss, xp.float64)
        finite_loss = xp.isfinite(loss)
        finite = xp.logical_and(finite_loss, xp.isfinite(norm))  # ()
        ok = xp.astype(finite, xp.float64)  # 1.0 or 0.0
        diverging = 1.0 - (xp.astype(finite_loss, xp.float64) if scaled else ok)
        s["loss_sum"] = s["loss_sum"] + xp.where(finite, loss * batch, 0.0)  # NaN * 0 is NaN
        s["images"] = s["images"] + ok * batch
        s["skipped"] = s["skipped"] + (1.0 - ok)
        s["run"] = (s["run"] + 1.0) * diverging
        s["tripped"] = xp.where(xp.logical_and(s["tripped"] < 0, s["run"] >= self.limit),
                                float(step), s["tripped"])
        s["last_loss"] = xp.where(finite, loss, s["last_loss"])
        s["last_loss_step"] = xp.where(finite, float(step), s["last_loss_step"])
        self.loss = loss
        return xp.logical_not(finite)

    def read(self, extra=None):
        """{field: float} and 'loss' (the latest step's): one host transfer. extra {name: 0-d
        device array} (the loss scale) comes along in the same transfer."""
        extra = extra or {}
        xp = self.xp
        values = to_numpy(xp.stack([self.state[name] for name in self.FIELDS] + [self.loss]
                                   + [xp.astype(v, xp.float64) for v in extra.values()]))
        return dict(zip(self.FIELDS + ("loss",) + tuple(extra), (float(v) for v in values)))

    def new_epoch(self):
        """Zero the per-epoch sums (loss_sum, images, skipped); the rest carries on."""
        for name in ("loss_sum", "images", "skipped"):
            self.state[name] = self.state[name] * 0.0
