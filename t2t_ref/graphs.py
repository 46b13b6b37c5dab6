"""CUDA graphs: a training step's forward and backward recorded once, then replayed each step.

On CuPy every array operation costs 5-15 us of Python and driver time whatever its size. At
small images the GPU's work per kernel is shorter than that, so the step's time is the count
of calls (T2T-ViT-7's forward and backward make 2,724 array calls in the plain ops, fewer
kernels where the fused ones take over; its 32x32 training step took 36 ms on an H200's host,
PyTorch eager's 33). A CUDA graph records the kernels one call of a function queues, with
their arguments and memory addresses, and replays them all with one launch: the Python code
runs once.

    step = StepGraph(fn, CupyRecorder())
    outputs = step(x, targets, seed)   # 1st call eager (warm-up), 2nd recorded and replayed,
                                       # later ones: inputs copied in, one replay

What that asks of fn, and of everything it reads (t2t_ref's forward and backward do it;
tests/graph_sim.py checks it on the CPU by replaying a recorded step on array_api_strict):
- every value that changes from step to step is read from a device array that stays where it
  is and is overwritten in place: the batch, the targets and the dropout seed (StepGraph copies
  them into its own input arrays), the parameters (AdamW updates the flat buffer in place), the
  fp16 loss scale (loss_scale.py updates it in place). A Python number baked into a kernel's
  arguments (a learning rate, a step count, a seed) would be replayed as it was recorded;
- no transfer between host and device (CuPy refuses one while recording), and none hidden
  inside a library call either: while recording (capture.py), products go to cuBLAS through
  ctypes (CuPy's cuBLAS wrappers refuse to run then) and FlatTensors copies gradients one by
  one (CuPy's concatenation of many arrays uploads their addresses from the host);
- the same shapes: a batch of another size runs eagerly (or gets its own recording, up to
  `max_graphs`);
- the outputs are the recording's arrays, overwritten by each replay: read them before the next
  call;
- called twice on the same inputs, it gives the same outputs (the check below calls it once
  more): t2t_ref's draws each call's dropout masks afresh from the seed.

Recording needs the warm-up call first: kernels compile and per-shape caches (rows of ones,
the soft split's indices, the dropout hash's element table) fill eagerly, so the recording
makes no array that outlives it. If recording fails (some call is not allowed while
recording), StepGraph says so once and runs fn eagerly from then on: slower, never wrong.
The first replay with new inputs is checked: fn runs eagerly on them first, and the replay
must give its outputs (to float rounding; one host transfer, once). A replay that differs (a
per-step value baked in, an address gone stale) is said in one line and dropped, and fn runs
eagerly from then on.
Every array the graph reads must live as long as it: the model's buffers do, and the
recording keeps every array those caches hold (device_cache.held()), so a cache that starts
over (past 64 shapes: a program sweeping sizes) drops its references, not the graph's.

Memory: each recording allocates from a memory pool of its own, kept as long as the graph, so
that no other allocation can take the addresses the graph writes to, and no cleanup of CuPy's
default pool (free_all_blocks, which CuPy also does when an allocation fails) can release
them. The graph holds its step's activations for good: about the memory of one step more.
"""

import sys
from collections import Counter

import numpy as np

from . import capture, device_cache

__all__ = ["CupyRecorder", "StepGraph", "NEEDS_CUPY", "ON_BY_DEFAULT", "wanted"]

# what train, evaluate and bench say to --cuda-graphs off CuPy
NEEDS_CUPY = "--cuda-graphs records CUDA kernels: use it with --backend cupy"
# --cuda-graphs when neither it nor --no-cuda-graphs is given: on for CuPy in one process
# (replayed steps trained as eager ones on an H200, bit for bit: the device script's graphs
# stage; the default training run took 14.6 s instead of 73 s)
ON_BY_DEFAULT = True


def wanted(flag, backend, processes=1):
    """Do train, evaluate and bench replay CUDA graphs? The flag if given (True or False),
    else the default: CuPy in one process (under MPI the ranks' sums would sit between the
    recorded kernels)."""
    if flag is not None:
        return flag
    return ON_BY_DEFAULT and backend == "cupy" and processes == 1


class _Recording:
    def __init__(self, inputs, outputs, replay, keep):
        self.inputs, self.outputs, self.replay, self.keep = inputs, outputs, replay, keep


class StepGraph:
    """fn(*inputs) recorded once per input signature (shapes and dtypes) and replayed.

    fn: a function of device arrays (see the module docstring for what it must do).
    recorder: CupyRecorder() on a GPU; tests use graph_sim.SimulatedRecorder.
    warmup: eager calls of a signature before it is recorded. max_graphs: recordings kept
    (each holds a step's memory); calls of further signatures run eagerly. verify: check the
    first replay on new inputs against an eager call (see the module docstring).
    """

    def __init__(self, fn, recorder, warmup=1, max_graphs=1, verify=True):
        self.fn, self.recorder = fn, recorder
        self.warmup, self.max_graphs, self.verify = warmup, max_graphs, verify
        self.recordings = {}  # signature -> _Recording
        self.calls = Counter()  # eager calls per signature
        self.failed = None  # why recording failed (then every call is eager), in one line
        self.error = None  # the exception that ended the recording, for a traceback
        self.unchecked = set()  # signatures whose first replay on new inputs is to be checked

    def __call__(self, *inputs):
        signature = tuple((tuple(a.shape), str(a.dtype)) for a in inputs)
        recording = self.recordings.get(signature)
        if recording is not None:
            if signature in self.unchecked:
                return self._checked_replay(signature, recording, inputs)
            return self._replay(recording, inputs)
        if (self.failed is not None or self.calls[signature] < self.warmup
                or len(self.recordings) >= self.max_graphs):
            self.calls[signature] += 1
            return self.recorder.warm(self.fn, inputs)
        recording = self._record(signature, inputs)
        if recording is None:
            return self.recorder.warm(self.fn, inputs)
        recording.replay()  # on the inputs it was recorded from, already in place
        if self.verify:
            self.unchecked.add(signature)
        return recording.outputs

    def _replay(self, recording, inputs):
        for kept, x in zip(recording.inputs, inputs):
            kept[...] = x  # one copy each, queued before the replay
        recording.replay()
        return recording.outputs

    def _checked_replay(self, signature, recording, inputs):
        """The first replay on new inputs, after an eager call on them: the same outputs, or
        the graph is dropped and the eager call's outputs are made again."""
        self.unchecked.discard(signature)
        expected = [_copy(a) for a in _arrays_of(self.recorder.warm(self.fn, inputs))]
        outputs = self._replay(recording, inputs)
        error = _worst_difference(expected, _arrays_of(outputs))
        if error is None:
            return outputs
        del self.recordings[signature]
        self.failed = f"a replay differed from the eager call by {error:.1e}"
        print(f"note: CUDA graph dropped ({self.failed}); the steps run without one",
              file=sys.stderr)
        return self.recorder.warm(self.fn, inputs)  # (the replay wrote over its outputs)

    def _record(self, signature, inputs):
        from .backend import array_namespace
        xp = array_namespace(*inputs)
        kept = [xp.asarray(x, copy=True) for x in inputs]  # the graph reads its inputs here
        try:
            outputs, replay, keep = self.recorder.record(self.fn, kept)
        except Exception as error:  # noqa: BLE001 - any refusal: eager from now on
            # an array a cache made while capturing was never filled (its kernel was only
            # recorded): the caches start over, so the eager steps make theirs anew
            device_cache.clear_all()
            self.error = error
            self.failed = f"{type(error).__name__}: {error}".splitlines()[0]
            print(f"note: CUDA graph recording failed ({self.failed}); the steps run without "
                  "one", file=sys.stderr)
            return None
        # the per-shape caches' arrays, read by address in the graph: kept with it
        keep = (keep, device_cache.held())
        recording = self.recordings[signature] = _Recording(kept, outputs, replay, keep)
        return recording


def _arrays_of(value):
    """The arrays in fn's outputs, in order (tuples and lists walked; flat buffers whole)."""
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays_of(v)]
    if hasattr(value, "flat") and hasattr(value, "layout"):  # flat.FlatTensors
        return [value.flat]
    return [value] if hasattr(value, "shape") and hasattr(value, "dtype") else []


def _copy(a):
    from .backend import array_namespace
    return array_namespace(a).asarray(a, copy=True)


# how far a replay may be from the eager call: float rounding (cuBLAS may pick another
# algorithm while recording), far below what a wrong replay gives
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def _worst_difference(expected, got):
    """None if every array of got equals expected's to TOLERANCE (max|a - b| over
    max(|a| + |b|), in float64 for floats); else the worst relative difference."""
    from .backend import array_namespace, to_numpy
    if len(expected) != len(got):
        return float("inf")
    for a, b in zip(expected, got):
        if tuple(a.shape) != tuple(b.shape):
            return float("inf")
        xp = array_namespace(a)
        kind = str(a.dtype).rsplit(".", 1)[-1]  # (array_api_strict's: "array_api_strict.float32")
        if kind not in TOLERANCE:  # integers, booleans: exactly
            if not bool(to_numpy(xp.all(a == b))):
                return float("inf")
            continue
        a64, b64 = xp.astype(a, xp.float64), xp.astype(b, xp.float64)
        both = to_numpy(xp.stack([xp.max(xp.abs(a64 - b64)),
                                  xp.max(xp.abs(a64) + xp.abs(b64))])) if a.size else \
            np.zeros(2)
        error = float(both[0] / max(both[1], 1e-300)) if np.all(np.isfinite(both)) else \
            (0.0 if bool(to_numpy(xp.all((a64 == b64) | (xp.isnan(a64) & xp.isnan(b64)))))
             else float("inf"))
        if not error <= TOLERANCE[kind]:
            return error
    return None


class CupyRecorder:
    """Records fn(*inputs) on CuPy into a CUDA graph (stream capture on a stream of its own,
    allocations from a memory pool of its own: see the module docstring); the replay is
    launched on the caller's current stream, in order with the work around it."""

    def __init__(self):
        import cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def warm(self, fn, inputs):
        """fn(*inputs) eagerly on the recording stream (in order with the caller's work): what
        a library sets up at its first use on a stream (cuBLAS's workspace) is set up before
        the recording, as PyTorch warms up before torch.cuda.graph."""
        import cupy
        caller = cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream:
            outputs = fn(*inputs)
        caller.wait_event(self.stream.record())
        return outputs

    def record(self, fn, inputs):
        """-> (outputs, replay, what must be kept alive with the graph)."""
        import cupy
        # the warm-up call's freed blocks, cached in the default pool, go back to the driver
        # first: the graph's own pool needs a whole step's memory more (a pool that cannot
        # allocate frees only its own cache, not the default pool's)
        cupy.get_default_memory_pool().free_all_blocks()
        pool = cupy.cuda.MemoryPool()
        caller = cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())  # the inputs' copies are queued there
        outputs = graph = None
        with cupy.cuda.using_allocator(pool.malloc), self.stream:
            # once eagerly from the graph's own pool first, down the recording's own path
            # (capture.py: cuBLAS through ctypes, copies one by one): the pool then holds
            # every block the recording asks for, so nothing is allocated from the driver
            # while capturing, and cuBLAS has set up and loaded its kernels for these calls
            with capture.recording():
                fn(*inputs)
            self.stream.begin_capture()
            try:
                with capture.recording():  # (cuBLAS through ctypes; no uploads: capture.py)
                    outputs = fn(*inputs)
            finally:
                try:
                    graph = self.stream.end_capture()
                except Exception:  # the capture was already broken: fn's error says why
                    if outputs is not None:
                        raise
        caller.wait_event(self.stream.record())  # replays (on the caller's stream) come after

        def replay():
            graph.launch(cupy.cuda.get_current_stream())

        return outputs, replay, (graph, pool)
