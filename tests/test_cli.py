"""Command lines that cannot work: each is refused as it is parsed, with one line naming the
flag, what is wrong and what to give instead, exit code 2, no usage block, no traceback."""

import pytest

from reliability import tried
from t2t_ref import convert, evaluate, predict, train
from t2t_ref.cli import plural

CLIS = {"train": train.main, "evaluate": evaluate.main, "predict": predict.main,
        "convert": convert.main}


def case(cli, args, says):
    """One bad command line: `cli args` must end with exit 2 and one line containing says."""
    return pytest.param(cli, args.split(), says, id=f"{cli} {args}", marks=tried(
        "command line", f"`{cli} {args}`", f"exit 2: `error: {says}`"))


BAD_COMMAND_LINES = [
    case("train", "--workers -1", "argument --workers: -1 is out of range: give a number >= 0"),
    case("train", "--seed -1", "argument --seed: -1 is out of range: give a number >= 0"),
    case("train", "--lr -1", "argument --lr: -1 is out of range: give a number > 0"),
    case("train", "--lr 0", "argument --lr: 0 is out of range: give a number > 0"),
    case("train", "--lr nan", "argument --lr: nan is not a finite number: give one > 0"),
    case("train", "--lr inf", "argument --lr: inf is not a finite number"),
    case("train", "--lr fast", "argument --lr: 'fast' is not a number"),
    case("train", "--weight-decay -0.1", "argument --weight-decay: -0.1 is out of range"),
    case("train", "--epochs 0", "argument --epochs: 0 is out of range: give a number >= 1"),
    case("train", "--batch-size 0", "argument --batch-size: 0 is out of range"),
    case("train", "--batch-size x", "argument --batch-size: 'x' is not an integer"),
    case("train", "--drop 1", "argument --drop: 1 is out of range: give a number in [0, 1)"),
    case("train", "--ema-decay 1", "argument --ema-decay: 1 is out of range"),
    case("train", "--val-fraction 1", "argument --val-fraction: 1 is out of range"),
    case("train", "--clip-grad 0", "argument --clip-grad: 0 is out of range: give a number > 0"),
    case("train", "--crop-scale 0 1", "argument --crop-scale/--scale: 0 is out of range: give a "
         "number in (0, 1]"),
    case("train", "--scale 0.5 2", "argument --crop-scale/--scale: 2 is out of range"),
    case("train", "--ratio 0 1", "argument --crop-ratio/--ratio: 0 is out of range"),
    case("train", "--ratio 2 1", "--crop-ratio 2 1: MIN is above MAX: give --crop-ratio 1 2"),
    case("train", "--aa rand-x", "argument --aa: 'x' is not a section of the grammar (m<int>, "
         "n<int>, mstd<float>, mmax<int>, inc<0|1>, w0), e.g. rand-m9-mstd0.5-inc1"),
    case("train", "--aa augmix-m5", "argument --aa: a RandAugment spec starts with 'rand'"),
    case("train", "--aa rand-n0", "argument --aa: n must be at least 1"),
    case("train", "--reprob 2", "argument --reprob: 2 is out of range: give a number from 0 to 1"),
    case("train", "--hflip -1", "argument --hflip: -1 is out of range: give a number from 0 to 1"),
    case("train", "--vflip 1.5", "argument --vflip: 1.5 is out of range"),
    case("train", "--remode noise", "argument --remode: invalid choice: 'noise' (choose from "
         "'pixel', 'rand', 'const')"),
    case("train", "--recount 0", "argument --recount: 0 is out of range: give a number >= 1"),
    case("train", "--color-jitter -0.1", "argument --color-jitter: -0.1 is out of range"),
    case("train", "--crop-pct 0", "argument --crop-pct: 0 is out of range: give a number in "
         "(0, 1]"),
    case("train", "--crop-pct 1.2", "argument --crop-pct: 1.2 is out of range"),
    case("train", "--train-interpolation cubic", "argument --train-interpolation: invalid "
         "choice: 'cubic'"),
    case("train", "--interpolation random", "argument --interpolation: invalid choice: "
         "'random'"),
    case("train", "--recipe timm", "argument --recipe: invalid choice: 'timm' (choose from "
         "'official')"),
    case("train", "--epochs 10 --cooldown-epochs 10", "--warmup-epochs 0.3 and "
         "--cooldown-epochs 10 leave no cosine in --epochs 10"),
    case("train", "--cooldown-epochs -1", "argument --cooldown-epochs: -1 is out of range"),
    case("train", "--crop-scale 0.5 0.2", "--crop-scale 0.5 0.2: MIN is above MAX: give "
         "--crop-scale 0.2 0.5"),
    case("train", "--warmup-epochs 5", "--warmup-epochs 5 is longer than the run (--epochs 3)"),
    case("train", "--synthetic-train 10", "--synthetic-train 10 images make no whole batch of "
         "--batch-size 64"),
    case("train", "--synthetic-val 0", "argument --synthetic-val: 0 is out of range"),
    case("train", "--synthetic-classes 11", "argument --synthetic-classes: 11 is out of range: "
         "give a number from 2 to 10"),
    case("train", "--synthetic-classes 1", "argument --synthetic-classes: 1 is out of range"),
    case("train", "--max-nonfinite-steps 0", "argument --max-nonfinite-steps: 0 is out of range"),
    case("train", "--model t2t_vit_99", "argument --model: invalid choice: 't2t_vit_99'"),
    case("train", "--img-size 50", "--img-size 50 is not a multiple of 16"),
    case("train", "--img-size 0", "argument --img-size: 0 is out of range: give a number >= 16"),
    case("train", "--recipe official --epochs 1", "--warmup-epochs 10 (from --recipe official) "
         "is longer than the run (--epochs 1): give at most --warmup-epochs 1, or more epochs"),
    case("train", "--resume a --init-from b", "give only one of them"),
    case("evaluate", "--checkpoint c --workers -1", "argument --workers: -1 is out of range"),
    case("evaluate", "--checkpoint c --batch-size 0", "argument --batch-size: 0 is out of range"),
    case("evaluate", "--data d", "one of the arguments --checkpoint --weights is required"),
    case("evaluate", "--checkpoint c --crop-pct 0", "argument --crop-pct: 0 is out of range"),
    case("evaluate", "--checkpoint c --interpolation random", "argument --interpolation: "
         "invalid choice: 'random'"),
    case("predict", "x.png --weights w --top 0", "argument --top: 0 is out of range"),
    case("predict", "x.png --weights w --batch-size 0", "argument --batch-size: 0 is out of range"),
    case("convert", "a.pth", "the following arguments are required: OUT"),
]


@pytest.mark.parametrize("cli, args, says", BAD_COMMAND_LINES)
def test_a_bad_command_line_is_one_line_and_exit_2(cli, args, says, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # train's default --out, runs/t2t, lands here if it gets far
    try:
        code = CLIS[cli](args)
    except SystemExit as exit:  # argparse's own exit
        code = exit.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert says in lines[0], lines[0]
    assert not (tmp_path / "runs").exists(), "nothing is created for a refused command line"


@tried("command line", "`--help` of train, evaluate, predict",
       "each option's default stated once (no \"(default: the file's) (default: None)\")")
def test_help_says_each_default_once(capsys):
    for cli in (train, evaluate, predict):
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        options = capsys.readouterr().out.split("options:", 1)[1]
        for entry in ("\n" + options).split("\n  -")[1:]:  # from one option to the next
            assert entry.count("(default:") <= 1, f"{cli.__name__}: -{' '.join(entry.split())}"


def test_counts_read_as_english():
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == \
        "3 classes"
    assert plural(1, "unreadable image") == "1 unreadable image"
    assert plural(0, "non-finite step") == "0 non-finite steps"


INTERRUPT_WHILE_LOADING = '''
import importlib.abc, os, signal, sys


class CtrlC(importlib.abc.MetaPathFinder):
    """Sends this process SIGINT when t2t_ref.model is about to be imported: a Ctrl-C while
    the command is still loading its modules, at a moment of the test's choosing."""

    def find_spec(self, name, path=None, target=None):
        if name == "t2t_ref.model":
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlC())
'''


@tried("command line", "Ctrl-C while `python -m t2t_ref.train` is still loading its modules "
       "(before main() runs)", "exit 130: `interrupted (Ctrl-C)`, no traceback (it was a "
       "KeyboardInterrupt traceback from inside an import)")
def test_ctrl_c_while_a_command_loads_is_one_line(tmp_path):
    import os
    import subprocess
    import sys
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_WHILE_LOADING)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "t2t_ref.train", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr.strip() == "interrupted (Ctrl-C)", \
        (done.returncode, done.stderr[-800:])
    # imported by a program of its own, t2t_ref leaves Ctrl-C to it: KeyboardInterrupt
    done = subprocess.run([sys.executable, "-c", "import t2t_ref"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "KeyboardInterrupt" in done.stderr, done.stderr[-800:]


@tried("command line", "a command's output piped into a reader that stops early "
       "(`python -m t2t_ref.predict ... | head`)", "exit 141 (128 + SIGPIPE), nothing on stderr "
       "(it was a BrokenPipeError traceback)")
def test_output_into_a_closed_pipe_ends_quietly():
    import subprocess
    import sys
    program = ("import sys\nfrom t2t_ref.cli import run\n"
               "def main():\n    for i in range(10 ** 6):\n        print('line', i)\n"
               "sys.exit(run(main))\n")
    child = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert child.stdout.readline() == b"line 0\n"
    child.stdout.close()  # as `head -1` does once it has its line
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141 and stderr == "", stderr[-600:]
