# %% [markdown]
# # 8. Data parallelism by hand
#
# Training on more cores, processes or GPUs than one means cutting each batch into pieces,
# computing each piece somewhere else, and putting the results back together. This notebook
# builds that from the model of notebook 5, step by step:
#
# 1. the gradient of a sum is the sum of the gradients, so pieces can be computed apart;
# 2. threads: `t2t_ref.parallel.DataParallel` runs the pieces on the cores of one process;
# 3. randomness: dropout masks must belong to the *sample*, not to the piece, or the cut
#    changes the result;
# 4. ranks: separate processes each hold a copy of the weights, and one **allreduce** sums
#    their gradients; we write the ring allreduce by hand and simulate the ranks in-process;
# 5. the communication arithmetic: when does adding workers stop paying?
#
# Shape letters: B batch, K classes, P parameters, R ranks (or pieces).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import t2t_ref
from t2t_ref.gaps import make_rng
from t2t_ref.optim import AdamW
from t2t_ref.parallel import DataParallel, piece_sizes, split_rows

plt.rcParams.update({"figure.dpi": 80})
rng = np.random.default_rng(0)
SIZE, CLASSES, B = 32, 10, 8


def relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def new_model(**kwargs):
    return t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE, seed=0,
                                dtype="float64", **kwargs)


x = rng.normal(size=(B, 3, SIZE, SIZE))          # (B, 3, S, S)
labels = rng.integers(0, CLASSES, B)             # (B,)

# %% [markdown]
# ## 1. The gradient of a sum is the sum of the gradients
# The loss of a batch is the mean of the samples' losses, $L = \frac{1}{B}\sum_b \ell_b$. Cut
# the batch in two halves of $B/2$: $L = \frac{1}{2} L_1 + \frac{1}{2} L_2$ with $L_i$ the mean
# over half $i$, and since differentiation is linear,
# $\nabla L = \frac{1}{2}\nabla L_1 + \frac{1}{2}\nabla L_2$. Each half can be computed by a
# different worker; only the gradients (one number per parameter) have to meet.

# %%
model = new_model().eval()                       # no dropout here: section 3 comes back to it
loss, dlogits = t2t_ref.cross_entropy(model.forward(x), labels)
model.backward(dlogits)
whole = model.grads.flat.copy()                  # (P,) every gradient, in one flat buffer

halves = []
for piece_x, piece_y in zip(split_rows(x, [B // 2, B // 2]), split_rows(labels, [B // 2] * 2)):
    _, dlogits = t2t_ref.cross_entropy(model.forward(piece_x), piece_y)
    model.backward(dlogits)
    halves.append(model.grads.flat.copy())
summed = 0.5 * halves[0] + 0.5 * halves[1]
print(f"{whole.size:,} gradients; whole batch vs the mean of two halves: relative difference "
      f"{relative(summed, whole):.1e}")
assert relative(summed, whole) < 1e-12

# %% [markdown]
# The difference is float64 rounding: the two computations add the same numbers in another
# order.
#
# ## 2. Threads: every core of one process
# NumPy runs an elementwise operation on one core. `DataParallel` wraps the model, cuts the batch
# into one piece per thread, runs each piece's forward and backward in a thread of its own (a
# shallow copy of the model: same weights, its own activations and gradient buffer) and sums
# the pieces' gradients into the model's. The model itself knows nothing of this.

# %%
timings = {}
results = {}
for threads in (1, 2):
    parallel = DataParallel(new_model().train(), threads=threads)
    for attempt in range(3):
        parallel.rng = make_rng(parallel.xp, 7)
        started = time.perf_counter()
        loss, dlogits = t2t_ref.cross_entropy(parallel.forward(x), labels)
        parallel.backward(dlogits)
        seconds = time.perf_counter() - started
    timings[threads] = seconds
    results[threads] = parallel.grads.flat.copy()
    print(f"{threads} thread(s): {parallel.piece_count(B)} piece(s) of {piece_sizes(B, threads)} "
          f"samples, forward + backward {1e3 * seconds:.0f} ms")
print(f"1 vs 2 threads, every gradient: relative difference {relative(results[2], results[1]):.1e}")
assert relative(results[2], results[1]) < 1e-12

# %% [markdown]
# The same gradients, with the performer's dropout on (the model is in training mode). On a
# machine with two idle cores the two-thread step is faster; a busy machine may show no gain.
#
# ## 3. Masks belong to samples, not to pieces
# The T2T performer layers drop 10% of their outputs in training. If each piece drew its masks
# from a random stream of its own, cutting the batch differently would change which values are
# dropped, and 2 threads would train another model than 1 thread. `gaps.KeyedRandom` makes each
# decision a hash of (seed, draw, *global sample index*, element): a piece that starts at sample
# `start` draws from `rng.piece(start)` and gets exactly the rows the whole batch would.

# %%
p_drop, shape = 0.5, (B, 48)
keyed_whole = make_rng(np, 3).keep_mask(np, shape, p_drop, np.float64, "cpu")
keyed_pieces = np.concatenate([make_rng(np, 3).piece(start).keep_mask(np, (size, 48), p_drop,
                                                                      np.float64, "cpu")
                               for start, size in ((0, 3), (3, 5))])
streams = [np.random.default_rng(3 + i) for i in range(2)]   # a stream per piece: the naive way
naive_whole = (np.random.default_rng(3).random(shape) >= p_drop) * 2.0
naive_pieces = np.concatenate([(s.random((size, 48)) >= p_drop) * 2.0
                               for s, size in zip(streams, (3, 5))])

fig, axes = plt.subplots(1, 4, figsize=(13, 2.6))
for ax, mask, title in zip(axes, (keyed_whole, keyed_pieces, naive_whole, naive_pieces),
                           ("keyed: whole batch", "keyed: pieces 3 + 5",
                            "one stream: whole batch", "a stream per piece: 3 + 5")):
    ax.imshow(mask > 0, cmap="gray", aspect="auto", interpolation="nearest")
    ax.set(title=title, xlabel="element", ylabel="sample")
fig.tight_layout()
plt.show()
assert np.array_equal(keyed_whole, keyed_pieces)
assert not np.array_equal(naive_whole, naive_pieces)

# %% [markdown]
# **Takeaway:** with keyed decisions the whole batch and its pieces drop the same elements
# (white is kept); with a random stream per piece the masks depend on the cut. Because the
# decisions are a function of the sample, a run resumed on a machine with another number of
# cores, or another number of processes, continues exactly.
#
# ## 4. Ranks and the allreduce
# Threads share one process's memory. Across processes (MPI ranks, one per GPU or machine) each
# rank holds its own copy of the weights, computes the gradient of its slice of the batch, and
# all ranks then need the *sum* of the R gradients: an **allreduce**. The ring allreduce moves
# the fewest bytes: the gradient is cut into R chunks; in R - 1 steps of a *reduce-scatter*
# each rank passes one chunk to its neighbour, which adds its own; after them rank r holds the
# full sum of chunk r + 1. R - 1 steps of an *all-gather* pass the finished chunks around. Each
# rank sends 2 (R - 1) / R of the gradient's bytes, whatever R is.

# %%
def ring_allreduce(buffers):
    """The ring allreduce, simulated: buffers[r] is rank r's (P,) gradient; returns each
    rank's result, every one the sum of all. Message by message, as the ranks would send."""
    R = len(buffers)
    chunks = [np.array_split(b.copy(), R) for b in buffers]      # chunks[rank][c]
    sent = 0
    for step in range(R - 1):                                     # reduce-scatter
        messages = [(r, (r - step) % R, chunks[r][(r - step) % R].copy()) for r in range(R)]
        for r, c, data in messages:                               # rank r sends chunk c right
            chunks[(r + 1) % R][c] += data
            sent += data.nbytes
    for step in range(R - 1):                                     # all-gather
        messages = [(r, (r + 1 - step) % R, chunks[r][(r + 1 - step) % R].copy())
                    for r in range(R)]
        for r, c, data in messages:
            chunks[(r + 1) % R][c] = data
            sent += data.nbytes
    return [np.concatenate(c) for c in chunks], sent


R = 4
ranks = [new_model().train() for _ in range(R)]                  # R copies of the same weights
sizes = piece_sizes(B, R)
starts = [sum(sizes[:r]) for r in range(R)]
grads = []
for model_r, start, piece_x, piece_y in zip(ranks, starts, split_rows(x, sizes),
                                            split_rows(labels, sizes)):
    model_r.rng = make_rng(np, 11).piece(start)                  # keyed by global sample
    _, dlogits = t2t_ref.cross_entropy(model_r.forward(piece_x), piece_y)
    model_r.backward(dlogits * (len(piece_y) / B))               # this slice's share of the mean
    grads.append(model_r.grads.flat.copy())
reduced, sent = ring_allreduce(grads)

single = new_model().train()
single.rng = make_rng(np, 11)
_, dlogits = t2t_ref.cross_entropy(single.forward(x), labels)
single.backward(dlogits)
P = single.grads.flat.size
print(f"{R} ranks, {P:,} gradients of 8 bytes: each rank sent {sent / R / 1e6:.2f} MB "
      f"= 2(R-1)/R x {8 * P / 1e6:.2f} MB = {2 * (R - 1) / R * 8 * P / 1e6:.2f} MB")
print(f"every rank's allreduced gradient vs one process: "
      f"{max(relative(g, single.grads.flat) for g in reduced):.1e}")
assert all(relative(g, single.grads.flat) < 1e-12 for g in reduced)
assert sent == R * 2 * (R - 1) * sum(c.nbytes for c in np.array_split(grads[0], R)) // R

# %% [markdown]
# Then every rank applies the same optimizer step to the same gradient, so the copies of the
# weights stay identical without ever being sent: only gradients travel.

# %%
for model_r, g in zip(ranks, reduced):
    model_r.grads.flat[...] = g
    AdamW(model_r.params, weight_decay=0.05).step(model_r.params, model_r.grads, 1e-3)
print("ranks' weights after one AdamW step, largest difference to rank 0:",
      max(float(np.max(np.abs(m.params.flat - ranks[0].params.flat))) for m in ranks))
assert all(np.array_equal(m.params.flat, ranks[0].params.flat) for m in ranks)

# %% [markdown]
# ## 5. The communication arithmetic
# A step of R data-parallel workers costs the compute of B/R samples plus the allreduce of the
# gradient, 2 (R-1)/R x 4P bytes in float32 at the link's bandwidth (unless it overlaps the
# backward pass, which this project's code does not do). The scaling efficiency is the ideal
# time over the real one. For T2T-ViT-14 at 224 (21.5 M parameters; one H200 takes 78.6 ms per
# training step of 64 images, BENCHMARKS.md), with each worker keeping a batch of 64:

# %%
variants = {name: t2t_ref.create_model(name, num_classes=1000, img_size=224)
            for name in ("t2t_vit_7", "t2t_vit_14", "t2t_vit_24")}
for name, m in variants.items():
    print(f"{name}: {m.num_parameters(trainable_only=True):,} parameters -> "
          f"{4 * m.num_parameters(trainable_only=True) / 1e6:.0f} MB of float32 gradients a step")

P14, step_seconds = variants["t2t_vit_14"].num_parameters(trainable_only=True), 0.0786
links = {"NVLink (H200, ~450 GB/s per direction)": 450e9,
         "100 Gb/s Ethernet / InfiniBand (12.5 GB/s)": 12.5e9}
workers = np.array([1, 2, 4, 8, 16, 32, 64])
fig, ax = plt.subplots(figsize=(7, 3.5))
for label, bandwidth in links.items():
    comm = 2 * (workers - 1) / workers * 4 * P14 / bandwidth      # seconds per step
    efficiency = step_seconds / (step_seconds + comm)
    ax.plot(workers, 100 * efficiency, "o-", label=label)
    print(label, " ".join(f"R={r}: {100 * e:.0f}%" for r, e in zip(workers, efficiency)))
ax.set(xscale="log", xlabel="workers R (batch 64 each)", ylabel="scaling efficiency (%)",
       ylim=(0, 105), title="T2T-ViT-14 at 224: compute 78.6 ms, allreduce not overlapped")
ax.set_xticks(workers, [str(r) for r in workers])
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **Takeaway:** over NVLink the allreduce of 86 MB costs well under a millisecond and 8 GPUs
# scale almost perfectly; over a 100 Gb/s network it costs about 13 ms per step, so 16 nodes
# keep about 85% of their ideal speed: the ring's 2 (R-1)/R barely grows with R, so the
# efficiency levels off instead of collapsing. Overlapping the allreduce with the backward pass
# (sending a layer's gradients while the layers below are still being differentiated) would hide
# most of it; that is what PyTorch's DDP buckets do.
#
# ## What we saw
# - Data parallelism is exact: the gradient of the batch is the (weighted) sum of the pieces'.
# - Threads in one process and ranks across processes differ only in how the sum is made.
# - Random decisions must be keyed by sample, or the cut changes the model.
# - Only gradients travel; the ring allreduce sends 2 (R-1)/R of them per rank.
#
# `mpirun -n R python -m t2t_ref.train` runs this across processes (README).
