"""--cuda-graphs on a GPU: replayed steps against eager ones, and what replaying saves.

    python scripts/gpu_graphs.py            # the device script's `graphs` stage

1. Training: a few steps eager and the same steps through train.RecordedForwardBackward
   (graphs.CupyRecorder: the first step eager, the second recorded, the rest replayed), from
   the same weights, batches, learning rates and dropout seeds: T2T-ViT-7 with dropout, drop
   path and clipping, and T2T-ViT-t-14 under fp16 with its loss scale. The weights, AdamW's
   first moment and the loss scale must agree (the same kernels on the same inputs: bit for
   bit is expected; the check allows 1e-6 relative, in case cuBLAS picks another algorithm
   while recording), and the recording must not have failed.
2. Inference: T2T-ViT-7's eval-mode forward, eager and replayed, logits compared.
3. Speed: ms per training step (T2T-ViT-7, 32x32, batch 64: the default run's step) and per
   inference step (224, batch 64), eager and replayed, median of 20 after 3 untimed.
Exit 1 on any mismatch or failed recording. tests/test_graphs.py runs parts 1 and 2 on
array_api_strict with the CPU's stand-in recorder (tests/graph_sim.py).
"""

import argparse
import statistics
import sys
import time
import traceback

import numpy as np

import t2t_ref
from gpu_parity import rel_error  # beside this script
from t2t_ref.backend import get_namespace, to_device, to_numpy
from t2t_ref.gaps import make_rng
from t2t_ref.graphs import StepGraph
from t2t_ref.guard import StepMonitor
from t2t_ref.loss_scale import DynamicLossScale
from t2t_ref.optim import AdamW
from t2t_ref.parallel import DataParallel
from t2t_ref.train import RecordedForwardBackward, step_seed, train_step

TOL = 1e-6
# (model, precision, loss scale, clip, dropout and drop path)
TRAINING_CASES = (("t2t_vit_7", "float32", False, 1.0, 0.1),
                  ("t2t_vit_t_14", "fp16", True, None, 0.0),
                  ("t2t_vit_7", "bf16", False, 1.0, 0.1))


def training_states(backend, make_recorder, name, precision, scaled, clip, drop, steps=6,
                    batch=16, size=32):
    """{eager: state, graphs: state} after `steps` steps each way (state: the weights, AdamW's
    m, the loss scale), and the recorder of the replayed run."""
    xp, device = get_namespace(backend)
    states, recorder = {}, None
    for way in ("eager", "graphs"):
        model = DataParallel(t2t_ref.create_model(
            name, num_classes=5, img_size=size, backend=backend, seed=0, drop_rate=drop,
            drop_path_rate=drop, precision=precision)).train()
        optimizer, monitor = AdamW(model.params), StepMonitor(xp, device, limit=3)
        # growth at every step: the scale the recorded backward reads changes each step
        scaler = DynamicLossScale(xp, device, init_scale=2.0 ** 10, growth_interval=1) \
            if scaled else None
        recorded = None
        if way == "graphs":
            recorder = make_recorder()
            recorded = RecordedForwardBackward(model, 0.1, scaler, recorder)
        rng = np.random.default_rng(1)
        for step in range(steps):
            x = to_device(rng.normal(size=(batch, 3, size, size)).astype(np.float32), xp,
                          device)
            y = to_device(rng.integers(0, 5, batch), xp, device)
            model.rng = make_rng(xp, step_seed(0, step))
            train_step(model, optimizer, None, monitor, x, y, step, 1e-3 * (1 + step),
                       label_smoothing=0.1, clip_grad=clip, scaler=scaler, recorded=recorded)
        states[way] = {"weights": to_numpy(model.params.flat),
                       "AdamW m": to_numpy(optimizer.exp_avg.flat)}
        if scaler is not None:
            states[way]["loss scale"] = to_numpy(scaler.scale)
        if recorded is not None and recorded.graph.failed is not None:
            states[way]["failed"] = recorded.graph.failed
            _print_error(recorded.graph)
    return states, recorder


def inference_logits(backend, make_recorder, name="t2t_vit_7", batch=8, size=32, calls=4):
    """[(eager logits, replayed logits)] for `calls` batches, eval mode, and the StepGraph."""
    xp, device = get_namespace(backend)
    model = t2t_ref.create_model(name, num_classes=5, img_size=size, backend=backend,
                                 seed=0).eval()
    graph = StepGraph(lambda x: model.forward(x, keep_cache=False), make_recorder())
    rng = np.random.default_rng(2)
    pairs = []
    for _ in range(calls):
        x = to_device(rng.normal(size=(batch, 3, size, size)).astype(np.float32), xp, device)
        eager = to_numpy(model.forward(x, keep_cache=False))
        pairs.append((eager, to_numpy(graph(x))))
    return pairs, graph


def _print_error(graph):
    """The whole traceback of a failed recording (StepGraph says one line), for the log."""
    if graph.error is not None:
        print("".join(traceback.format_exception(graph.error)), end="")


def check(backend, make_recorder, cases=TRAINING_CASES, steps=6):
    """Parts 1 and 2: printed lines, and how many failed."""
    failed = 0
    for name, precision, scaled, clip, drop in cases:
        states, _ = training_states(backend, make_recorder, name, precision, scaled, clip,
                                    drop, steps)
        eager, graphs = states["eager"], states["graphs"]
        errors = {k: rel_error(eager[k], graphs[k]) for k in eager}
        ok = "failed" not in graphs and all(e <= TOL for e in errors.values())
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} training {name} {precision}, {steps} steps, "
              f"replayed against eager: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
              + (f"; recording failed: {graphs['failed']}" if "failed" in graphs else ""))
    pairs, graph = inference_logits(backend, make_recorder)
    _print_error(graph)
    error = max(rel_error(a, b) for a, b in pairs)
    ok = graph.failed is None and error <= TOL
    failed += not ok
    print(f"{'PASS' if ok else 'FAIL'} inference t2t_vit_7, replayed against eager: logits "
          f"{error:.1e}" + (f"; recording failed: {graph.failed}" if graph.failed else ""))
    return failed


def _median_ms(step, sync, repeats=20, warmup=3):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def speed(make_recorder):
    """Part 3 (CuPy): ms per step eager and replayed."""
    import cupy
    from t2t_ref import bench
    sync = cupy.cuda.get_current_stream().synchronize
    for config in ("t2t_vit_7-32-b64-train", "t2t_vit_7-224-b64-infer"):
        ms = {}
        for graphs in (False, True):
            side = bench.Ours(bench.parse_config(config), "cupy", graphs=graphs,
                              recorder=make_recorder() if graphs else None)
            side.prepare()
            ms[graphs] = _median_ms(side.step, sync)
            del side
        print(f"speed {config}: eager {ms[False]:.2f} ms, replayed {ms[True]:.2f} ms per step "
              f"({ms[False] / ms[True]:.2f}x)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from t2t_ref.graphs import CupyRecorder
    failed = check("cupy", CupyRecorder, steps=args.steps)
    speed(CupyRecorder)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
