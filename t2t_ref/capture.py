"""Is this thread recording a CUDA graph? graphs.CupyRecorder says so while CuPy captures a
step, for the two places that must then work another way (each says why where it reads it):

- gaps.matmul / cupy_gemm: CuPy's cuBLAS wrappers refuse every call while a stream captures
  (CuPy issue #6290), though cuBLAS's products can be captured: cupy_gemm calls cuBLAS itself,
  for float32 products too;
- FlatTensors.update: CuPy's concatenate of more than 8 arrays uploads the arrays' addresses
  from the host, and CuPy refuses a host-to-device copy while a stream captures (the recording
  would fail): the tensors are copied one by one instead.

    with capture.recording():
        ...                     # capture.active() is True in this thread
"""

import contextlib
import threading

_state = threading.local()


def active():
    """Is a CUDA graph being recorded in this thread?"""
    return getattr(_state, "recording", False)


@contextlib.contextmanager
def recording():
    saved, _state.recording = active(), True
    try:
        yield
    finally:
        _state.recording = saved
