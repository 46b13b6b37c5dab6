"""The consumer's side of a batch (data/feed.py, mixup.py, data/upload.py): uint8 in, the
model's input out, on every backend alike; mixup and cutmix on the device against their
definitions restated in NumPy; the CuPy upload from pinned memory where there is a GPU."""

import numpy as np
import pytest

from conftest import on
from t2t_ref.backend import get_namespace, to_numpy
from t2t_ref.data import RandomErasing, model_input, normalize
from t2t_ref.mixup import mix_batch, one_hot


def uint8_batch(b=6, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, 3, size, size), dtype=np.uint8)


def test_model_input_is_the_same_on_every_backend(backend):
    images = uint8_batch()
    erasing = RandomErasing(1.0, "pixel", max_count=2)
    rows = np.stack([erasing.draw(16, np.random.default_rng(s)) for s in range(6)])
    xp, device = get_namespace(backend)
    for dtype in ("float32", "float64"):
        x = model_input(images, rows, erasing, xp=xp, device=device,
                        dtype=getattr(xp, dtype))
        assert x.shape == (6, 3, 16, 16) and x.dtype == getattr(xp, dtype)
        host = normalize(images)
        erasing.apply(host, rows)
        assert np.allclose(to_numpy(x), host, rtol=0, atol=1e-6), backend
    # uint8 already on the device (the CuPy upload's batches) is taken as it is
    assert np.array_equal(to_numpy(model_input(on(backend, images), xp=xp, device=device)),
                          normalize(images))


def mix_by_definition(images, labels, K, rng, mixup_alpha, cutmix_alpha):
    """timm's Mixup in batch mode, restated: one lam per batch, partner B-1-i."""
    partner, targets = images[::-1], one_hot(labels, K)
    if cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5):
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        S = images.shape[-1]
        cut = int(S * np.sqrt(1 - lam))
        cy, cx = rng.integers(0, S, size=2)
        t, b = np.clip([cy - cut // 2, cy + cut // 2], 0, S)
        left, r = np.clip([cx - cut // 2, cx + cut // 2], 0, S)
        mixed = images.copy()
        mixed[:, :, t:b, left:r] = partner[:, :, t:b, left:r]
        lam = 1 - (b - t) * (r - left) / S**2
    else:
        lam = rng.beta(mixup_alpha, mixup_alpha)
        mixed = lam * images + (1 - lam) * partner
    return mixed, lam * targets + (1 - lam) * targets[::-1]


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_on_the_device_follow_their_definition(backend, mixup, cutmix):
    images = normalize(uint8_batch(8, 16, seed=1)).astype(np.float64)
    labels = np.arange(8) % 5
    for seed in range(6):
        x, targets = mix_batch(on(backend, images), labels, 5, np.random.default_rng(seed),
                               mixup, cutmix)
        expected_x, expected_t = mix_by_definition(images, labels, 5,
                                                   np.random.default_rng(seed), mixup, cutmix)
        assert np.allclose(to_numpy(x), expected_x, rtol=1e-12, atol=1e-12), seed
        assert np.allclose(targets, expected_t, rtol=1e-6) and targets.dtype == np.float32
        assert np.allclose(targets.sum(axis=1), 1.0)


def test_mixup_with_partners_is_the_whole_batch_cut_in_pieces():
    """Under MPI a rank mixes its piece with the mirrored piece its partners come in."""
    images = normalize(uint8_batch(6, 16, seed=2))
    labels = np.arange(6)
    whole = mix_batch(images, labels, 6, np.random.default_rng(4), 0.8, 1.0)
    for start, stop in ((0, 4), (4, 6)):
        partners = (images[::-1][start:stop], labels[::-1][start:stop])
        x, t = mix_batch(images[start:stop], labels[start:stop], 6,
                         np.random.default_rng(4), 0.8, 1.0, partners=partners)
        assert np.array_equal(x, whole[0][start:stop]) and np.array_equal(t, whole[1][start:stop])


def cupy_with_gpu():
    try:
        from t2t_ref.backend import get_namespace as namespace
        namespace("cupy")
        return True
    except Exception:
        return False


@pytest.mark.skipif(not cupy_with_gpu(), reason="the upload from pinned memory needs CuPy and "
                    "a GPU (checked by the device script)")
def test_cupy_upload_from_pinned_memory_hands_over_every_batch_unchanged():
    import cupy
    from t2t_ref.data import Batch
    from t2t_ref.data.upload import ahead
    batches = [Batch(uint8_batch(4 + k % 2, 16, seed=k), np.arange(4 + k % 2), None)
               for k in range(5)]
    batches[2] = Batch(uint8_batch(0, 16), np.arange(0), None)  # an MPI rank's empty piece
    got = list(ahead(iter(batches)))
    assert len(got) == 5
    for (images, labels, erase), batch in zip(got, batches):
        assert isinstance(images, cupy.ndarray) and images.dtype == cupy.uint8
        assert np.array_equal(images.get(), batch.images)
        assert np.array_equal(labels, batch.labels) and erase is None


class StandInCupy:
    """Enough of CuPy for data/upload.py, logging what it is asked: streams, events, pinned
    buffers and copies, so the order of the upload can be checked without a GPU."""

    uint8 = np.uint8

    def __init__(self):
        self.log, self.pinned, self.events = [], 0, 0
        parent = self

        class Event:
            def __init__(self):
                parent.events += 1
                self.id = parent.events

            def synchronize(self):
                parent.log.append(("synchronize", self.id))

        class Stream:
            def __init__(self, non_blocking=False, name="side"):
                self.name = name

            def record(self):
                event = Event()
                parent.log.append(("record", self.name, event.id))
                return event

            def wait_event(self, event):
                parent.log.append(("wait", self.name, event.id))

        class DeviceArray:
            def __init__(self, shape, dtype):
                self.data = np.zeros(shape, dtype)

            def set(self, host, stream=None):
                assert stream is not None and stream.name == "side"  # asynchronous
                self.data[...] = host
                parent.log.append(("copy", id(host.base if host.base is not None else host)))

        consumer = Stream(name="consumer")
        self.cuda = type("cuda", (), {"Stream": Stream,
                                      "get_current_stream": staticmethod(lambda: consumer)})
        self.empty = lambda shape, dtype: DeviceArray(shape, dtype)

    def empty_pinned(self, size, dtype):
        self.pinned += 1
        return np.zeros(size, dtype)


def test_upload_order_with_a_stand_in_cupy(monkeypatch):
    """The copy of each batch is queued on the side stream before the batch is handed on; the
    consumer's stream waits for that copy's event; a pinned buffer is rewritten only after its
    previous copy's event; two pinned buffers serve any number of batches."""
    import sys
    from t2t_ref.data import Batch
    from t2t_ref.data.upload import ahead
    fake = StandInCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupyx", fake)
    batches = [Batch(uint8_batch(4, 8, seed=k), np.arange(4) + k, None) for k in range(5)]
    got = []
    for batch in ahead(iter(batches)):
        got.append(batch)
        # the consumer's stream waited (on the GPU) for this batch's copy before it is used
        copy_event = [e for e in fake.log if e[0] == "record" and e[1] == "side"][len(got) - 1]
        assert ("wait", "consumer", copy_event[2]) in fake.log
    assert [np.array_equal(b.images.data, h.images) for b, h in zip(got, batches)] == [True] * 5
    assert [list(b.labels) for b in got] == [list(h.labels) for h in batches]
    assert fake.pinned == 2
    copies = [k for k, e in enumerate(fake.log) if e[0] == "copy"]
    syncs = [k for k, e in enumerate(fake.log) if e[0] == "synchronize"]
    assert len(copies) == 5 and len(syncs) == 3  # batches 2, 3, 4 reuse a buffer
    copied = [e[2] for e in fake.log if e[0] == "record" and e[1] == "side"]
    assert [fake.log[k][1] for k in syncs] == copied[:3]  # each waits for its buffer's last
    for reuse, sync in zip(copies[2:], syncs):
        assert sync < reuse
    # and every copy waits for what the consumer's stream had queued (the pool's blocks)
    for k in copies:
        assert fake.log[k - 1][:2] == ("wait", "side") and fake.log[k - 2][1] == "consumer"


def test_the_uploads_wait_for_the_gpu_is_not_counted_as_waiting_for_data(monkeypatch):
    """On CuPy, ahead() blocks when its pinned buffers are still being copied from, and each
    copy waits for the steps queued before it: the host waiting for the GPU. The training
    loop's "waiting for data" leaves that time out (it was counted: on an H200 the replayed
    default run said 19-23% "waiting for data" while its steps took about what the GPU needs).
    A fake clock: each batch takes the loader 0.5 s and the GPU wait 2 s."""
    import sys
    import time
    import types

    from t2t_ref import train
    from t2t_ref.data import Batch
    from t2t_ref.data.upload import GpuWait, ahead
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    fake = StandInCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupyx", fake)

    def gpu_busy(event_synchronize):
        def synchronize(self):
            clock[0] += 2.0
            event_synchronize(self)
        return synchronize

    def loader():
        for k in range(5):
            clock[0] += 0.5
            yield Batch(uint8_batch(4, 8, seed=k), np.arange(4), None)

    gpu_wait = GpuWait()
    batch_event = type(fake.cuda.Stream().record())
    monkeypatch.setattr(batch_event, "synchronize", gpu_busy(batch_event.synchronize))
    position, timings = types.SimpleNamespace(epoch_data_seconds=0.0), train.Timings()
    got = list(train.waited(ahead(loader(), gpu_wait=gpu_wait), position, timings, gpu_wait))
    assert len(got) == 5
    assert gpu_wait.seconds == 3 * 2.0  # batches 2, 3 and 4 reuse a pinned buffer
    assert timings.data == position.epoch_data_seconds == 5 * 0.5, timings.data
