"""Exponential moving average of the weights (timm's ModelEmaV2), kept on the device.

After every optimizer step: ema = decay * ema + (1 - decay) * weights. Evaluating with the
EMA weights smooths out the last steps' noise; the official recipe uses decay 0.99996, which
on a short run leaves the EMA near the random initial weights (accuracy looks like zero).
With the model's flat parameters (flat.py) the EMA is flat too, and an update is two array
calls over the whole buffer.
"""

from .backend import array_namespace, backend_name
from .flat import FlatTensors


class WeightEMA:
    def __init__(self, params, decay):
        self.decay = decay
        # a copy on the same device (flat parameters: a flat copy, same layout)
        self.params = params.copy() if isinstance(params, FlatTensors) \
            else {k: v + 0.0 for k, v in params.items()}

    def load(self, weights):
        """Set the EMA weights from {name: array on the model's device} (a resumed run's)."""
        for name, value in weights.items():
            self.params[name] = value

    def update(self, params, found_inf=None):
        """One step of the average. found_inf (a 0-d boolean device array, see guard.py): where
        True the step was skipped, and so is this update (decay 1), with no host transfer (NumPy,
        whose device is the host, reads the flag)."""
        d, rest = self.decay, 1.0 - self.decay
        xp = array_namespace(*params.values())
        if found_inf is not None and backend_name(xp) == "numpy":  # on the host: read it
            if bool(found_inf):
                return
            found_inf = None
        if found_inf is not None:
            keep = xp.astype(xp.logical_not(found_inf), xp.float64)
            d, rest = keep * d + (1.0 - keep), keep * rest  # 1 and 0 for a skipped step
            dtype = next(iter(params.values())).dtype
            d, rest = xp.astype(d, dtype), xp.astype(rest, dtype)
        if isinstance(self.params, FlatTensors) and self.params.same_layout(params):
            ema = self.params.flat
            ema *= d  # in place: the same roundings as ema * d + value * rest
            ema += params.flat * rest
            return
        for key, value in params.items():
            self.params[key] = self.params[key] * d + value * rest

    def swap_into(self, model):
        """Exchange the model's weights with the EMA's (call twice to swap back)."""
        model.params, self.params = self.params, model.params
