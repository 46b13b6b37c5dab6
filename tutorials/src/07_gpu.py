# %% [markdown]
# # 7. On the GPU
#
# Every op in `t2t_ref` takes its array namespace from its inputs (`xp = array_namespace(x)`)
# and uses only the array API standard's functions, so the same code runs on NumPy and, with
# `backend="cupy"`, on an NVIDIA GPU. This notebook shows what changes on a device and what
# doesn't:
#
# 1. arrays live on a device, and moving them between host and device is explicit;
# 2. GPU work is **asynchronous**: timing it needs a synchronisation;
# 3. CuPy keeps freed memory in a **pool**, so "used" and "reserved" memory differ;
# 4. a training step is the very same code.
#
# Cells that need a GPU say so and skip where there is none (CuPy not installed, or no CUDA
# device). The host/device ideas are shown first on the CPU with `array_api_strict`, the
# backend the tests use: it puts arrays on a second, fake device, which catches the same
# mistakes a GPU would.
#
# To run the GPU cells: a machine with an NVIDIA GPU and CuPy for its CUDA version
# (`pip install -e ".[cuda12]"` or `".[cuda13]"`, as `nvidia-smi` shows; README, "On a GPU").

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import t2t_ref
from t2t_ref.backend import BackendError, get_namespace, to_device, to_numpy
from t2t_ref.optim import AdamW

plt.rcParams.update({"figure.dpi": 80})
rng = np.random.default_rng(0)

try:
    xp_gpu, gpu = get_namespace("cupy")
    import cupy
    GPU = True
    gpu_name = cupy.cuda.runtime.getDeviceProperties(gpu.id)["name"]
    print("GPU:", gpu_name.decode() if isinstance(gpu_name, bytes) else gpu_name, "| CuPy", cupy.__version__)
except BackendError as err:
    GPU = False
    print(f"No GPU here, so the cells marked 'needs a GPU' skip.\n  ({err})")

# %% [markdown]
# ## Host and device, shown on the CPU
# `get_namespace(name)` returns the namespace and the device of a backend. `to_device` moves a
# host (NumPy) array there; `to_numpy` brings an array back. With `array_api_strict` the device
# is a fake second device, so a model on it computes with arrays that live "elsewhere":

# %%
xs, device1 = get_namespace("array_api_strict")
host = rng.random((2, 3, 64, 64), dtype=np.float32)                 # (B, 3, S, S) on the host
x_device = to_device(host, xs, device1)                             # an explicit host -> device copy
print("host array:", type(host).__name__, "| device array:", type(x_device).__name__, "on", x_device.device)

model_device = t2t_ref.create_model("t2t_vit_7", num_classes=10, img_size=64, backend="array_api_strict", seed=0)
model_host = t2t_ref.create_model("t2t_vit_7", num_classes=10, img_size=64, seed=0)
logits_device = model_device.forward(x_device)                       # stays on the device
logits_back = to_numpy(logits_device)                               # an explicit device -> host copy
difference = np.max(np.abs(logits_back - model_host.forward(host)))
print("logits on", logits_device.device, f"| largest difference from NumPy's: {difference:.1e}")
assert difference < 1e-5, "the device model must compute what the host model computes"

# %% [markdown]
# The same seed gives the same weights on every backend: they are drawn on the host with NumPy
# and moved to the device once. What is *not* allowed is mixing: a host array given to a
# device model, or two arrays on different devices in one operation. On a GPU these mistakes
# either fail or, worse, make a silent host round trip every step; on `array_api_strict` they
# fail loudly, which is why the tests run on it:

# %%
for what, attempt in (("host array into a device model", lambda: model_device.forward(host)),
                      ("device array + host array", lambda: x_device + xs.asarray(host))):
    try:
        attempt()
    except ValueError as err:
        print(f"{what}: ValueError: {err}")
    else:
        raise AssertionError(f"{what} was allowed: array_api_strict should have refused it")

# %% [markdown]
# ## The same model on the GPU *(needs a GPU)*
# Identical code with `backend="cupy"`. The weights are the same numbers as on the CPU, so the
# logits agree to float32 round-off.

# %%
if not GPU:
    print("skipped: needs a CUDA GPU and CuPy (README, 'On a GPU')")
else:
    model_gpu = t2t_ref.create_model("t2t_vit_7", num_classes=10, img_size=64, backend="cupy", seed=0)
    x_gpu = to_device(host, xp_gpu, gpu)                              # host -> GPU
    logits_gpu = model_gpu.forward(x_gpu)                             # runs on the GPU
    difference = np.max(np.abs(to_numpy(logits_gpu) - model_host.forward(host)))
    print(type(logits_gpu).__module__, logits_gpu.shape, f"| largest difference from NumPy's: {difference:.1e}")
    assert difference < 1e-4, "CuPy must compute what NumPy computes, to float32 round-off"

# %% [markdown]
# ## Timing asynchronous work *(needs a GPU)*
# A CuPy call returns as soon as its kernel is *queued*; the GPU runs it later. A timer around
# `model.forward` therefore measures how fast Python queues kernels, not how long the GPU
# computes. Two correct ways: wait for the GPU (`cupy.cuda.Device().synchronize()`) before
# reading the clock each time, or record CUDA events on the stream and ask for the time between
# them. (NumPy is synchronous: there, a plain timer is right.) Also, the first call of anything
# compiles and caches kernels: warm up first.

# %%
def step_gpu(model, x, labels):
    """One forward + loss + backward on the GPU (nothing copied back)."""
    loss, dlogits = t2t_ref.cross_entropy(model.forward(x), labels, smoothing=0.1)
    model.backward(dlogits)
    return loss


if not GPU:
    print("skipped: needs a CUDA GPU and CuPy")
else:
    model224 = t2t_ref.create_model("t2t_vit_7", num_classes=1000, img_size=224, backend="cupy", seed=0).train()
    batch = 32
    x224 = to_device(rng.random((batch, 3, 224, 224), dtype=np.float32), xp_gpu, gpu)
    labels224 = to_device(rng.integers(0, 1000, batch), xp_gpu, gpu)
    for _ in range(3):                                                # warm-up: kernel compilation, pool
        step_gpu(model224, x224, labels224)
    gpu.synchronize()

    started = time.perf_counter()
    step_gpu(model224, x224, labels224)
    no_sync = time.perf_counter() - started                           # only the queueing
    gpu.synchronize()

    started = time.perf_counter()
    step_gpu(model224, x224, labels224)
    gpu.synchronize()                                                 # wait for the GPU
    with_sync = time.perf_counter() - started

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    step_gpu(model224, x224, labels224)
    stop.record()
    stop.synchronize()
    events = cupy.cuda.get_elapsed_time(start, stop) / 1e3            # milliseconds -> seconds
    print(f"batch {batch} at 224, forward + backward: timer without sync {no_sync * 1e3:.1f} ms (wrong), "
          f"with sync {with_sync * 1e3:.1f} ms, CUDA events {events * 1e3:.1f} ms "
          f"-> {batch / with_sync:.0f} images/s")

# %% [markdown]
# For comparison, the same step on this machine's CPU with NumPy (a plain timer is right here),
# on a batch of 2 to keep it short:

# %%
model_cpu224 = t2t_ref.create_model("t2t_vit_7", num_classes=1000, img_size=224, seed=0).train()
x_cpu = rng.random((2, 3, 224, 224), dtype=np.float32)
labels_cpu = rng.integers(0, 1000, 2)
started = time.perf_counter()
loss, dlogits = t2t_ref.cross_entropy(model_cpu224.forward(x_cpu), labels_cpu, smoothing=0.1)
model_cpu224.backward(dlogits)
cpu_seconds = time.perf_counter() - started
print(f"CPU, NumPy: batch 2 at 224, forward + backward {cpu_seconds * 1e3:.0f} ms -> {2 / cpu_seconds:.1f} images/s")

# %% [markdown]
# ## Throughput against batch size *(needs a GPU)*
# Small batches leave most of a GPU idle: throughput grows with the batch until the GPU is
# busy, then flattens; memory grows linearly (activations kept for the backward).

# %%
if not GPU:
    print("skipped: needs a CUDA GPU and CuPy")
else:
    pool = cupy.get_default_memory_pool()
    batches, throughput, peak_gib = [1, 2, 4, 8, 16, 32, 64], [], []
    for b in batches:
        xb = to_device(rng.random((b, 3, 224, 224), dtype=np.float32), xp_gpu, gpu)
        lb = to_device(rng.integers(0, 1000, b), xp_gpu, gpu)
        step_gpu(model224, xb, lb)                                    # warm-up for this shape
        gpu.synchronize()
        pool.free_all_blocks()
        started = time.perf_counter()
        for _ in range(3):
            step_gpu(model224, xb, lb)
        gpu.synchronize()
        throughput.append(3 * b / (time.perf_counter() - started))
        peak_gib.append(pool.total_bytes() / 2**30)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4))
    ax_t.plot(batches, throughput, "o-")
    ax_t.set(xscale="log", xlabel="batch size", ylabel="images / s (forward + backward)",
             title="T2T-ViT-7 at 224 on the GPU")
    ax_m.plot(batches, peak_gib, "o-")
    ax_m.set(xscale="log", xlabel="batch size", ylabel="GiB reserved by CuPy's pool", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.show()
    print("Takeaway: throughput rises with the batch until the GPU is saturated; memory grows "
          "linearly with it.")

# %% [markdown]
# (Where the cell ran, its last line is the figure's takeaway: throughput rises with the batch
# until the GPU is saturated, and the pool's memory grows linearly with the batch.)
#
# ## The memory pool *(needs a GPU)*
# CuPy does not return freed GPU memory to the driver: it keeps the blocks in a pool and reuses
# them, because `cudaMalloc` is slow. `used_bytes()` is what live arrays occupy, `total_bytes()`
# what the pool holds; `nvidia-smi` shows the latter. A forward keeps its cache (the activations)
# alive until the backward releases it:

# %%
if not GPU:
    print("skipped: needs a CUDA GPU and CuPy")
else:
    pool = cupy.get_default_memory_pool()
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    x32 = to_device(rng.random((32, 3, 224, 224), dtype=np.float32), xp_gpu, gpu)
    l32 = to_device(rng.integers(0, 1000, 32), xp_gpu, gpu)
    model224.grads = {}
    pool.free_all_blocks()
    print("before forward:     used", gib(pool.used_bytes()), "| pool", gib(pool.total_bytes()))
    loss, dlogits = t2t_ref.cross_entropy(model224.forward(x32), l32, smoothing=0.1)
    gpu.synchronize()
    print("after forward:      used", gib(pool.used_bytes()), "| pool", gib(pool.total_bytes()),
          "(the cache holds the activations)")
    model224.backward(dlogits)
    gpu.synchronize()
    print("after backward:     used", gib(pool.used_bytes()), "| pool", gib(pool.total_bytes()),
          "(cache released; the gradients' flat buffer kept, reused by every backward)")
    del loss, dlogits
    pool.free_all_blocks()
    print("free_all_blocks():  used", gib(pool.used_bytes()), "| pool", gib(pool.total_bytes()))

# %% [markdown]
# ## A training step on the GPU *(needs a GPU)*
# The loop of notebook 6, unchanged, except that each batch is moved to the device once, and the
# loss is read back (`float(loss)`, one small device -> host copy, which also synchronises) only
# every few steps. The optimizer's state lives on the GPU with the parameters.

# %%
if not GPU:
    print("skipped: needs a CUDA GPU and CuPy")
else:
    from t2t_ref.data import IMAGENET_MEAN, IMAGENET_STD, make_shapes

    images, labels, names = make_shapes(64 * 20, 32, seed=0, num_classes=4)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    inputs = (images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std
    model = t2t_ref.create_model("t2t_vit_7", num_classes=4, img_size=32, backend="cupy", seed=0).train()
    optimizer = AdamW(model.params, weight_decay=0.05)
    started = time.perf_counter()
    for step in range(20):
        x = to_device(inputs[step * 64:(step + 1) * 64], xp_gpu, gpu)   # host -> device, once per batch
        y = to_device(labels[step * 64:(step + 1) * 64], xp_gpu, gpu)
        loss, dlogits = t2t_ref.cross_entropy(model.forward(x), y, smoothing=0.1)
        model.backward(dlogits)
        optimizer.step(model.params, model.grads, 5e-4)
        if (step + 1) % 5 == 0:
            print(f"step {step + 1}: loss {float(loss):.4f}")               # device -> host, and a sync
    print(f"20 steps of 64 images in {time.perf_counter() - started:.2f} s")

# %% [markdown]
# ## Fused kernels *(needs a GPU)*
# On CuPy every array operation is one kernel launch and one trip of its operands through the
# GPU's memory. LayerNorm's plain forward (`t2t_ref/ops/layernorm.py`, the version these
# tutorials derive) is eight such operations; on CuPy the same op calls
# `t2t_ref/cupy_kernels.py`, where one CUDA kernel does the whole row (one warp per row, its
# sums by warp shuffles). `cupy_kernels.plain_ops()` switches back to the plain code, which is
# how the tests compare the two:

# %%
if not GPU:
    print("skipped: needs a CUDA GPU and CuPy")
else:
    from t2t_ref import cupy_kernels
    from t2t_ref.ops.layernorm import layernorm_forward

    rows = to_device(rng.standard_normal((64, 197, 384), dtype=np.float32), xp_gpu, gpu)
    w = to_device(np.ones(384, np.float32), xp_gpu, gpu)
    b = to_device(np.zeros(384, np.float32), xp_gpu, gpu)

    def ms_per_call(fn, repeats=20):
        fn()
        gpu.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        gpu.synchronize()
        return 1e3 * (time.perf_counter() - start) / repeats

    fused_ms = ms_per_call(lambda: layernorm_forward(rows, w, b))
    fused = layernorm_forward(rows, w, b)[0]
    with cupy_kernels.plain_ops():
        plain_ms = ms_per_call(lambda: layernorm_forward(rows, w, b))
        plain = layernorm_forward(rows, w, b)[0]
    difference = float(xp_gpu.max(xp_gpu.abs(fused - plain)))
    print(f"LayerNorm of (64, 197, 384): plain {plain_ms:.3f} ms, fused {fused_ms:.3f} ms; "
          f"largest difference {difference:.1e}")
    assert difference < 1e-5, "the fused kernel must compute what the plain op computes"

# %% [markdown]
# ## Record once, replay: CUDA graphs
# Each array operation costs CuPy 5-15 us of Python and driver time, whatever its size. A
# T2T-ViT-7 forward and backward is a few thousand of them, so at 32x32 the GPU waits for
# Python. A **CUDA graph** records the kernels one call of a function queues, with their
# arguments and the addresses of their arrays, and replays them all with one launch: the Python
# runs once. What that means for the code is easiest to see with a toy recorder on the CPU:
# it keeps each operation with its arguments, and a replay calls them again, as a GPU would,
# without running the Python that made them.

# %%
class Tape:
    """A toy recording: (function, arguments, output array) per operation."""

    def __init__(self):
        self.ops = []

    def op(self, fn, *args):
        out = fn(*args)
        self.ops.append((fn, args, out))
        return out

    def replay(self):  # the same functions, the same arguments, into the same arrays
        for fn, args, out in self.ops:
            out[...] = fn(*args)


def sgd_step(tape, w, grad, lr):  # w <- w - lr * grad, recorded
    update = tape.op(np.multiply, grad, lr)
    tape.op(np.subtract, w, update)
    w[...] = tape.ops[-1][2]       # (this in-place write is Python: a replay skips it)


for how in ("a Python number", "a device array"):
    w, grad = np.ones(3), np.full(3, 0.5)
    lr_array = np.array(0.1)
    tape = Tape()
    sgd_step(tape, w, grad, 0.1 if how == "a Python number" else lr_array)  # recorded, lr 0.1
    lr_array[...] = 0.01                                    # the schedule lowers lr...
    tape.replay()                                           # ...and the step is replayed
    print(f"lr as {how}: the replayed update is {tape.ops[0][2][0]:.3f} per element")
    assert np.isclose(tape.ops[0][2][0], 0.05 if how == "a Python number" else 0.005)

# %% [markdown]
# A Python number is baked into the recording: the replay still steps with lr 0.1. Whatever
# changes from step to step must reach the graph through an array it reads where it lies and
# that is overwritten in place: the batch, the labels, the dropout seed (`gaps.seed_array`),
# the fp16 loss scale. That is how `t2t_ref/graphs.py` records a training step's forward and
# backward (`--cuda-graphs`, on by default with `--backend cupy`); the optimizer, whose
# learning rate and step count change, stays outside it. On an H200 a replayed T2T-ViT-7
# training step at 32x32, batch 64, took 3.1 ms against 24 ms eagerly, and the default
# 3-epoch training run 14.6 s against 73 s. The tests replay a whole recorded step on `array_api_strict` in the same
# way (`tests/graph_sim.py`) and check that replayed steps train bit for bit as eager ones.
#
# Not every call can be recorded, either. CuPy refuses any host-to-device copy while a stream
# captures, and its cuBLAS wrappers too (the products could be captured, but CuPy does not
# allow it yet). So while a graph records, t2t_ref calls cuBLAS itself through ctypes, and
# copies the gradients into their flat buffer one by one: CuPy's one-kernel concatenation
# of many arrays first uploads their addresses from the host (`t2t_ref/capture.py`).

# %%
if not GPU:
    print("skipped: needs a CUDA GPU and CuPy")
else:
    from t2t_ref.graphs import CupyRecorder, StepGraph

    small = t2t_ref.create_model("t2t_vit_7", num_classes=10, img_size=32, backend="cupy", seed=0).eval()
    x32 = to_device(rng.standard_normal((64, 3, 32, 32), dtype=np.float32), xp_gpu, gpu)
    forward = StepGraph(lambda x: small.forward(x, keep_cache=False), CupyRecorder())
    eager_logits = to_numpy(small.forward(x32, keep_cache=False))
    for _ in range(3):                                   # warm-up, record, replay
        replayed_logits = to_numpy(forward(x32))
    assert np.allclose(replayed_logits, eager_logits, rtol=1e-5, atol=1e-5)

    eager_ms = ms_per_call(lambda: small.forward(x32, keep_cache=False))  # (the fused kernels' timer)
    print(f"T2T-ViT-7 forward at 32x32, batch 64: eager {eager_ms:.2f} ms, "
          f"replayed {ms_per_call(lambda: forward(x32)):.2f} ms")

# %% [markdown]
# ## What we saw
# - One code base, two devices: the namespace comes from the arrays, and `to_device` /
#   `to_numpy` are the only host <-> device copies, explicit and rare.
# - `array_api_strict`'s fake device makes a forgotten transfer fail on any machine, which is
#   how the tests keep the code GPU-clean without a GPU.
# - GPU timings need a synchronisation (or CUDA events); a warm-up comes first.
# - CuPy's pool keeps freed memory for reuse: `used_bytes` and `total_bytes` differ, and
#   `free_all_blocks()` hands it back.
# - Chains of elementwise and row operations pay a launch and a memory pass each; the fused
#   kernels of `cupy_kernels.py` do the same math in one, and are tested against the plain ops.
# - A CUDA graph replays a step's kernels with one launch; it replays Python numbers as they
#   were recorded, so what changes per step lives in arrays overwritten in place.
#
# Next, [tutorial 8](08_data_parallelism.ipynb) takes the model from one process to several:
# threads, then MPI ranks, and why the batch is cut so that K of them compute one run.
