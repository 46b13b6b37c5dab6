"""Exponential moving average of the weights (timm's ModelEmaV2), kept on the device.

After every optimizer step: ema = decay * ema + (1 - decay) * weights. Evaluating with the
EMA weights smooths out the last steps' noise; the official recipe uses decay 0.99996, which
on a short run leaves the EMA near the random initial weights (accuracy looks like zero).
"""


class WeightEMA:
    def __init__(self, params, decay):
        self.decay = decay
        self.params = {k: v + 0.0 for k, v in params.items()}  # a copy on the same device

    def update(self, params):
        d = self.decay
        for key, value in params.items():
            self.params[key] = self.params[key] * d + value * (1.0 - d)

    def swap_into(self, model):
        """Exchange the model's weights with the EMA's (call twice to swap back)."""
        model.params, self.params = self.params, model.params
