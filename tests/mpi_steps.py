"""5 AdamW steps with dropout and drop path, the same batches on any number of ranks.

test_mpi.py calls steps() in its own process (1 process x B) and runs this file under
`mpirun -n 2` (2 ranks x their pieces of B): rank 0 saves what the ranks computed to the .npz
named on the command line. Each rank uses the training's own train_step and its piece of
every batch, cut as the loader cuts (parallel.piece_sizes).
"""

import sys

import numpy as np

import t2t_ref
from t2t_ref.gaps import make_rng
from t2t_ref.guard import StepMonitor
from t2t_ref.optim import AdamW
from t2t_ref.parallel import DataParallel, mpi, piece_sizes
from t2t_ref.train import train_step

SIZE, CLASSES, STEPS = 32, 5, 5
# (variant, dtype, global batch): a performer and a transformer; 5 is cut unevenly, 3 + 2
CASES = [("t2t_vit_7", "float64", 4), ("t2t_vit_7", "float32", 4),
         ("t2t_vit_t_14", "float64", 4), ("t2t_vit_t_14", "float32", 4),
         ("t2t_vit_7", "float64", 5)]


def steps(name, dtype, batch, world):
    """The flat weights and the last step's global loss after STEPS steps on this rank's
    pieces of fixed random batches."""
    model = DataParallel(t2t_ref.create_model(
        name, num_classes=CLASSES, img_size=SIZE, dtype=dtype, drop_rate=0.1,
        drop_path_rate=0.2), threads=1, world=world).train()
    optimizer = AdamW(model.params, weight_decay=0.05, threads=1)
    monitor = StepMonitor(model.xp, model.device, limit=3)
    sizes = piece_sizes(batch, world.size)
    start = sum(sizes[:world.rank])
    rng = np.random.default_rng(7)
    for step in range(STEPS):
        images = rng.normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)
        labels = rng.integers(0, CLASSES, batch)
        mine = slice(start, start + sizes[world.rank])
        model.rng = make_rng(model.xp, 100 + step)  # keyed by global sample: see DataParallel
        x = model.xp.asarray(images[mine], dtype=model.dtype)  # (b, 3, S, S)
        train_step(model, optimizer, None, monitor, x, labels[mine], step, lr=1e-3,
                   label_smoothing=0.1, clip_grad=1.0)
    return np.asarray(model.params.flat), monitor.read()["loss"]


def host_staged_sum(world):
    """The host-staged transport on array_api_strict arrays (a device array stand-in):
    rank r contributes (r + 1) * [0, 1, 2, 3, 4]."""
    import array_api_strict as xp
    array = xp.arange(5, dtype=xp.float64) * float(world.rank + 1)
    mpi.HostStagedSum(world.comm)(array)
    return np.asarray(array)


if __name__ == "__main__":
    world = mpi.join()
    results = {}
    for name, dtype, batch in CASES:
        weights, loss = steps(name, dtype, batch, world)
        results[f"{name}-{dtype}-{batch}"] = weights
        results[f"{name}-{dtype}-{batch}-loss"] = np.asarray(loss)
        # every rank must hold the same weights, bit for bit
        world.check_same_bytes(f"{name} weights", np.ascontiguousarray(weights))
    results["host_staged"] = host_staged_sum(world)
    results["transport"] = np.asarray(type(world._sum).__name__)
    if world.rank == 0:
        np.savez(sys.argv[1], **results)
