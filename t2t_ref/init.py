"""Weight initialisation as the official code does it, drawn on the host with NumPy.

Drawing on the host from one seeded generator, in the state-dict's key order, makes the same
seed give the same weights on every backend; the arrays then move to the device once.
"""

import math

import numpy as np


def trunc_normal(rng, shape, std=0.02, low=-2.0, high=2.0):
    """Normal(0, std) redrawn until inside [low, high], as timm's trunc_normal_.

    The bounds are absolute (timm's defaults a=-2, b=2), so with std 0.02 they sit at
    100 standard deviations and practically never bite: effectively a plain normal.
    """
    values = rng.normal(0.0, std, size=shape)
    outside = (values < low) | (values > high)
    while outside.any():
        values[outside] = rng.normal(0.0, std, size=int(outside.sum()))
        outside = (values < low) | (values > high)
    return values


def orthogonal(rng, shape, gain=1.0):
    """A matrix with orthonormal rows (or columns, whichever are fewer), as nn.init.orthogonal_.

    QR of a Gaussian matrix, with the signs of R's diagonal folded into Q so that the result
    is uniformly distributed over orthogonal matrices.
    """
    rows, cols = shape
    gaussian = rng.normal(size=(rows, cols))
    if rows < cols:
        gaussian = gaussian.T
    q, r = np.linalg.qr(gaussian)
    q = q * np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return gain * q


def sinusoid_table(n_positions, width):
    """The fixed position table (n_positions, width) of the official get_sinusoid_encoding.

    angle(p, j) = p / 10000^(2 (j // 2) / width); even channels sin(angle), odd cos(angle).
    """
    positions = np.arange(n_positions, dtype=np.float64)[:, None]  # (P, 1)
    channels = np.arange(width)[None, :]  # (1, W)
    angles = positions / np.power(10000.0, 2 * (channels // 2) / width)  # (P, W)
    table = np.empty_like(angles)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return table


def performer_features(rng, num_features, width):
    """The performer's fixed random-feature matrix w (m, d): orthogonal rows scaled by sqrt(m)."""
    return orthogonal(rng, (num_features, width)) * math.sqrt(num_features)


# ---- state-dict entries: (name, shape, how to initialise), as the models list them ------------

def linear_specs(prefix, d_in, d_out, bias=True):
    specs = [(prefix + "weight", (d_out, d_in), "trunc_normal")]
    return specs + [(prefix + "bias", (d_out,), "zeros")] if bias else specs


def norm_specs(prefix, width):
    return [(prefix + "weight", (width,), "ones"), (prefix + "bias", (width,), "zeros")]


def conv_default(fan_in):
    """PyTorch's default Conv init (kaiming_uniform_, a = sqrt 5), which the official code
    leaves on its convolutions: uniform in +-1/sqrt(fan_in), weight and bias alike."""
    return ("uniform", fan_in ** -0.5)
