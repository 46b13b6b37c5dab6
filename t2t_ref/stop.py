"""Stopping a training run on a signal, between two steps, so that what it saves is a finished
step and `--resume` continues it exactly.

    with StopSignals(mpi=world.size > 1, speaks=world.rank == 0) as stop:
        for batch in batches:
            if stop.requested:           # the signal's number, or None
                ...                      # save `last`, exit 128 + the number

The signals, and what a run does on each:

    SIGINT   Ctrl-C                    one process: stop after this step, save `last`
    SIGTERM  kill, docker stop, a      the same (one process: here; MPI ranks: mpi.py's
             scheduler's time limit    watcher, within SIGTERM_GRACE seconds)
    SIGUSR1  kill -USR1                the same, one process or MPI ranks alike

Having saved, the run exits with 128 + the signal's number, as a process ended by the signal
does: 130, 143, 138. A second signal quits at once without saving (KeyboardInterrupt, exit
130; the last checkpoint stays as it was).

Under MPI ranks Ctrl-C is the launcher's: mpirun answers it with SIGTERM to every rank and, a
fraction of a second later, SIGKILL, too soon for any save; and a SIGTERM can mean that a rank
has died, so MPI ranks take SIGTERM in mpi.py's own thread, which ends the rank if the stop
does not come in time. SIGUSR1 ends nothing: mpirun forwards it to every rank and the job goes
on, so `kill -USR1 <mpirun's pid>`, or a scheduler's warning signal before a time limit (SLURM:
`--signal=USR1@120`, to ranks that srun started), is how an MPI run stops with a save at any
pace. The ranks may receive a signal at different moments, or one rank alone may; they agree
on the step to stop at, at the start of each step (World.start_step: one allgather carries
every rank's request with its sample count), and rank 0 writes the checkpoint.
"""

import os
import signal

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}


class StopSignals:
    """While active, the first SIGINT/SIGTERM/SIGUSR1 (mpi: SIGUSR1 only) sets `requested` to
    its number and, if this process speaks (MPI rank 0), says so on stderr; a second raises
    KeyboardInterrupt."""

    def __init__(self, mpi=False, speaks=True):
        self.signals = (signal.SIGUSR1,) if mpi else (signal.SIGINT, signal.SIGTERM,
                                                      signal.SIGUSR1)
        self.speaks = speaks
        self.requested = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum
        if self.speaks:  # os.write, not print: the handler may interrupt a print to stderr
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
            os.write(2, f"\n{NAMES[signum]}: stopping after this step to save a checkpoint "
                        f"({again} to quit without saving)\n".encode())

    def __enter__(self):
        for signum in self.signals:
            if signal.getsignal(signum) is signal.SIG_IGN:  # ignored by whoever started us
                continue  # (a job started with `&` in a script ignores Ctrl-C): as Python
            self._previous[signum] = signal.signal(signum, self._handle)  # itself leaves it
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def exit_code(signum):
    """The exit code of a run stopped by signal signum (None: --stop-after, as Ctrl-C): 128 + its
    number, as the shell reports a process that the signal ended."""
    return 128 + (signal.SIGINT if signum is None else signum)
