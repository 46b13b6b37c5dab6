"""Threads in one process: the pieces of a batch run at once, one thread each.

NumPy runs every elementwise operation (LayerNorm, GELU, softmax, the soft split...) on one
core; only its BLAS matmuls use more. So on NumPy the batch is cut into one piece per core,
each piece's forward and backward runs in a thread of its own with BLAS held to one thread,
and the results are joined: every operation gets a core. This works because NumPy releases
Python's GIL inside its loops and BLAS calls, and the ops of a whole piece are long enough
(milliseconds) for the hand-over of the GIL between threads to cost next to nothing. On 2 cores
a training step takes about 0.7x the time of the one-thread step (BENCHMARKS.md).

Call backend.keep_freed_memory() at the start of a long script (the commands do): glibc
otherwise gives each thread a heap of its own and unmaps it whenever it empties, and every
step page-faults its arrays in again.
"""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

from ..gaps import whole_arrays

_lock = threading.Lock()
_map_lock = threading.Lock()  # held by the one map_in_threads running
_local = threading.local()  # .in_worker: True in a thread while it runs a map's work
_blas = None  # threadpoolctl's controller of NumPy's BLAS, made at first use
_pool = None  # the worker threads, made at first use and reused
_pool_size = 0


def _blas_controller():
    global _blas
    with _lock:
        if _blas is None:
            import threadpoolctl
            _blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
        return _blas


def blas_threads():
    """How many threads NumPy's BLAS uses now: the cores this process was given to work on
    (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and threadpoolctl's limits all set it); 1 when
    threadpoolctl finds no BLAS."""
    counts = [lib.get_num_threads() for lib in _blas_controller().lib_controllers]
    return max([c for c in counts if c] or [1])


def check_threads(threads):
    """Raise ValueError unless threads is a positive integer or None."""
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads must be a positive integer or None (as many as NumPy's "
                         f"BLAS uses), got {threads!r}")


def thread_count(backend, threads=None):
    """How many threads share the work now: `threads`, or NumPy's BLAS thread count; always 1
    off NumPy (CuPy runs each operation on the whole GPU; array_api_strict is for tests)."""
    if backend != "numpy":
        return 1
    return threads if threads is not None else blas_threads()


def balanced_groups(arrays, n):
    """Split the names of {name: array} into at most n groups of about equal total size (the
    largest array first, each into the group with the fewest elements so far): work for n
    threads over many tensors, as the optimizer's per-tensor update has."""
    groups, totals = [[] for _ in range(n)], [0] * n
    for name in sorted(arrays, key=lambda k: -_size(arrays[k])):
        smallest = totals.index(min(totals))
        groups[smallest].append(name)
        totals[smallest] += _size(arrays[name])
    return [group for group in groups if group]


def _size(array):
    return math.prod(array.shape)


def shutdown_pool():
    """Stop the worker threads (after their work); the next map starts new ones. (The bench's
    profiler does, so that the threads it profiles are started under its hook.)"""
    global _pool, _pool_size
    with _map_lock, _lock:
        pool, _pool, _pool_size = _pool, None, 0
    if pool is not None:
        pool.shutdown(wait=True)


def in_worker_thread():
    """Is this thread running work of map_in_threads?"""
    return getattr(_local, "in_worker", False)


def _run_in_worker(fn, args):
    _local.in_worker = True
    try:
        with whole_arrays():  # see gaps.whole_arrays
            return fn(*args)
    finally:
        _local.in_worker = False


def map_in_threads(fn, argument_tuples):
    """[fn(*args) for args in argument_tuples], each call in its own thread, with NumPy's
    BLAS held to one thread meanwhile (the threads already use every core). An exception in
    any call is raised here, after all calls have finished.

    One map at a time: a second caller waits (two at once would fight over the cores, and
    over the BLAS thread count each restores). Called from inside a worker, the calls run one
    after the other in that thread (the pool's threads are all taken)."""
    global _pool, _pool_size
    if in_worker_thread():
        return [fn(*args) for args in argument_tuples]
    n = len(argument_tuples)
    with _map_lock:
        with _lock:
            if _pool_size < n:
                if _pool is not None:
                    _pool.shutdown(wait=False)  # its threads are idle: one map at a time
                _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="t2t_ref-piece")
                _pool_size = n
            pool = _pool
        with _blas_controller().limit(limits=1):
            futures = [pool.submit(_run_in_worker, fn, args) for args in argument_tuples]
            errors = [f.exception() for f in futures]  # waits for every call
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
