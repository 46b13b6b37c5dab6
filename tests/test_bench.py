"""The benchmark tool (t2t_ref.bench): its FLOP count, its profiler, and a quick run end to end.

No speed target is asserted here: these tests prove that the tool measures what it says, not
how fast anything is.
"""

import json
import platform
import sys
import threading
import time

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from t2t_ref import bench
from t2t_ref import model as model_module
from t2t_ref.layers import token_performer
from t2t_ref.ops import linear
from t2t_ref.optim import AdamW
from t2t_ref.torch_port import create_torch_model

# the benchmark's one extra dependency (it sets NumPy's BLAS threads); not in the test extra
pytest.importorskip("threadpoolctl", reason="t2t_ref.bench needs threadpoolctl: "
                                            "pip install threadpoolctl")


@pytest.mark.parametrize("name, size", [("t2t_vit_7", 48), ("t2t_vit_t_14", 32)])
def test_count_flops_matches_torch_flop_counter(name, size):
    """count_flops (from the shapes) against torch's FlopCounterMode on the oracle's forward,
    which counts every mm/addmm/bmm the eager model runs (the performer's einsums included)."""
    model = create_torch_model(name, num_classes=bench.NUM_CLASSES, img_size=size).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(3, 3, size, size))
    expected = counter.get_total_flops()
    ours = bench.count_flops(name, size, 3, training=False)
    assert abs(ours - expected) <= 0.02 * expected, \
        f"{name} at {size}: count_flops {ours:,} vs FlopCounterMode {expected:,}"
    assert bench.count_flops(name, size, 3, training=True) == 3 * ours


@pytest.mark.parametrize("name, gmacs", [("t2t_vit_7", 1.1), ("t2t_vit_14", 4.8),
                                         ("t2t_vit_t_14", 6.1)])
def test_count_flops_gives_the_papers_macs(name, gmacs):
    """The T2T-ViT paper's table lists MACs (multiply-adds) at 224: FLOPs / 2."""
    assert round(bench.count_flops(name, 224, 1, training=False) / 2e9, 1) == gmacs


def test_parse_config():
    config = bench.parse_config("t2t_vit_t_14-64-b32-train")
    assert (config.model, config.img_size, config.batch, config.training) == \
        ("t2t_vit_t_14", 64, 32, True)
    assert config.name == "t2t_vit_t_14-64-b32-train"
    for bad in ("t2t_vit_7-224-16-train", "t2t_vit_99-224-b16-train", "t2t_vit_7-100-b4-infer",
                "t2t_vit_7-224-b16-predict"):
        with pytest.raises(ValueError, match="configuration"):
            bench.parse_config(bad)


def _is_original(function):
    return not hasattr(function, "__wrapped__")


@pytest.fixture
def one_thread():
    bench.limit_threads(1)
    yield
    bench.restore_threads()


def test_profiler_exclusive_times_add_up_to_the_step(one_thread):
    side = bench.Ours(bench.parse_config("t2t_vit_7-32-b2-train"), "numpy")
    side.prepare()
    side.step()  # warm
    plain = []
    for _ in range(3):
        start = time.perf_counter()
        side.step()
        plain.append(1e3 * (time.perf_counter() - start))

    total_ms, rows, threads = bench.profile_step(side)
    assert threads["threads"] == 1 and abs(threads["thread_ms"] - total_ms) < 1e-6
    by_op = {row["op"]: row for row in rows}
    other = by_op["other (bench loop, outside the profiled code)"]
    wrapped_ms = sum(row["ms"] for row in rows if row is not other)
    # exclusive times: nested calls are not counted twice, so they add up to the step
    assert 0.0 <= other["ms"] <= 0.1 * total_ms, (other, total_ms)
    assert abs(wrapped_ms + other["ms"] - total_ms) < 1e-6
    assert abs(sum(row["pct"] for row in rows) - 100.0) < 1e-6
    assert all(row["ms"] >= -0.05 for row in rows), rows  # exclusive time is never negative
    # the profiled step is a normal step (loose: the machine may be busy)
    assert 0.2 * min(plain) < total_ms < 5 * max(plain), (total_ms, plain)
    # it names the main ops, with their call counts (7 blocks, 2 performer layers)
    for op, calls in [("linear_forward", 38), ("linear_backward", 38),
                      ("layernorm_forward", 19), ("layernorm_backward", 19),
                      ("scaled_dot_product_attention_forward", 7),
                      ("scaled_dot_product_attention_backward", 7),
                      ("performer_attention_forward", 2), ("performer_attention_backward", 2),
                      ("token_performer_forward", 2), ("block_backward", 7),
                      ("soft_split_forward", 3), ("fold", 3), ("cross_entropy", 1),
                      ("AdamW.step (own code)", 1), ("AdamW._update_range (flat buffers)", 1),
                      ("T2TViT.forward (own code)", 1), ("T2TViT.backward (own code)", 1),
                      ("DataParallel.forward (own code)", 1)]:
        assert by_op[op]["calls"] == calls, (op, by_op.get(op))
    assert bench.WAITING not in by_op  # one thread: no pieces to wait for
    # it replaced nothing, and its hook is gone
    assert _is_original(model_module.linear_forward)
    assert model_module.linear_forward is linear.linear_forward
    assert model_module.T2T_LAYERS["performer"][0] is token_performer.token_performer_forward
    assert _is_original(token_performer.token_performer_forward)
    assert _is_original(model_module.T2TViT.forward) and _is_original(AdamW.step)
    assert sys.getprofile() is None and threading.getprofile() is None


@pytest.fixture
def two_threads():
    bench.limit_threads(2)
    yield
    bench.restore_threads()


def test_profiler_sums_the_worker_threads(two_threads):
    """With two threads the model runs two pieces at once: each op is counted in both worker
    threads, the main thread's wait for them is left out, and the rows add up to thread time."""
    side = bench.Ours(bench.parse_config("t2t_vit_7-32-b4-train"), "numpy")
    side.prepare()
    side.step()  # warm
    total_ms, rows, threads = bench.profile_step(side)
    by_op = {row["op"]: row for row in rows}
    assert threads["threads"] >= 3, threads  # the main thread and (at least) two pool threads
    assert bench.WAITING not in by_op
    assert abs(sum(row["ms"] for row in rows) - threads["thread_ms"]) < 1e-6
    assert abs(sum(row["pct"] for row in rows) - 100.0) < 1e-6
    assert all(row["ms"] >= -0.05 for row in rows), rows
    # the pieces' work is counted in full: more thread time than wall time (two busy threads),
    # at most the wall time of all three threads
    assert total_ms < threads["thread_ms"] < 3 * total_ms, (total_ms, threads)
    for op, calls in [("linear_forward", 2 * 38), ("layernorm_backward", 2 * 19),
                      ("T2TViT.forward (own code)", 2), ("T2TViT.backward (own code)", 2),
                      ("DataParallel.forward (own code)", 1), ("cross_entropy", 1),
                      ("summing the pieces' gradients", 2), ("AdamW.step (own code)", 1),
                      ("AdamW._update_range (flat buffers)", 2)]:
        assert by_op[op]["calls"] == calls, (op, by_op.get(op))


def test_main_quick_writes_sane_numbers(tmp_path, capsys):
    # one thread: the test machine may be busy, and two-thread BLAS on a busy 2-core machine
    # can be 10x slower; the thread count is the same for both sides either way
    path = tmp_path / "bench.json"
    threads_before = torch.get_num_threads()
    assert bench.main(["--quick", "--repeats", "5", "--threads", "1", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads_before  # main puts the thread counts back
    out = capsys.readouterr().out
    assert "where t2t_ref's time goes" in out and "loader images/s" in out
    report = json.loads(path.read_text())
    assert report["peak_gflops"] > 0 and report["machine"]["threads"] == 1
    assert [r["config"] for r in report["results"]] == [c.name for c in bench.QUICK]
    for r in report["results"]:
        assert r["logits_rel_diff"] < 1e-4  # the same model on both sides
        assert r["flops"] == bench.count_flops(r["model"], r["img_size"], r["batch"],
                                               r["mode"] == "train")
        for side in ("ours", "torch"):
            s = r[side]
            assert len(s["times_ms"]) == 5 and all(t > 0 for t in s["times_ms"])
            assert s["min_ms"] <= s["ms"] <= s["max_ms"]
            assert s["images_per_s"] == pytest.approx(r["batch"] / (s["ms"] / 1e3))
            assert s["gflops"] == pytest.approx(r["flops"] / (s["ms"] / 1e3) / 1e9)
            assert s["peak_pct"] == pytest.approx(100 * s["gflops"] / report["peak_gflops"])
            assert "error" not in r["memory"][side], r["memory"][side]
            assert r["memory"][side]["peak_mb"] >= 0
        assert r["ratio"] == pytest.approx(r["ours"]["ms"] / r["torch"]["ms"])
        if r["mode"] == "train":  # a training step allocates (grads, optimizer state)
            assert r["memory"]["ours"]["peak_mb"] > 0 and r["memory"]["torch"]["peak_mb"] > 0
            assert r["memory_ratio"] == pytest.approx(
                r["memory"]["ours"]["peak_mb"] / r["memory"]["torch"]["peak_mb"])
        assert r["loader_images_per_s"] > 0
        assert r["profile_ms"] > 0 and r["profile"][0]["ms"] > 0


def test_loader_bench_reports_images_per_second_per_worker_count(tmp_path, monkeypatch):
    """bench --loader's measurement, small: JPEG photos written and decoded, the recipe's
    augmentation, a rate per worker count, the consumer's share per batch."""
    from t2t_ref import bench_loader
    lines, timed = [], {}
    real_rate = bench_loader.loader_rate

    def loader_rate(dataset, batch, size, workers, *args):  # how much each count is given
        timed[workers] = len(dataset)
        return real_rate(dataset, batch, size, workers, *args)
    monkeypatch.setattr(bench_loader, "loader_rate", loader_rate)
    result = bench_loader.run(batch=4, size=32, batches=2, worker_counts=[1, 2],
                              out=lines.append)
    assert set(result["workers"]) == {1, 2} and all(r > 0 for r in result["workers"].values())
    # every worker gets 3 batches or more (2 batches for 2 workers left one idle half the time)
    assert timed == {1: 4 * 3, 2: 4 * 3 * 2}, timed
    assert result["consumer_ms"] > 0
    assert "rand-m9-mstd0.5-inc1, random erasing 0.25" in lines[0]
    assert lines[1].strip().startswith("1 worker process") and "per worker" in lines[1]
    monkeypatch.setitem(sys.modules, "skimage", None)  # a bare GPU machine: stand-ins
    what, photos = bench_loader.source_photos()
    assert what.startswith("generated") and photos[0].shape == (480, 640, 3)
    monkeypatch.undo()
    samples = bench_loader.write_photos(str(tmp_path), 3)
    assert [label for _, label in samples] == [0, 1, 2]
    with Image.open(samples[0][0]) as img:
        assert img.format == "JPEG" and max(img.size) == 500 and min(img.size) == 375


def test_main_refuses_bad_options(capsys):
    assert bench.main(["--quick", "--repeats", "4"]) == 2
    assert bench.main(["--config", "t2t_vit_7-30-b4-train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "at least 5" in err and "multiple of 16" in err


def test_cupy_without_a_gpu_is_one_line(capsys):
    from t2t_ref.backend import BackendError, get_namespace
    try:
        get_namespace("cupy")
        if torch.cuda.is_available():
            pytest.skip("CuPy and a CUDA PyTorch are here: --backend cupy would run")
    except BackendError:
        pass
    assert bench.main(["--quick", "--backend", "cupy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_precision_the_machine_cannot_run_is_one_line(monkeypatch, capsys):
    """As on a T4 asked for bf16 (precision.py refuses it): the bench says so before timing."""
    from t2t_ref import precision

    def refuse(xp, name, master_dtype):
        raise precision.PrecisionError(f"precision {name} needs a GPU of compute capability "
                                       "8.0 or newer, and this one is 7.5: use --precision fp16")
    monkeypatch.setattr(precision, "compute_dtype", refuse)
    assert bench.main(["--quick", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: precision bf16 needs") and err.count("\n") == 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_is_accepted_by_glibc():
    """The mallopt settings must be within glibc's limits (mallopt returns 0 otherwise, and
    the commands would silently run without them)."""
    from t2t_ref.backend import keep_freed_memory
    assert keep_freed_memory() is True


def test_failures_name_parity_and_gpu_targets():
    """Parity is checked on every backend; the speed and memory targets in GPU mode."""
    good = {"parity_tolerance": 1e-4, "logits_rel_diff": 1e-7, "grads_rel_diff": 2e-7,
            "grads_worst": "head.weight", "ratio": 1.1, "target_ratio": 1.2,
            "memory_ratio": 1.2, "target_memory_ratio": 1.5}
    assert bench.failures(good, "cupy") == [] and bench.failures(good, "numpy") == []
    slow = dict(good, ratio=1.3, memory_ratio=1.6)
    assert bench.failures(slow, "numpy") == []
    assert [f.split()[0] for f in bench.failures(slow, "cupy")] == ["1.30x", "1.60x"]
    smoke = dict(slow, target_ratio=None)  # --quick: its batches of 4 have no speed target
    assert [f.split()[0] for f in bench.failures(smoke, "cupy")] == ["1.60x"]
    wrong = dict(good, grads_rel_diff=float("nan"), logits_rel_diff=3e-3)
    failed = bench.failures(wrong, "numpy")
    assert len(failed) == 2 and "gradient head.weight" in failed[1], failed
    # under half precision: t2t_ref against its own float32 (torch.autocast's only reported)
    half = dict(good, precision="bf16", half_tolerance=(1e-2, 3e-2), half={
        "t2t_ref": {"logits": 5e-3, "grads": 8e-3, "worst": "blocks.3.norm2.weight"},
        "torch": {"logits": 2e-3, "grads": float("nan"), "worst": "head.weight"}})
    assert bench.failures(half, "numpy") == []
    half["half"]["t2t_ref"] = {"logits": 2e-2, "grads": 4e-2, "worst": "head.weight"}
    failed = bench.failures(half, "numpy")
    assert len(failed) == 2 and "bf16 logits differ from float32's" in failed[0] \
        and "bf16 gradient head.weight" in failed[1], failed


def test_half_precision_mode_holds_the_policy_to_its_float32(tmp_path):
    """bench --precision: the float32 twins of both sides are still the same model, and
    t2t_ref's half-precision logits and gradients are within HALF_TOLERANCE of its float32
    (fp16's gradients with the loss scale); torch.autocast's distance is recorded too. One
    whole run (bf16), and fp16's check alone (the timing is the same code)."""
    path = tmp_path / "half.json"
    assert bench.main(["--config", "t2t_vit_7-32-b4-train", "--precision", "bf16",
                       "--repeats", "5", "--threads", "1", "--json", str(path)]) == 0
    (bf16,) = json.loads(path.read_text())["results"]
    config = bench.parse_config("t2t_vit_7-32-b4-train")
    ours = bench.Ours(config, "numpy", precision="fp16")
    theirs = bench.Theirs(config, "cpu", state=ours.model.state_dict(), precision="fp16")
    fp16 = bench.check_parity(config, "numpy", "fp16", ours, theirs)
    for precision, r in (("bf16", bf16), ("fp16", fp16)):
        assert r["logits_rel_diff"] < 1e-4 and r["grads_rel_diff"] < 1e-4  # same model
        logits_tol, grads_tol = bench.HALF_TOLERANCE[precision]
        policy, autocast = r["half"]["t2t_ref"], r["half"]["torch"]
        assert 0 < policy["logits"] <= logits_tol and 0 < policy["grads"] <= grads_tol, policy
        assert autocast["logits"] > 0 and autocast["worst"] is not None  # measured, not held


def test_a_parity_failure_exits_1(monkeypatch, capsys):
    """If PyTorch's side computed something else, the bench says so and exits 1."""
    original = bench.Theirs.eval_logits
    monkeypatch.setattr(bench.Theirs, "eval_logits",
                        lambda self, half=True: original(self, half) + 1.0)
    assert bench.main(["--config", "t2t_vit_7-32-b2-infer", "--threads", "1"]) == 1
    assert "FAILED: t2t_vit_7-32-b2-infer: logits differ" in capsys.readouterr().err
