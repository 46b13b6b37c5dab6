"""--cuda-graphs without a GPU: a training step's forward and backward recorded once and
replayed (t2t_ref/graphs.py) trains exactly as eager steps do. tests/graph_sim.py replays the
recording on array_api_strict as a GPU replays a graph: the same operations on the same arrays
with the same Python numbers, none of the step's Python run again. So a per-step value that
reaches the recording as a Python number, or through an array that is rebound instead of
overwritten, comes back as the recorded step's, and the replayed run parts from the eager
one; the planted faults below show that this test sees it."""

import sys

import numpy as np
import pytest

import t2t_ref
from t2t_ref import device_cache, train
from t2t_ref.backend import get_namespace, to_device, to_numpy
from t2t_ref.gaps import KeyedRandom, make_rng
from t2t_ref.graphs import StepGraph
from t2t_ref.guard import StepMonitor
from t2t_ref.loss_scale import DynamicLossScale
from t2t_ref.optim import AdamW
from t2t_ref.parallel import DataParallel
from t2t_ref.train import RecordedForwardBackward, step_seed, train_step

from graph_sim import SimulatedRecorder
from reliability import tried

STRICT = "array_api_strict"
STEPS = 5


def _run(name, recorder=None, scaler=False, clip=None, recorded_class=RecordedForwardBackward,
         scaler_class=DynamicLossScale, verify=True):
    """STEPS training steps on array_api_strict (dropout 0.1, drop path 0.1, each step its own
    seed, learning rate and batch), eager or through a recording -> the final state."""
    xp, device = get_namespace(STRICT)
    model = DataParallel(t2t_ref.create_model(name, num_classes=5, img_size=32, backend=STRICT,
                                              drop_rate=0.1, drop_path_rate=0.1)).train()
    optimizer = AdamW(model.params)
    monitor = StepMonitor(xp, device, limit=3)
    # growth every step: the scale the backward starts from changes at every step
    loss_scale = scaler_class(xp, device, init_scale=4.0, growth_interval=1) if scaler else None
    recorded = None if recorder is None else recorded_class(model, 0.1, loss_scale, recorder,
                                                             verify=verify)
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        x = to_device(rng.normal(size=(4, 3, 32, 32)).astype(np.float32), xp, device)
        y = to_device(rng.integers(0, 5, 4), xp, device)
        model.rng = make_rng(xp, step_seed(0, step))  # as train.batch_inputs does
        train_step(model, optimizer, None, monitor, x, y, step, 1e-3 * (step + 1),
                   label_smoothing=0.1, clip_grad=clip, scaler=loss_scale, recorded=recorded)
    state = {"params": to_numpy(model.params.flat), "m": to_numpy(optimizer.exp_avg.flat),
             "monitor": monitor.read()}
    if loss_scale is not None:
        state["scale"] = float(to_numpy(loss_scale.scale))
    return state


def _differences(a, b):
    return [key for key in a if not np.array_equal(np.asarray(a[key]), np.asarray(b[key]))
            and key != "monitor"] + \
        [f"monitor {k}" for k in a["monitor"]
         if not np.array_equal(a["monitor"][k], b["monitor"][k], equal_nan=True)]


@pytest.mark.parametrize("name, scaler, clip", [("t2t_vit_7", False, 1.0),
                                                ("t2t_vit_t_14", True, None)])
def test_replayed_steps_train_exactly_as_eager_ones(name, scaler, clip):
    """Step 0 eager (the warm-up), step 1 recorded, steps 2-4 replayed (step 2's replay also
    checked against an eager call, and kept: three replays ran): the weights, AdamW's moments,
    the monitor's loss and counts and the loss scale equal the eager run's, bit for bit
    (dropout and drop path draw each step's own masks from the seed on the device)."""
    recorder = SimulatedRecorder()
    eager = _run(name, scaler=scaler, clip=clip)
    replayed = _run(name, recorder, scaler=scaler, clip=clip)
    assert recorder.replays == STEPS - 2 and len(recorder.tapes) == 1
    assert len(recorder.tapes[0]) > 500, "the recording holds the forward and backward"
    assert _differences(eager, replayed) == [], _differences(eager, replayed)


class RebindingLossScale(DynamicLossScale):
    """The fault loss_scale.py had: update() binds new arrays instead of overwriting."""

    def update(self, found_inf):
        xp = self.xp
        self.scale = self.scale * xp.where(found_inf, xp.full_like(self.scale, 0.5), 2.0)


class SeedBakedIn(RecordedForwardBackward):
    """A recording that takes its dropout seed from model.rng's Python number."""

    def _forward_backward(self, x, targets, seed):
        model = self.model
        rng, model.rng = model.rng, KeyedRandom(model.rng.seed)  # baked in when recorded
        try:
            return train.forward_backward(model, x, targets, self.label_smoothing, self.scaler)
        finally:
            model.rng = rng


FAULTS = {"loss scale rebound": dict(scaler=True, scaler_class=RebindingLossScale),
          "seed as a Python number": dict(recorded_class=SeedBakedIn)}


@pytest.mark.parametrize("fault", FAULTS)
def test_the_replay_sees_a_value_baked_into_the_recording(fault):
    """The comparison above can fail: a loss scale rebound at each step (the recording keeps
    multiplying by the first array), or dropout keyed by the recorded step's seed, make the
    replayed run part from the eager one (StepGraph's own check of its first replay off)."""
    eager = _run("t2t_vit_7", **FAULTS[fault])
    replayed = _run("t2t_vit_7", SimulatedRecorder(), verify=False, **FAULTS[fault])
    assert "params" in _differences(eager, replayed)


@tried("faults", "`--cuda-graphs` whose replay differs from an eager step (a per-step value "
       "baked into the recording)", "one line `note: CUDA graph dropped (a replay differed "
       "from the eager call by ...)`; the run goes on eagerly and ends as an eager run does")
@pytest.mark.parametrize("fault", FAULTS)
def test_a_replay_that_parts_from_eager_is_dropped(fault, capsys):
    """StepGraph checks its first replay on new inputs against an eager call on them: with a
    value baked into the recording, it says so in one line, drops the graph and goes on
    eagerly, and the run ends where the eager one does."""
    eager = _run("t2t_vit_7", **FAULTS[fault])
    capsys.readouterr()
    guarded = _run("t2t_vit_7", SimulatedRecorder(), **FAULTS[fault])
    assert _differences(eager, guarded) == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "note: CUDA graph dropped (a replay differed from the eager call by "), lines


def _strict_array(values):
    xp, device = get_namespace(STRICT)
    return to_device(np.asarray(values, dtype=np.float32), xp, device)


@tried("faults", "`--cuda-graphs` where a step cannot be recorded (a host transfer, or host "
       "data copied up, while recording)", "one line `note: CUDA graph recording failed "
       "(...)`; the steps run eagerly, with the right results")
@pytest.mark.parametrize("fault", ["host transfer", "host data"])
def test_a_recording_that_fails_runs_eagerly_from_then_on(fault, capsys):
    """A function that reads a value on the host (float(x)), or copies host data to the
    device, cannot be recorded (CuPy refuses both while capturing): StepGraph says so once,
    then calls it eagerly, with the right results. The per-shape caches start over after the
    failed recording (an array one made while capturing was never filled on a GPU)."""
    xp, device = get_namespace(STRICT)
    cache = device_cache.DeviceCache()
    made = []

    def fn(x):
        cache.get(xp, device, ("twos",), lambda: made.append(1) or xp.full(
            x.shape, 2.0, device=device))
        if fault == "host transfer":
            return x * float(xp.sum(x))
        return x * xp.asarray(2.0, device=device)

    step = StepGraph(fn, SimulatedRecorder())
    for values in ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0]):
        x = _strict_array(values)
        expected = np.asarray(values) * (sum(values) if fault == "host transfer" else 2.0)
        np.testing.assert_array_equal(to_numpy(step(x)), expected)
    assert len(made) == 2, "the cache was made again after the failed recording"
    assert step.failed is not None and step.recordings == {}
    assert type(step.error).__name__ == "RecordingRefused"  # kept, for a whole traceback
    assert capsys.readouterr().err.count("CUDA graph recording failed") == 1


def test_each_signature_is_recorded_once_and_others_run_eagerly():
    """The first call of a shape is eager, the second recorded, later ones replayed (the
    first of them checked against an eager call); with max_graphs=1 a second shape (an
    epoch's short last batch) stays eager."""
    xp, _ = get_namespace(STRICT)
    calls = []

    def fn(x):
        calls.append(x.shape)
        return xp.sum(x * x)

    recorder = SimulatedRecorder()
    step = StepGraph(fn, recorder)
    for values in ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0], [8.0], [9.0, 1.0]):
        out = step(_strict_array(values))
        assert float(to_numpy(out)) == sum(v * v for v in values)
    # eager, recording, the check's eager call, the 1-element ones eager
    assert calls == [(2,), (2,), (2,), (1,), (1,)]
    assert recorder.replays == 2 and step.failed is None


def _ids_within(value):
    """id() of every object inside nested tuples and lists (value itself included)."""
    found = {id(value)}
    if isinstance(value, (tuple, list)):
        for v in value:
            found |= _ids_within(v)
    return found


def test_a_recording_keeps_the_cached_arrays_it_reads():
    """A graph reads the per-shape caches (rows of ones; on NumPy and CuPy the soft split's
    indices too) by address. The recording keeps every array they hold, so a cache that starts
    over (a program sweeping image sizes) cannot free memory that a replay still reads; and
    the recording does read them."""
    device_cache.clear_all()
    xp, device = get_namespace(STRICT)
    model = t2t_ref.create_model("t2t_vit_7", num_classes=5, img_size=32, backend=STRICT)
    dlogits = to_device(np.ones((2, 5), np.float32), xp, device)

    def forward_backward(x):
        model.forward(x)
        return model.backward(dlogits)

    class AddressesOnly(SimulatedRecorder):
        """What CupyRecorder keeps of a recording: the graph, which holds raw addresses and
        no array objects (the simulation's tape, which does, is kept by its replay alone)."""

        def record(self, fn, inputs):
            outputs, replay, _ = super().record(fn, inputs)
            return outputs, replay, ("a graph",)

    recorder = AddressesOnly()
    step = StepGraph(forward_backward, recorder)
    x = to_device(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32),
                  xp, device)
    step(x)
    step(x)  # recorded
    cached = [a for value in device_cache.held() for a in (value if isinstance(value, tuple)
                                                            else (value,))]
    read = {id(a) for _, args, kwargs, _ in recorder.tapes[0]
            for a in (*args, *kwargs.values())}
    assert len(cached) >= 4 and sum(id(a) in read for a in cached) >= 4, \
        "the recording reads the cached rows of ones"
    device_cache.clear_all()  # the caches start over: only the recording still holds them
    (recording,) = step.recordings.values()
    kept = _ids_within(recording.keep)
    lost = [tuple(a.shape) for a in cached if id(a) not in kept]
    assert lost == [], f"cached arrays the recording does not keep: {lost}"


def test_a_seed_array_draws_the_masks_of_its_seed():
    """What the recording's dropout reads: KeyedRandom over a device seed is keyed as the
    int seed is (tests/test_random.py checks every backend)."""
    xp, device = get_namespace(STRICT)
    from t2t_ref.gaps import seed_array
    a = KeyedRandom(seed_array(xp, 12345, device)).keep_mask(xp, (3, 8), 0.5, xp.float32,
                                                               device)
    b = KeyedRandom(12345).keep_mask(xp, (3, 8), 0.5, xp.float32, device)
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@tried("command line", "`train`, `evaluate` or `bench` with `--cuda-graphs` on --backend numpy",
       "exit 2: `error: --cuda-graphs records CUDA kernels: use it with --backend cupy`")
def test_cuda_graphs_need_the_cupy_backend(tmp_path, capsys):
    from t2t_ref import bench, evaluate
    assert train.main(["--cuda-graphs", "--out", str(tmp_path / "o")]) == 2
    assert evaluate.main(["--checkpoint", str(tmp_path / "none.safetensors"),
                          "--cuda-graphs"]) == 2
    assert bench.main(["--quick", "--cuda-graphs"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: --cuda-graphs records CUDA kernels: use it with --backend cupy"] * 3


class Batches:
    """A loader's evaluation batches: uint8 images (B, 3, 32, 32) and labels, the last one
    short (it runs eagerly)."""

    def __init__(self, count=9, batch=4):
        rng = np.random.default_rng(3)
        self.images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        self.labels = rng.integers(0, 5, count)
        self.batch = batch

    def __len__(self):
        return -(-len(self.labels) // self.batch)

    def epoch_batches(self, epoch):
        for start in range(0, len(self.labels), self.batch):
            rows = slice(start, start + self.batch)
            yield self.images[rows], self.labels[rows], None


def test_evaluate_with_a_replayed_forward_scores_as_eager():
    """evaluate --cuda-graphs: the forward recorded once and replayed for each full batch
    gives the eager evaluation's loss and accuracies exactly."""
    from t2t_ref.evaluate import evaluate
    model = t2t_ref.create_model("t2t_vit_7", num_classes=5, img_size=32, backend=STRICT)
    eager = evaluate(model, Batches(), progress=False)
    recorder = SimulatedRecorder()
    graphed = StepGraph(lambda x: model.forward(x, keep_cache=False), recorder)
    assert evaluate(model, Batches(), progress=False, forward=graphed) == eager
    assert recorder.replays == 0 and graphed.calls  # 2 full batches: warm-up, recorded
    replayed = evaluate(model, Batches(count=17), progress=False, forward=graphed)
    assert replayed == evaluate(model, Batches(count=17), progress=False)
    assert recorder.replays == 4


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_the_bench_times_the_replayed_steps(mode):
    """bench --cuda-graphs: its steps replay (a training step's forward and backward, an
    inference step's forward), and change the weights as its eager steps do."""
    from t2t_ref import bench
    config = bench.parse_config(f"t2t_vit_7-32-b2-{mode}")
    sides = {}
    for graphs in (False, True):
        recorder = SimulatedRecorder()
        side = bench.Ours(config, STRICT, graphs=graphs, recorder=recorder)
        side.prepare()
        for _ in range(4):
            side.step()
        sides[graphs] = to_numpy(side.model.params.flat)
        if graphs:
            assert recorder.replays == 2, recorder.replays
    np.testing.assert_array_equal(sides[True], sides[False])


@pytest.fixture(scope="module")
def gpu_graphs():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "gpu_graphs.py"
    sys.path.insert(0, str(path.parent))  # as when it runs: it imports gpu_parity beside it
    spec = importlib.util.spec_from_file_location("gpu_graphs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# gpu_graphs.TRAINING_CASES without fp16 (array_api_strict has none): the loss scale in float32
CPU_CASES = (("t2t_vit_7", "float32", False, 1.0, 0.1),
             ("t2t_vit_t_14", "float32", True, None, 0.0))


def test_the_device_scripts_graph_check_passes_and_can_fail(gpu_graphs, capsys, monkeypatch):
    """scripts/gpu_graphs.py's comparisons (the device script's `graphs` stage) on
    array_api_strict with the CPU's recorder: all pass; with the dropout seed baked into the
    recording, the training case with dropout fails and says which state parted."""
    assert gpu_graphs.check(STRICT, SimulatedRecorder, cases=CPU_CASES, steps=4) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "FAIL" not in out, out
    monkeypatch.setattr(gpu_graphs, "RecordedForwardBackward", SeedBakedIn)
    assert gpu_graphs.check(STRICT, SimulatedRecorder, cases=CPU_CASES[:1], steps=4) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL training t2t_vit_7") and "weights" in out, out


def test_cupy_replayed_steps_train_as_eager_ones(gpu_graphs):
    """On a GPU (skipped elsewhere): the real recorder, CUDA stream capture, against eager
    steps; T2T-ViT-7 with dropout, drop path and clipping, 4 steps (2 replayed)."""
    from conftest import cupy_or_skip
    cupy_or_skip()
    from t2t_ref.graphs import CupyRecorder
    states, recorder = gpu_graphs.training_states("cupy", CupyRecorder, *CPU_CASES[0], steps=4)
    assert "failed" not in states["graphs"], states["graphs"]["failed"]
    for key, eager in states["eager"].items():
        error = gpu_graphs.rel_error(eager, states["graphs"][key])
        assert error <= gpu_graphs.TOL, f"{key}: replayed {error:.1e} from eager"


def test_a_replayed_step_leaves_few_calls_outside_the_graph():
    """What --cuda-graphs saves, counted on array_api_strict: a replayed training step of
    T2T-ViT-7 makes under a hundred array calls of its own (the inputs' copies, the seed,
    clipping, the monitor, AdamW's plain flat update: one kernel on CuPy), where an eager step
    makes thousands (BENCHMARKS.md, "Array calls per layer")."""
    from strict_watch import array_calls
    xp, device = get_namespace(STRICT)
    model = DataParallel(t2t_ref.create_model("t2t_vit_7", num_classes=5, img_size=32,
                                              backend=STRICT)).train()
    optimizer, monitor = AdamW(model.params), StepMonitor(xp, device, limit=3)
    recorded = RecordedForwardBackward(model, 0.1, None, SimulatedRecorder())
    rng, counts = np.random.default_rng(0), []
    for step in range(4):  # eager (warm-up), recorded, checked against eager, replayed
        x = to_device(rng.normal(size=(2, 3, 32, 32)).astype(np.float32), xp, device)
        y = to_device(rng.integers(0, 5, 2), xp, device)
        model.rng = make_rng(xp, step)
        with array_calls() as calls:
            train_step(model, optimizer, None, monitor, x, y, step, 1e-3, 0.1, 1.0,
                       recorded=recorded)
        counts.append(calls.total)
    assert counts[0] > 2000 and counts[3] < 100, counts


def test_graphs_by_default_only_where_they_can_run(tmp_path, monkeypatch):
    """CUDA graphs are on by default for CuPy runs in one process (graphs.wanted, for train,
    evaluate and bench); a run without the flag records nothing on NumPy, and says nothing about it;
    --no-cuda-graphs is accepted there too; only an explicit --cuda-graphs off CuPy is
    refused."""
    from t2t_ref import evaluate
    from t2t_ref.graphs import wanted
    assert wanted(None, "cupy") and not wanted(None, "cupy", processes=2)
    assert not wanted(None, "numpy") and wanted(False, "cupy") is False
    for flags, chosen in (([], None), (["--cuda-graphs"], True), (["--no-cuda-graphs"], False)):
        assert evaluate.build_parser().parse_args(["--checkpoint", "c"] + flags).cuda_graphs \
            is chosen
    args = ["--synthetic-train", "64", "--synthetic-val", "32", "--batch-size", "32",
            "--workers", "0"]
    for flags in ([], ["--no-cuda-graphs"]):
        config = train.resolve_config(train.build_parser().parse_args(
            args + flags + ["--out", str(tmp_path / f"run{len(flags)}")]))
        run = train.prepare(config)
        assert run.recorded is None and config["cuda_graphs"] in (None, False)
    with pytest.raises(train.UsageError, match="use it with --backend cupy"):
        train.resolve_config(train.build_parser().parse_args(args + ["--cuda-graphs"]))


# ---- every product of a recorded step can go to cuBLAS directly --------------------------------

RECORDED_VARIANTS = ("t2t_vit_7", "t2t_vit_t_14", "t2t_vit_14_resnext", "t2t_vit_14_wide",
                     "t2t_vit_dense", "t2t_vit_14_se", "t2t_vit_16_ghost", "vit_7_patch16")


@pytest.mark.parametrize("name, precision", [(n, "float32") for n in RECORDED_VARIANTS]
                         + [("t2t_vit_7", "bf16"), ("t2t_vit_t_14", "fp16")])
def test_every_product_of_a_recorded_step_is_one_cublas_call(name, precision):
    """While a CUDA graph records, CuPy's matmul may not call cuBLAS, so every product of the
    recorded forward and backward must be one cupy_gemm could make: gaps.matmul routes it
    there (cupy_gemm.takes) and, once the operand cuBLAS cannot read in place is copied
    contiguous as cupy_gemm.matmul copies it, plan() has its arguments. The first GPU run of
    --cuda-graphs failed at the performer's qp @ kp_sum[:, :, None], whose new axis has
    stride 0 (plan() then refused the contiguous copy too). NumPy stands in for CuPy here."""
    from t2t_ref import cupy_gemm, gaps
    from t2t_ref.instrument import wrapped

    def elements(x):
        return tuple(s // x.itemsize for s in x.strides)

    refused, products = [], []
    real = gaps.matmul

    def checked(a, b, out_dtype=None):
        products.append(1)
        if not cupy_gemm.takes(a, b):
            refused.append(f"{a.shape} {a.dtype} @ {b.shape} {b.dtype}: not one cuBLAS call")
        else:
            a_in = a if cupy_gemm.operand(a.shape, elements(a)) else np.ascontiguousarray(a)
            b_in = b if cupy_gemm.operand(b.shape, elements(b)) else np.ascontiguousarray(b)
            if cupy_gemm.plan(a_in.shape, elements(a_in), b_in.shape, elements(b_in)) is None:
                refused.append(f"{a.shape} strides {a.strides} @ {b.shape} strides "
                               f"{b.strides}: no plan")
        return real(a, b, out_dtype)

    model = DataParallel(t2t_ref.create_model(name, num_classes=5, img_size=32, seed=0,
                                              drop_rate=0.1, drop_path_rate=0.1,
                                              precision=precision)).train()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 5, 2)
    model.rng = make_rng(np, step_seed(0, 0))
    # (every `from ..gaps import matmul` too; the check is of layouts, so it needs no
    # recording: capture.active() is thread-local, and DataParallel's pieces run in threads)
    with wrapped(lambda f: f is real, lambda f: checked):
        train.forward_backward(model, x, y, 0.1)
    assert products, "no product went through gaps.matmul"
    assert not refused, f"{name} {precision}: {len(refused)} of {len(products)} products " \
                        f"could not be recorded:\n" + "\n".join(refused[:10])
