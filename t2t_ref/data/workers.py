"""Where a loader's batches are made in the background: worker processes (or threads) that fill
batch-sized uint8 slots, in shared memory, that the loader copies its batches out of.

    ring = Ring(slots=4, batch_shape=(B, 3, S, S), shared=True)  # slots in /dev/shm
    pool = start_pool(workers, batch_maker, processes=True)
    future = pool.submit(*fill_task(ring, slot, indices, epoch, batch_maker, processes))
    labels, erase, bad = future.result()           # the images are in ring[slot][:len(labels)]

Why processes and shared memory: decoding (libjpeg), resizing and RandAugment's Pillow ops
release the GIL only in part, and the consumer's thread launches kernels or runs the model's
threads: 15 worker processes keep a 16-core GPU machine's GPU fed where threads sharing one
interpreter would not. A process hands its batch over by writing it into a slot of shared
memory (multiprocessing.shared_memory), so only the labels and erasing rows (a few hundred
bytes) go through a pipe; a uint8 batch is 9.6 MB at 64 x 3 x 224 x 224 and the loader's copy
out of the slot takes a few milliseconds. Threads (processes=False) fill slots of ordinary
memory the same way.

Workers are forked by default (Linux): they inherit the dataset (an ArrayDataset's images are
shared, not copied). "spawn"/"forkserver" pickle the batch maker to each worker and need the
main script behind `if __name__ == "__main__":`. Workers ignore Ctrl-C, SIGTERM and SIGUSR1,
which a terminal or a scheduler sends to every process of the job: the main process stops the
run (t2t_ref/stop.py) and closes them. A worker whose parent died without closing it (kill -9,
killed for memory) exits within a second, and multiprocessing's resource tracker then frees
the shared memory.
"""

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import shared_memory

import numpy as np

from .folder import DataError


class Ring:
    """`slots` uint8 buffers of batch_shape (B, 3, S, S); shared=True: in one shared-memory
    block that worker processes attach to by name. close() frees it."""

    def __init__(self, slots, batch_shape, shared):
        self.shape = (slots, *batch_shape)
        nbytes = int(np.prod(self.shape))
        self.shm = None
        if shared:
            check_shared_memory(nbytes)
            start_resource_tracker()
            self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
            self.array = np.ndarray(self.shape, dtype=np.uint8, buffer=self.shm.buf)
        else:
            self.array = np.empty(self.shape, dtype=np.uint8)
        self.name = None if self.shm is None else self.shm.name

    def __getitem__(self, slot):
        return self.array[slot]  # (B, 3, S, S) uint8

    def close(self):
        self.array = None  # the view goes first: shared memory with views cannot close
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


def start_resource_tracker():
    """Start multiprocessing's resource tracker (the process that unlinks shared memory a crash
    left behind; the first SharedMemory starts it) with SIGUSR1 blocked, a mask it keeps: a
    scheduler's SIGUSR1 to every process of the job (stop.py) must not kill it (it ignores
    SIGINT and SIGTERM itself). Killed, it is restarted by the next unlink with a warning and a
    traceback."""
    from multiprocessing import resource_tracker
    if not hasattr(signal, "pthread_sigmask"):
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def shared_memory_free(where="/dev/shm"):
    """Bytes free in where (None where there is no such folder to ask: another OS)."""
    try:
        stat = os.statvfs(where)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def workers_that_fit(workers, batch_bytes, rings=1, ranks_on_node=1, where="/dev/shm"):
    """(workers, note): at most `workers` worker processes whose batches in flight (a loader
    keeps 2 per worker, of batch_bytes each, in each of `rings` loaders at once) fit in this
    process's share of the free shared memory; note (a line to print) says why fewer, else
    None. For --workers' default: Docker gives a container 64 MB of /dev/shm, 6 batches of
    64 images at 224, where 15 workers would ask for 30."""
    free = shared_memory_free(where)
    if free is None or workers == 0:
        return workers, None
    share = free // max(1, ranks_on_node)
    fit = int(share // (2 * rings * max(1, batch_bytes)))
    if fit >= workers:
        return workers, None
    shared = f", shared by {ranks_on_node} MPI ranks" if ranks_on_node > 1 else ""
    using = f"using {fit}" if fit else "loading in the training process instead"
    return fit, (f"note: {where} has {free / 2**20:.0f} MB free{shared}, room for the batches "
                 f"in flight of {fit} loader worker{'s' * (fit != 1)}, not {workers}: {using} "
                 "(give the container more, docker run --shm-size=2g, or set --workers)")


def check_shared_memory(nbytes, where="/dev/shm"):
    """Refuse a ring that /dev/shm cannot hold (Docker gives containers 64 MB by default),
    in one line, before a worker dies of SIGBUS writing into it."""
    free = shared_memory_free(where)
    if free is not None and nbytes > free:  # (None: nothing to ask; the allocation speaks)
        raise DataError(f"the loader's worker processes need {nbytes / 2**20:.0f} MB of shared "
                        f"memory for the batches in flight, but {where} has "
                        f"{free / 2**20:.0f} MB free: use fewer --workers or a smaller batch, "
                        "or give the container more (docker run --shm-size=2g)")


def start_pool(workers, batch_maker, processes, start_method=None):
    """An executor of `workers` processes (each holding its own batch_maker) or threads."""
    if not processes:
        return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="t2t-loader")
    if start_method is None and "fork" in multiprocessing.get_all_start_methods():
        start_method = "fork"  # the dataset is inherited, not pickled (3.14 defaults otherwise)
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(start_method),
        initializer=_install_in_worker, initargs=(batch_maker, os.getpid()))


def fill_task(ring, slot, indices, epoch, batch_maker, processes):
    """(function, *args) that fills ring[slot] with the batch of `indices`: for pool.submit."""
    if processes:
        return _fill_in_worker, ring.name, ring.shape, slot, indices, epoch
    return batch_maker, indices, epoch, ring[slot]


# ---- in a worker process: its batch maker, installed once, and the rings it attached to ----

_BATCH_MAKER = None
_ATTACHED = {}  # ring name -> SharedMemory


def _install_in_worker(batch_maker, parent):
    global _BATCH_MAKER
    threading.Thread(target=_exit_with, args=(parent,), name="t2t_ref-orphan-watch",
                     daemon=True).start()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # the main process's to
        signal.signal(signum, signal.SIG_IGN)  # handle (stop.py), also when sent to the group
    _BATCH_MAKER = batch_maker


def _exit_with(parent, every=1.0):
    """End this worker once its parent is gone (kill -9, killed for memory): nothing else
    would, and the run's shared memory stays allocated while a worker holds it. The check is
    PyTorch's DataLoader's: the parent process id changes when the parent dies."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def _fill_in_worker(name, shape, slot, indices, epoch):
    shm = _ATTACHED.get(name)
    if shm is None:
        for old in _ATTACHED.values():  # an earlier epoch's ring: its owner has freed it
            old.close()
        _ATTACHED.clear()
        shm = _ATTACHED[name] = shared_memory.SharedMemory(name=name)
    out = np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)[slot]  # (B, 3, S, S)
    return _BATCH_MAKER(indices, epoch, out)
