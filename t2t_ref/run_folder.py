"""The folder a training run writes (--out): checked before any training, and locked while a
process writes it.

    check_out_folder(out)           # UsageError now, not at the first checkpoint
    run.lock = lock_run_folder(out)  # UsageError if another process holds it
    ...
    release_run_folder(run)          # (the OS lets go anyway when the process ends)
"""

import errno
import os

from .atomic import folder_path_problem
from .cli import UsageError


def check_out_folder(out):
    """Refuse an --out that cannot hold a run (a file, a path under a file, a folder that
    cannot be written) now, before any training, rather than at the first checkpoint. Creates
    nothing: the nearest folder that exists is probed with a temporary file."""
    problem = folder_path_problem(out)
    if problem is not None:
        separator = ": " if problem.startswith("cannot") else " "
        raise UsageError(f"--out {out}{separator}{problem}")


def lock_run_folder(out):
    """An exclusive lock on the run folder itself (flock on the folder, no file made), held
    while this process lives: the OS lets go of it when the process ends, however it ends. A
    second process writing the same run (a job requeued while the first still runs, the same
    command in two terminals) is refused instead of interleaving checkpoints and metrics.
    -> the folder's open descriptor (keep it; close it to let go), or None without flock."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return None
    descriptor = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(descriptor)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):  # held: another process writes it
            raise UsageError(f"{out} is in use by another training process: wait for it to "
                             "end, or choose another --out") from None
        # a file system without locks (Lustre mounted without -o flock: ENOSYS; some network
        # and FUSE file systems): the run goes on unlocked, as it did before there was a lock
        return None
    return descriptor


def release_run_folder(run):
    """Let go of the run folder's lock (lock_run_folder): the next process may write it."""
    lock, run.lock = getattr(run, "lock", None), None
    if lock is not None:
        os.close(lock)
