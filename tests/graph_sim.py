"""A CUDA graph on the CPU: record the array calls one call of a function makes on
array_api_strict, and replay them as a GPU replays a graph, without running its Python again.

    recorder = SimulatedRecorder()
    step = StepGraph(fn, recorder)       # t2t_ref.graphs: what CupyRecorder does on a GPU

A replay calls each recorded operation again with the *same arguments*: the same array
objects (whose contents may have changed: a kernel reads its memory when it runs) and the
same Python numbers (a kernel's arguments are fixed when it is recorded), and writes the
result into the array the recording returned (a kernel writes to the same address each
time). So a function that reads a per-step value from a Python number, or from an array it
rebinds instead of overwriting, gives the recorded step's value again, as on a GPU, and the
replayed steps part from eager ones: what tests/test_graphs.py looks for. Host transfers and
arrays made from host data during the recording are refused, as CuPy refuses them while it
captures.

The recording pass itself runs the function (a GPU's recording runs nothing, and StepGraph's
first replay then runs it once): its replay is skipped once, so the recorded call counts as
that first replay.
"""

import contextlib
import functools
import threading

import array_api_strict
import numpy as np

from t2t_ref import capture

from strict_watch import HOST_METHODS, patched_strict


class RecordingRefused(RuntimeError):
    """What CuPy raises for a host transfer while a stream is capturing."""


ARRAY = type(array_api_strict.asarray(0.0))  # (looked up before anything is patched)


def _is_array(x):
    return isinstance(x, ARRAY)


@contextlib.contextmanager
def _recording(tape):
    """Patch array_api_strict so that every outermost call is appended to tape as
    (original function, args, kwargs, result); host transfers raise RecordingRefused."""
    local = threading.local()

    def recorded(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            if depth == 0:
                if name in HOST_METHODS or (name == "to_device" and "CPU" in str(args[1:])):
                    raise RecordingRefused(f"{name}: a host transfer while recording")
                if name == "asarray" and not _is_array(args[0] if args else kwargs["obj"]):
                    raise RecordingRefused(f"asarray({type(args[0]).__name__}): host data "
                                           "copied to the device while recording")
            local.depth = depth + 1
            try:
                result = function(*args, **kwargs)
            finally:
                local.depth = depth
            if depth == 0:
                tape.append((function, args, kwargs, result))
            return result
        return wrapper

    with patched_strict(recorded, methods=("to_device",)):
        yield


def _arrays_in(values):
    for v in values:
        if _is_array(v):
            yield v._array
        elif isinstance(v, (tuple, list)):
            yield from _arrays_in(v)


def _write_into(recorded, new, args):
    """The replayed result into the recorded one's memory (same shape and dtype). A read-only
    result is a view of an argument (broadcast_to): it shows the argument as it is now."""
    if _is_array(recorded):
        if new is recorded:
            return
        assert new.shape == recorded.shape and new.dtype == recorded.dtype, \
            (new.shape, recorded.shape, new.dtype, recorded.dtype)
        if not recorded._array.flags.writeable:
            assert any(np.shares_memory(recorded._array, a) for a in _arrays_in(args)), \
                "a read-only result that is not a view of an argument"
            return
        recorded._array[...] = new._array
    elif isinstance(recorded, (tuple, list)):
        for r, n in zip(recorded, new):
            _write_into(r, n, args)


class SimulatedRecorder:
    """graphs.CupyRecorder's interface on array_api_strict: record(fn, inputs) ->
    (outputs, replay, tape). `replays` counts the replays that ran the tape."""

    def __init__(self):
        self.tapes = []
        self.replays = 0

    def warm(self, fn, inputs):
        return fn(*inputs)

    def record(self, fn, inputs):
        tape = []
        with _recording(tape), capture.recording():  # as CupyRecorder records
            outputs = fn(*inputs)
        self.tapes.append(tape)
        first = [True]

        def replay():
            if first[0]:  # the recording pass ran the function: it was the first replay
                first[0] = False
                return
            for function, args, kwargs, result in tape:
                _write_into(result, function(*args, **kwargs), args)
            self.replays += 1

        return outputs, replay, tape
