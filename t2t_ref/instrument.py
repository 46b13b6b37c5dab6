"""A function swapped for a wrapper in every t2t_ref module that holds it, while a block runs:
how scripts/gpu_trace.py logs each op's outputs and the tests check each op's dtypes or each
product's layout, without the model knowing. Modules import functions by name (`from ..gaps
import matmul`), so replacing it where it is defined would miss every caller.

    with wrapped(lambda f: f is gaps.matmul, lambda matmul: checked_version_of(matmul)):
        model.forward(x)            # every call of gaps.matmul goes through the wrapper
"""

import contextlib
import sys


def is_op(obj):
    """Is obj one of t2t_ref.ops' *_forward or *_backward functions?"""
    return (callable(obj) and getattr(obj, "__module__", "").startswith("t2t_ref.ops")
            and getattr(obj, "__name__", "").endswith(("_forward", "_backward")))


@contextlib.contextmanager
def wrapped(select, wrap):
    """While the block runs, every module attribute obj of t2t_ref with select(obj) is
    wrap(obj) (one wrapper per function, wherever it is held); restored afterwards."""
    wrappers, patched = {}, []
    modules = [m for n, m in list(sys.modules.items())
               if m is not None and (n == "t2t_ref" or n.startswith("t2t_ref."))]
    for module in modules:
        for attr, obj in list(vars(module).items()):
            if select(obj):
                if id(obj) not in wrappers:
                    wrappers[id(obj)] = wrap(obj)
                setattr(module, attr, wrappers[id(obj)])
                patched.append((module, attr, obj))
    try:
        yield
    finally:
        for module, attr, obj in reversed(patched):
            setattr(module, attr, obj)
