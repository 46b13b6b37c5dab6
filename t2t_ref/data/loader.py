"""Batches for training and evaluation: shuffle, decode, augment, stack, in the background.

    with Loader(FileDataset(train), batch_size=128, size=224, train=True, workers=2) as loader:
        for epoch in range(start_epoch, epochs):
            for step, (images, labels) in enumerate(loader.epoch_batches(epoch, start_batch),
                                                    start=start_batch):
                ...                     # images (B, 3, S, S) float32, labels (B,) int64: host
            start_batch = 0
        print(len(loader.bad_files), "unreadable files skipped")

Determinism. Everything random is a function of (seed, epoch, ...), never of timing or of the
number of workers:
  - the order of an epoch is a permutation drawn from (seed, epoch) (train) or 0..N-1 (eval);
  - batch b of an epoch is always samples order[b*B : (b+1)*B];
  - sample i's augmentation (crop, flip) is drawn from its own generator, seeded by
    (seed, epoch, i), i the sample's index in the dataset.
So workers=0 and workers=4 give the same arrays, and epoch_batches(epoch, start_batch=k)
gives exactly the batches k, k+1, ... of an uninterrupted epoch (resume mid-epoch).

Workers. workers=0 makes each batch in the calling process, when asked for. workers=n > 0
makes whole batches in n background threads (processes=True: processes), keeping up to
prefetch batches in flight, so the next batches are being made while the caller computes.
Threads are the default because they measured faster for image files: Pillow's decode and
resize and NumPy's arithmetic release the GIL, and a thread hands its batch over without
copying, where a process pickles it through a pipe (38 MB for 64 x 3 x 224 x 224 float32);
224-pixel JPEG batches came 1.5x faster from 2 threads than from 2 processes. Processes may
win where per-image Python glue dominates (tiny images) on many cores. Workers start with the
first epoch and live until close(); use the loader as a context manager (or call close()) so
they shut down also on an exception or Ctrl-C. Worker processes ignore Ctrl-C themselves: the
main process gets the KeyboardInterrupt and closes them.

Unreadable files. A file that cannot be decoded is left out of its batch (the batch has fewer
samples: in the worst case, a batch whose every file is bad, zero) and recorded in
loader.bad_files {path: reason}; the first time each file fails, one line goes to stderr (or
to on_bad_file(path, reason) if given). A bad file is tried again each epoch, reported once.

Augmentation. train=True: RandomResizedCrop(size, scale, ratio) + horizontal flip (see
transforms.py). train=False: resize to int(size / 0.9), centre crop size. The same code serves
in-memory images (the synthetic set): each uint8 array becomes a PIL image first, so the
synthetic set gets the same random-resized crop and flip; pass scale=SYNTHETIC_CROP_SCALE
there (a 0.08 crop often misses its single shape).

Shapes: N samples in the dataset, B batch size, S output size.
"""

import collections
import concurrent.futures
import itertools
import multiprocessing
import signal
import sys

import numpy as np

from .transforms import CorruptImage, eval_transform, to_normalized_chw, train_transform


class Loader:
    """Batches of (images (B, 3, S, S) float32, labels (B,) int64) from a dataset.

    dataset     : FileDataset or ArrayDataset (anything with __len__, image(i), labels)
    batch_size  : B
    size        : S, the output side in pixels
    train       : True: random-resized crop + flip, shuffled, drop_last; False: centre crop
    eval_resize : False: evaluation takes images that are already S x S as they are (the
                  built-in shapes, drawn at the training size), instead of resizing to S/0.9
                  and cropping S, which would cut shapes near the border
    seed        : seeds the epoch orders and every sample's augmentation
    workers     : 0 in-process; n > 0 background workers
    shuffle, drop_last : default to train
    scale, ratio: RandomResizedCrop's area and aspect-ratio ranges (train only)
    prefetch    : batches in flight with workers > 0 (default 2 per worker)
    processes   : workers are processes instead of threads
    start_method: multiprocessing start method for worker processes; None = the platform's
                  default (fork on Linux). "spawn"/"forkserver" pickle the dataset to each
                  worker and need the main script behind `if __name__ == "__main__":`.
    on_bad_file : called as on_bad_file(path, reason) once per unreadable file; default
                  prints one line to stderr
    piece       : (i, n): serve only piece i of n of every batch (MPI rank i of n: cut as
                  t2t_ref.parallel.piece_sizes cuts, larger pieces first; a batch of fewer
                  than n samples leaves the last pieces empty); None: whole batches
    mirrored    : serve every batch in reverse order (before it is cut into pieces): row j
                  of piece i is then the partner that mixup and cutmix pair with row j of
                  the unmirrored piece i (sample B-1-k of the batch for sample k)
    """

    def __init__(self, dataset, batch_size, size, *, train, seed=0, workers=0, shuffle=None,
                 drop_last=None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), prefetch=None,
                 processes=False, start_method=None, on_bad_file=None, eval_resize=True,
                 piece=None, mirrored=False):
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
        self._make_batch = BatchMaker(dataset, size, train, seed, scale, ratio, eval_resize)
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
        """Yield (images (B, 3, S, S) float32, labels (B,) int64) for batches start_batch, ...,
        len(self) - 1 of epoch. B is batch_size, except for the last batch without drop_last
        and for batches that lost unreadable files."""
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
                yield self._deliver(self._make_batch(indices, epoch))
            return
        pool = self._start_pool()
        # threads call the BatchMaker directly; each process calls the copy installed in it
        work = _make_batch_in_worker if self.processes else self._make_batch
        pending = collections.deque(pool.submit(work, indices, epoch)
                                    for indices in itertools.islice(batches, self.prefetch))
        try:
            while pending:
                result = self._result(pending.popleft())
                indices = next(batches, None)  # refill: keep prefetch batches in flight
                if indices is not None:
                    pending.append(pool.submit(work, indices, epoch))
                yield self._deliver(result)
        finally:  # also when the caller stops early or an exception passes through
            for future in pending:
                future.cancel()

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
            if self.processes:
                context = multiprocessing.get_context(self.start_method)
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=context, initializer=_install_in_worker,
                    initargs=(self._make_batch,))
            else:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix="t2t-loader")
        return self._pool

    def _result(self, future):
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            self.close()
            raise RuntimeError("a loader worker process died (killed for memory?): use fewer "
                               "workers, a smaller batch or prefetch, or workers=0") from None

    def _deliver(self, result):
        """Record the batch's unreadable files (reporting new ones); return (images, labels)."""
        images, labels, bad = result
        for path, reason in bad:
            if path not in self.bad_files:
                self.bad_files[path] = reason
                if self.on_bad_file is not None:
                    self.on_bad_file(path, reason)
                else:
                    print(f"warning: skipping unreadable image {path}: {reason}",
                          file=sys.stderr, flush=True)
        return images, labels


class BatchMaker:
    """Makes one batch from dataset indices: the work a worker does. Picklable.

    batch_maker(indices (b,), epoch) -> (images (b', 3, S, S) float32, labels (b',) int64,
    bad [(path, reason), ...]), b' = b minus the unreadable samples, in the order of indices.
    """

    def __init__(self, dataset, size, train, seed, scale, ratio, eval_resize=True):
        self.dataset, self.size, self.train, self.seed = dataset, size, train, seed
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.eval_resize = eval_resize

    def __call__(self, indices, epoch):
        images = np.empty((len(indices), 3, self.size, self.size), dtype=np.float32)
        kept, bad = [], []
        for index in indices:
            index = int(index)
            try:
                img = self.dataset.image(index)
            except CorruptImage as err:
                bad.append((err.path, err.reason))
                continue
            if self.train:
                rng = sample_rng(self.seed, epoch, index)
                x = train_transform(img, self.size, rng, self.scale, self.ratio)
            elif self.eval_resize or img.size != (self.size, self.size):
                x = eval_transform(img, self.size)
            else:
                x = to_normalized_chw(img)  # already S x S: taken as it is
            images[len(kept)] = x                        # (3, S, S)
            kept.append(index)
        labels = self.dataset.labels[np.asarray(kept, dtype=np.int64)]
        return images[:len(kept)], labels, bad


def sample_rng(seed, epoch, index):
    """The generator of sample index's augmentation in epoch: a function of the three only.

    (spawn_key (epoch, 1, index) can't collide with the epoch orders' (epoch, 0).)
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, 1, index)))


# ---- worker processes: each holds one BatchMaker, installed once when it starts ------------

_WORKER_BATCH_MAKER = None


def _install_in_worker(batch_maker):
    global _WORKER_BATCH_MAKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _WORKER_BATCH_MAKER = batch_maker


def _make_batch_in_worker(indices, epoch):
    return _WORKER_BATCH_MAKER(indices, epoch)

