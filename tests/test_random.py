"""gaps.KeyedRandom: dropout's decisions as a function of (seed, draw, sample, element)."""

import numpy as np
import pytest

from t2t_ref.backend import get_namespace, to_numpy
from t2t_ref.gaps import KeyedRandom, _hash32_int, make_rng, seed_array


def loop_mask(seed, draw, first_sample, shape, p):
    """The documented formulas, element by element on Python integers: the slow twin."""
    low, high = seed % 2**32, seed // 2**32
    key = _hash32_int(_hash32_int(low ^ _hash32_int(high)) ^ _hash32_int(draw))
    samples, per_sample = shape[0], int(np.prod(shape[1:]))
    threshold = int(np.ceil(p * 2**24))
    out = np.zeros((samples, per_sample))
    for b in range(samples):
        sample_key = _hash32_int(_hash32_int(first_sample + b) ^ key)
        for j in range(per_sample):
            bits = _hash32_int(_hash32_int(j) ^ sample_key)
            out[b, j] = 1.0 / (1.0 - p) if bits >> 8 >= threshold else 0.0
    return out.reshape(shape)


def test_keep_mask_is_the_formula(backend):
    """Every backend gives the formula's masks (NumPy in its chunked way, the others whole)."""
    xp, device = get_namespace(backend)
    rng = KeyedRandom(2**33 + 5, first_sample=3)
    for draw, shape in enumerate([(2, 3, 40), (4, 1, 1), (3, 70000)]):  # last: > one chunk
        mask = to_numpy(rng.keep_mask(xp, shape, 0.25, xp.float64, device))
        expected = loop_mask(2**33 + 5, draw, 3, shape, 0.25) if shape[1] < 1000 else None
        if expected is None:  # spot-check the long rows instead of 210,000 Python hashes
            full = loop_mask(2**33 + 5, draw, 3, (3, 200), 0.25)
            np.testing.assert_array_equal(mask[:, :200], full)
        else:
            np.testing.assert_array_equal(mask, expected)
    assert rng.draws == 3


def test_a_seed_on_the_device_gives_the_same_masks(backend):
    """A seed held in a device array (a recorded CUDA graph's step seed, graphs.py) gives the
    int seed's masks, draw after draw and piece by piece; overwriting the array in place moves
    the masks to the new seed's, and the array itself is never changed by a draw."""
    xp, device = get_namespace(backend)
    seeds = (2**33 + 5, 7, 2**64 - 1)
    array = seed_array(xp, seeds[0], device)
    for seed in seeds:
        assert seed_array(xp, seed, device, out=array) is array
        on_device, on_host = KeyedRandom(array, first_sample=3), KeyedRandom(seed, 3)
        for shape in [(2, 3, 40), (4, 1, 1)]:
            np.testing.assert_array_equal(
                to_numpy(on_device.keep_mask(xp, shape, 0.25, xp.float32, device)),
                to_numpy(on_host.keep_mask(xp, shape, 0.25, xp.float32, device)),
                err_msg=f"seed {seed}, shape {shape}")
        np.testing.assert_array_equal(
            to_numpy(on_device.piece(1).keep_mask(xp, (2, 9), 0.5, xp.float32, device)),
            to_numpy(on_host.piece(1).keep_mask(xp, (2, 9), 0.5, xp.float32, device)))
        assert to_numpy(array).tolist() == [seed % 2**32, seed // 2**32]


def test_masks_do_not_depend_on_how_the_batch_is_cut():
    """The mask of the whole batch equals the masks of its pieces side by side."""
    whole = KeyedRandom(9).keep_mask(np, (7, 5, 6), 0.4, np.float32, "cpu")
    rng = KeyedRandom(9)
    pieces = [rng.piece(start).keep_mask(np, (size, 5, 6), 0.4, np.float32, "cpu")
              for start, size in ((0, 3), (3, 1), (4, 3))]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_draws_repeat_and_move_on():
    a, b = make_rng(np, 7), make_rng(np, 7)
    first = a.keep_mask(np, (4, 1000), 0.5, np.float32, "cpu")
    np.testing.assert_array_equal(first, b.keep_mask(np, (4, 1000), 0.5, np.float32, "cpu"))
    assert not np.array_equal(first, a.keep_mask(np, (4, 1000), 0.5, np.float32, "cpu")), \
        "the next draw must give other decisions"
    assert not np.array_equal(first, make_rng(np, 8).keep_mask(np, (4, 1000), 0.5,
                                                               np.float32, "cpu"))
    assert not np.array_equal(first, make_rng(np, 7 + 2**32).keep_mask(
        np, (4, 1000), 0.5, np.float32, "cpu")), "the seed's high bits count"
    assert not np.array_equal(first[0], first[1]), "samples get their own decisions"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_fraction(p):
    mask = KeyedRandom(1).keep_mask(np, (50, 20000), p, np.float64, "cpu")
    dropped = (mask == 0).mean(axis=1)  # per sample
    assert np.all(np.abs(dropped - p) < 0.02), dropped
    assert set(np.unique(mask).tolist()) == {0.0, 1.0 / (1.0 - p)}
    # neighbouring samples are not alike: the agreement of two independent masks
    agree = (mask[:-1] == mask[1:]).mean()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01, agree
