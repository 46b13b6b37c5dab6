"""Watching array_api_strict: which arrays go to the host, and how many array calls a piece
of code makes. The tests' stand-in for a GPU's two costs, measured on any machine.

    with host_transfers() as transfers:          # every float(x), int(x), bool(x), x.item(),
        step()                                   # np.asarray(x), iteration, to_device(CPU)
    assert transfers == [], transfers            # (where, what) of each, to say what failed

    with array_calls() as calls:                 # namespace functions and array operators,
        step()                                   # counted once per call made by our code
    calls.total, calls.by_name                   # (not the calls they make inside)

Both patch array_api_strict's Array class and module for the duration of the block only.
On CuPy each counted call is a kernel launch (or a few); each host transfer a synchronisation.
"""

import contextlib
import functools
import threading
import traceback
from collections import Counter

import array_api_strict

# what turns a device array into a host value: each would make CuPy wait for the GPU
HOST_METHODS = ("__float__", "__int__", "__bool__", "__index__", "__complex__", "__array__",
                "__iter__", "__dlpack__", "__buffer__")


def _array_class():
    return type(array_api_strict.asarray(0.0))


def _our_frame():
    """The innermost stack frame in t2t_ref (where the transfer was asked for), as text."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/t2t_ref/" in frame.filename and "/tests/" not in frame.filename:
            return f"{frame.filename.rsplit('/t2t_ref/', 1)[1]}:{frame.lineno} {frame.line}"
    return "(outside t2t_ref)"


@contextlib.contextmanager
def host_transfers():
    """Yield a list that collects (where, what) for every device -> host transfer."""
    Array = _array_class()
    seen, originals = [], {}

    def watch(name, method):
        @functools.wraps(method)
        def watched(self, *args, **kwargs):
            if name != "to_device" or "CPU" in str(args[0] if args else kwargs.get("device")):
                seen.append((_our_frame(), name))
            return method(self, *args, **kwargs)
        return watched

    for name in (*HOST_METHODS, "to_device"):
        if hasattr(Array, name):
            originals[name] = getattr(Array, name)
            setattr(Array, name, watch(name, originals[name]))
    try:
        yield seen
    finally:
        for name, method in originals.items():
            setattr(Array, name, method)


class Calls:
    def __init__(self):
        self.by_name = Counter()
        self._local = threading.local()

    @property
    def total(self):
        return sum(self.by_name.values())


# Array's dunder methods that are not array operations
NOT_OPERATORS = ("__init__", "__new__", "__repr__", "__str__", "__getattribute__", "__setattr__",
                 "__class__", "__hash__", "__array_namespace__", "__init_subclass__",
                 "__subclasshook__", "__reduce__", "__reduce_ex__", "__sizeof__", "__format__",
                 "__dir__", "__delattr__", "__getstate__", "__module__", "__doc__", "__slots__",
                 "__annotations__", "__weakref__")


@contextlib.contextmanager
def patched_strict(wrap, methods=()):
    """Within the block, every array operator (and each of `methods`) of array_api_strict's
    Array and every function of its namespace is wrap(name, original)."""
    Array, patched = _array_class(), []
    operators = [n for n in dir(Array) if n.startswith("__") and n.endswith("__")
                 and n not in NOT_OPERATORS and callable(getattr(Array, n, None))]
    for name in (*operators, *methods):
        original = getattr(Array, name)
        setattr(Array, name, wrap(name, original))
        patched.append((Array, name, original))
    for name in dir(array_api_strict):
        value = getattr(array_api_strict, name)
        if not name.startswith("_") and callable(value) and not isinstance(value, type):
            setattr(array_api_strict, name, wrap(name, value))
            patched.append((array_api_strict, name, value))
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


@contextlib.contextmanager
def array_calls():
    """Yield a Calls: how many namespace functions and array operators our code called."""
    calls = Calls()

    def count(name, function):
        @functools.wraps(function)
        def counted(*args, **kwargs):
            depth = getattr(calls._local, "depth", 0)
            if depth == 0:
                calls.by_name[name] += 1
            calls._local.depth = depth + 1
            try:
                return function(*args, **kwargs)
            finally:
                calls._local.depth = depth
        return counted

    with patched_strict(count):
        yield calls
