"""Time t2t_ref against PyTorch eager on the identical model, and show where t2t_ref's time goes.

    python -m t2t_ref.bench                      # the four standard configurations (--all)
    python -m t2t_ref.bench --quick              # tiny configurations, a smoke test
    python -m t2t_ref.bench --config t2t_vit_7-64-b64-train --repeats 9 --json bench.json
    python -m t2t_ref.bench --markdown           # also a table ready for BENCHMARKS.md
    python -m t2t_ref.bench --backend cupy       # GPU: CuPy against PyTorch CUDA eager
    python -m t2t_ref.bench --loader             # the loader alone: images/s at 224

A configuration is named MODEL-SIZE-bBATCH-MODE, MODE 'train' (one training step: forward,
cross-entropy with label smoothing 0.1, backward, AdamW update) or 'infer' (one forward; PyTorch
under torch.no_grad()). Both sides run the same variant with the same weights (t2t_ref's,
copied into the PyTorch port of the official model, t2t_ref/torch_port.py), the same batch, in
float32, with the same number of threads (torch.set_num_threads and, for NumPy's BLAS,
threadpoolctl). Training runs both models in train mode: the T2T performer layers' two fixed
0.1 dropouts act on both sides.

What is printed for each configuration:
  - ms per step: the median of --repeats timed steps (min and max beside it), t2t_ref and
    PyTorch interleaved step by step (the order alternating every repetition) after --warmup
    steps of each, so that a change in the machine's load hits both alike (with --pause
    seconds of idling before each timed step, so that neither starts while the other
    library's idle threads still spin); images/s; the ratio t2t_ref / PyTorch of the
    medians, against the target (training <= 1.25x, inference <= 1.15x).
  - GFLOP/s: the matmul FLOPs counted from the shapes (count_flops; a training step counts 3x
    the forward's) over the median time, and as % of this machine's float32 matmul rate (a
    large NumPy matmul, same threads).
  - peak memory: each side in a fresh subprocess, the growth of the peak resident set (Linux
    VmHWM, reset through /proc/self/clear_refs) over the process after building the model and
    the input, across one warm-up and one measured step; the optimizer's state is inside it
    on both sides. Inference is forward(x, keep_cache=False) on t2t_ref's side, as
    torch.no_grad() on PyTorch's. Target: a training step <= 1.5x PyTorch's.
  - loader: images/s of t2t_ref.data.Loader making training batches of this size and batch
    with the official recipe's augmentation from in-memory synthetic images (--workers
    processes), beside the model's images/s, so the slower of the two shows. --loader times
    only the loader, on JPEG photos at 224, for 1, 2 and all cores (bench_loader.py), or for
    --workers alone where it is given (0: in the training process).
  - where t2t_ref's time goes: one extra profiled step (not one of the timed ones), with every
    function of t2t_ref.ops, t2t_ref.layers and t2t_ref.gaps, the model's forward/backward and
    AdamW's step timed through Python's profiling hook (OpProfiler), keeping *exclusive* time
    (the time of nested profiled calls subtracted), as ms per step and % of the step. On NumPy
    the model and AdamW run in one thread per core (t2t_ref.parallel): the times are then
    summed over the threads (thread-ms), without the main thread's wait for the others.

--backend cupy: t2t_ref on CuPy against PyTorch CUDA eager, timed with CUDA events, TF32 off on
both; memory is the peak of bytes in use on both sides (CuPy's pool counted at every
allocation; torch.cuda.max_memory_allocated). In this mode the bench is a check: the exit
code is 1 when a target (training and inference <= 1.2x PyTorch, memory <= 1.5x) is missed.
In both modes the logits and (training) every gradient of the same model in eval mode must
agree with PyTorch's within 1e-4 (float32), else the exit code is 1.

Shapes: B batch, S image side, N tokens, D backbone width, E = 64 the T2T token width, m = 32
performer features, h heads, K classes.
"""

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import os
import pkgutil
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import threadpoolctl

from .atomic import file_path_problem, write_atomic
from .backend import keep_freed_memory, to_device, to_numpy
from .cli import HelpFormatter, run as run_cli, user_error
from .gaps import make_rng
from . import graphs
from .graphs import NEEDS_CUPY
from .loss_scale import DynamicLossScale
from .model import PATCH, create_model
from .ops.cross_entropy import cross_entropy
from .optim import AdamW, decays
from .parallel import DataParallel
from .precision import PRECISIONS
from .train import forward_backward
from .variants import list_models

LR = 5e-4  # the learning rate of the timed AdamW steps (the value does not change the work)
WEIGHT_DECAY = 0.05
SMOOTHING = 0.1
NUM_CLASSES = 1000
# t2t_ref time / PyTorch time, at most: on the CPU (2 cores) and on one GPU
TARGET_RATIO = {"numpy": {"train": 1.25, "infer": 1.15},
                "cupy": {"train": 1.2, "infer": 1.2}}
# logits and gradients of the same model on both sides, max|a-b| / max(|a|+|b|), float32
PARITY_TOLERANCE = 1e-4
# under half precision: t2t_ref's (logits, gradients) against its own float32, at most (the
# bounds tests/test_precision.py holds the policy to). torch.autocast's distance from its
# float32 is printed beside, not asserted: it rounds other ops, and is often the further
# (T2T-ViT-7 at 64, bf16: its worst gradient 0.14 from float32, t2t_ref's 0.009)
HALF_TOLERANCE = {"bf16": (1e-2, 3e-2), "fp16": (2e-3, 5e-3)}
# fp16 gradients are compared as fp16 training computes them: with a loss scale (GradScaler's
# first), without which the small ones flush to zero on both sides
HALF_GRAD_SCALE = {"bf16": 1.0, "fp16": 2.0 ** 16}
TARGET_MEMORY_RATIO = 1.5  # peak memory of a training step, t2t_ref / PyTorch, at most
MIN_REPEATS, MIN_WARMUP = 5, 2
MATMUL_SIZE = {"numpy": 2048, "cupy": 8192}  # n of the n x n x n float32 matmul for the peak
QUICK_MATMUL_SIZE = 1024
LOADER_BATCHES = 12  # batches in the loader's timed epoch (a few times its prefetch)


# ---- configurations -------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    model: str
    img_size: int
    batch: int
    mode: str  # 'train' or 'infer'

    @property
    def name(self):
        return f"{self.model}-{self.img_size}-b{self.batch}-{self.mode}"

    @property
    def training(self):
        return self.mode == "train"

    def describe(self):
        what = ("training step (forward + backward + AdamW)" if self.training
                else "inference (forward)")
        return f"{self.model}, {self.img_size}x{self.img_size}, batch {self.batch}, {what}"


def parse_config(name):
    """'t2t_vit_7-224-b16-train' -> Config; ValueError saying what is wrong."""
    match = re.fullmatch(r"(?P<model>\w+)-(?P<size>\d+)-b(?P<batch>\d+)-(?P<mode>train|infer)",
                         name)
    if match is None:
        raise ValueError(f"configuration {name!r} is not MODEL-SIZE-bBATCH-MODE, e.g. "
                         "t2t_vit_7-224-b16-train or t2t_vit_14-224-b8-infer")
    model, size, batch = match["model"], int(match["size"]), int(match["batch"])
    if model not in list_models():
        raise ValueError(f"configuration {name!r}: unknown model {model!r}; choose one of "
                         f"{', '.join(list_models())}")
    if size < PATCH or size % PATCH:
        raise ValueError(f"configuration {name!r}: the image size must be a multiple of {PATCH}")
    if batch < 1:
        raise ValueError(f"configuration {name!r}: the batch must be at least 1")
    return Config(model, size, batch, match["mode"])


# The issue's configurations, with the times t2t_ref took when they were set (its anchors).
STANDARD = [parse_config(n) for n in ("t2t_vit_7-224-b16-train", "t2t_vit_7-64-b64-train",
                                      "t2t_vit_t_14-64-b32-train", "t2t_vit_14-224-b8-infer")]
ANCHOR_MS = {"t2t_vit_7-224-b16-train": 1110.0, "t2t_vit_7-64-b64-train": 300.0,
             "t2t_vit_t_14-64-b32-train": 520.0, "t2t_vit_14-224-b8-infer": 540.0}
QUICK = [parse_config(n) for n in ("t2t_vit_7-32-b4-train", "t2t_vit_7-32-b4-infer")]


# ---- FLOPs, counted from the shapes ---------------------------------------------------------

def count_flops(variant, img_size, batch, training):
    """Matmul FLOPs (2 * M * N * K per product) of one forward, or x3 for a training step
    (the backward's two products per forward product). Elementwise work is not counted.
    variant: a name ('t2t_vit_7') or a t2t_ref.variants.Variant; the multiply-accumulates per
    image come from t2t_ref.summary's count, which knows every model family."""
    from .summary import count
    macs_per_image = count(variant, img_size, NUM_CLASSES)[2]
    flops = 2 * batch * macs_per_image
    return 3 * flops if training else flops


# ---- threads --------------------------------------------------------------------------------

def limit_threads(n):
    """Use n threads in NumPy's BLAS (and any other thread pool threadpoolctl sees) and in
    PyTorch if it is imported, until restore_threads(). Returns threadpoolctl's info on the
    BLAS libraries, NumPy's first."""
    restore_threads()
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch else None  # before threadpoolctl, which
    _limits.append((threadpoolctl.threadpool_limits(limits=n), torch_threads))  # limits it too
    if torch:
        torch.set_num_threads(n)
    blas = [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    # NumPy's own first (SciPy may bring a second OpenBLAS; both are limited)
    return sorted(blas, key=lambda info: "numpy" not in info["filepath"])


_limits = []  # the active (threadpoolctl limiter, PyTorch's thread count before it)


def restore_threads():
    """Undo limit_threads: the thread counts from before it."""
    while _limits:
        limiter, torch_threads = _limits.pop()
        limiter.restore_original_limits()
        if torch_threads is not None:
            sys.modules["torch"].set_num_threads(torch_threads)


class BenchError(Exception):
    """Something the user can fix (a missing package, no GPU); main prints it as one line."""


def _torch():
    try:
        import torch
    except ImportError:
        raise BenchError("the benchmark's peer is PyTorch, which is not installed: "
                         "pip install torch") from None
    return torch


def load_oracle():
    """The PyTorch port of the official model (t2t_ref/torch_port.py); needs PyTorch."""
    _torch()
    from . import torch_port
    return torch_port


# ---- the two sides --------------------------------------------------------------------------

def make_batch(config, seed=0):
    """Host inputs: images (B, 3, S, S) float32 (like normalized images), labels (B,) int64."""
    rng = np.random.default_rng(seed)
    S = config.img_size
    images = rng.standard_normal((config.batch, 3, S, S), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, config.batch, dtype=np.int64)
    return images, labels


class Ours:
    """t2t_ref on a backend: the model, the input on its device, and (training) AdamW."""

    label = "t2t_ref"

    def __init__(self, config, backend, seed=0, precision="float32", graphs=False,
                 recorder=None):
        self.config, self.backend = config, backend
        # graphs: each step replays a CUDA graph of it (graphs.py; recorder: CupyRecorder())
        self.graphs, self.recorder = graphs, recorder
        self.recorded = self.forward_graph = None
        self.steps = 0
        self.model = DataParallel(create_model(config.model, num_classes=NUM_CLASSES,
                                               img_size=config.img_size, backend=backend,
                                               dtype="float32", seed=seed,
                                               precision=precision))
        xp, device = self.model.xp, self.model.device
        images, labels = make_batch(config, seed)
        self.x = xp.astype(to_device(images, xp, device), self.model.dtype)  # (B, 3, S, S)
        self.y = to_device(labels, xp, device)  # (B,)
        self.opt = None
        # fp16 trains with a loss scale (loss_scale.py), as train.py does
        self.scaler = DynamicLossScale(xp, device) if precision == "fp16" else None

    def prepare(self):
        """Set the mode; a training step gets its optimizer (m and v allocated here)."""
        self.model.train(self.config.training)
        if self.config.training:
            self.opt = AdamW(self.model.params, weight_decay=WEIGHT_DECAY)
        if self.graphs:
            from .graphs import CupyRecorder, StepGraph
            from .train import RecordedForwardBackward
            recorder = self.recorder or CupyRecorder()
            if self.config.training:
                self.recorded = RecordedForwardBackward(self.model, SMOOTHING, self.scaler,
                                                        recorder)
            else:
                self.forward_graph = StepGraph(
                    lambda x: self.model.forward(x, keep_cache=False), recorder)

    def step(self):
        model = self.model
        if not self.config.training:
            if self.forward_graph is not None:
                self.forward_graph(self.x)
            else:
                model.forward(self.x, keep_cache=False)  # (B, K); as under torch.no_grad()
            return
        model.rng = make_rng(model.xp, self.steps)  # each step its own masks, as in train.py
        self.steps += 1
        if self.recorded is not None:
            _loss, grads = self.recorded(self.x, self.y)
        else:
            _loss, grads = forward_backward(model, self.x, self.y, SMOOTHING, self.scaler)
        if self.scaler is None:
            self.opt.step(model.params, grads, LR)
            return
        found_inf = self.scaler.unscale(grads)
        self.opt.step(model.params, grads, LR, found_inf=found_inf)
        self.scaler.update(found_inf)

    def sync(self):
        if self.backend == "cupy":
            import cupy
            cupy.cuda.get_current_stream().synchronize()

    def eval_logits(self):
        self.model.eval()
        logits = to_numpy(self.model.forward(self.x, keep_cache=False))
        return logits

    def eval_grads(self, scale=1.0):
        """{name: host array}: every parameter's gradient of the smoothed cross-entropy, eval
        mode (no dropout: both sides compute the same function); the backward of the loss
        times `scale`, divided by it after (fp16's loss scale)."""
        model = self.model.eval()
        _loss, dlogits = cross_entropy(model.forward(self.x), self.y,
                                                            SMOOTHING)
        model.backward(dlogits * scale)
        return {name: to_numpy(g) / scale for name, g in model.grads.items()}


class Theirs:
    """The PyTorch port of the official model, eager, on the CPU or CUDA, with t2t_ref's
    weights (state=None: its own initialisation, enough for measuring memory)."""

    label = "PyTorch"

    def __init__(self, config, device, state=None, seed=0, precision="float32"):
        torch = _torch()
        oracle = load_oracle()
        self.torch, self.config, self.device = torch, config, device
        # half precision: torch.autocast around forward and loss; fp16 with a GradScaler
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda" if device != "cpu" else "cpu") \
            if precision == "fp16" else None
        model = oracle.create_torch_model(config.model, num_classes=NUM_CLASSES,
                                          img_size=config.img_size)
        if state is not None:
            model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                   for k, v in state.items()}, strict=True)
        self.model = model.to(device=device, dtype=torch.float32)
        images, labels = make_batch(config, seed)
        self.x = torch.from_numpy(images).to(device)  # (B, 3, S, S)
        self.y = torch.from_numpy(labels).to(device)  # (B,)
        self.opt = None

    def prepare(self):
        """Mode and optimizer: AdamW with t2t_ref's decay groups (no decay for 1-D tensors,
        biases and the class token); its state is allocated lazily, at the first step."""
        torch = self.torch
        self.model.train(self.config.training)
        if self.config.training:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            decay = [p for n, p in named if decays(n, tuple(p.shape))]
            no_decay = [p for n, p in named if not decays(n, tuple(p.shape))]
            self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                          {"params": no_decay, "weight_decay": 0.0}], lr=LR)

    def autocast(self, half=True):
        """torch.autocast in the benchmark's half precision, or nothing under float32 (or
        half=False: the float32 reference)."""
        if self.autocast_dtype is None or not half:
            return contextlib.nullcontext()
        return self.torch.autocast("cuda" if self.device != "cpu" else "cpu",
                                   dtype=self.autocast_dtype)

    def step(self):
        torch = self.torch
        if not self.config.training:
            with torch.no_grad(), self.autocast():
                self.model(self.x)
            return
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.model(self.x)
            loss = torch.nn.functional.cross_entropy(logits, self.y, label_smoothing=SMOOTHING)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def eval_logits(self, half=True):
        self.model.eval()
        with self.torch.no_grad(), self.autocast(half):
            return self.model(self.x).float().cpu().numpy()

    def eval_grads(self, scale=1.0, half=True):
        torch = self.torch
        self.model.eval()
        self.model.zero_grad(set_to_none=True)
        with self.autocast(half):
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y,
                                                     label_smoothing=SMOOTHING)
        (loss * scale).backward()
        grads = {n: p.grad.float().cpu().numpy() / scale
                 for n, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        return grads


# ---- timing ---------------------------------------------------------------------------------

def make_timer(backend):
    """timer(side) -> milliseconds of one side.step(): wall clock on the CPU, CUDA events
    (recorded on the current stream around the step) on the GPU."""
    if backend == "numpy":
        def timer(side):
            side.sync()
            start = time.perf_counter()
            side.step()
            side.sync()
            return 1e3 * (time.perf_counter() - start)
        return timer

    def timer(side):
        if isinstance(side, Ours):
            import cupy
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            side.step()
            end.record()
            end.synchronize()
            return cupy.cuda.get_elapsed_time(start, end)
        torch = side.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        side.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return timer


def time_interleaved(sides, timer, warmup, repeats, pause=0.0):
    """{label: [ms of each timed step]}: warm-up steps of each side, then repeats rounds of
    one step of each side, the order alternating from round to round.

    pause: seconds of idling before each timed step. After a call, OpenBLAS's worker threads
    spin for up to ~0.1 s (its thread timeout) before they sleep; without a pause they would
    take CPU from the PyTorch step that follows a t2t_ref one (measured here: ~60 ms of CPU
    in the 0.2 s after a 512^3 matmul on 2 threads). A side's own spinning within its step
    is its own behaviour and stays in.
    """
    for _ in range(warmup):
        for side in sides:
            side.step()
            side.sync()
    times = {side.label: [] for side in sides}
    for r in range(repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if pause:
                time.sleep(pause)
            times[side.label].append(timer(side))
    return times


def summarize(times_ms, flops, batch, peak_gflops):
    median = statistics.median(times_ms)
    gflops = flops / (median * 1e-3) / 1e9
    return {"ms": median, "min_ms": min(times_ms), "max_ms": max(times_ms),
            "times_ms": list(times_ms), "images_per_s": batch / (median * 1e-3),
            "gflops": gflops, "peak_pct": 100.0 * gflops / peak_gflops}


def matmul_rate(backend, n, repeats=5):
    """GFLOP/s of an n x n x n float32 matmul (median of repeats, after one warm-up): the
    machine's single-precision matmul rate, with the threads as limited."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    seconds = []
    if backend == "numpy":
        np.matmul(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            np.matmul(a, b)
            seconds.append(time.perf_counter() - start)
    else:
        import cupy
        a, b = cupy.asarray(a), cupy.asarray(b)
        cupy.matmul(a, b)
        for _ in range(repeats):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            cupy.matmul(a, b)
            end.record()
            end.synchronize()
            seconds.append(1e-3 * cupy.cuda.get_elapsed_time(start, end))
    return 2.0 * n ** 3 / statistics.median(seconds) / 1e9


def torch_matmul_rate(device, n, repeats=5):
    """The same for torch.mm (for the record: its BLAS may differ from NumPy's)."""
    torch = _torch()
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    seconds = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return 2.0 * n ** 3 / statistics.median(seconds) / 1e9


# ---- peak memory, each side in a fresh process ----------------------------------------------

def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap():
    """Give the C heap's free memory back to the system (glibc's malloc_trim), so that memory
    freed while building the model is not reused unseen by the measured steps."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss_kib():
    try:
        return _proc_status_kib("VmHWM")
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def memory_child(spec):
    """Run in a fresh process: the peak memory growth of one side over one warm-up and one
    measured step, from the baseline after the model and the input are built."""
    keep_freed_memory()  # as the commands run (for PyTorch's side too: the same process setup)
    config, backend, side = parse_config(spec["config"]), spec["backend"], spec["side"]
    if side == "torch":
        _torch()  # imported first, so that limit_threads sets its threads too
    limit_threads(spec["threads"])
    precision = spec.get("precision", "float32")
    runner = (Ours(config, backend, precision=precision) if side == "ours"
              else Theirs(config, "cpu" if backend == "numpy" else "cuda", precision=precision))
    gc.collect()
    out = {"side": side}
    if backend == "numpy":
        import tracemalloc
        _release_free_heap()
        baseline = _proc_status_kib("VmRSS")
        out["method"] = "VmHWM - VmRSS at baseline" if _reset_peak_rss() else \
            "ru_maxrss - VmRSS at baseline (peak not resettable: may under-count)"
        if side == "ours":
            tracemalloc.start()
        runner.prepare()
        for _ in range(2):
            runner.step()
        out["peak_mb"] = max(0, _peak_rss_kib() - baseline) / 1024
        out["baseline_mb"] = baseline / 1024
        if side == "ours":
            out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2 ** 20
            tracemalloc.stop()
        return out
    if side == "ours":
        # torch.cuda.max_memory_allocated counts the bytes of live tensors at their peak, not
        # what its caching allocator holds; CuPy's pool says only what it holds, so every
        # allocation goes through a wrapper that records the pool's bytes in use after it
        import cupy
        pool = cupy.get_default_memory_pool()
        cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        baseline = pool.used_bytes()
        peak = [baseline]

        def counting_malloc(size):
            memory = pool.malloc(size)
            peak[0] = max(peak[0], pool.used_bytes())
            return memory

        cupy.cuda.set_allocator(counting_malloc)
        try:
            runner.prepare()
            for _ in range(2):
                runner.step()
            runner.sync()
        finally:
            cupy.cuda.set_allocator(pool.malloc)
        out["method"] = "peak bytes in use in CuPy's pool (every allocation counted) - baseline"
        out["peak_mb"] = (peak[0] - baseline) / 2 ** 20
        out["pool_held_mb"] = (pool.total_bytes() - baseline) / 2 ** 20
        return out
    torch = runner.torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    runner.prepare()
    for _ in range(2):
        runner.step()
    torch.cuda.synchronize()
    out["method"] = "torch.cuda.max_memory_allocated - allocated at baseline"
    out["peak_mb"] = (torch.cuda.max_memory_allocated() - baseline) / 2 ** 20
    return out


def _memory_child_main(spec_json):
    print(json.dumps(memory_child(json.loads(spec_json))))
    return 0


def measure_memory(config, backend, threads, side, timeout=900, precision="float32"):
    """memory_child in a fresh Python process; its result dict, or {'error': ...}."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    spec = json.dumps({"config": config.name, "backend": backend, "threads": threads,
                       "side": side, "precision": precision})
    code = ("import sys; from t2t_ref.bench import _memory_child_main; "
            "sys.exit(_memory_child_main(sys.argv[1]))")
    try:
        done = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"side": side, "error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"side": side, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- per-op breakdown -----------------------------------------------------------------------

WAITING = "(main thread waiting for the worker threads)"


def _profiled_functions():
    """{function: name} for everything the profiler times: each function defined in the
    modules of t2t_ref.ops, t2t_ref.layers and t2t_ref.gaps, plus the model's forward and
    backward (their own code, per piece of the batch), DataParallel's forward and backward
    and its sum of the pieces' gradients, AdamW's step and per-thread update, and the wait for
    the worker threads (parallel.threads.map_in_threads, which is left out of the rows)."""
    from . import cupy_kernels, gaps, layers, ops, parallel
    from .model import T2TViT
    from .optim import AdamW
    from .parallel.threads import map_in_threads
    modules = [gaps, layers, ops, cupy_kernels]
    for package in (ops, layers):
        modules += [importlib.import_module(f"{package.__name__}.{info.name}")
                    for info in pkgutil.iter_modules(package.__path__)]
    functions = {}
    for module in modules:
        for obj in vars(module).values():
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                functions[obj] = obj.__name__  # an alias is timed under the defining name
    functions[T2TViT.forward] = "T2TViT.forward (own code)"
    functions[T2TViT.backward] = "T2TViT.backward (own code)"
    functions[parallel.DataParallel.forward] = "DataParallel.forward (own code)"
    functions[parallel.DataParallel.backward] = "DataParallel.backward (own code)"
    functions[parallel._sum_into] = "summing the pieces' gradients"
    functions[AdamW.step] = "AdamW.step (own code)"
    functions[AdamW._update] = "AdamW._update (per tensor)"
    functions[AdamW._update_flat] = "AdamW._update_flat (own code)"
    functions[AdamW._update_range] = "AdamW._update_range (flat buffers)"
    functions[map_in_threads] = WAITING
    return functions


class OpProfiler:
    """Exclusive time per function while active, summed over the threads that ran it:

        with OpProfiler(sync) as profiler:
            step()                      # timed as total_ms
        profiler.rows(total_ms)         # [{op, calls, ms, pct}], slowest first

    The mechanism is Python's own profiling hook (sys.setprofile, and threading.setprofile
    for the worker threads of t2t_ref.parallel, whose pool is restarted on entry and exit so
    that its threads carry the hook exactly while the profiler is active): the interpreter
    reports every Python function call and return, and the functions of
    _profiled_functions() are recognised by their code objects. Nothing of t2t_ref is
    patched or replaced. Each call's time minus its nested profiled calls' time (in its own
    thread) is its exclusive time. On NumPy the model runs pieces of the batch in threads
    (t2t_ref.parallel), so the ops' times add up to *thread* time: the main thread's wall
    time, less its wait for the worker threads, plus the worker threads' busy time;
    `thread_ms` is that sum and the whole of the % column. With one thread it is the step's
    wall time. sync (CuPy: wait for the GPU) is called at every entry and exit, so the GPU's
    work is counted where it was queued. The hook costs a little time at every Python call,
    profiled or not: the profiled step is slower than a timed one (both are printed).
    """

    def __init__(self, sync=None):
        self.sync = sync
        self.stats = {}  # name -> [calls, exclusive seconds]
        self.threads = set()  # idents of the threads that ran profiled code
        self.thread_ms = None  # set by rows()
        self._local = threading.local()  # .stack: [name, start, nested seconds, frame] per call
        self._lock = threading.Lock()
        self._main = threading.get_ident()
        self._main_wrapped = 0.0  # seconds of the main thread inside outermost profiled calls
        self._names = {}  # code object -> row name

    def _hook(self, frame, event, arg):
        if event == "call":
            name = self._names.get(frame.f_code)
            if name is None:
                return
            stack = getattr(self._local, "stack", None)
            if stack is None:
                stack = self._local.stack = []
            if self.sync is not None:
                self.sync()
            stack.append([name, time.perf_counter(), 0.0, frame])
        elif event == "return":
            stack = getattr(self._local, "stack", None)
            if not stack or stack[-1][3] is not frame:
                return
            if self.sync is not None:
                self.sync()
            name, start, nested, _ = stack.pop()
            elapsed = time.perf_counter() - start
            with self._lock:
                entry = self.stats.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += elapsed - nested
                self.threads.add(threading.get_ident())
                if not stack and threading.get_ident() == self._main:
                    self._main_wrapped += elapsed
            if stack:
                stack[-1][2] += elapsed

    def __enter__(self):
        from .parallel.threads import shutdown_pool
        self._names = {function.__code__: name
                       for function, name in _profiled_functions().items()}
        shutdown_pool()  # the next map's threads start with the hook
        threading.setprofile(self._hook)
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        from .parallel.threads import shutdown_pool
        sys.setprofile(None)
        threading.setprofile(None)
        shutdown_pool()  # and later threads start without it

    def rows(self, total_ms):
        """[{op, calls, ms, pct}] sorted by time, with 'other' = the main thread's time outside
        the profiled code; the wait for the worker threads is left out. Sets self.thread_ms."""
        rows = [{"op": name, "calls": calls, "ms": 1e3 * seconds}
                for name, (calls, seconds) in self.stats.items() if name != WAITING]
        rows.append({"op": "other (bench loop, outside the profiled code)", "calls": 1,
                     "ms": total_ms - 1e3 * self._main_wrapped})
        self.thread_ms = sum(r["ms"] for r in rows)
        for row in rows:
            row["pct"] = 100.0 * row["ms"] / self.thread_ms
        return sorted(rows, key=lambda r: -r["ms"])


def profile_step(side, pause=0.0):
    """Time one step of t2t_ref with every op profiled: (total ms, rows of OpProfiler.rows,
    {"thread_ms", "threads"}). pause: seconds of idling first, as before a timed step."""
    sync = side.sync if side.backend == "cupy" else None
    side.sync()
    time.sleep(pause)
    with OpProfiler(sync) as profiler:
        start = time.perf_counter()
        side.step()
        side.sync()
        total_ms = 1e3 * (time.perf_counter() - start)
    rows = profiler.rows(total_ms)
    return total_ms, rows, {"thread_ms": profiler.thread_ms, "threads": len(profiler.threads)}


# ---- the loader -----------------------------------------------------------------------------

def loader_rate(config, workers, batches=LOADER_BATCHES):
    """Images/s of t2t_ref.data.Loader making training batches of the configuration's size
    and batch with the official recipe's augmentation (random resized crop, flip,
    RandAugment, erasing rectangles) from in-memory synthetic images: one whole epoch of
    `batches` batches (bench_loader.py times JPEG photos, at 224, for 1, 2 and all cores)."""
    from .bench_loader import BATCHES_PER_WORKER, recipe_loader
    from .bench_loader import loader_rate as rate
    from .data import ArrayDataset, make_shapes
    B, S = config.batch, config.img_size
    batches = max(batches, BATCHES_PER_WORKER * workers)  # every worker busy
    dataset = ArrayDataset(*make_shapes(B * batches, S, seed=0)[:2])
    recipe = recipe_loader(dataset, B, S, 0)
    return rate(dataset, B, S, workers, recipe.transform, recipe.erasing)


# ---- the machine ----------------------------------------------------------------------------

def describe_machine(backend, threads, blas):
    torch = _torch()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    torch_blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    machine = {
        "cpu": cpu, "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads, "python": platform.python_version(), "numpy": np.__version__,
        "numpy_blas": ", ".join(f"{b['internal_api']} {b['version']} ({b.get('architecture')},"
                                f" {b['num_threads']} threads)" for b in blas) or "unknown",
        "blas_libraries": [b["filepath"] for b in blas],
        "torch": torch.__version__, "torch_blas": torch_blas[1] if torch_blas else "unknown",
        "torch_threads": torch.get_num_threads(), "backend": backend,
    }
    if backend == "cupy":
        import cupy
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cupy"] = cupy.__version__
        machine["cuda"] = torch.version.cuda
    return machine


# ---- one configuration ----------------------------------------------------------------------

def run_config(config, args, peak_gflops):
    """Everything measured for one configuration, as a dict (see the module docstring)."""
    torch_device = "cpu" if args.backend == "numpy" else "cuda"
    ours = Ours(config, args.backend, precision=args.precision, graphs=args.cuda_graphs)
    theirs = Theirs(config, torch_device, state=ours.model.state_dict(),
                    precision=args.precision)
    parity = check_parity(config, args.backend, args.precision, ours, theirs)
    ours.prepare()
    theirs.prepare()

    flops = count_flops(config.model, config.img_size, config.batch, config.training)
    times = time_interleaved([ours, theirs], make_timer(args.backend), args.warmup, args.repeats,
                             args.pause)
    result = {"config": config.name, **asdict(config), "flops": flops, **parity,
              "precision": args.precision, "cuda_graphs": args.cuda_graphs,
              "parity_tolerance": PARITY_TOLERANCE,
              "anchor_ms": ANCHOR_MS.get(config.name),
              "ours": summarize(times["t2t_ref"], flops, config.batch, peak_gflops),
              "torch": summarize(times["PyTorch"], flops, config.batch, peak_gflops)}
    result["ratio"] = result["ours"]["ms"] / result["torch"]["ms"]
    # --quick's batches of 4 are a smoke test: Python's fixed cost per call sets their time, and
    # the speed targets are for the real configurations
    result["target_ratio"] = None if config in QUICK else TARGET_RATIO[args.backend][config.mode]

    result["profile_ms"], result["profile"], threads = profile_step(ours, args.pause)
    result["profile_thread_ms"], result["profile_threads"] = threads["thread_ms"], \
        threads["threads"]
    del ours, theirs
    gc.collect()

    memory = {side: measure_memory(config, args.backend, args.threads, side,
                                   precision=args.precision)
              for side in ("ours", "torch")}
    result["memory"] = memory
    ok = all("peak_mb" in m for m in memory.values())
    result["memory_ratio"] = (memory["ours"]["peak_mb"] / memory["torch"]["peak_mb"]
                              if ok and memory["torch"]["peak_mb"] > 0 else None)
    result["target_memory_ratio"] = TARGET_MEMORY_RATIO if config.training else None
    result["loader_images_per_s"] = loader_rate(config, args.workers, args.loader_batches)
    result["loader_workers"] = args.workers
    return result


def check_parity(config, backend, precision, ours, theirs):
    """The same model on both sides: logits and (training) every gradient, in float32. Under
    half precision also each side against its own float32: t2t_ref's policy is held to
    HALF_TOLERANCE, torch.autocast's figures are reported beside. -> the result's fields."""
    half = precision != "float32"
    # float32 on our side: the half model itself, or a float32 twin with its weights
    ours32 = ours
    if half:
        ours32 = Ours(config, backend, precision="float32")
        ours32.model.load_state_dict(ours.model.state_dict())
    training = config.training
    ours_float32 = ours32.eval_logits(), ours32.eval_grads() if training else None
    theirs_float32 = (theirs.eval_logits(half=False),
                      theirs.eval_grads(half=False) if training else None)
    parity = dict(zip(("logits_rel_diff", "grads_rel_diff", "grads_worst"),
                      _differences(ours_float32[0], theirs_float32[0],
                                   ours_float32[1], theirs_float32[1])))
    if half:
        scale = HALF_GRAD_SCALE[precision]
        ours_half = ours.eval_logits(), ours.eval_grads(scale) if training else None
        theirs_half = theirs.eval_logits(), theirs.eval_grads(scale) if training else None
        parity["half"] = {
            side: dict(zip(("logits", "grads", "worst"),
                           _differences(got[0], float32[0], got[1], float32[1])))
            for side, got, float32 in (("t2t_ref", ours_half, ours_float32),
                                       ("torch", theirs_half, theirs_float32))}
        parity["half_tolerance"] = HALF_TOLERANCE[precision]
    return parity


def _differences(logits_a, logits_b, grads_a=None, grads_b=None):
    """(logits' relative difference, the largest gradient's, the name of that gradient)."""
    if grads_a is None:
        return _rel_diff(logits_a, logits_b), None, None
    missing = sorted(set(grads_a) ^ set(grads_b))
    if missing:
        raise BenchError(f"gradients of {missing[:5]} on one side only")
    diffs = {k: _rel_diff(grads_a[k], grads_b[k]) for k in grads_a}
    worst = max(diffs, key=lambda k: np.nan_to_num(diffs[k], nan=np.inf))
    return _rel_diff(logits_a, logits_b), diffs[worst], worst


# ---- printing -------------------------------------------------------------------------------

def _rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-30))


def failures(result, backend):
    """What a configuration failed: parity always; on the GPU also the speed and memory
    targets (the GPU mode is the check the device script runs). [] when all is well."""
    failed = []
    tol = result["parity_tolerance"]
    if not result["logits_rel_diff"] <= tol:
        failed.append(f"logits differ from PyTorch's by {result['logits_rel_diff']:.1e} > {tol}")
    if result["grads_rel_diff"] is not None and not result["grads_rel_diff"] <= tol:
        failed.append(f"gradient {result['grads_worst']} differs from PyTorch's by "
                      f"{result['grads_rel_diff']:.1e} > {tol}")
    if "half" in result:  # t2t_ref's policy against its own float32
        ours, (logits_tol, grads_tol) = result["half"]["t2t_ref"], result["half_tolerance"]
        if not ours["logits"] <= logits_tol:
            failed.append(f"{result['precision']} logits differ from float32's by "
                          f"{ours['logits']:.1e} > {logits_tol}")
        if ours["grads"] is not None and not ours["grads"] <= grads_tol:
            failed.append(f"{result['precision']} gradient {ours['worst']} differs from "
                          f"float32's by {ours['grads']:.1e} > {grads_tol}")
    if backend == "cupy":
        if result["target_ratio"] is not None and not result["ratio"] <= result["target_ratio"]:
            failed.append(f"{result['ratio']:.2f}x PyTorch's time > {result['target_ratio']}x")
        target, ratio = result["target_memory_ratio"], result["memory_ratio"]
        if target is not None and ratio is not None and not ratio <= target:
            failed.append(f"{ratio:.2f}x PyTorch's peak memory > {target}x")
    return failed


def _verdict(value, target):
    if value is None or target is None:
        return ""
    return f"(target <= {target:.2f}x: {'met' if value <= target else 'MISSED'})"


PROFILE_MIN_PCT = 0.5  # the printed breakdown lists the ops above this; the JSON has all


def print_result(r):
    ours, torch_ = r["ours"], r["torch"]
    config = Config(r["model"], r["img_size"], r["batch"], r["mode"])
    row = "   {:<24}{:>16}{:>16}   {}".format
    print(f"\n== {r['config']}: {config.describe()}")
    grads = (f", every gradient to {r['grads_rel_diff']:.1e} (worst {r['grads_worst']})"
             if r.get("grads_rel_diff") is not None else "")
    print(f"   same model: eval logits agree to {r['logits_rel_diff']:.1e} (relative){grads}; "
          f"{r['flops'] / 1e9:.2f} GFLOP per step (matmuls, from the shapes)")
    if "half" in r:
        def against_float32(h):
            grads = (f", gradients {h['grads']:.1e} (worst {h['worst']})"
                     if h["grads"] is not None else "")
            return f"logits {h['logits']:.1e}{grads}"
        print(f"   {r['precision']} against float32 (each side's own): t2t_ref "
              f"{against_float32(r['half']['t2t_ref'])} (at most "
              f"{r['half_tolerance'][0]:g} / {r['half_tolerance'][1]:g}); torch.autocast "
              f"{against_float32(r['half']['torch'])}")
    print(row("", "t2t_ref", "PyTorch", ""))
    print(row("ms per step (median)", f"{ours['ms']:.1f}", f"{torch_['ms']:.1f}",
              f"ratio {r['ratio']:.2f}x " + (_verdict(r["ratio"], r["target_ratio"])
                                            if r["target_ratio"] is not None
                                            else "(--quick: a smoke test, no target)")))
    print(row("  min .. max", f"{ours['min_ms']:.1f}..{ours['max_ms']:.1f}",
              f"{torch_['min_ms']:.1f}..{torch_['max_ms']:.1f}",
              f"{len(ours['times_ms'])} interleaved runs each"
              + (f"; issue's anchor {r['anchor_ms']:.0f} ms" if r.get("anchor_ms") else "")))
    print(row("images/s", f"{ours['images_per_s']:.1f}", f"{torch_['images_per_s']:.1f}", ""))
    print(row("GFLOP/s (% of peak)", f"{ours['gflops']:.1f} ({ours['peak_pct']:.0f}%)",
              f"{torch_['gflops']:.1f} ({torch_['peak_pct']:.0f}%)", ""))
    mem = r["memory"]
    cells = [f"{m['peak_mb']:.1f}" if "peak_mb" in m else "n/a"
             for m in (mem["ours"], mem["torch"])]
    ratio = (f"ratio {r['memory_ratio']:.2f}x "
             f"{_verdict(r['memory_ratio'], r['target_memory_ratio'])}"
             if r["memory_ratio"] is not None else "")
    print(row("peak memory (MB)", *cells, ratio))
    if "tracemalloc_peak_mb" in mem["ours"]:
        print(row("", "", "", f"t2t_ref's tracemalloc peak "
                              f"{mem['ours']['tracemalloc_peak_mb']:.1f} MB"))
    for m in mem.values():
        if "error" in m:
            print(row("", "", "", f"{m['side']}: memory run failed: {m['error']}"))
    slower = "loader" if r["loader_images_per_s"] < ours["images_per_s"] else "model"
    print(row("loader images/s", f"{r['loader_images_per_s']:.1f}", "",
              f"{r['loader_workers']} workers, vs t2t_ref's {ours['images_per_s']:.1f}: "
              f"the {slower} is the slower"))
    threads = r["profile_threads"]
    print(f"   where t2t_ref's time goes: exclusive time per function in one profiled step "
          f"({r['profile_ms']:.1f} ms; timed median {ours['ms']:.1f} ms)"
          + (f",\n   summed over the threads that ran it (the main thread and the model's "
             f"worker threads: {r['profile_thread_ms']:.1f} thread-ms in all, the % column's whole)"
             if threads > 1 else "")
          + ("\n   (--cuda-graphs: t2t_ref's forward and backward replay a CUDA graph, which the "
             "profile does not see inside; what runs outside it is listed)"
             if r.get("cuda_graphs") else ""))
    print(f"   {'op':<46}{'calls':>6}{'thread-ms' if threads > 1 else 'ms/step':>10}{'%':>7}")
    shown = [p for p in r["profile"] if p["pct"] >= PROFILE_MIN_PCT]
    rest = [p for p in r["profile"] if p["pct"] < PROFILE_MIN_PCT]
    for p in shown:
        print(f"   {p['op']:<46}{p['calls']:>6}{p['ms']:>10.2f}{p['pct']:>7.1f}")
    if rest:
        print(f"   {f'({len(rest)} more, each < {PROFILE_MIN_PCT}%)':<46}"
              f"{sum(p['calls'] for p in rest):>6}{sum(p['ms'] for p in rest):>10.2f}"
              f"{sum(p['pct'] for p in rest):>7.1f}")


def print_markdown(machine, peak, results, pause):
    gpu = f", GPU {machine['gpu']} (CuPy {machine['cupy']}, CUDA {machine['cuda']})" \
        if "gpu" in machine else ""
    print(f"\n### {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads"
          f"{gpu}\n")
    print(f"NumPy {machine['numpy']} ({machine['numpy_blas']}), PyTorch {machine['torch']} "
          f"(BLAS {machine['torch_blas']}), Python {machine['python']}, backend "
          f"{machine['backend']}, float32. Float32 matmul rate ({peak['n']}^3): "
          f"{peak['library']} {peak['gflops']:.0f} GFLOP/s (the peak), torch "
          f"{peak['torch_gflops']:.0f} GFLOP/s.\n")
    print("| configuration | t2t_ref ms | PyTorch ms | ratio (target) | t2t_ref img/s | "
          "PyTorch img/s | loader img/s | GFLOP/s t2t_ref / PyTorch (% of peak) | "
          "peak MB t2t_ref / PyTorch (ratio) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        o, t = r["ours"], r["torch"]
        mem = r["memory"]
        if r["memory_ratio"] is not None:
            memory = (f"{mem['ours']['peak_mb']:.0f} / {mem['torch']['peak_mb']:.0f} "
                      f"({r['memory_ratio']:.2f}x)")
        else:
            memory = "n/a"
        target = "" if r["target_ratio"] is None else f" (<= {r['target_ratio']:.2f})"
        print(f"| {r['config']} | {o['ms']:.1f} | {t['ms']:.1f} | {r['ratio']:.2f}x"
              f"{target} | {o['images_per_s']:.1f} | "
              f"{t['images_per_s']:.1f} | {r['loader_images_per_s']:.0f} | "
              f"{o['gflops']:.1f} / {t['gflops']:.1f} ({o['peak_pct']:.0f}% / "
              f"{t['peak_pct']:.0f}%) | {memory} |")
    timing = "CUDA events" if machine["backend"] == "cupy" else "wall clock"
    memory = ("peak bytes in use (CuPy's pool at every allocation, torch.cuda)"
              if machine["backend"] == "cupy" else "growth of the peak resident set")
    print(f"\nMedian of {len(results[0]['ours']['times_ms'])} interleaved runs ({timing}) "
          "after warm-up" + (f", {pause:g} s pause before each" if pause else "")
          + f"; peak memory: {memory} over one warm-up + one measured step, each side in its "
          "own process. `python -m t2t_ref.bench --markdown`.")


# ---- the command line -----------------------------------------------------------------------

def check_json_path(path):
    """Refuse a --json PATH that cannot be written (empty, a folder, under a missing folder or
    a file, in a folder that cannot be written) now, before any timing, rather than after the
    whole run: BenchError. Creates nothing: the folder is probed with a temporary file."""
    if not path.strip():
        raise BenchError("--json is empty: give a file path, e.g. --json bench.json")
    full = os.path.abspath(path)
    if os.path.isdir(full) or path.endswith(("/", os.sep)):
        raise BenchError(f"--json {path} is a folder: give a file path, e.g. --json "
                         f"{os.path.join(path, 'bench.json')}")
    problem = file_path_problem(full)
    if problem is not None:
        raise BenchError(f"--json {path}: {problem}, or give another path")


def write_json(path, report):
    """Write report to path atomically (the old file stays whole if this fails); 0, or after
    an OSError (disk full, the folder gone or made read-only meanwhile) one line and 2. The
    numbers are printed already."""
    try:
        write_atomic(path, json.dumps(report, indent=2))
    except OSError as err:
        return user_error(f"cannot write --json {path} ({err.strerror or err}): the results "
                          "are printed above; free space (or fix what the error names) and "
                          "run again")
    print(f"\nwrote {path}")
    return 0


def main(argv=None):
    keep_freed_memory()  # reuse freed arrays' memory: see backend.keep_freed_memory
    parser = argparse.ArgumentParser(prog="python -m t2t_ref.bench", description=__doc__,
                                     formatter_class=HelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--config", action="append", metavar="NAME",
                       help="a configuration MODEL-SIZE-bBATCH-(train|infer), e.g. "
                            "t2t_vit_7-224-b16-train; repeatable")
    which.add_argument("--all", action="store_true",
                       help="the four standard configurations: "
                            + ", ".join(c.name for c in STANDARD) + " (the default)")
    which.add_argument("--quick", action="store_true",
                       help="tiny configurations (" + ", ".join(c.name for c in QUICK)
                            + ") and a smaller matmul and loader run: a smoke test")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                        help="numpy: against PyTorch on the CPU; cupy: against PyTorch CUDA")
    parser.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                        help="bf16 or fp16: t2t_ref's precision policy (precision.py) against "
                        "PyTorch under torch.autocast (fp16: both with a loss scale)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="cupy: t2t_ref's steps replay a CUDA graph of the forward and "
                        "backward (as train runs them; inference: of the forward); PyTorch "
                        "stays eager (default: on with --backend cupy, as in train; "
                        "--no-cuda-graphs times eager steps)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for both sides (NumPy's BLAS and PyTorch)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS,
                        help=f"timed steps of each side (at least {MIN_REPEATS})")
    parser.add_argument("--warmup", type=int, default=MIN_WARMUP,
                        help=f"untimed steps of each side first (at least {MIN_WARMUP})")
    parser.add_argument("--pause", type=float, default=None, metavar="SECONDS",
                        help="idle time before each timed step, so that the other library's "
                             "idle threads have stopped spinning (default: 0.15 with numpy "
                             "and more than one thread, else 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader worker processes, 0 for loading in the training process "
                        "(default: the cores less one; with --loader: 1, 2 and all cores, "
                        "each measured)")
    parser.add_argument("--loader", action="store_true",
                        help="only the loader: images/s at 224 with the official recipe's "
                        "augmentation from JPEG photos, for 1, 2 and all cores' workers, or "
                        "for --workers alone where it is given (t2t_ref/bench_loader.py)")
    parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    parser.add_argument("--markdown", action="store_true",
                        help="also print a Markdown table for BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.json is not None:  # before any timing: a bad path would lose the whole run
        try:
            check_json_path(args.json)
        except BenchError as err:
            return user_error(err)
    if args.loader:
        if args.workers is not None and args.workers < 0:
            return user_error(f"--workers {args.workers}: give 0 (loading in the training "
                              "process) or more worker processes")
        from . import bench_loader
        result = bench_loader.run(batches=3 if args.quick else 6, worker_counts=(
            None if args.workers is None else [args.workers]))
        return write_json(args.json, result) if args.json is not None else 0
    if args.workers is None:
        from .data import default_workers
        args.workers = default_workers()
    if args.repeats < MIN_REPEATS:
        return user_error(f"--repeats {args.repeats}: at least {MIN_REPEATS} timed runs")
    if args.warmup < MIN_WARMUP:
        return user_error(f"--warmup {args.warmup}: at least {MIN_WARMUP} warm-up steps")
    if args.threads < 1 or args.workers < 0 or (args.pause or 0.0) < 0.0:
        return user_error("--threads must be >= 1, --workers and --pause >= 0")
    args.cuda_graphs = graphs.wanted(args.cuda_graphs, args.backend)  # as train runs them
    if args.cuda_graphs and args.backend != "cupy":
        return user_error(NEEDS_CUPY)
    if args.pause is None:
        args.pause = 0.15 if args.backend == "numpy" and args.threads > 1 else 0.0
    try:
        configs = (QUICK if args.quick else
                   [parse_config(n) for n in args.config] if args.config else STANDARD)
    except ValueError as err:
        return user_error(err)
    args.loader_batches = 6 if args.quick else LOADER_BATCHES
    try:
        return run(args, configs)
    except BenchError as err:
        return user_error(err)
    finally:
        restore_threads()


def run(args, configs):
    torch = _torch()
    load_oracle()
    if args.backend == "cupy":
        os.environ["CUPY_TF32"] = "0"  # read when CuPy is imported (next line); children too
        from .backend import BackendError, get_namespace
        try:
            get_namespace("cupy")
        except BackendError as err:
            raise BenchError(err) from None
        if not torch.cuda.is_available():
            raise BenchError("--backend cupy compares with PyTorch CUDA, but this PyTorch "
                             "has no CUDA device: install a CUDA build of torch")
        torch.backends.cuda.matmul.allow_tf32 = False  # full float32 on both sides
        torch.backends.cudnn.allow_tf32 = False
    if args.precision != "float32":  # one line for a precision this backend or GPU cannot run
        from .backend import get_namespace
        from .precision import PrecisionError, compute_dtype
        xp, _ = get_namespace(args.backend)
        try:
            compute_dtype(xp, args.precision, xp.float32)
        except PrecisionError as err:
            raise BenchError(err) from None
    blas = limit_threads(args.threads)  # torch is imported: its threads too
    machine = describe_machine(args.backend, args.threads, blas)
    device = "cpu" if args.backend == "numpy" else "cuda"
    n = QUICK_MATMUL_SIZE if args.quick else MATMUL_SIZE[args.backend]
    # the machine's rate: the backend's own matmul (torch's beside it, for the record)
    peak = {"n": n, "library": args.backend, "gflops": matmul_rate(args.backend, n),
            "torch_gflops": torch_matmul_rate(device, n)}
    peak_gflops = peak["gflops"]
    precision = "float32" if args.precision == "float32" else \
        f"{args.precision} (t2t_ref's policy against torch.autocast)"
    print(f"t2t_ref vs PyTorch {torch.__version__} eager, backend {args.backend}, {precision}, "
          f"{args.threads} threads; {machine['cpu']}, {machine['cores']} cores"
          + (f"; GPU {machine['gpu']}" if "gpu" in machine else ""))
    print(f"NumPy {machine['numpy']} BLAS: {machine['numpy_blas']}; torch BLAS: "
          f"{machine['torch_blas']}")
    print(f"float32 matmul rate ({n}^3, median of 5): {args.backend} {peak_gflops:.1f} "
          f"GFLOP/s (the peak below), torch {peak['torch_gflops']:.1f} GFLOP/s")
    print(f"{args.warmup} warm-up + {args.repeats} timed steps of each side, interleaved"
          + (f", {args.pause:g} s pause before each timed step" if args.pause else ""))
    results, failed = [], []
    for config in configs:
        result = run_config(config, args, peak_gflops)
        print_result(result)
        results.append(result)
        failed += [f"{config.name}: {f}" for f in failures(result, args.backend)]
    if args.markdown:
        print_markdown(machine, peak, results, args.pause)
    written = 0
    if args.json is not None:
        report = {"machine": machine, "matmul": peak, "peak_gflops": peak_gflops,
                  "repeats": args.repeats, "warmup": args.warmup, "results": results}
        written = write_json(args.json, report)
    if failed:
        print("\nFAILED: " + "; ".join(failed), file=sys.stderr)
        return written or 1
    return written


if __name__ == "__main__":
    sys.exit(run_cli(main))
