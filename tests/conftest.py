"""Shared test helpers: backends to run on, and comparisons that say what differed."""

import os

import numpy as np
import pytest

from t2t_ref.backend import BackendError, get_namespace, to_device, to_numpy


def pytest_configure(config):
    """Under pytest-xdist (README's `-n auto`) each worker keeps to one BLAS thread, and so do
    the programs it starts (CLIs, notebook kernels, mpirun ranks): the tests' matrices are
    small, and two workers each spinning two OpenBLAS threads on two cores ran the suite no
    faster than one worker (7:50 either way on this 2-core machine; 4:30 with one thread
    each). Tests that are about thread counts set theirs explicitly."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)  # NumPy is already loaded: limit its BLAS now


def available_backends():
    """numpy and array_api_strict always; cupy only where CuPy and a GPU exist (else a skip)."""
    params = ["numpy", "array_api_strict"]
    try:
        get_namespace("cupy")
        params.append("cupy")
    except BackendError as err:
        params.append(pytest.param("cupy", marks=pytest.mark.skip(reason=str(err))))
    return params


@pytest.fixture(params=available_backends())
def backend(request):
    return request.param


def cupy_or_skip():
    """The cupy module where CuPy and a GPU work; else the test is skipped, saying why."""
    try:
        get_namespace("cupy")
    except BackendError as err:
        pytest.skip(str(err))
    import cupy
    return cupy


def on(backend, array, dtype=None):
    """A host array moved to the backend's device (and dtype, if given)."""
    xp, device = get_namespace(backend)
    out = to_device(array, xp, device)
    return xp.astype(out, getattr(xp, dtype)) if dtype else out


def rel_error(a, b):
    """max|a-b| / max(|a|+|b|) (CS231n's relative error); 0 when both are 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-300))


def assert_close(actual, expected, tol, name="tensor"):
    """Relative error <= tol, else fail naming the tensor, its first differing entries and the
    largest difference."""
    actual = to_numpy(actual) if not isinstance(actual, np.ndarray) else actual
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, \
        f"{name}: shape {actual.shape} != expected {expected.shape}"
    err = rel_error(actual, expected)
    if not err <= tol:  # also catches NaN
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        scale = np.max(np.abs(actual) + np.abs(expected))
        bad = np.argwhere(diff > tol * scale)[:5]
        entries = ", ".join(f"{tuple(int(i) for i in idx)}: {actual[tuple(idx)]:.10g} vs "
                            f"{expected[tuple(idx)]:.10g}" for idx in bad)
        worst = np.unravel_index(np.nanargmax(diff), diff.shape)
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.0e}; first differing entries "
            f"(ours vs expected) {entries}; largest difference {diff[worst]:.3e} at "
            f"{tuple(int(i) for i in worst)}")
