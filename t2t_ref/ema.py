"""Exponential moving average of the weights (timm's ModelEmaV2), kept on the device.

After every optimizer step: ema = decay * ema + (1 - decay) * weights. Evaluating with the
EMA weights smooths out the last steps' noise; the official recipe uses decay 0.99996, which
on a short run leaves the EMA near the random initial weights (accuracy looks like zero).
With the model's flat parameters (flat.py) the EMA is flat too, and an update is two array
calls over the whole buffer.
"""

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

    def update(self, params):
        d = self.decay
        if isinstance(self.params, FlatTensors) and self.params.same_layout(params):
            ema = self.params.flat
            ema *= d  # in place; the same roundings as ema * d + value * (1 - d)
            ema += params.flat * (1.0 - d)
            return
        for key, value in params.items():
            self.params[key] = self.params[key] * d + value * (1.0 - d)

    def swap_into(self, model):
        """Exchange the model's weights with the EMA's (call twice to swap back)."""
        model.params, self.params = self.params, model.params
