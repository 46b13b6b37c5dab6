"""Threads against MPI ranks on one machine: the median training step (train.train_step:
forward, loss, backward, clipping, AdamW) of a configuration, and the time of the allreduce.

    python scripts/mpi_bench.py t2t_vit_7 64 64                  # 1 process, a thread per core
    OMP_NUM_THREADS=1 mpirun -n 2 python scripts/mpi_bench.py t2t_vit_7 64 64   # 2 ranks

Arguments: variant, image size, global batch, [measured steps (11)]. Prints one JSON line
(rank 0): the per-step times in ms, their median, and the median of 21 allreduces of the flat
gradient buffer alone (0 for one process). Also: `python scripts/mpi_bench.py --bytes` prints
each variant's gradient buffer in bytes (float32, 224x224, 1000 classes).
"""

import json
import statistics
import sys
import time

import numpy as np

import t2t_ref
from t2t_ref.backend import keep_freed_memory
from t2t_ref.gaps import make_rng
from t2t_ref.guard import StepMonitor
from t2t_ref.optim import AdamW
from t2t_ref.parallel import DataParallel, mpi, piece_sizes
from t2t_ref.parallel.threads import thread_count
from t2t_ref.train import train_step


def gradient_bytes():
    """{variant: bytes of its float32 flat gradient buffer} at 224 with 1000 classes."""
    sizes = {}
    for name in t2t_ref.list_models():
        model = t2t_ref.create_model(name, img_size=224, num_classes=1000)
        sizes[name] = int(model.params.flat.shape[0]) * 4
    return sizes


def main(name, size, batch, steps=11):
    keep_freed_memory()
    world = mpi.join()
    model = DataParallel(t2t_ref.create_model(name, img_size=size, num_classes=10),
                         world=world).train()
    optimizer = AdamW(model.params, weight_decay=0.05)
    monitor = StepMonitor(model.xp, model.device, limit=3)
    pieces = piece_sizes(batch, world.size)
    start = sum(pieces[:world.rank])
    rng = np.random.default_rng(0)
    x_all = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    y_all = rng.integers(0, 10, batch)
    x, y = x_all[start:start + pieces[world.rank]], y_all[start:start + pieces[world.rank]]
    times = []
    for step in range(2 + steps):  # 2 warm-up steps
        world.allgather(None)  # every rank starts the step together
        began = time.perf_counter()
        model.rng = make_rng(model.xp, step)
        train_step(model, optimizer, None, monitor, x, y, step, 1e-4, 0.1, 1.0)
        monitor.read()
        if step >= 2:
            times.append((time.perf_counter() - began) * 1e3)
    reduce_ms = []
    buffer = model.params.flat.copy()
    for _ in range(21 if world.size > 1 else 0):
        world.allgather(None)
        began = time.perf_counter()
        world.sum(buffer)
        reduce_ms.append((time.perf_counter() - began) * 1e3)
    if world.rank == 0:
        print(json.dumps({
            "config": f"{name}-{size}-b{batch}-train", "ranks": world.size,
            "threads per rank": thread_count("numpy"), "median ms": statistics.median(times),
            "steps ms": [round(t, 1) for t in times], "gradient MB": buffer.nbytes / 1e6,
            "allreduce median ms": statistics.median(reduce_ms) if reduce_ms else 0.0}))


if __name__ == "__main__":
    if sys.argv[1:] == ["--bytes"]:
        print(json.dumps(gradient_bytes()))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
             *(int(a) for a in sys.argv[4:5]))
