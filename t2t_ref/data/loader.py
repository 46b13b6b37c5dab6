"""Batches for training and evaluation: shuffle, decode, augment, stack, in the background.

    with Loader(FileDataset(train), batch_size=128, size=224, train=True, workers=15) as loader:
        for epoch in range(start_epoch, epochs):
            for step, (images, labels, erase) in enumerate(
                    loader.epoch_batches(epoch, start_batch), start=start_batch):
                x = model_input(images, erase, erasing, xp=xp, device=device)   # feed.py
            start_batch = 0
        print(len(loader.bad_files), "unreadable files skipped")

A batch is (images (B, 3, S, S) uint8, labels (B,) int64, erase): the pixels as the transforms
left them, a quarter of float32's bytes; normalising to float32 (and random erasing, which
works on normalised values) is the consumer's, on its own device (feed.py). erase is None
without random erasing, else the (B, R, 5) rectangles the workers drew (erasing.py).

Determinism. Everything random is a function of (seed, epoch, ...), never of timing or of the
number of workers:
  - the order of an epoch is a permutation drawn from (seed, epoch) (train) or 0..N-1 (eval);
  - batch b of an epoch is always samples order[b*B : (b+1)*B];
  - sample i's augmentation (crop, flip, RandAugment, colour jitter, erasing rectangles and
    their noise keys) is drawn from its own generator, seeded by (seed, epoch, i), i the
    sample's index in the dataset.
So workers=0 and workers=15 give the same arrays, so do MPI ranks reading their pieces, and
epoch_batches(epoch, start_batch=k) gives exactly the batches k, k+1, ... of an uninterrupted
epoch (resume mid-epoch).

Workers. workers=0 makes each batch in the calling process, when asked for. workers=n > 0
makes whole batches in n background processes (processes=False: threads), keeping up to
prefetch batches in flight, each written into its own slot of shared memory (workers.py), so
the next batches are being made while the caller computes. Workers start with the first epoch
and live until close(); use the loader as a context manager (or call close()) so they shut
down also on an exception or Ctrl-C.

Unreadable files. A file that cannot be decoded is left out of its batch (the batch has fewer
samples: in the worst case, a batch whose every file is bad, zero) and recorded in
loader.bad_files {path: reason}; the first time each file fails, one line goes to stderr (or
to on_bad_file(path, reason) if given). A bad file is tried again each epoch, reported once.

Augmentation: transform is a TrainTransform or EvalTransform (transforms.py; by default the
official recipe's crop and flip for train=True, resize to S/0.9 and centre crop otherwise).
The same code serves in-memory images (the synthetic set): each uint8 array becomes a PIL
image first.

Shapes: N samples in the dataset, B batch size, S output size, R erasing rectangles per image.
"""

import collections
import concurrent.futures
import itertools
import os
import sys
from typing import NamedTuple

import numpy as np

from .transforms import CorruptImage, EvalTransform, TrainTransform, to_uint8_chw
from .workers import Ring, fill_task, start_pool


class Batch(NamedTuple):
    images: np.ndarray        # (B, 3, S, S) uint8
    labels: np.ndarray        # (B,) int64
    erase: np.ndarray | None  # (B, R, 5) int64 erasing rectangles, or None (erasing off)


class Loader:
    """Batches (images (B, 3, S, S) uint8, labels (B,) int64, erase) from a dataset.

    dataset     : FileDataset or ArrayDataset (anything with __len__, image(i), labels)
    batch_size  : B
    size        : S, the output side in pixels
    train       : True: shuffled, drop_last, TrainTransform() by default; False: in order,
                  EvalTransform() by default
    transform   : the per-image transform (transforms.TrainTransform or EvalTransform)
    erasing     : erasing.RandomErasing whose rectangles the workers draw, or None
    seed        : seeds the epoch orders and every sample's augmentation
    workers     : 0 in-process; n > 0 background workers
    shuffle, drop_last : default to train
    prefetch    : batches in flight with workers > 0 (default 2 per worker)
    processes   : workers are processes (default) rather than threads
    start_method: multiprocessing start method for worker processes (default: fork where
                  there is one); see workers.py
    on_bad_file : called as on_bad_file(path, reason) once per unreadable file; default
                  prints one line to stderr
    piece       : (i, n): serve only piece i of n of every batch (MPI rank i of n: cut as
                  t2t_ref.parallel.piece_sizes cuts, larger pieces first; a batch of fewer
                  than n samples leaves the last pieces empty); None: whole batches
    mirrored    : serve every batch in reverse order (before it is cut into pieces): row j
                  of piece i is then the partner that mixup and cutmix pair with row j of
                  the unmirrored piece i (sample B-1-k of the batch for sample k)
    """

    def __init__(self, dataset, batch_size, size, *, train, transform=None, erasing=None,
                 seed=0, workers=0, shuffle=None, drop_last=None, prefetch=None,
                 processes=True, start_method=None, on_bad_file=None, piece=None,
                 mirrored=False):
        if batch_size < 1 or workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1, workers={workers} >= 0")
        self.dataset, self.batch_size, self.size, self.train = dataset, batch_size, size, train
        self.seed, self.workers = seed, workers
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = train if drop_last is None else drop_last
        self.prefetch = max(1, 2 * workers if prefetch is None else prefetch)
        self.processes, self.start_method = processes, start_method
        self.on_bad_file = on_bad_file
        self.piece, self.mirrored = piece, mirrored
        self.bad_files = {}  # path -> reason, in the order they were found
        if transform is None:
            transform = TrainTransform() if train else EvalTransform()
        self.transform, self.erasing = transform, erasing
        self._make_batch = BatchMaker(dataset, size, transform, erasing, seed)
        self._pool = None
        if len(self) == 0:
            raise ValueError(f"{len(dataset)} samples make no whole batch of {batch_size}: use "
                             "a smaller batch size (or drop_last=False), or more data")

    def __len__(self):
        """Batches per epoch."""
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch_order(self, epoch):
        """(N,) int64: the dataset indices of an epoch, in the order they are served."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch, 0)))
        return rng.permutation(n)

    def epoch_batches(self, epoch, start_batch=0):
        """Yield Batch(images (B, 3, S, S) uint8, labels (B,) int64, erase) for batches
        start_batch, ..., len(self) - 1 of epoch. B is batch_size (this loader's piece of
        it), except for the last batch without drop_last and for batches that lost
        unreadable files."""
        if not 0 <= start_batch <= len(self):  # checked now, not at the first next()
            raise ValueError(f"start_batch={start_batch} is outside 0..{len(self)}")
        order, b = self.epoch_order(epoch), self.batch_size
        batches = (self._piece_of(order[k * b:(k + 1) * b])
                   for k in range(start_batch, len(self)))
        return self._serve(batches, epoch)

    def _piece_of(self, indices):
        """This loader's piece of one batch's indices (all of them without `piece`)."""
        if self.mirrored:
            indices = indices[::-1]
        if self.piece is None:
            return indices
        from ..parallel import piece_sizes
        index, count = self.piece
        sizes = piece_sizes(len(indices), count) + [0] * count  # empty pieces past the batch
        start = sum(sizes[:index])
        return indices[start:start + sizes[index]]

    def _serve(self, batches, epoch):
        """The generator behind epoch_batches: batches is an iterator of index arrays."""
        if self.workers == 0:
            for indices in batches:
                out = np.empty((len(indices), 3, self.size, self.size), dtype=np.uint8)
                yield self._deliver(out, *self._make_batch(indices, epoch, out))
            return
        pool = self._start_pool()
        # one slot per batch in flight: a batch's slot is refilled once its images are copied
        ring = Ring(self.prefetch, (self.batch_size, 3, self.size, self.size), self.processes)
        pending = collections.deque()

        def submit(slot, indices):
            task = fill_task(ring, slot, indices, epoch, self._make_batch, self.processes)
            pending.append((slot, pool.submit(*task)))

        try:
            for slot, indices in enumerate(itertools.islice(batches, self.prefetch)):
                submit(slot, indices)
            while pending:
                slot, future = pending.popleft()
                result = self._result(future)
                images = ring[slot][:len(result[0])].copy()  # (b, 3, S, S): the slot is free
                indices = next(batches, None)  # refill: keep prefetch batches in flight
                if indices is not None:
                    submit(slot, indices)
                yield self._deliver(images, *result)
        finally:  # also when the caller stops early or an exception passes through
            for _, future in pending:
                future.cancel()
            # a batch being made still writes into the ring: wait for it before freeing. Not
            # for a cancelled one: it never runs, and once close() has shut the pool down
            # (the generator may be closed after the loader) nothing would ever mark it done
            concurrent.futures.wait([future for _, future in pending if not future.cancelled()])
            ring.close()

    def close(self):
        """Stop the workers (waits for the batches they are making; drops queued ones)."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def _start_pool(self):
        if self._pool is None:
            self._pool = start_pool(self.workers, self._make_batch, self.processes,
                                    self.start_method)
        return self._pool

    def _result(self, future):
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            self.close()
            raise RuntimeError("a loader worker process died (killed for memory?): use fewer "
                               "workers, a smaller batch or prefetch, or workers=0") from None

    def _deliver(self, images, labels, erase, bad):
        """Record the batch's unreadable files (reporting new ones); return the Batch."""
        for path, reason in bad:
            if path not in self.bad_files:
                self.bad_files[path] = reason
                if self.on_bad_file is not None:
                    self.on_bad_file(path, reason)
                else:
                    print(f"warning: skipping unreadable image {path}: {reason}",
                          file=sys.stderr, flush=True)
        return Batch(images[:len(labels)], labels, erase)


class BatchMaker:
    """Makes one batch from dataset indices: the work a worker does. Picklable.

    batch_maker(indices (b,), epoch, out (>= b, 3, S, S) uint8) writes the images into
    out[:b'] and returns (labels (b',) int64, erase (b', R, 5) int64 or None,
    bad [(path, reason), ...]), b' = b minus the unreadable samples, in the order of indices.
    """

    def __init__(self, dataset, size, transform, erasing, seed):
        self.dataset, self.size, self.seed = dataset, size, seed
        self.transform, self.erasing = transform, erasing

    def __call__(self, indices, epoch, out):
        kept, erase, bad = [], [], []
        for index in indices:
            index = int(index)
            try:
                img = self.dataset.image(index)
            except CorruptImage as err:
                bad.append((err.path, err.reason))
                continue
            rng = sample_rng(self.seed, epoch, index)
            out[len(kept)] = to_uint8_chw(self.transform(img, self.size, rng))  # (3, S, S)
            if self.erasing is not None:
                erase.append(self.erasing.draw(self.size, rng))            # (R, 5)
            kept.append(index)
        labels = self.dataset.labels[np.asarray(kept, dtype=np.int64)]
        if self.erasing is None:
            return labels, None, bad
        rows = self.erasing.max_count
        return labels, np.asarray(erase, dtype=np.int64).reshape(len(kept), rows, 5), bad


def sample_rng(seed, epoch, index):
    """The generator of sample index's augmentation in epoch: a function of the three only.

    (spawn_key (epoch, 1, index) can't collide with the epoch orders' (epoch, 0).)
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, 1, index)))


def default_workers(ranks_on_node=1):
    """--workers' default: the cores this process may use, shared among the node's MPI ranks,
    less one for the process itself (at least 0)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, (cores or 1) // max(1, ranks_on_node) - 1)
