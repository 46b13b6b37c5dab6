"""evaluate's scores are honest about broken models: a tie is not a hit, a NaN or inf output is
a miss (and counted), and top-k is top-5 only where 5 is less than the number of classes."""

import json
import math

import numpy as np
import pytest

from conftest import on
from reliability import tried
from t2t_ref.backend import get_namespace, to_numpy
from t2t_ref.data import IMAGENET_MEAN, IMAGENET_STD
from t2t_ref.evaluate import evaluate, json_line, summary, top_k


class FixedModel:
    """A stand-in with the model's evaluate interface, whose logits are given: sample i (its
    index is written in its image's first pixel) gets logits[i]."""

    def __init__(self, backend, logits):
        self.xp, self.device = get_namespace(backend)
        self.dtype = self.xp.float32
        self.logits = np.asarray(logits, dtype=np.float32)  # (N, K)
        self.num_classes = self.logits.shape[1]
        self.backend = backend

    def eval(self):
        return self

    def forward(self, x, keep_cache=True):
        pixel = to_numpy(x[:, 0, 0, 0]) * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # normalised
        index = np.rint(pixel * 255).astype(int)  # (B,)
        return on(self.backend, self.logits[index])


class Batches:
    """A loader of (uint8 images, labels, no erasing) batches of 2 whose first pixel is the
    sample's index."""

    def __init__(self, labels):
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return math.ceil(len(self.labels) / 2)

    def epoch_batches(self, epoch):
        for start in range(0, len(self.labels), 2):
            index = np.arange(start, min(start + 2, len(self.labels)))
            images = np.zeros((len(index), 3, 2, 2), dtype=np.uint8)
            images[:, 0, 0, 0] = index
            yield images, self.labels[index], None


def scores(backend, logits, labels):
    return evaluate(FixedModel(backend, logits), Batches(labels), progress=False)


@tried("evaluation", "a model whose logits are all equal (or tie with the true class)",
       "wrong at top-1 (and at top-k when k or more classes tie): 0%, not 100%")
def test_ties_do_not_count_as_correct(backend):
    K = 10
    logits = [np.zeros(K),                        # all equal: wrong at top-1 and top-5
              np.eye(K)[3] + np.eye(K)[7],        # the true class 3 ties with class 7: top-5
              np.eye(K)[3]]                       # right
    result = scores(backend, logits, [3, 3, 3])
    assert result["top1"] == pytest.approx(100 / 3)
    assert result["top5"] == pytest.approx(200 / 3)
    assert result["nonfinite"] == 0


@tried("evaluation", "NaN or inf logits (a diverged model)",
       "each such sample wrong at every k; evaluate says how many (a NaN model scored 100%)")
def test_non_finite_logits_are_wrong_and_counted(backend):
    K = 6
    right = np.eye(K)[2] * 5
    logits = [np.full(K, np.nan), right, np.where(np.arange(K) == 2, np.inf, 0.0),
              np.where(np.arange(K) == 4, np.nan, right)]
    result = scores(backend, logits, [2, 2, 2, 2])
    assert result["top1"] == 25.0 and result["top5"] == 25.0
    assert result["nonfinite"] == 3
    assert math.isnan(result["loss"])
    assert "3 images had NaN or inf outputs: counted wrong" in summary("m", result)

    def refuse(constant):
        raise AssertionError(f"evaluate's JSON line holds {constant}, which is not JSON")

    line = json.loads(json_line(result), parse_constant=refuse)  # standard JSON: null
    assert line["loss"] is None and line["top1"] == 25.0 and line["nonfinite"] == 3


@tried("evaluation", "top-5 with 5 classes or fewer",
       "reported as top-k, k = classes - 1, and labelled so (top-4, top-2); none for 2 classes")
@pytest.mark.parametrize("K, k", [(1000, 5), (10, 5), (6, 5), (5, 4), (3, 2), (2, None)])
def test_top_k_is_top_5_only_where_it_means_something(K, k):
    assert top_k(K) == k
    logits = np.tile(np.arange(K, dtype=np.float32)[::-1], (2, 1))  # class 0 first, 1 second
    result = scores("numpy", logits, [0, 1])
    keys = sorted(key for key in result if key.startswith("top"))
    assert keys == (["top1"] if k is None else ["top1", f"top{k}"])
    line = summary("m", result)
    assert ("top-5" in line) == (k == 5) and (k is None or f"top-{k} 100.00%" in line)
