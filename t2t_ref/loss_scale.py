"""Dynamic loss scaling for float16 training, as torch.amp.GradScaler does it, kept on the device.

float16's smallest normal number is 6e-5 (subnormals reach 6e-8): the gradients of a
transformer's later layers are often smaller, and would flush to zero. So the backward starts
from the loss gradient multiplied by a large `scale` (2^16 at first), every gradient comes out
scale times larger, and before the optimizer sees them they are divided by scale again, in
float32. If the scale was too large, some gradient overflows to inf: that step is skipped and
the scale halved; after `growth_interval` finite steps in a row it is doubled again:

    found_inf:  scale = scale * backoff (0.5),   good_steps = 0
    else:       good_steps += 1; if good_steps == growth_interval: scale *= growth (2), 0

bfloat16 has float32's exponent range and needs none of this. Both numbers live in 0-d device
arrays and are updated with array operations from the step's found_inf flag, so scaling costs
no host transfer (the training loop reads `scale` with its logged loss); state_dict() reads
them, for a checkpoint.

    scaler = DynamicLossScale(xp, device)
    model.backward(scaler.scale_gradient(dlogits))     # d(scale * loss)
    found_inf = scaler.unscale(model.grads)            # grads /= scale; any inf or NaN?
    optimizer.step(params, grads, lr, found_inf=found_inf)   # skipped where found_inf
    scaler.update(found_inf)
"""

from .backend import to_numpy
from .flat import FlatTensors


class DynamicLossScale:
    def __init__(self, xp, device, init_scale=2.0 ** 16, growth_factor=2.0,
                 backoff_factor=0.5, growth_interval=2000):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1
                and growth_interval >= 1):
            raise ValueError("loss scale: init_scale > 0, growth_factor > 1, "
                             "0 < backoff_factor < 1 and growth_interval >= 1 are needed")
        self.xp, self.device = xp, device
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.scale = xp.asarray(float(init_scale), dtype=xp.float32, device=device)  # ()
        self.good_steps = xp.asarray(0.0, dtype=xp.float32, device=device)  # () a count

    def scale_gradient(self, dloss):
        """The gradient of scale * loss: the backward's starting point, times scale."""
        return dloss * self.xp.astype(self.scale, dloss.dtype)

    def unscale(self, grads):
        """Divide the gradients by the scale, in float32 (flat buffers: in place, one call);
        return found_inf, a 0-d boolean device array: True if any gradient is inf or NaN."""
        xp = self.xp
        inverse = 1.0 / self.scale
        if isinstance(grads, FlatTensors):
            grads.flat *= xp.astype(inverse, grads.flat.dtype)
            return xp.logical_not(xp.all(xp.isfinite(grads.flat)))
        finite = []
        for name, g in grads.items():
            grads[name] = g * xp.astype(inverse, g.dtype)
            finite.append(xp.all(xp.isfinite(grads[name])))
        return xp.logical_not(xp.all(xp.stack(finite)))

    def update(self, found_inf):
        """Back off after an overflow, grow after growth_interval finite steps in a row."""
        xp = self.xp
        good = xp.where(found_inf, 0.0, self.good_steps + 1.0)  # ()
        grow = good >= self.growth_interval
        one = xp.ones_like(self.scale)  # where() takes at most one Python scalar
        factor = xp.where(found_inf, self.backoff_factor,
                          xp.where(grow, self.growth_factor, one))
        # in place: a step recorded as a CUDA graph (graphs.py) reads these arrays where they lie
        self.scale[...] = self.scale * xp.astype(factor, xp.float32)
        self.good_steps[...] = xp.astype(xp.where(grow, 0.0, good), xp.float32)

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self):
        """{"scale", "good_steps", and the settings}: host numbers (a deliberate transfer)."""
        return {"scale": float(to_numpy(self.scale)),
                "good_steps": int(to_numpy(self.good_steps)),
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, state):
        xp = self.xp
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.scale[...] = xp.asarray(float(state["scale"]), dtype=xp.float32,
                                     device=self.device)
        self.good_steps[...] = xp.asarray(float(state["good_steps"]), dtype=xp.float32,
                                          device=self.device)
