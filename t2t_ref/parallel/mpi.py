"""MPI ranks: one process per piece of each batch, the gradients summed by one allreduce.

    mpirun -n 4 python -m t2t_ref.train ...      # 4 ranks, each a quarter of every batch

join() is the process's World: a size-1 World that does nothing when the process was not
started by an MPI launcher (mpi4py is then not even imported), else MPI.COMM_WORLD through
mpi4py. DataParallel(model, world=world) uses it: each rank runs its piece of the global batch,
and after the backward one allreduce sums the ranks' flat gradient buffers.

How a sum crosses processes (choose_transport):
  numpy      MPI's Allreduce on the host buffer itself, in place;
  cupy       NCCL through CuPy (cupy.cuda.nccl; rank 0's unique id broadcast over MPI), on the
             device and on CuPy's current stream: no host sync. Where NCCL is missing or the
             node has fewer GPUs than ranks (NCCL refuses two ranks on one GPU): host-staged,
             copy to the host, MPI Allreduce, copy back. T2T_REF_ALLREDUCE=host forces it;
  array_api_strict  host-staged (tests).

SIGTERM. A launcher sends it when a rank has died (killed, out of memory), when the others
may be blocked in a collective for ever (mpirun follows it with SIGKILL within a second), and
a scheduler sends it when the job's time is up (SLURM to every task that srun started, with
30 s before SIGKILL). join() blocks SIGTERM in every thread before MPI starts its own and waits
for it in a thread of its own, which a rank stuck inside MPI still runs. While a training run
can stop (World.stoppable), it asks the run to stop at its next step with a save (train.py:
the ranks agree on the step, as for SIGUSR1; stop.py), says so (rank 0), and ends the rank
itself if that has not happened within SIGTERM_GRACE seconds or on a second SIGTERM; otherwise
it says one line and ends the rank at once. A rank whose Python code fails after the start
calls abort() so that the others do not wait for it for ever.
"""

import contextlib
import hashlib
import io
import os
import signal
import sys
import threading
import traceback
import zlib

# set by the launchers: Open MPI, MPICH and Intel MPI (Hydra), MVAPICH; PMIx (srun) names no size
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")
LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                        "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                       "MV2_COMM_WORLD_LOCAL_SIZE")
INSTALL = "pip install 't2t_ref[mpi]'"
# seconds a SIGTERM leaves a training run to reach its next step and save (SLURM's KillWait,
# the time between its SIGTERM and SIGKILL, is 30 s by default)
SIGTERM_GRACE = float(os.environ.get("T2T_REF_SIGTERM_GRACE", "20"))


class WorldError(Exception):
    """The ranks cannot go on together (one failed to start, they disagree); the message is
    one line. exit_code: what every rank exits with."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


def launched():
    """(rank, size) as the MPI launcher set them in the environment; (0, 1) without one."""
    size = next((int(os.environ[v]) for v in SIZE_VARIABLES if v in os.environ), None)
    rank = next((int(os.environ[v]) for v in RANK_VARIABLES if v in os.environ), None)
    if size is None and rank is not None:
        size = 2  # PMIx without a size variable: MPI will say; more than one is the safe guess
    return (rank or 0, size or 1)


_world = None


def join():
    """This process's World (made once): MPI's when started by an MPI launcher with more than
    one rank, else a World of one. Raises WorldError when launched with several ranks but
    mpi4py is missing (K copies of one single-process run would write over each other)."""
    global _world
    if _world is not None:
        return _world
    rank, size = launched()
    if size <= 1:
        _world = World()
        return _world
    _watch_for_sigterm(rank)  # before MPI starts its threads: they inherit the blocked signal
    # SIGUSR1 (stop with a save: stop.py) is the main thread's alone: MPI's threads, started
    # by the import, block it, so that it never interrupts one of their system calls
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        from mpi4py import MPI
    except ImportError:
        raise WorldError(f"started by an MPI launcher with {size} ranks, but mpi4py is not "
                         f"installed: {INSTALL}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    _world = World(MPI.COMM_WORLD)
    return _world


class World:
    """The processes that train together: rank (0..size-1), size, and the collectives the
    training needs. World() is one process: every collective is the identity."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.note = ""  # said with the SIGTERM line: what stays on disk (set by the trainer)
        self.stoppable = False  # a training run that stops at a step on a SIGTERM (train.py)
        self.terminating = None  # SIGTERM's number once one came (the trainer reads it)
        self._sum = None  # the transport of sum(), chosen at its first call
        if comm is not None:
            _watcher["world"] = self

    def __repr__(self):
        return f"World(rank {self.rank} of {self.size})"

    # ---- sums of arrays: the allreduce ----------------------------------------------------

    def sum(self, array):
        """The elementwise sum of `array` over the ranks, written into `array` (a contiguous
        array of any backend; the gradient buffer is one). Returns it."""
        if self.size == 1:
            return array
        if self._sum is None:
            self._sum = self._choose_sum(array)
        return self._sum(array)

    def _choose_sum(self, array):
        from ..backend import array_namespace, backend_name
        backend = backend_name(array_namespace(array))
        nccl = gpus = None
        if backend == "cupy":
            nccl, gpus = _nccl_module(), _gpu_count()
        local = self.comm.Split_type(_mpi().COMM_TYPE_SHARED).Get_size()
        choice = choose_transport(backend, nccl is not None, local, gpus,
                                  os.environ.get("T2T_REF_ALLREDUCE"))
        # every rank must take the same road: NCCL on one and MPI on another would hang
        choices = self.comm.allgather(choice)
        choice = choices[0] if len(set(choices)) == 1 else "host"
        if choice == "nccl":
            return NcclSum(self.comm)
        if choice == "mpi":
            return MpiSum(self.comm)
        return HostStagedSum(self.comm)

    # ---- Python objects: small, at the start and once per epoch ---------------------------

    def allgather(self, value):
        """[value of rank 0, value of rank 1, ...] on every rank (pickled; small values)."""
        return [value] if self.size == 1 else self.comm.allgather(value)

    def gather_counts(self, count):
        """Every rank's count of samples in this step, on every rank: (counts per rank)."""
        if self.size == 1:
            return [count]
        return self.comm.allgather(int(count))

    def start_step(self, count, stop):
        """At the start of a training step, with this rank's count of samples and stop request
        (a signal's number, or None: stop.py): (every rank's count, the request of the lowest
        rank that has one, or None), the same on every rank, so that every rank stops at the
        same step. One allgather of small ints; the step's forward takes the counts from here
        (DataParallel.forward's `counts`) instead of gathering them again."""
        if self.size == 1:
            return [count], stop
        ranks = self.comm.allgather((int(count), int(stop or 0)))
        return [c for c, _ in ranks], next((s for _, s in ranks if s), None)

    def abort(self, code):
        """End every rank now (after a failure on this one that the others cannot know of)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size > 1:
            self.comm.Abort(code)
        os._exit(code)

    # ---- agreement at the start -----------------------------------------------------------

    def start(self, build, user_errors=()):
        """build() on every rank (parse the command line, read the data and the weights...),
        then agree(): every rank returns build()'s result, or raises the same WorldError.
        Alone, build() is called and its errors raised as they come. The result's
        `fingerprint` ({what: value}, if it has one) must be equal on every rank. Only rank 0
        prints: the others' output (argparse's error, say) is kept for the message."""
        if self.size == 1:
            return build()
        error = result = None
        said = io.StringIO()
        quiet = self.rank != 0
        try:
            with contextlib.redirect_stdout(said) if quiet else contextlib.nullcontext(), \
                    contextlib.redirect_stderr(said) if quiet else contextlib.nullcontext():
                result = build()
        except SystemExit as stop:  # argparse: a bad command line (it printed why), or --help
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
            lines = said.getvalue().strip().splitlines() or [""]
            error = (code, lines[-1].removeprefix("error: "))
        except user_errors as err:
            if not quiet:
                print(f"error: {err}", file=sys.stderr)  # said as one process says it
            error = (2, str(err))
        except Exception as err:  # noqa: BLE001 - a bug: the other ranks must not wait for us
            traceback.print_exc(file=sys.__stderr__)
            error = (1, f"{type(err).__name__}: {err}")
        self.agree(error, getattr(result, "fingerprint", None))
        return result

    def agree(self, error, fingerprint):
        """Every rank calls this once it is ready to train (error None) or has failed to start
        (error (exit_code, message)); fingerprint {what: value} must be equal on every rank
        (flags, code version, data). Raises WorldError on every rank alike when some rank failed
        or they disagree; its message names the rank and the difference. Rank 0's own error
        comes back as itself (exit code, message): it has said it already."""
        if self.size == 1:
            return
        reports = self.comm.allgather((error, fingerprint))
        failed = [(rank, err) for rank, (err, _) in enumerate(reports) if err is not None]
        if failed:
            rank, (code, message) = failed[0]
            if rank == 0:
                raise WorldError(None, code)  # rank 0 said it already, as one process would
            raise WorldError(f"rank {rank} of {self.size}: {message}", code)
        first = reports[0][1] or {}
        for rank, (_, theirs) in enumerate(reports[1:], start=1):
            for key in first:
                if theirs.get(key) != first[key]:
                    raise WorldError(
                        f"the ranks disagree: rank {rank} has {key} {_short(theirs.get(key))} "
                        f"where rank 0 has {_short(first[key])}: start every rank with the "
                        "same command, the same t2t_ref and the same data")

    def barrier(self):
        """Wait until every rank is here (after rank 0's checkpoint: a launcher that sees one
        rank end ends the others, which must not cut rank 0's write short)."""
        if self.size > 1:
            self.comm.Barrier()

    def check_same_bytes(self, what, host_array):
        """Raise WorldError on every rank unless host_array's bytes are equal on all ranks (the
        weights are checked so before each checkpoint: one CRC each, not the weights)."""
        if self.size == 1:
            return
        crcs = self.comm.allgather(zlib.crc32(memoryview(host_array).cast("B")))
        if len(set(crcs)) > 1:
            raise WorldError(f"the ranks' {what} differ ({len(set(crcs))} versions among "
                             f"{self.size} ranks): their MPI sums were not the same on every "
                             "rank; stop and report this", exit_code=1)


def choose_transport(backend, nccl_available, ranks_on_node, gpus_on_node, forced=None):
    """How a sum over ranks is made: 'mpi' (in place on host arrays), 'nccl' (on the GPU) or
    'host' (staged through host memory). forced: T2T_REF_ALLREDUCE's 'host' or 'nccl'."""
    if backend == "numpy":
        return "mpi"
    if backend != "cupy" or forced == "host":
        return "host"
    if nccl_available and (gpus_on_node or 0) >= ranks_on_node:
        return "nccl"
    return "host"


class MpiSum:
    """Allreduce in place on a NumPy array."""

    def __init__(self, comm):
        self.comm, self.MPI = comm, _mpi()

    def __call__(self, array):
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        return array


class HostStagedSum:
    """Copy to the host, Allreduce there, copy back: for device arrays without NCCL."""

    def __init__(self, comm):
        self.mpi_sum = MpiSum(comm)

    def __call__(self, array):
        import numpy as np

        from ..backend import array_namespace, device_of, to_device, to_numpy
        xp = array_namespace(array)
        host = np.ascontiguousarray(to_numpy(array))  # (n,) a copy on the host
        self.mpi_sum(host)
        array[...] = xp.astype(to_device(host, xp, device_of(array)), array.dtype)
        return array


class NcclSum:
    """NCCL's allreduce on CuPy arrays, in place on the current stream (no host sync). Made
    collectively: rank 0 draws the unique id, MPI broadcasts it, every rank joins."""

    def __init__(self, comm):
        from cupy.cuda import nccl
        self.nccl = nccl
        unique_id = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
        self.communicator = nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())

    def __call__(self, array):
        import cupy
        types = {cupy.dtype(cupy.float32): self.nccl.NCCL_FLOAT32,
                 cupy.dtype(cupy.float64): self.nccl.NCCL_FLOAT64}
        pointer = array.data.ptr
        self.communicator.allReduce(pointer, pointer, array.size, types[array.dtype],
                                    self.nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)
        return array


def use_local_gpu(world):
    """On CuPy with several ranks: make GPU (rank on this node) mod (GPUs) the current device,
    before anything is put on one, so that each rank of a node has its own where it can."""
    if world.size == 1:
        return
    import cupy
    # the launcher's word, not a collective: ranks that disagree (one on NumPy) must still
    # reach World.agree() to be told so
    local_rank = next((int(os.environ[v]) for v in LOCAL_RANK_VARIABLES if v in os.environ), 0)
    cupy.cuda.Device(local_rank % max(1, _gpu_count() or 1)).use()


def ranks_on_this_node(world):
    """How many of the world's ranks share this machine, as the launcher says (no collective:
    it is asked before the ranks agree); all of them where the launcher does not say."""
    return next((int(os.environ[v]) for v in LOCAL_SIZE_VARIABLES if v in os.environ),
                world.size)


def code_version():
    """A hash of t2t_ref's Python source: ranks running different code would not compute
    the same steps."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def _short(value, limit=80):
    text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _mpi():
    from mpi4py import MPI
    return MPI


def _nccl_module():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


def _gpu_count():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CUDA at all: no GPU
        return 0


# ---- the end of a job: SIGTERM from the launcher ---------------------------------------------

_watcher = {"world": None}


def _watch_for_sigterm(rank):
    """Block SIGTERM in this thread (and so in every thread started after, MPI's included) and
    wait for it in a daemon thread: Python's own handler would only run once the main thread
    returns from MPI, which a rank waiting for a dead one never does."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait():
        signal.sigwait({signal.SIGTERM})
        world = _watcher["world"]
        note = world.note if world is not None else ""
        if world is not None and world.stoppable:  # a training run: stop at a step, saving
            world.terminating = signal.SIGTERM
            if rank == 0:
                print(f"\nSIGTERM: the MPI job is ending (another rank failed or was killed, "
                      f"mpirun was stopped, or the job's time is up): every rank saves at its "
                      f"next step if they all reach it within {SIGTERM_GRACE:g} s"
                      + (f"; otherwise {note}" if note else ""), file=sys.stderr, flush=True)
            if signal.sigtimedwait({signal.SIGTERM}, SIGTERM_GRACE) is None and rank == 0:
                print(f"error: the ranks did not save within {SIGTERM_GRACE:g} s; rank 0 stops"
                      + (f": {note}" if note else ""), file=sys.stderr, flush=True)
            os._exit(143)  # the grace is over, or a second SIGTERM came
        if rank == 0:
            print("\nerror: the MPI job is ending: another rank failed or was killed, or "
                  "mpirun was stopped; rank 0 stops too" + (f"; {note}" if note else ""),
                  file=sys.stderr, flush=True)
        os._exit(143)  # 128 + SIGTERM, as a process ended by it

    threading.Thread(target=wait, name="t2t_ref-sigterm", daemon=True).start()
