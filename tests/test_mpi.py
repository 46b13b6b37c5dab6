"""MPI ranks (t2t_ref.parallel.mpi): real `mpirun -n 2` jobs on this machine must give what one
process gives, resume under another rank count, and end together when a rank dies.

mpirun comes with the `mpi` extra (mpi4py and Open MPI's wheel), which the `test` extra pulls
in; without it these tests are skipped, except in CI (CI=true), where they fail. Open MPI
refuses root and more ranks than cores unless told: the environment below tells it.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from reliability import tried
from t2t_ref import evaluate, train
from t2t_ref.checkpoint import load_checkpoint
from t2t_ref.parallel import mpi

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--synthetic-train", "96", "--synthetic-val", "40", "--batch-size", "32",
        "--img-size", "32", "--workers", "0", "--warmup-epochs", "0.5"]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",  # Open MPI 5
           "OMPI_MCA_rmaps_base_oversubscribe": "1",  # Open MPI 4
           "OMP_NUM_THREADS": "1"}  # 2 ranks x 1 thread on 2 cores


def mpirun_path():
    """The mpirun beside this Python (the wheel's), else on PATH; None without mpi4py."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.path.exists(beside) else shutil.which("mpirun")


MPIRUN = mpirun_path()
needs_mpirun = pytest.mark.skipif(MPIRUN is None and not os.environ.get("CI"),
                                  reason="no mpi4py or mpirun: pip install -e '.[mpi]'")


def test_ci_has_mpirun():
    """CI installs the test extra, which brings the mpi one: the MPI tests must run there."""
    if MPIRUN is None and not os.environ.get("CI"):
        pytest.skip("no mpi4py or mpirun here (pip install -e '.[mpi]')")
    assert MPIRUN is not None, "pip install -e '.[test]' should install mpi4py and mpirun"


def mpirun(ranks, args, timeout=300, **popen):
    """`mpirun -n ranks python args...`; a CompletedProcess (or, with popen, a Popen)."""
    command = [MPIRUN, "-n", str(ranks), sys.executable, *args]
    env = {**os.environ, **MPI_ENV}
    if popen:
        return subprocess.Popen(command, env=env, text=True, **popen)
    return subprocess.run(command, env=env, text=True, capture_output=True, timeout=timeout)


def relative(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_without_a_launcher_there_is_no_mpi():
    """Not started by mpirun: a World of one, and mpi4py not even imported."""
    code = ("import sys; from t2t_ref import train; from t2t_ref.parallel import mpi; "
            "w = mpi.join(); print(w.size, w.rank, 'mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in mpi.SIZE_VARIABLES
           and k not in mpi.RANK_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["1", "0", "False"], out.stderr


@tried("command line", "`mpirun -n 2` without mpi4py installed", "exit 2: `error: started by "
       "an MPI launcher with 2 ranks, but mpi4py is not installed: pip install "
       "'t2t_ref[mpi]'`")
def test_launched_without_mpi4py_says_how_to_install_it():
    code = ("import sys; sys.modules['mpi4py'] = None; from t2t_ref import train; "
            "sys.exit(train.main(['--epochs', '1']))")
    env = {**os.environ, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: started by an MPI launcher with 2 ranks, but mpi4py "
                                  "is not installed: pip install 't2t_ref[mpi]'"), out.stderr


@pytest.mark.parametrize("backend, nccl, ranks, gpus, forced, expected", [
    ("numpy", False, 2, 0, None, "mpi"),  # host arrays: MPI in place
    ("numpy", False, 2, 0, "host", "mpi"),
    ("cupy", True, 2, 2, None, "nccl"),  # a GPU per rank
    ("cupy", True, 4, 2, None, "host"),  # NCCL refuses two ranks on one GPU
    ("cupy", False, 2, 2, None, "host"),  # CuPy without NCCL
    ("cupy", True, 2, 2, "host", "host"),  # T2T_REF_ALLREDUCE=host
    ("array_api_strict", False, 2, 0, None, "host")])
def test_the_transport_is_chosen_by_backend_nccl_and_gpus(backend, nccl, ranks, gpus, forced,
                                                          expected):
    assert mpi.choose_transport(backend, nccl, ranks, gpus, forced) == expected


@needs_mpirun
def test_two_ranks_equal_one_process_after_five_adamw_steps(tmp_path):
    """2 ranks x B/2 (and 3 + 2 of B = 5) against 1 process x B: 5 AdamW steps with dropout
    and drop path, a performer and a transformer variant. The ranks hold the same weights bit
    for bit (the script checks); against one process, float64 within 1e-12 and float32 within
    1e-4 (relative); the host-staged sum adds what the ranks gave."""
    sys.path.insert(0, HERE)
    import mpi_steps
    result = tmp_path / "ranks.npz"
    job = mpirun(2, [os.path.join(HERE, "mpi_steps.py"), str(result)])
    assert job.returncode == 0, job.stderr
    ranks = np.load(result)
    assert str(ranks["transport"]) == "MpiSum"
    np.testing.assert_array_equal(ranks["host_staged"], np.arange(5) * 3.0)  # 1x + 2x
    one = mpi.World()
    for name, dtype, batch in mpi_steps.CASES:
        key = f"{name}-{dtype}-{batch}"
        alone, loss = mpi_steps.steps(name, dtype, batch, one)
        tolerance = 1e-12 if dtype == "float64" else 1e-4
        err = relative(ranks[key], alone)
        assert err <= tolerance, f"{key}: 2 ranks differ from 1 process by {err:.1e}"
        assert abs(float(ranks[key + "-loss"]) - loss) <= tolerance * abs(loss), key
        assert relative(alone, mpi_steps.steps(name, dtype, batch, one)[0]) == 0  # repeats


@needs_mpirun
@tried("faults", "`mpirun -n 2` training (RandAugment, random erasing, mixup, cutmix) stopped "
       "mid-epoch (`--stop-after`), resumed by one process", "exit 130 and `last` saved by "
       "rank 0; progress bars as whole lines (no carriage returns: mpirun forwards lines); the "
       "resumed run ends where an uninterrupted one-process run does (float64, 1e-12); "
       "`evaluate` under mpirun gives the one-process numbers")
def test_an_mpi_run_stopped_mid_epoch_resumes_with_another_rank_count(tmp_path, capsys):
    args = TINY + ["--epochs", "2", "--dtype", "float64", "--drop", "0.1", "--drop-path", "0.2",
                   "--mixup", "0.8", "--cutmix", "1.0", "--ema-decay", "0.9",
                   "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.5", "--recount", "2",
                   "--scale", "0.5", "1"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert train.main(args + ["--out", str(straight)]) == 0
    job = mpirun(2, ["-m", "t2t_ref.train", *args, "--out", str(cut), "--stop-after", "4"])
    assert job.returncode == 130, job.stderr
    assert job.stderr.count("interrupted at step 4") == 1, job.stderr  # rank 0 alone speaks
    # progress as whole lines: mpirun passes a rank's output on a line at a time, and a bar
    # redrawn in place would not show until it ends
    assert "\r" not in job.stderr and "\nepoch 1/2: " in job.stderr, job.stderr
    assert "2 MPI ranks" in job.stdout and job.stdout.count("epoch 1:") == 1, job.stdout
    weights, meta, _, _ = load_checkpoint(cut / "last.safetensors")
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 1, 4)
    capsys.readouterr()
    assert train.main(["--resume", str(cut / "last.safetensors")]) == 0  # 1 process
    for part in (0, 3):  # weights, EMA
        a, b = load_checkpoint(straight / "last.safetensors")[part], \
            load_checkpoint(cut / "last.safetensors")[part]
        for key in a:
            err = relative(b[key], a[key])
            assert err <= 1e-12, f"{key}: {err:.1e} from the uninterrupted run"
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (straight, cut)]
    for a, b in zip(*records, strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "val_top1_ema"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key

    capsys.readouterr()
    checkpoint = ["--checkpoint", str(straight / "last.safetensors"), "--workers", "0",
                  "--batch-size", "16"]  # 40 images: the last batch of 8 is cut too
    assert evaluate.main(checkpoint) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    job = mpirun(2, ["-m", "t2t_ref.evaluate", *checkpoint])
    assert job.returncode == 0, job.stderr
    lines = job.stdout.strip().splitlines()
    assert len(lines) == 2, job.stdout  # the summary and the JSON, once
    ranks = json.loads(lines[-1])
    for key in ("images", "top1", "top5", "nonfinite"):
        assert ranks[key] == alone[key], key
    assert ranks["loss"] == pytest.approx(alone["loss"], rel=1e-12)


@needs_mpirun
@tried("faults", "one rank of `mpirun -n 2` training killed (SIGKILL) after the first epoch",
       "the other rank ends within seconds, having said `SIGTERM: the MPI job is ending "
       "(another rank failed or was killed, ...): every rank saves at its next step if they all "
       "reach it within 20 s; otherwise runs/x/last.safetensors and runs/x/best.safetensors "
       "are as epoch 1 left them` (mpirun's SIGKILL follows at once); the checkpoint loads")
def test_killing_one_rank_ends_the_job_with_the_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    job = mpirun(2, ["-m", "t2t_ref.train", *TINY, "--synthetic-train", "1280", "--epochs",
                     "3", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            assert job.poll() is None, job.communicate()
            time.sleep(0.05)
        assert (out / "metrics.jsonl").exists(), "no epoch finished in time"
        os.kill(rank_pid(job.pid, 1), signal.SIGKILL)
        killed = time.time()
        _, err = job.communicate(timeout=60)
        ended = time.time() - killed
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert ended < 15, f"the job took {ended:.0f} s to end after a rank died"
    ours = [line for line in err.splitlines() if line.startswith("SIGTERM:")]
    assert len(ours) == 1, err  # rank 0 alone speaks
    assert ours[0].startswith("SIGTERM: the MPI job is ending (another rank failed or was "
                              "killed"), ours[0]
    assert ours[0].endswith(f"otherwise {out / 'last.safetensors'} and "
                            f"{out / 'best.safetensors'} are as epoch 1 left them"), ours[0]
    weights, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert meta["epoch"] == 1 and all(np.isfinite(w).all() for w in weights.values())


@needs_mpirun
@pytest.mark.parametrize("signum, ranks, code", [
    pytest.param(signal.SIGUSR1, (1,), 138, marks=tried(
        "faults", "SIGUSR1 to one rank of `mpirun -n 2` training (`kill -USR1` of mpirun "
        "reaches every rank; a scheduler's warning signal, SLURM `--signal=USR1@120`)",
        "both ranks stop at the same step: exit 138, `interrupted at step N by SIGUSR1: saved "
        "...` once (rank 0, which never got the signal), `last` at step N, resumable")),
    pytest.param(signal.SIGTERM, (1, 0), 143, marks=tried(
        "faults", "SIGTERM to every rank of `mpirun -n 2` training, as SLURM sends it to the "
        "tasks srun started when a job's time is up", "every rank stops at the same step and "
        "rank 0 saves before any rank ends: exit 143, `interrupted at step N by SIGTERM: "
        "saved ...` once, `last` at step N; a one-process resume runs on")),
])
def test_a_stop_signal_stops_every_rank_at_the_same_step_with_a_save(tmp_path, signum, ranks,
                                                                      code):
    out = tmp_path / "run"
    job = mpirun(2, ["-m", "t2t_ref.train", *TINY, "--synthetic-train", "640", "--epochs", "50",
                     "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / "config.json").exists() and time.time() < deadline:  # started
            assert job.poll() is None, job.communicate()
            time.sleep(0.05)
        time.sleep(1.5)  # some steps in
        for rank in ranks:
            os.kill(rank_pid(job.pid, rank), signum)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == code, err  # mpirun passes on the ranks' exit code
    assert "Traceback" not in err, err
    name = signal.Signals(signum).name
    said = re.findall(rf"interrupted at step (\d+) by {name}: saved (\S+); continue", err)
    assert len(said) == 1 and said[0][1] == str(out / "last.safetensors"), err
    weights, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == int(said[0][0]) > 0, meta
    assert all(np.isfinite(w).all() for w in weights.values())
    assert train.main(["--resume", str(out / "last.safetensors"), "--epochs",
                       str(meta["epoch"] + 1)]) == 0  # one process goes on from there


@needs_mpirun
@tried("faults", "SIGUSR1 to one rank of `mpirun -n 2` training while the ranks validate",
       "the ranks agree on a validation batch and stop there: exit 138, `last` holds the "
       "epoch's last step (epoch 0, batch 2 of 2), and a resumed run validates that epoch")
def test_a_stop_during_validation_under_mpi_stops_every_rank_there(tmp_path):
    out = tmp_path / "run"
    job = mpirun(2, ["-m", "t2t_ref.train", *TINY, "--synthetic-train", "64", "--synthetic-val",
                     "8000", "--epochs", "3", "--out", str(out)], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / "config.json").exists() and time.time() < deadline:  # started
            assert job.poll() is None, job.communicate()
            time.sleep(0.05)
        # 2 training steps, then 8000 images to score (seconds): the signal comes among them.
        # (The progress bar cannot tell when: mpirun forwards a line once it ends.)
        time.sleep(1.5)
        os.kill(rank_pid(job.pid, 1), signal.SIGUSR1)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 138, err
    assert err.count("interrupted at step 2 by SIGUSR1") == 1, err
    _, meta, _, _ = load_checkpoint(out / "last.safetensors")
    assert (meta["epoch"], meta["batch"], meta["step"]) == (0, 2, 2), meta
    assert not (out / "metrics.jsonl").exists()
    assert train.main(["--resume", str(out / "last.safetensors"), "--epochs", "1"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1, validated


def rank_pid(launcher, rank):
    """The process id of MPI rank `rank` among the launcher's descendants."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and \
                    _descends_from(int(pid), launcher):
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} of mpirun {launcher} not found")


def _descends_from(pid, ancestor):
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return False


@needs_mpirun
@tried("command line", "MPI ranks started with different flags (`mpirun -n 1 ... --lr 1e-3 : "
       "-n 1 ... --lr 2e-3`)", "exit 2 before any step: `error: the ranks disagree: rank 1 has "
       "--lr 0.002 where rank 0 has 0.001: start every rank with the same command...`")
def test_ranks_that_disagree_stop_before_training(tmp_path):
    args = ["-m", "t2t_ref.train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]
    command = [MPIRUN, "-n", "1", sys.executable, *args, "--lr", "1e-3", ":", "-n", "1",
               sys.executable, *args, "--lr", "2e-3"]
    job = subprocess.run(command, env={**os.environ, **MPI_ENV}, capture_output=True,
                         text=True, timeout=120)
    assert job.returncode == 2, job.stderr
    ours = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: the ranks disagree: rank 1 has --lr 0.002 where rank 0 has 0.001: "
                    "start every rank with the same command, the same t2t_ref and the same "
                    "data"], job.stderr
    assert not (tmp_path / "run" / "last.safetensors").exists()


@needs_mpirun
@tried("command line", "a missing checkpoint under `mpirun -n 2`", "exit 2 and the "
       "one line a single process prints, said once (rank 0), not once per rank")
def test_a_user_mistake_under_mpirun_is_said_once(tmp_path):
    job = mpirun(2, ["-m", "t2t_ref.train", "--resume", str(tmp_path / "nope.safetensors")])
    assert job.returncode == 2
    ours = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert ours == [f"error: checkpoint {tmp_path / 'nope.safetensors'} does not exist: check "
                    "the path"], job.stderr
