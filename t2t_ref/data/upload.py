"""CuPy only: a loader's uint8 batches go up to the GPU from pinned memory, one batch ahead, on
a side stream, so the copy of batch k+1 overlaps the compute of batch k.

    for images, labels, erase in ahead(loader.epoch_batches(epoch)):   # images: cupy uint8
        x = model_input(images, erase, erasing, xp=xp, device=device)  # feed.py

Each batch is copied (memcpy) into one of `depth` page-locked host buffers, then
cudaMemcpyAsync'd from there on a non-blocking stream; an event marks the copy's end and the
consumer's stream waits on that event (on the GPU, not the host) before the batch's first
kernel. Pageable memory would make CUDA stage the copy through its own pinned buffer,
synchronously. A pinned buffer is rewritten only after its previous copy has finished.

Memory safety: the destination is allocated from CuPy's pool on the consumer's stream, and the
side stream first waits for everything the consumer's stream had queued by then, so a block
the pool hands back (freed by an earlier step whose kernels may still be queued) is not
overwritten early.

Without CuPy nothing here is used (the NumPy path normalises the host batch in place of an
upload); tests/test_feed.py checks the order of the upload's steps on the CPU, with a
stand-in for CuPy.
"""

import collections
import time

import numpy as np


class GpuWait:
    """Seconds the host spent in ahead() waiting for the GPU: for a pinned buffer's previous
    copy, which had itself waited for the steps queued before it. Time the GPU bounds, not the
    loader: the training loop does not count it as waiting for data."""

    def __init__(self):
        self.seconds = 0.0


def ahead(batches, depth=2, gpu_wait=None):
    """Yield the loader's Batches with images as CuPy arrays on the current device, uploaded
    one batch ahead of the consumer (depth - 1 batches in flight). gpu_wait: a GpuWait that
    the time spent waiting for the GPU is added to."""
    import cupy
    import cupyx

    side = cupy.cuda.Stream(non_blocking=True)
    staging = [None] * depth           # pinned (B, 3, S, S) uint8 host buffers
    copied = [None] * depth            # the event of each buffer's last copy
    queue = collections.deque()
    for k, (images, labels, erase) in enumerate(batches):
        if images.size == 0:  # an MPI rank's empty piece: nothing to copy
            queue.append((cupy.empty(images.shape, dtype=cupy.uint8), labels, erase, None))
            if len(queue) == depth:
                yield _ready(queue.popleft())
            continue
        i = k % depth
        if copied[i] is not None:
            began = time.perf_counter()
            copied[i].synchronize()     # the buffer's previous copy has left it
            if gpu_wait is not None:
                gpu_wait.seconds += time.perf_counter() - began
        if staging[i] is None or staging[i].size < images.size:
            staging[i] = cupyx.empty_pinned(images.size, dtype=np.uint8)
        host = staging[i][:images.size].reshape(images.shape)
        np.copyto(host, images)                                         # (b, 3, S, S)
        consumer = cupy.cuda.get_current_stream()
        device_images = cupy.empty(images.shape, dtype=cupy.uint8)      # on the consumer's
        side.wait_event(consumer.record())                              # stream's pool
        device_images.set(host, stream=side)                            # async: pinned
        copied[i] = side.record()
        queue.append((device_images, labels, erase, copied[i]))
        if len(queue) == depth:
            yield _ready(queue.popleft())
    while queue:
        yield _ready(queue.popleft())


def _ready(item):
    """The consumer's stream waits (on the GPU) for the batch's copy; the Batch."""
    import cupy

    from .loader import Batch
    images, labels, erase, event = item
    if event is not None:
        cupy.cuda.get_current_stream().wait_event(event)
    return Batch(images, labels, erase)
