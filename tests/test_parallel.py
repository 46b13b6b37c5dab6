"""Data parallelism (t2t_ref.parallel): a batch cut into pieces that run in threads must give
what the whole batch gives in one thread, dropout included, and the threads must really be
separate."""

import threading

import numpy as np
import pytest

import t2t_ref
from t2t_ref.gaps import make_rng
from t2t_ref.optim import AdamW
from t2t_ref.parallel import DataParallel, piece_sizes, split_rows
from t2t_ref.parallel.threads import balanced_groups, blas_threads, in_worker_thread, \
    map_in_threads

SIZE, CLASSES = 32, 5


@pytest.mark.parametrize("batch, threads, expected", [(10, 4, [3, 3, 2, 2]), (4, 2, [2, 2]),
                                                      (3, 8, [1, 1, 1]), (7, 1, [7]),
                                                      (1, 2, [1])])
def test_piece_sizes_are_even_and_cover_the_batch(batch, threads, expected):
    assert piece_sizes(batch, threads) == expected


def test_split_rows_are_consecutive_views():
    x = np.arange(10 * 3).reshape(10, 3)
    pieces = split_rows(x, [4, 3, 3])
    assert [p.shape[0] for p in pieces] == [4, 3, 3]
    assert np.array_equal(np.concatenate(pieces), x)
    assert all(np.shares_memory(p, x) for p in pieces)


def test_map_in_threads_runs_each_call_in_its_own_thread_with_one_blas_thread():
    before = blas_threads()
    seen = []
    barrier = threading.Barrier(2, timeout=30)  # both calls must be running at the same time

    def work(i):
        barrier.wait()
        seen.append((threading.get_ident(), blas_threads(), in_worker_thread()))
        return i * i

    assert not in_worker_thread()
    assert map_in_threads(work, [(2,), (3,)]) == [4, 9]  # results in call order
    idents = {ident for ident, _, _ in seen}
    assert len(idents) == 2 and threading.get_ident() not in idents, seen
    assert all(count == 1 and in_worker for _, count, in_worker in seen), seen
    assert blas_threads() == before  # restored
    assert not in_worker_thread()


def test_map_in_threads_raises_a_calls_error_after_all_finished():
    finished = []

    def work(i):
        if i == 0:
            raise KeyError("piece 0 failed")
        finished.append(i)

    with pytest.raises(KeyError, match="piece 0 failed"):
        map_in_threads(work, [(0,), (1,)])
    assert finished == [1]


def _forward_backward(model, x, g):
    logits = model.forward(x)
    dx = model.backward(g)
    return logits, dx, {k: v.copy() for k, v in model.grads.items()}


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])  # performer and transformer
def test_pieces_give_what_one_thread_gives(name):
    """Uneven pieces (5 samples in 3), train mode with dropout and drop path: logits, input
    gradient and every parameter's gradient as the model alone computes them, up to float64
    rounding: dropout's decisions are keyed by sample, not by piece."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, SIZE, SIZE))
    g = rng.normal(size=(5, CLASSES))
    results = {}
    for threads in (None, 3):
        model = t2t_ref.create_model(name, num_classes=CLASSES, img_size=SIZE, dtype="float64",
                                     drop_rate=0.2, drop_path_rate=0.3).train()
        if threads:
            model = DataParallel(model, threads=threads)
            assert model.piece_count(5) == 3
        model.rng = make_rng(model.xp, 11)
        results[threads] = _forward_backward(model, x, g)
        assert model.rng.draws > 0
    (logits1, dx1, grads1), (logits3, dx3, grads3) = results[None], results[3]
    assert _relative(logits3, logits1) < 1e-12
    assert _relative(dx3, dx1) < 1e-10
    assert grads3.keys() == grads1.keys()
    for key in grads1:
        err = _relative(grads3[key], grads1[key])
        assert err < 1e-10, f"{key}: the pieces' gradient differs by {err:.1e} (relative)"


def test_one_thread_is_the_model_itself():
    """DataParallel with one thread calls the model's own forward and backward: bit for bit."""
    rng = np.random.default_rng(3)
    x, g = rng.normal(size=(2, 3, SIZE, SIZE)), rng.normal(size=(2, CLASSES))
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE,
                                 dtype="float64", drop_rate=0.1).train()
    alone = _forward_backward(model, x, g)
    model.rng = make_rng(model.xp, 1)  # the same draws again
    wrapped = DataParallel(model, threads=1)
    wrapped.rng = make_rng(model.xp, 1)
    assert model.rng is wrapped.rng, "attributes are the model's, read and written through"
    model.rng = make_rng(model.xp, 1)
    again = _forward_backward(wrapped, x, g)
    for a, b in zip(alone[:2], again[:2]):
        np.testing.assert_array_equal(a, b)
    for k in alone[2]:
        np.testing.assert_array_equal(alone[2][k], again[2][k], err_msg=k)


def test_training_in_pieces_repeats_and_matches_central_differences():
    """Train mode, dropout and drop path on, 2 pieces: the same model.rng repeats a step
    exactly, another one changes it, and the summed gradients are the gradient of the step's
    loss (central differences)."""
    model = DataParallel(t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE,
                                              dtype="float64", drop_rate=0.2,
                                              drop_path_rate=0.3), threads=2).train()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, SIZE, SIZE))
    g = rng.normal(size=(4, CLASSES))
    direction = {k: rng.normal(size=v.shape) for k, v in model.params.items()}

    def loss(seed=7):
        model.rng = make_rng(model.xp, seed)
        return float(np.sum(model.forward(x) * g))

    first = loss()
    model.backward(g)
    analytic = sum(np.sum(model.grads[k] * d) for k, d in direction.items())
    assert loss() == first, "the same model.rng did not repeat the step"
    assert loss(seed=8) != first, "the dropout masks do not depend on model.rng"

    base = {k: v.copy() for k, v in model.params.items()}
    h = 1e-6
    losses = []
    for sign in (1, -1):
        for k in base:
            model.params[k] = base[k] + sign * h * direction[k]
        losses.append(loss())
    numeric = (losses[0] - losses[1]) / (2 * h)
    assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1.0), (analytic, numeric)


def test_adamw_steps_in_threads_equal_one_process():
    """5 AdamW steps with dropout and drop path: 1 thread and 2 threads end with the same
    weights, float64 within 1e-12 (relative)."""
    rng = np.random.default_rng(4)
    batches = [(rng.normal(size=(4, 3, SIZE, SIZE)), rng.integers(0, CLASSES, 4))
               for _ in range(5)]
    final = {}
    for threads in (1, 2):
        model = DataParallel(t2t_ref.create_model(
            "t2t_vit_7", num_classes=CLASSES, img_size=SIZE, dtype="float64", drop_rate=0.1,
            drop_path_rate=0.2), threads=threads).train()
        opt = AdamW(model.params, weight_decay=0.05, threads=threads)
        for step, (x, y) in enumerate(batches):
            model.rng = make_rng(model.xp, 100 + step)
            _, dlogits = t2t_ref.cross_entropy(model.forward(x), y, smoothing=0.1)
            model.backward(dlogits)
            opt.step(model.params, model.grads, 1e-3)
        final[threads] = model.params.flat.copy()
    assert _relative(final[2], final[1]) < 1e-12


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_bad_thread_count_is_refused(threads):
    model = t2t_ref.create_model("t2t_vit_7", num_classes=CLASSES, img_size=SIZE)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        DataParallel(model, threads=threads)


def test_the_model_imports_nothing_of_the_parallel_layer():
    """The math (ops/, layers/, gaps.py, model.py) does not know how it is run."""
    import ast
    import pathlib
    root = pathlib.Path(t2t_ref.__file__).parent
    files = [root / "model.py", root / "gaps.py", *(root / "ops").glob("*.py"),
             *(root / "layers").glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any("parallel" in n or "shards" in n for n in names), \
                f"{path.name} imports {names}"


def test_balanced_groups_cover_every_name_once_and_even_out_the_sizes():
    arrays = {f"t{i}": np.zeros(size) for i, size in enumerate([50, 40, 30, 20, 10, 10])}
    groups = balanced_groups(arrays, 2)
    assert sorted(name for group in groups for name in group) == sorted(arrays)
    totals = [sum(arrays[name].size for name in group) for group in groups]
    assert totals == [80, 80], totals
    assert balanced_groups({"only": np.zeros(3)}, 4) == [["only"]]  # no empty groups


def test_adamw_in_threads_updates_exactly_as_in_one_thread():
    """Each thread updates whole tensors of its own, with the same operations: bit for bit."""
    rng = np.random.default_rng(2)
    shapes = {"a.weight": (300, 700), "b.weight": (64, 64), "b.bias": (64,), "c": (1, 1, 8)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    results = {}
    for threads in (1, 2):
        p = {k: v.copy() for k, v in params.items()}
        opt = AdamW(p, weight_decay=0.05, threads=threads)
        for step in range(3):
            grads = {k: np.random.default_rng(step).normal(size=s).astype(np.float32)
                     for k, s in shapes.items()}
            opt.step(p, grads, lr=1e-2)
        results[threads] = p
    for k in shapes:
        assert np.array_equal(results[1][k], results[2][k]), k


def test_map_in_threads_nested_or_concurrent_runs_and_restores_blas():
    """A map inside a worker runs its calls in place (no deadlock on the busy pool); maps from
    two threads at once take turns, and the BLAS thread count ends as it began."""
    before = blas_threads()

    def inner(i):
        return map_in_threads(lambda j: (i, j, threading.get_ident()), [(0,), (1,)])

    results = map_in_threads(inner, [(0,), (1,)])
    for i, pairs in enumerate(results):
        assert [(a, b) for a, b, _ in pairs] == [(i, 0), (i, 1)]
        assert len({ident for _, _, ident in pairs}) == 1  # in the calling worker's thread

    outer = [threading.Thread(target=map_in_threads, args=(time_waster, [(k,), (k,)]))
             for k in range(3)]
    for t in outer:
        t.start()
    for t in outer:
        t.join(timeout=60)
    assert blas_threads() == before


def time_waster(k):
    x = np.random.default_rng(k).random((200, 200))
    return float(np.sum(x @ x))


class CountingComm:
    """A stand-in communicator of two ranks whose other rank mirrors this one: counts the
    allgathers a piece of code makes."""

    def __init__(self):
        self.allgathers = 0

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def allgather(self, value):
        self.allgathers += 1
        return [value, value]


def test_a_training_step_gathers_the_ranks_counts_once(monkeypatch):
    """Under MPI the start of a step gathers every rank's sample count with the stop
    requests (World.start_step); the forward takes them from there instead of a second
    allgather, and counts that do not fit this rank's piece are refused."""
    from t2t_ref.parallel import mpi
    from t2t_ref.parallel.mpi import World
    monkeypatch.setattr(mpi, "_watcher", {"world": None})  # (a World of ranks registers)
    comm = CountingComm()
    world = World(comm)
    model = DataParallel(t2t_ref.create_model("t2t_vit_7", num_classes=3, img_size=32),
                         threads=1, world=world).eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    counts, stop = world.start_step(2, None)
    assert (counts, stop, comm.allgathers) == ([2, 2], None, 1)
    given = model.forward(x, keep_cache=False, counts=counts)
    assert comm.allgathers == 1 and model.samples == 4
    gathered = model.forward(x, keep_cache=False)  # (evaluation: no start of a step)
    assert comm.allgathers == 2
    np.testing.assert_array_equal(given, gathered)
    with pytest.raises(ValueError, match="do not fit"):
        model.forward(x, counts=[3, 2])
