"""Softmax cross-entropy with label smoothing, mean over the batch, as
torch.nn.functional.cross_entropy(logits, target, label_smoothing=eps).

The smoothed target puts 1 - eps + eps/K on the true class and eps/K on every other class.
Targets may also be given as probabilities (B, K), as mixup and cutmix make them.
"""

from ..backend import array_namespace, device_of
from ..gaps import wide


def smoothed_targets(labels, num_classes, smoothing, dtype):
    """labels (B,) integer class indices -> target probabilities (B, K)."""
    xp = array_namespace(labels)
    classes = xp.arange(num_classes, device=device_of(labels))  # (K,)
    one_hot = xp.astype(labels[:, None] == classes[None, :], dtype)  # (B, K)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy(logits, targets, smoothing=0.0):
    """logits (B, K); targets (B,) class indices or (B, K) probabilities.

    Returns (loss, dlogits): loss a 0-d array (mean over the batch), dlogits (B, K).
    The backward is short enough to live here: with p = softmax(logits) and targets t,
    loss = -sum(t * log p) / B gives d(loss)/d(logits) = (p * sum(t) - t) / B, which is
    (p - t) / B when each row of t sums to 1 (always, for labels, mixup and cutmix).
    Half-precision logits are taken in float32 (precision.py): the loss and dlogits are
    float32.
    """
    xp = array_namespace(logits)
    logits = wide(logits)
    if targets.ndim == 2:
        targets = wide(targets)
    B, K = logits.shape
    if targets.ndim == 1:
        targets = smoothed_targets(targets, K, smoothing, logits.dtype)  # (B, K)
    elif smoothing:
        targets = targets * (1.0 - smoothing) + smoothing / K
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)  # (B, K) avoids exp overflow
    log_norm = xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))  # (B, 1)
    log_probs = shifted - log_norm  # (B, K)
    loss = -xp.sum(targets * log_probs) / B  # ()
    row_mass = xp.sum(targets, axis=-1, keepdims=True)  # (B, 1), 1 for distributions
    dlogits = (xp.exp(log_probs) * row_mass - targets) / B  # (B, K)
    return loss, dlogits
