"""Choosing the array namespace ("backend") by name.

All compute code in t2t_ref is written once against the array API standard and takes its
namespace from its inputs:

    xp = array_namespace(x)          # numpy, cupy or array_api_strict, as x is
    y = xp.sum(x * x, axis=-1)

This module is the only place that maps a *name* ("numpy", "cupy", "array_api_strict") to a
namespace and a device, and the only place that moves arrays between host and device.
"""

import functools

import array_api_compat
import numpy as np
from array_api_compat import device as device_of  # noqa: F401 (re-exported)

BACKENDS = ("numpy", "cupy", "array_api_strict")
DTYPES = ("float32", "float64")


def array_namespace(*arrays):
    """array_api_compat.array_namespace, kept per array type for the one-array call: a step
    asks about a thousand times, at 1.4 us each (timeit on BENCHMARKS.md's 2-core Xeon; 0.05
    us cached), and on a GPU at small images every microsecond of Python is step time. The
    namespace of a NumPy, CuPy or array_api_strict array depends on its type alone."""
    if len(arrays) == 1:
        kind = type(arrays[0])
        xp = _NAMESPACES.get(kind)
        if xp is None:
            xp = _NAMESPACES[kind] = array_api_compat.array_namespace(arrays[0])
        return xp
    return array_api_compat.array_namespace(*arrays)


_NAMESPACES = {}  # array type -> its namespace


class BackendError(ValueError):
    """A backend that was asked for cannot be used here (unknown name, CuPy or GPU missing)."""


def get_namespace(name):
    """Return (xp, device) for a backend name.

    numpy            -> array_api_compat.numpy on the CPU
    cupy             -> array_api_compat.cupy on the current CUDA device
    array_api_strict -> array_api_strict on its 'device1': a second, fake device, so any hidden
                        host transfer (mixing with CPU arrays, np.asarray) fails loudly in tests.
    """
    if name == "numpy":
        import array_api_compat.numpy as xp
        return xp, "cpu"
    if name == "cupy":
        cupy = _working_cupy()
        import array_api_compat.cupy as xp
        return xp, cupy.cuda.Device()
    if name == "array_api_strict":
        try:
            import array_api_strict as xp
        except ImportError:
            raise BackendError("backend 'array_api_strict' needs the array-api-strict package: "
                               "pip install array-api-strict") from None
        return xp, xp.Device("device1")
    raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


CUPY_WHEELS = ("cupy", "cupy-cuda11x", "cupy-cuda12x", "cupy-cuda13x")


@functools.cache
def _working_cupy():
    """CuPy, once it has run one kernel and one cuBLAS matrix product on the GPU.

    Counting devices is not enough: a CuPy built for another CUDA than the driver's, or a
    missing NVRTC or cuBLAS library, would otherwise fail later, inside the model, as a
    traceback. Any failure here is one BackendError line saying what to install.
    """
    from importlib import metadata
    installed = []
    for wheel in CUPY_WHEELS:
        try:
            installed.append(f"{wheel} {metadata.version(wheel)}")
        except metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        raise BackendError(f"two CuPy packages are installed ({', '.join(installed)}) and they "
                           "overwrite each other: pip uninstall all but the one for this "
                           "machine's CUDA (nvidia-smi shows it)")
    try:
        import cupy
    except ImportError as err:
        reason = "not installed" if not installed else f"installed but fails to import ({err})"
        raise BackendError(
            f"backend 'cupy' needs CuPy, which is {reason}: on a machine with an NVIDIA GPU, "
            "pip install -e '.[cuda12]' or '.[cuda13]' (the CUDA version nvidia-smi shows), "
            "or use --backend numpy") from None
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, no runtime: CuPy raises its own CUDA errors
        n_gpus = 0
    if n_gpus == 0:
        raise BackendError("backend 'cupy' needs a CUDA GPU, and none was found: "
                           "use backend 'numpy' on this machine")
    try:
        host = np.arange(16, dtype=np.float32).reshape(4, 4)
        x = cupy.asarray(host)
        y = (x * 0.5 + 1.0) @ x  # an elementwise kernel (compiled by NVRTC) and cuBLAS
        cupy.cuda.Device().synchronize()
        if not np.array_equal(y.get(), (host * 0.5 + 1.0) @ host):
            raise RuntimeError("a 4x4 matrix product came out wrong")
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise BackendError(
            f"backend 'cupy' found {n_gpus} GPU(s) but CUDA failed on a first kernel "
            f"({type(err).__name__}: {first_line}): install the CuPy wheel that matches this "
            "machine's CUDA version (nvidia-smi), e.g. pip install -e '.[cuda13]', "
            "or use --backend numpy") from None
    return cupy


def get_dtype(xp, name):
    """The namespace's float dtype for 'float32' or 'float64'."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose float32 or float64")
    return getattr(xp, name)


def backend_name(xp):
    """The backend name of a namespace, the inverse of get_namespace."""
    module = xp.__name__
    for name in BACKENDS:
        if name in module:
            return name
    raise BackendError(f"unsupported array namespace {module}")


def to_device(array, xp, device):
    """Host (NumPy or anything np.asarray takes) -> an array of namespace xp on device."""
    host = np.asarray(array)
    if backend_name(xp) == "cupy":
        import cupy
        with device:
            return xp.asarray(cupy.asarray(host))
    return xp.asarray(host, device=device)


def to_numpy(array):
    """Any backend's array -> a host NumPy array (an explicit, deliberate host transfer)."""
    if isinstance(array, np.ndarray):
        return array
    xp = array_namespace(array)
    name = backend_name(xp)
    if name == "cupy":
        return array.get()
    if name == "array_api_strict":
        return np.asarray(array.to_device(xp.Device("CPU_DEVICE")))
    return np.asarray(array)


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS.

    The NumPy path allocates and frees arrays of tens of MB in every step. By default glibc
    returns such blocks to the OS (munmap, or trimming the heap's top) and the next array of
    that size page-faults through fresh zeroed pages: about 10% of a training step at 224x224
    here (medians of repeated A/B runs). With blocks up to 32 MiB kept in the heap and the heap
    trimmed only past 2 GiB of free space, a step reuses the memory of the last one. Peak
    memory is unchanged; memory freed after the peak stays with the process until it exits.
    All threads also share one heap ("arena"): glibc gives each thread a heap of its own and
    unmaps it whenever it empties, which the model's threads (parallel/threads.py) did every step,
    thousands of page faults per step; one shared heap keeps its memory, and made sharded
    steps 5-20% faster here.

    The training, evaluation, prediction and benchmark commands call this first, before any
    thread starts (a thread keeps the heap it has); call it yourself at the start of a
    long-running script. Does nothing (returns False) where glibc is not the C library.
    """
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)  # glibc's largest allowed value
                and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
                and mallopt(M_ARENA_MAX, 1))
