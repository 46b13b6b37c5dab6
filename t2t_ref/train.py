"""Train T2T-ViT on an ImageNet-style folder, or on the built-in shapes when no --data is given.

    python -m t2t_ref.train                                   # built-in shapes, a few minutes
    python -m t2t_ref.train --data imagenette2-320 --img-size 224 --epochs 100 --backend cupy
    python -m t2t_ref.train --resume runs/t2t/last.safetensors
    python -m t2t_ref.train --data flowers --model t2t_vit_14 --init-from 81.5_T2T_ViT_14.pth.tar
    python -m t2t_ref.train --data imagenet --recipe official --model t2t_vit_14 --backend cupy
    python -m t2t_ref.train --data digits --img-size 64 --hflip 0 --crop-pct 1   # no flip,
                                                          # whole-image evaluation
    mpirun -n 4 python -m t2t_ref.train ...    # 4 processes, each a quarter of every batch

Augmentation takes timm's flags (--hflip, --vflip, --scale/--ratio, --train-interpolation,
--color-jitter, --aa, --reprob/--remode/--recount, --no-aug; evaluation --crop-pct,
--interpolation), each with its official value in --help; --recipe official sets the whole
official ImageNet recipe for --model (recipe.py) and prints it as a command line. Batches come
from worker processes as uint8 (data/loader.py) and are normalised, erased and mixed on the
training device (data/feed.py, mixup.py).

Each epoch writes to --out: metrics.jsonl (one line per epoch), curves.png, and the
checkpoints last.safetensors and best.safetensors (see checkpoint.py). Ctrl-C (or SIGTERM,
SIGUSR1: stop.py) saves `last` (mid-epoch, exactly where it stopped) and --resume continues as
if never interrupted: every random number is a function of (seed, epoch, step), never of the
clock. --resume with a larger --epochs extends a run (the schedule becomes the new total's,
from the current step).

A step whose loss or gradient norm is NaN or inf is skipped and counted on the device
(guard.py), read with the logged loss every LOG_EVERY steps; --max-nonfinite-steps of them in
a row stop the run. Exit codes: 0 done, 2 a user mistake (one line saying what to change),
3 diverged (checkpoints as the last finished epoch left them), 130 Ctrl-C, 143 SIGTERM and
138 SIGUSR1 (`last` saved).

The loop is train_step (forward, loss, backward, clip, AdamW, EMA: what the tutorial writes)
inside bookkeeping: prepare() builds or resumes a Run, fit() feeds it batches, logs, and
checkpoints each epoch (finish_epoch); a Position says where the run is. Under mpirun
(parallel/mpi.py) every rank runs the same code on its piece of each batch; rank 0 alone
prints and writes.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, fields

import numpy as np
from tqdm import tqdm

from .atomic import remove_leftovers, write_atomic
from .backend import BackendError, keep_freed_memory, to_device, to_numpy
from .checkpoint import (CheckpointError, NonFiniteError, checkpoint_meta, load_checkpoint,
                         save_checkpoint)
from .cli import (Parser, UsageError, number, path, plural, progress_options, run as run_cli,
                  user_error)
from .data import (SHAPE_CLASSES, ArrayDataset, DataError, FileDataset, Loader,
                   default_workers, find_splits, make_shapes_splits, model_input)
from .data.erasing import MODES
from .data.randaugment import rand_augment
from .data.upload import GpuWait
from .data.transforms import RESAMPLE, TRAIN_INTERPOLATIONS
from .data.folder import short_list
from .data.workers import workers_that_fit
from .ema import WeightEMA
from .evaluate import evaluate, json_line, top_k
from .gaps import KeyedRandom, make_rng, seed_array
from . import graphs
from .graphs import NEEDS_CUPY, CupyRecorder, StepGraph
from .guard import StepMonitor, grad_norm, quiet_float_warnings
from .mixup import mix_batch
from .loss_scale import DynamicLossScale
from .model import PATCH, create_model
from .precision import PRECISIONS, PrecisionError
from .parallel import DataParallel, mpi
from .parallel.mpi import WorldError
from .ops.cross_entropy import cross_entropy
from .optim import AdamW, clip_grad_norm
from .pretrained import PretrainedError, load_weights_into
from .recipe import (DATA_DEFAULTS, RECIPES, erasing_of, eval_transform_of, official,
                     train_transform_of)
from .run_folder import check_out_folder, lock_run_folder, release_run_folder
from .schedule import CosineSchedule
from .stop import NAMES as STOP_NAMES
from .stop import StopSignals
from .stop import exit_code as stop_exit_code
from .variants import list_models

LOG_EVERY = 10  # steps between reads of the loss and the non-finite counters: one host sync
# Flags that may differ when resuming: where the run is, not what it computes.
RESUME_MAY_CHANGE = ("data", "workers", "backend", "cuda_graphs", "out", "resume",
                     "stop_after", "max_nonfinite_steps")
# What a checkpoint written before these flags existed ran with
BEFORE_THESE_FLAGS = {**DATA_DEFAULTS, "cooldown_epochs": 0, "recipe": None,
                      "precision": "float32", "warmup_prefix": True}
# Flags that may differ between MPI ranks (paths can differ from node to node; what is read
# there is compared by content)
RANK_LOCAL = ("data", "workers", "out", "resume")


class Diverged(Exception):
    """The run stopped because its steps kept coming out NaN or inf (exit code 3); the message
    names the step, the last finite loss and the learning rate. everywhere: raised on every MPI
    rank alike (else on this one only, and the others must be ended)."""

    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere


class OutputError(Exception):
    """A file of the run could not be written (disk full, quota, permissions): the message
    says what is still on disk and how to go on; exit code 2, as a user mistake."""


USER_ERRORS = (DataError, CheckpointError, BackendError, PretrainedError, OutputError)


class Interrupted(Exception):
    """Raised between two training steps at --stop-after or on a stop signal (stop.py);
    signum: the signal's number, None for --stop-after."""

    def __init__(self, signum=None):
        super().__init__(signum)
        self.signum = signum


def aa_spec(text):
    """--aa's type: a RandAugment spec in timm's grammar (checked now), or none."""
    if text.lower() in ("none", ""):
        return None
    try:
        rand_augment(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--aa {text!r}: ")) from None
    return text


def build_parser(defaults=True):
    """The command line. defaults=False leaves every flag not given out of the parsed result:
    how a resumed run tells a flag written out from one left at its default."""
    p = Parser(prog="python -m t2t_ref.train", description=__doc__)

    def add(*names, **options):
        if not defaults:
            options["default"] = argparse.SUPPRESS
        p.add_argument(*names, **options)

    fraction = number(float, low=0, below=1)  # [0, 1)
    add("--recipe", default=None, choices=RECIPES,
        help="official: every flag of the official ImageNet recipe for --model (lr scaled by "
        "--batch-size from 1e-3 or 5e-4 at 512, weight decay by size, 310 epochs, warmup, "
        "drop path, mixup/cutmix, RandAugment, random erasing, EMA; see t2t_ref/recipe.py); "
        "flags given explicitly win, and the run prints the command it resolved to")
    add("--data", type=path("a dataset folder"), default=None,
        help="ImageNet-style folder: DIR/train/<class>/*, optional "
        "DIR/val/<class>/* (default: the built-in procedurally generated shapes)")
    add("--model", default="t2t_vit_7", choices=list_models(), metavar="NAME",
        help="model: " + ", ".join(list_models()))
    add("--img-size", type=number(int, low=PATCH), default=None,
        help="image side, a multiple of 16 (default: 32 for the built-in shapes, else 224)")
    add("--epochs", type=number(int, low=1), default=3,
        help="passes over the training set; with --resume, more than the checkpoint's "
        "extends the run")
    add("--batch-size", type=number(int, low=1), default=64, help="images per optimizer step")
    add("--lr", type=number(float, above=0), default=5e-4, help="peak learning rate, after warmup")
    add("--weight-decay", type=number(float, low=0), default=0.05,
        help="AdamW's decoupled decay; none on biases, norm weights and the class token")
    add("--warmup-epochs", type=number(float, low=0), default=0.3,
        help="linear warmup from --warmup-lr to --lr, per step")
    add("--cooldown-epochs", type=number(int, low=0), default=0,
        help="the last epochs of --epochs train at --min-lr; the cosine spans the others "
        "(official: 10 of 310)")
    add("--warmup-prefix", action=argparse.BooleanOptionalAction, default=True,
        help="the cosine starts where the warmup ends; --no-warmup-prefix: one cosine over "
        "all the scheduled steps, whose first ones the warmup replaces, as timm's default "
        "(official: --no-warmup-prefix)")
    add("--warmup-lr", type=number(float, low=0), default=1e-6,
        help="learning rate at the first step")
    add("--min-lr", type=number(float, low=0), default=1e-5, help="the cosine schedule's floor")
    add("--label-smoothing", type=fraction, default=0.1, help="weight spread over all classes")
    add("--clip-grad", type=number(float, above=0), default=None,
        help="clip the gradients' global L2 norm")
    add("--drop", type=fraction, default=0.0, help="dropout rate of the backbone")
    add("--drop-path", type=fraction, default=0.0,
        help="stochastic depth rate of the last block (official: 0.1)")
    add("--mixup", type=number(float, low=0), default=0.0,
        help="mixup alpha (official: 0.8)")
    add("--cutmix", type=number(float, low=0), default=0.0,
        help="cutmix alpha (official: 1.0)")
    add("--ema-decay", type=fraction, default=0.0,
        help="weight EMA decay, 0 = off (official: 0.99996, far too slow for short runs)")
    # ---- data augmentation: timm's flag names (and the official recipe's values) ----
    probability = number(float, low=0, high=1)
    add("--crop-scale", "--scale", dest="crop_scale", type=number(float, above=0, high=1),
        nargs=2, default=None, metavar=("MIN", "MAX"),
        help="random resized crop area range (default: 0.08 1.0, the official one; 1 1, no "
        "crop, for the built-in shapes: every image is new and already randomly placed)")
    add("--crop-ratio", "--ratio", dest="crop_ratio", type=number(float, above=0), nargs=2,
        default=None, metavar=("MIN", "MAX"),
        help="random resized crop aspect-ratio range (default: 0.75 1.333, the official one; "
        "1 1 for the built-in shapes)")
    add("--train-interpolation", default="bicubic", choices=TRAIN_INTERPOLATIONS,
        help="resampling of the training crop (and RandAugment's geometric ops); random: "
        "bilinear or bicubic per image (official: random)")
    add("--hflip", type=probability, default=0.5, metavar="P",
        help="probability of a horizontal flip; 0 turns it off, for data whose orientation "
        "carries the label, such as digits and text (official: 0.5)")
    add("--vflip", type=probability, default=0.0, metavar="P",
        help="probability of a vertical flip (official: 0)")
    add("--color-jitter", type=number(float, low=0), default=0.0, metavar="S",
        help="brightness, contrast and saturation jitter strength, used only without --aa "
        "(official: 0.4, unused there since --aa is set)")
    add("--aa", type=aa_spec, default=None, metavar="SPEC",
        help="RandAugment in timm's grammar, e.g. rand-m9-mstd0.5-inc1 (magnitude 9, its noise "
        "0.5, the increasing op set) or rand-m7-n3; none: off (official: "
        "rand-m9-mstd0.5-inc1)")
    add("--reprob", type=probability, default=0.0, metavar="P",
        help="random erasing probability per image, on the normalised image (official: 0.25)")
    add("--remode", default="pixel", choices=MODES,
        help="random erasing fill: pixel (per-pixel normal noise), rand (one colour per "
        "rectangle) or const (zeros) (official: pixel)")
    add("--recount", type=number(int, low=1), default=1, metavar="N",
        help="random erasing rectangles per image, 1 to N (official: 1)")
    add("--no-aug", action="store_true", default=False,
        help="no augmentation: training images are only resized (shorter side to the image "
        "size), centre-cropped and normalised; --mixup and --cutmix still apply")
    add("--crop-pct", type=number(float, above=0, high=1), default=0.9,
        help="evaluation resizes the shorter side to img-size / crop-pct and crops the "
        "centre; 1 evaluates the whole (square) image (official: 0.9, 248 for 224). The "
        "built-in shapes are scored as drawn")
    add("--interpolation", default="bicubic", choices=list(RESAMPLE),
        help="resampling of the evaluation resize (official: bicubic)")
    add("--val-fraction", type=fraction, default=0.1,
        help="part of train/ held out for validation when DIR has no val/")
    add("--synthetic-train", type=number(int, low=1), default=40_000,
        help="built-in set: training images (at least one batch)")
    add("--synthetic-val", type=number(int, low=1), default=2_000,
        help="built-in set: validation images")
    add("--synthetic-classes", type=number(int, low=2, high=len(SHAPE_CLASSES)), default=10,
        help=f"built-in set: classes (2-{len(SHAPE_CLASSES)})")
    add("--workers", type=number(int, low=0), default=None,
        help="background processes decoding and augmenting images (0: none, in the training "
        "process) (default: the usable cores less one, shared among an MPI job's ranks on "
        "one machine)")
    add("--backend", default="numpy", choices=["numpy", "cupy"],
        help="numpy on the CPU, cupy on an NVIDIA GPU")
    add("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
        help="cupy: record each step's forward and backward once as a CUDA graph and replay "
        "it (t2t_ref/graphs.py): one launch where there were thousands of array calls, for "
        "small images whose steps the launches bound; one process only (default: "
        + ("on with --backend cupy in one process" if graphs.ON_BY_DEFAULT else "off") + ")")
    add("--dtype", default="float32", choices=["float32", "float64"],
        help="the weights' dtype (and the computation's, under --precision float32)")
    add("--precision", default="float32", choices=list(PRECISIONS),
        help="bf16 or fp16: products and activations in half precision from float32 weights, "
        "float32 where half precision breaks (the table in t2t_ref/precision.py); fp16 with a "
        "dynamic loss scale")
    add("--seed", type=number(int, low=0), default=0,
        help="seeds the weights, data order, augmentation, dropout and the built-in set")
    add("--out", type=path("a folder"), default="runs/t2t",
        help="folder for checkpoints, metrics and plots")
    add("--max-nonfinite-steps", type=number(int, low=1), default=3, metavar="N",
        help="a step whose loss or gradient norm is NaN or inf is skipped; after N such steps "
        "in a row the run stops (exit code 3), its checkpoints untouched")
    add("--resume", type=path("a checkpoint or a run's folder"), default=None, metavar="PATH",
        help="continue from a checkpoint (a run's folder: its last.safetensors)")
    add("--init-from", type=path("a checkpoint file"), default=None, metavar="FILE",
        help="start from these weights (official .pth.tar or t2t_ref .safetensors; EMA ones "
        "where present): new head if the class count differs, position table resized if the "
        "image size does")
    add("--stop-after", type=int, default=None, metavar="STEPS", help=argparse.SUPPRESS)
    return p


def resolve_config(args, given=None):
    """The run's full configuration as a dict: the flags, with --recipe's values for the flags
    not given (`given`: the flags written on the command line) and 'auto' defaults filled in.
    (Each flag's own range is checked as it is parsed; here, what depends on several.)"""
    config = vars(args).copy()
    if config["recipe"] is not None:
        given = given or {}
        recipe = official(config["model"], config["batch_size"])
        if config["data"] is None:  # the built-in shapes keep their size (224: 6 GB of them)
            del recipe["img_size"]
        config.update({k: v for k, v in recipe.items() if k not in given})
    builtin = config["data"] is None
    if config["img_size"] is None:
        config["img_size"] = 32 if builtin else 224
    if config["crop_scale"] is None:
        config["crop_scale"] = [1.0, 1.0] if builtin else [0.08, 1.0]
    if config["crop_ratio"] is None:
        config["crop_ratio"] = [1.0, 1.0] if builtin else [3 / 4, 4 / 3]
    config["crop_scale"], config["crop_ratio"] = list(config["crop_scale"]), \
        list(config["crop_ratio"])
    S = config["img_size"]
    if S < PATCH or S % PATCH:
        raise UsageError(f"--img-size {S} is not a multiple of {PATCH}: every model cuts the "
                         f"image into a grid 16x smaller (T2T-ViT's three soft splits, ViT's "
                         f"16x16 patches); try {max(PATCH, S // PATCH * PATCH)}")
    for flag in ("crop_scale", "crop_ratio"):
        low, high = config[flag]
        if low > high:
            raise UsageError(f"--{flag.replace('_', '-')} {low:g} {high:g}: MIN is above MAX: "
                             f"give --{flag.replace('_', '-')} {high:g} {low:g}")
    from_recipe = (f" (from --recipe {config['recipe']})" if config["recipe"] is not None
                   and "warmup_epochs" not in (given or {}) else "")
    if config["warmup_epochs"] > config["epochs"]:
        raise UsageError(f"--warmup-epochs {config['warmup_epochs']:g}{from_recipe} is longer "
                         f"than the run (--epochs {config['epochs']}): give at most "
                         f"--warmup-epochs {config['epochs']}, or more epochs")
    if config["warmup_epochs"] + config["cooldown_epochs"] > config["epochs"]:
        raise UsageError(f"--warmup-epochs {config['warmup_epochs']:g} and --cooldown-epochs "
                         f"{config['cooldown_epochs']} leave no cosine in --epochs "
                         f"{config['epochs']}: give fewer cooldown epochs")
    try:  # every combination of the data flags, as the loader will build them
        train_transform_of(config), erasing_of(config), eval_transform_of(config)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if config.get("cuda_graphs") and config["backend"] != "cupy":
        raise UsageError(NEEDS_CUPY)
    if builtin and config["synthetic_train"] < config["batch_size"]:
        raise UsageError(f"--synthetic-train {config['synthetic_train']} images make no whole "
                         f"batch of --batch-size {config['batch_size']}: give at least "
                         f"{config['batch_size']} images, or a smaller batch")
    return config


def resumed_config(flags, given, meta):
    """The checkpoint's configuration. Flags written on the command line (`given`; a flag set
    to its default value counts) must agree with it, apart from where the run is (data path,
    workers, backend, out) and --epochs, which extends (or shortens) the run; else the run
    would not continue as it was. --out defaults to the checkpoint's folder, --data to the
    folder it was trained on, where that still is."""
    saved = {**BEFORE_THESE_FLAGS, **meta["config"]}
    conflicts = [f"--{k.replace('_', '-')} {_shown(v)} (checkpoint: {_shown(saved.get(k))})"
                 for k, v in given.items() if k not in RESUME_MAY_CHANGE + ("epochs",)
                 and _listify(v) != _listify(saved.get(k))]
    if conflicts:
        raise UsageError("a resumed run continues with its checkpoint's settings, but "
                         + ", ".join(conflicts) + " differ: drop these flags, or start a new "
                         "run with another --out")
    flags = dict(flags)
    if flags["data"] is None and saved["data"] is not None:  # where it was, if it still is
        if not os.path.isdir(saved["data"]):
            raise UsageError(f"the checkpoint was trained on {saved['data']}, which is not "
                             "there (moved, or another machine): give its place with --data")
        flags["data"] = saved["data"]
    if flags["data"] is not None and saved["data"] is None:
        raise UsageError("the checkpoint was trained on the built-in shapes: resume without "
                         "--data")
    config = {**saved, **{k: flags[k] for k in RESUME_MAY_CHANGE}}
    for k in ("epochs", "max_nonfinite_steps"):  # the checkpoint's, unless given
        config[k] = given.get(k, saved.get(k, flags[k]))
    if config["warmup_epochs"] > config["epochs"]:
        raise UsageError(f"--epochs {config['epochs']} is shorter than the run's warmup "
                         f"({config['warmup_epochs']:g} epochs): give at least "
                         f"{math.ceil(config['warmup_epochs'])}")
    if "out" not in given:
        config["out"] = os.path.dirname(os.path.abspath(flags["resume"]))
    return config


def command_line(config, always=()):
    """The flags of a configuration that differ from their defaults (and those named in
    always), as a command line that gives the same configuration without --recipe (where the
    run is: --resume, --stop-after left out)."""
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    negatable = {a.dest for a in parser._actions if isinstance(a, argparse.BooleanOptionalAction)}
    words = []
    for key, value in config.items():
        if key in ("recipe", "resume", "stop_after") or key not in defaults:
            continue
        if _listify(value) == _listify(defaults[key]) and key not in always:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is False and key in negatable:
            words.append("--no-" + flag[2:])
        elif value is None:
            words += [flag, "none"]  # (only --aa has none for a value)
        else:
            words += [flag, *(_number(v) for v in (value if isinstance(value, list)
                                                   else [value]))]
    return " ".join(words)


def _number(value):
    """A flag's value as written: floats short where that is exact (0.75, not 0.75000...)."""
    if isinstance(value, float):
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value


def _listify(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def load_data(config):
    """-> (class_names, train dataset, val dataset) for the configured source."""
    if config["data"] is None:
        (tx, ty), (vx, vy), names = make_shapes_splits(
            config["synthetic_train"], config["synthetic_val"], config["img_size"],
            config["seed"], config["synthetic_classes"])
        return names, ArrayDataset(tx, ty), ArrayDataset(vx, vy)
    names, train, val = find_splits(config["data"], config["val_fraction"], config["seed"])
    if not val:
        raise DataError(f"{config['data']} has no validation images: add val/<class>/ "
                        "folders or use --val-fraction > 0")
    if len(train) < config["batch_size"]:
        raise DataError(f"{config['data']} has {plural(len(train), 'training image')}, no "
                        f"whole batch of --batch-size {config['batch_size']}: use a batch of "
                        f"at most {len(train)}, or more images")
    return names, FileDataset(train), FileDataset(val)


def step_seed(seed, step):
    """The seed of one step's dropout masks and mixup draws: a function of (seed, step) only."""
    return int(np.random.SeedSequence(seed, spawn_key=(step, 2)).generate_state(1)[0])


@dataclass
class Position:
    """Where a run is: what a checkpoint records (besides the weights, moments and EMA) to go
    on exactly from there. Saved as the checkpoint's metadata under these names."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps done, skipped non-finite ones included
    best_top1: float = -1.0  # the best finite validation top-1 so far (-1: none yet)
    # the current epoch so far: the loss summed over the images of its finite steps, and
    # their number; all its images; its training seconds, and how many of them the loop
    # waited for its next batch
    epoch_loss_sum: float = 0.0
    epoch_loss_images: int = 0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    epoch_data_seconds: float = 0.0
    # non-finite steps (guard.StepMonitor): this epoch's, in a row, the last finite loss
    nonfinite_steps: int = 0
    nonfinite_run: int = 0
    last_finite_loss: float | None = None
    last_finite_step: int | None = None

    @classmethod
    def from_meta(cls, meta):
        """The position a checkpoint recorded (older checkpoints lack the newer entries: they
        start from the defaults)."""
        names = [f.name for f in fields(cls)]
        position = cls(**{name: meta[name] for name in names if name in meta})
        if "epoch_loss_images" not in meta:
            position.epoch_loss_images = position.epoch_images
        return position

    def monitor_state(self):
        """guard.StepMonitor's counters as this position left them."""
        return {"loss_sum": self.epoch_loss_sum, "images": self.epoch_loss_images,
                "skipped": self.nonfinite_steps, "run": self.nonfinite_run,
                "last_loss": _or_nan(self.last_finite_loss),
                "last_loss_step": _or_nan(self.last_finite_step)}

    def take_monitor(self, r):
        """Copy in a StepMonitor.read()."""
        finite = math.isfinite(r["last_loss"])
        self.epoch_loss_sum, self.epoch_loss_images = r["loss_sum"], int(r["images"])
        self.nonfinite_steps, self.nonfinite_run = int(r["skipped"]), int(r["run"])
        self.last_finite_loss = r["last_loss"] if finite else None
        self.last_finite_step = int(r["last_loss_step"]) if finite else None

    def next_epoch(self):
        """The epoch is done: count it, zero its sums."""
        self.epoch, self.batch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_loss_images, self.epoch_images = 0.0, 0, 0
        self.epoch_seconds, self.epoch_data_seconds, self.nonfinite_steps = 0.0, 0.0, 0


@dataclass
class Timings:
    """Where this process's wall-clock seconds went, for the run's last line. On a GPU the
    training loop also waits for the device (at each log interval's one read, and when the
    upload's pinned buffers are all still being copied from); `data` is the host's wait for
    the loader (and, on CuPy, the upload's queueing) alone."""

    started: float = dataclasses.field(default_factory=time.perf_counter)
    training: float = 0.0    # the epochs' step loops, the data wait included
    data: float = 0.0        # of which: waiting for the next batch
    validation: float = 0.0  # scoring the validation split (and the EMA's)
    saving: float = 0.0      # checkpoints, metrics.jsonl and the plot

    def line(self):
        """'time: 85.0 s in all: 6.1 s starting, ...': the whole process since `started`;
        "starting" is what the other parts leave (start-up, and the moments after the end)."""
        total = time.perf_counter() - self.started
        starting = total - self.training - self.validation - self.saving
        return (f"time: {total:.1f} s in all: {starting:.1f} s starting, {self.training:.1f} s "
                f"training ({self.data:.1f} s of it waiting for data), {self.validation:.1f} s "
                f"validating, {self.saving:.1f} s writing checkpoints and plots")


def waited(batches, position, timings, gpu_wait=None):
    """The loader's batches, the time spent waiting for each added to the epoch's (position)
    and the run's (timings) data seconds; less, on CuPy, the upload's wait for the GPU
    (gpu_wait, a data.upload.GpuWait): the host running ahead of the GPU is not data late."""
    batches = iter(batches)
    while True:
        asked = time.perf_counter()
        on_gpu = 0.0 if gpu_wait is None else gpu_wait.seconds
        try:
            batch = next(batches)
        except StopIteration:
            return
        waited_for = time.perf_counter() - asked
        if gpu_wait is not None:
            waited_for = max(0.0, waited_for - (gpu_wait.seconds - on_gpu))
        position.epoch_data_seconds += waited_for
        timings.data += waited_for
        yield batch


def train_step(model, optimizer, ema, monitor, x, targets, step, lr, label_smoothing=0.0,
               clip_grad=None, scaler=None, recorded=None, counts=None):
    """One optimizer step, as the tutorial writes it: forward, loss, backward, clip, AdamW,
    EMA. model is a DataParallel: under MPI x (b, 3, S, S) is this rank's piece of the batch,
    and the loss and gradients are those of the mean over the whole (global) batch. A step
    whose loss or gradient norm is NaN or inf changes nothing (found_inf stays on the device:
    see guard.py). scaler (fp16): the backward starts from the scaled loss gradient, the
    gradients are unscaled before anything reads them, and an overflow halves the scale.
    recorded: a RecordedForwardBackward (--cuda-graphs) that replays the forward and backward.
    counts: every rank's sample count of this step, if gathered already (agreed_stop).
    Returns the global batch's size."""
    if recorded is None:
        loss, grads = forward_backward(model, x, targets, label_smoothing, scaler, counts)
        samples = model.samples
    else:
        loss, grads = recorded(x, targets)
        samples = x.shape[0]  # (one process)
    if scaler is not None:
        scaler.unscale(grads)  # in float32; an overflow shows as an inf norm below
    if clip_grad is not None:
        norm = clip_grad_norm(grads, clip_grad)
    else:
        norm = grad_norm(grads)
    found_inf = monitor.step(step, loss, norm, samples,
                             scaled=scaler is not None)  # on the device
    optimizer.step(model.params, grads, lr, found_inf=found_inf)
    if ema is not None:
        ema.update(model.params, found_inf=found_inf)
    if scaler is not None:
        scaler.update(found_inf)
    model.grads = {}
    return samples


def forward_backward(model, x, targets, label_smoothing=0.0, scaler=None, counts=None):
    """A step's forward, loss and backward (what --cuda-graphs records): -> (the global
    batch's mean loss, 0-d; the gradients, model.grads). counts: as DataParallel.forward's."""
    logits = model.forward(x) if counts is None else model.forward(x, counts=counts)  # (b, K)
    loss, dlogits = cross_entropy(logits, targets, label_smoothing)  # mean over this piece
    loss, dlogits = model.batch_mean(loss, dlogits)  # mean over the global batch
    if scaler is not None:
        dlogits = scaler.scale_gradient(dlogits)  # d(scale * loss)
    model.backward(dlogits)  # model.grads: summed over threads and ranks
    return loss, model.grads


class RecordedForwardBackward:
    """forward_backward recorded once as a CUDA graph and replayed at every step
    (graphs.StepGraph; --cuda-graphs). What changes from step to step reaches the graph
    through its inputs: x, the targets, and the step's dropout seed, which batch_inputs left
    in model.rng and which goes in as a device array (gaps.seed_array). One process only:
    under MPI the ranks' sums are host calls between the kernels."""

    def __init__(self, model, label_smoothing, scaler, recorder, verify=True):
        if model.world.size > 1:
            raise UsageError("--cuda-graphs runs in one process: under MPI the gradient "
                             "allreduce sits between the recorded kernels; drop the flag")
        self.model, self.label_smoothing, self.scaler = model, label_smoothing, scaler
        self.graph = StepGraph(self._forward_backward, recorder, verify=verify)

    def _forward_backward(self, x, targets, seed):
        model = self.model
        rng, model.rng = model.rng, KeyedRandom(seed)
        try:
            return forward_backward(model, x, targets, self.label_smoothing, self.scaler)
        finally:
            model.rng = rng

    def __call__(self, x, targets):
        model = self.model
        seed = seed_array(model.xp, model.rng.seed, model.device)
        return self.graph(x, targets, seed)


class Run:
    """Everything a training run holds: configuration, ranks, model, optimizer, EMA, data,
    schedule, position, history, files. Made by prepare(); trained by fit()."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    @property
    def speaks(self):
        """Does this process print, write files and show progress bars? (rank 0)"""
        return self.world.rank == 0

    def say(self, *args, **kwargs):
        if self.speaks:
            print(*args, **kwargs)

    def kept(self):
        """What a diverged or killed run leaves: the checkpoints of its last finished epoch."""
        files = [path for path in (self.last_path, self.best_path) if os.path.exists(path)]
        if not files:
            return "no checkpoint was written"
        return f"{' and '.join(files)} {'are' if len(files) > 1 else 'is'} as epoch " \
            f"{self.position.epoch} left {'them' if len(files) > 1 else 'it'}"


def prepare(config, resume=None, world=None):
    """Build a run as configured, or continue one: resume is load_checkpoint's (weights, meta,
    optimizer, ema). Under MPI (world of several ranks) every rank builds the same run; rank 0
    alone touches --out."""
    world = world if world is not None else mpi.World()
    out = config["out"]
    paths = {name: os.path.join(out, f"{name}.safetensors") for name in ("last", "best")}
    run = Run(config=config, world=world, out=out, last_path=paths["last"],
              best_path=paths["best"], metrics_path=os.path.join(out, "metrics.jsonl"),
              timings=Timings())
    mixing = config["mixup"] > 0 or config["cutmix"] > 0
    if config["workers"] is None:  # the cores less one, shared with the node's other ranks,
        ranks = mpi.ranks_on_this_node(world)  # as many as /dev/shm has room for
        config["workers"], note = workers_that_fit(
            default_workers(ranks), config["batch_size"] * 3 * config["img_size"] ** 2,
            rings=2 if mixing and world.size > 1 else 1, ranks_on_node=ranks)
        if note:
            run.say(note, file=sys.stderr)
    else:
        ranks = mpi.ranks_on_this_node(world)
        spare = default_workers(ranks) + 1  # this rank's share of the cores
        if config["workers"] > 2 * spare:
            run.say(f"note: --workers {config['workers']} is many more than the "
                    f"{plural(spare, 'core')} this process has: the workers take turns on them "
                    f"with each other and with training, and the batches come slower; the "
                    f"default is {default_workers(ranks)}", file=sys.stderr)
    if world.size > config["batch_size"]:
        raise UsageError(f"--batch-size {config['batch_size']} is smaller than the "
                         f"{world.size} MPI ranks (each takes a piece of every batch): give at "
                         f"least {world.size}, or fewer ranks")
    if run.speaks:
        check_out_folder(out)
        if resume is None and os.path.exists(run.last_path):
            raise UsageError(f"{out} already holds a run: continue it with --resume "
                             f"{run.last_path}, or choose another --out")
        left = remove_leftovers(out)
        if left:
            print(f"removed {plural(len(left), 'temporary file')} that an interrupted write "
                  f"left in {out}: {', '.join(left)}", file=sys.stderr)

    class_names, train_set, val_set = load_data(config)
    if config["backend"] == "cupy":
        mpi.use_local_gpu(world)  # before anything goes onto a GPU
    # the model, run on every core (threads) and over the MPI ranks
    try:
        model = DataParallel(create_model(
            config["model"], num_classes=len(class_names), img_size=config["img_size"],
            backend=config["backend"], dtype=config["dtype"], seed=config["seed"],
            drop_rate=config["drop"], drop_path_rate=config["drop_path"],
            precision=config.get("precision", "float32")), world=world)
    except PrecisionError as err:
        raise UsageError(f"--precision {config.get('precision')}: {err}") from None
    if resume is None and config.get("init_from"):  # before the optimizer and EMA copy them
        notes = load_weights_into(model, config["init_from"])
        run.say(f"initialised from {config['init_from']}" + "".join(f"; {n}" for n in notes))
    xp, device = model.xp, model.device
    optimizer = AdamW(model.params, weight_decay=config["weight_decay"])
    ema = WeightEMA(model.params, config["ema_decay"]) if config["ema_decay"] > 0 else None
    position, saved_epochs = Position(), config["epochs"]
    if resume is not None:
        weights, meta, optimizer_state, ema_weights = resume
        if meta["class_names"] != class_names:
            differing = sorted(set(class_names) ^ set(meta["class_names"]))
            raise DataError(f"the data's classes differ from the checkpoint's "
                            f"({len(class_names)} vs {len(meta['class_names'])}; in one and "
                            f"not the other: {short_list(differing)}): resume on the dataset "
                            "the run was started with")
        try:
            model.load_state_dict(weights)
            optimizer.load_state_dict(optimizer_state)
            if ema is not None:
                ema.load({k: xp.astype(to_device(v, xp, device), model.dtype)
                          for k, v in ema_weights.items()})
        except (ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(f"the checkpoint does not fit {config['model']}: {err}") \
                from None
        position = Position.from_meta(meta)
        saved_epochs = meta["config"]["epochs"]
        if run.speaks:
            refuse_rewinding(config["resume"], position, run.last_path)
        if position.epoch >= config["epochs"]:
            done = f"{position.epoch} of {plural(config['epochs'], 'epoch')}" \
                if position.epoch == config["epochs"] else \
                f"{plural(position.epoch, 'epoch')}, more than --epochs {config['epochs']},"
            raise UsageError(f"the run has trained {done} already: to train on, "
                             f"resume with --epochs N, N more than {position.epoch}")

    if config["recipe"] is not None and resume is None:
        run.say(f"--recipe {config['recipe']} resolves to: python -m t2t_ref.train "
                + command_line(config, always=official(config["model"], 1)))
    history = []
    if run.speaks:
        os.makedirs(out, exist_ok=True)
        run.lock = lock_run_folder(out)  # held until this process ends
        config_path = os.path.join(out, "config.json")
        write_output(run, config_path, lambda: write_atomic(config_path,
                                                            json.dumps(config, indent=2)))
        history = read_history(run.metrics_path)[:position.epoch]

    # each rank reads its piece of every batch (all of it when alone)
    piece = (world.rank, world.size) if world.size > 1 else None
    loader_options = dict(workers=config["workers"], on_bad_file=warn_bad_file, piece=piece)
    train_options = dict(seed=config["seed"], transform=train_transform_of(config),
                         erasing=erasing_of(config), **loader_options)
    loader = Loader(train_set, config["batch_size"], config["img_size"], train=True,
                    **train_options)
    # mixup pairs sample i with sample B-1-i of the global batch, which another rank reads:
    # a second loader serves this rank the partners of its samples (decoded once more here)
    partners = Loader(train_set, config["batch_size"], config["img_size"], train=True,
                      **{**train_options, "mirrored": True, "on_bad_file": _ignore}) \
        if mixing and world.size > 1 else None
    # the built-in shapes are drawn at the training size: scored as drawn, not zoomed by the
    # photo recipe's resize-to-S/0.9-and-crop (which would cut shapes near the border)
    val_loader = Loader(val_set, config["batch_size"], config["img_size"], train=False,
                        transform=eval_transform_of(config, as_drawn=isinstance(
                            val_set, ArrayDataset)), **loader_options)
    steps_per_epoch = len(loader)

    def cosine(epochs):
        return CosineSchedule(config["lr"],
                              (epochs - config["cooldown_epochs"]) * steps_per_epoch,
                              warmup_steps=round(config["warmup_epochs"] * steps_per_epoch),
                              warmup_lr=config["warmup_lr"], min_lr=config["min_lr"],
                              warmup_prefix=config["warmup_prefix"])

    schedule = cosine(config["epochs"])
    K = len(class_names)
    run.say(f"{config['model']}: {model.num_parameters(True):,} trainable parameters, "
            f"{len(train_set)} training and {plural(len(val_set), 'validation image')} of "
            f"{plural(K, 'class', 'classes')}, {config['img_size']}x{config['img_size']}, "
            f"{config['backend']}/{config['dtype']}, {plural(steps_per_epoch, 'step')} per epoch"
            + (f", {world.size} MPI ranks" if world.size > 1 else ""))
    if resume is not None:
        run.say(f"resuming at epoch {position.epoch + 1} of {config['epochs']}, step "
                f"{position.step} (batch {position.batch} of {steps_per_epoch})")
    if saved_epochs != config["epochs"]:  # timm's way: the schedule the new total defines
        step = position.step
        run.say(f"{'extending' if config['epochs'] > saved_epochs else 'shortening'} the run "
                f"from {saved_epochs} to {plural(config['epochs'], 'epoch')}: the cosine "
                f"schedule now ends at step {schedule.total_steps}, and the learning rate at "
                f"step {step} goes from {cosine(saved_epochs)(step):.4g} to "
                f"{schedule(step):.4g}")
    monitor = StepMonitor(xp, device, config["max_nonfinite_steps"],
                          state=position.monitor_state())
    # fp16: the dynamic loss scale (loss_scale.py), continued from the checkpoint's
    scaler = DynamicLossScale(xp, device) if config.get("precision") == "fp16" else None
    if scaler is not None and resume is not None and "loss_scale" in resume[1]:
        scaler.load_state_dict(resume[1]["loss_scale"])
    # --cuda-graphs: the forward and backward recorded once, replayed each step (graphs.py)
    recorded = RecordedForwardBackward(model, config["label_smoothing"], scaler,
                                       CupyRecorder()) \
        if graphs.wanted(config.get("cuda_graphs"), config["backend"], world.size) else None
    data = dataset_fingerprint(config, class_names, train_set, val_set)
    if resume is not None and resume[1].get("data", data) != data:  # (older checkpoints: none)
        run.say(f"note: the data is not what the checkpoint was trained on ({resume[1]['data']} "
                f"then, {data} now): the run goes on, but not as it would have (other epoch "
                "orders, other samples)", file=sys.stderr)
    run.__dict__.update(
        class_names=class_names, model=model, optimizer=optimizer, ema=ema, loader=loader,
        partners=partners, val_loader=val_loader, steps_per_epoch=steps_per_epoch,
        schedule=schedule, mixing=mixing, position=position, history=history, monitor=monitor,
        scaler=scaler, recorded=recorded, data=data,
        fingerprint=None if world.size == 1 else {
            "code version": mpi.code_version(),
            **{f"--{k.replace('_', '-')}": v for k, v in config.items()
               if k not in RANK_LOCAL},
            "data": data,
            "weights (CRC-32)": zlib.crc32(memoryview(to_numpy(model.params.flat)).cast("B")),
            "position": dataclasses.asdict(position)})
    world.note = run.kept()
    return run


def refuse_rewinding(resume_path, position, last_path):
    """Resuming from a checkpoint older than its run folder's last (best.safetensors, say)
    would write over the newer last.safetensors and the metrics after it: refused, with the
    two ways on."""
    if os.path.abspath(resume_path) == os.path.abspath(last_path) or \
            not os.path.isfile(last_path):
        return
    try:
        latest = Position.from_meta(checkpoint_meta(last_path))
    except Exception:  # noqa: BLE001 - an unreadable last: nothing newer to keep
        return
    if latest.step > position.step:
        raise UsageError(
            f"{resume_path} is at epoch {position.epoch} (step {position.step}), but "
            f"{last_path} is further on (epoch {latest.epoch}, step {latest.step}); resuming "
            "into that folder would write over it: resume from "
            f"{os.path.dirname(last_path) or '.'} to go on, or give --out a new folder to "
            "branch off from this checkpoint")


def dataset_fingerprint(config, class_names, train_set, val_set):
    """A short digest of what the ranks read: classes, file names (relative to --data) or
    labels, split sizes. Ranks with different data would not train one model; a checkpoint
    keeps it, and a resume on other data says so."""
    digest = hashlib.sha256(json.dumps(class_names).encode())
    for dataset in (train_set, val_set):
        digest.update(np.ascontiguousarray(dataset.labels).tobytes())
        if isinstance(dataset, FileDataset):
            root = config["data"]
            digest.update("\n".join(os.path.relpath(p, root) for p in dataset.paths).encode())
    return f"{len(train_set)}+{len(val_set)} images, {digest.hexdigest()[:16]}"


def batch_inputs(run, batch, partners):
    """A step's batch (this rank's piece, uint8) -> (x, targets) on the device: normalised,
    erased, mixed with mixup or cutmix if on (data/feed.py, mixup.py); sets model.rng to the
    step's dropout generator. partners: the mirrored loader's batch (MPI with mixup) or None."""
    model, config, xp, device = run.model, run.config, run.model.xp, run.model.device
    seed = step_seed(config["seed"], run.position.step)
    images, labels, erase = batch
    x = model_input(images, erase, run.loader.erasing, xp=xp, device=device, dtype=model.dtype)
    targets = labels
    if run.mixing:
        pair = None
        if partners is not None and len(partners.labels) == len(labels):
            # (else unreadable files shifted the pairs: this piece's own mirror)
            pair = (model_input(partners.images, partners.erase, run.loader.erasing, xp=xp,
                                device=device, dtype=model.dtype), partners.labels)
        x, targets = mix_batch(x, labels, len(run.class_names), np.random.default_rng(seed),
                               config["mixup"], config["cutmix"], partners=pair)
    t = to_device(targets, xp, device)
    if run.mixing:
        t = xp.astype(t, model.dtype)  # (b, K) probabilities
    model.rng = make_rng(xp, seed)  # keyed by global sample: the same masks on any cut
    return x, t


def on_device(batches, backend, gpu_wait=None):
    """A loader's batches as the step takes them: on CuPy uploaded from pinned memory one
    batch ahead (data/upload.py; its waits for the GPU added to gpu_wait); on the CPU as they
    are."""
    if backend != "cupy":
        return batches
    from .data.upload import ahead
    return ahead(batches, gpu_wait=gpu_wait)


def save_run_state(path, run):
    """Write a checkpoint with everything needed to continue exactly from run.position (rank 0
    writes; every rank checks). Diverged if the weights are not finite (checkpoint.py writes
    no NaN or inf); WorldError if the ranks' weights differ."""
    model, config, world = run.model, run.config, run.world
    weights = to_numpy(model.params.flat)  # (n,) on the host: one transfer per checkpoint
    if not np.all(np.isfinite(weights)):  # on every rank alike (rank 0 alone writes)
        raise Diverged(f"the weights became NaN or inf by step {run.position.step}: the "
                       f"learning rate ({config['lr']:g} at its peak) is too high for this "
                       "run; lower --lr or set --clip-grad and start a new run",
                       everywhere=True)
    world.check_same_bytes("weights", weights)
    if not run.speaks:
        return
    meta = {"model": config["model"], "class_names": run.class_names, "config": config,
            "data": run.data,  # what it was trained on: a resume on other data says so
            **dataclasses.asdict(run.position)}
    if getattr(run, "scaler", None) is not None:
        meta["loss_scale"] = run.scaler.state_dict()
    ema = run.ema
    try:
        write_output(run, path, lambda: save_checkpoint(
            path, model.state_dict(), meta, optimizer=run.optimizer.state_dict(),
            ema=None if ema is None else {k: to_numpy(v) for k, v in ema.params.items()}))
    except NonFiniteError as err:
        raise Diverged(f"the weights became NaN or inf by step {run.position.step} ({err}): "
                       f"the learning rate ({config['lr']:g} at its peak) is too high for "
                       "this run; lower --lr or set --clip-grad and start a new run") from None
    finally:
        world.note = run.kept()  # what a SIGTERM from mpirun leaves (mpi.py says it)

def write_output(run, path, write):
    """write(), which writes path. An OSError (disk full, quota, a folder made read-only)
    becomes an OutputError naming what `last` still holds: the run stops there, with no
    half-written file (write_atomic) and its earlier checkpoints as they were."""
    try:
        write()
    except OSError as err:
        reason = err.strerror or str(err)
        if os.path.exists(run.last_path):
            step = checkpoint_meta(run.last_path)["step"]
            then = (f"{run.last_path} still holds step {step}: free space (or fix what the "
                    f"error names), then continue with --resume {run.last_path}")
        else:
            then = "no checkpoint was written yet: free space (or fix it) and start again"
        raise OutputError(f"cannot write {path} ({reason}); {then}") from None


def plot_curves(history, path):
    """Loss and accuracy per epoch, as curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [h["val_top1"] for h in history], "o-", label="top-1")
    topk = [key for key in history[-1] if key.startswith("val_top") and key[7:].isdigit()
            and key != "val_top1"]
    for key in topk:  # val_top5, or val_top{k} for fewer classes (evaluate.top_k)
        ax_acc.plot(epochs, [h.get(key) for h in history], "o-", label=f"top-{key[7:]}")
    if any("val_top1_ema" in h for h in history):
        ax_acc.plot(epochs, [h.get("val_top1_ema") for h in history], "o--", label="top-1 EMA")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Accuracy", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())


def read_history(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def warn_bad_file(path, reason):
    """The loaders' report of an unreadable image: on its own line, above the progress bar."""
    tqdm.write(f"warning: skipping unreadable image {path}: {reason}", file=sys.stderr)


def fit(run):
    """Train the prepared run to its last epoch. Returns the metrics history.

    Raises Interrupted (after saving `last`) at --stop-after or a stop signal, Diverged when the
    steps keep coming out non-finite."""
    config, model, position, world = run.config, run.model, run.position, run.world
    schedule, steps_per_epoch = run.schedule, run.steps_per_epoch

    def read_monitor():
        """The one host transfer of the logging interval: the loss and the non-finite
        counters (the same on every rank: each step's were summed over the ranks). Stops the
        run (Diverged) once max_nonfinite_steps in a row were skipped."""
        r = run.monitor.read(extra=None if run.scaler is None
                             else {"loss_scale": run.scaler.scale})
        position.take_monitor(r)
        if run.scaler is not None and r["loss_scale"] < 1.0:
            raise Diverged(
                f"the fp16 loss scale fell to {r['loss_scale']:g} by step {position.step}: "
                "the gradients overflow float16 even unscaled; train with --precision bf16 "
                "(float32's range) or float32, or lower "
                f"--lr ({run.kept()})", everywhere=True)
        if r["tripped"] >= 0:
            step = int(r["tripped"])
            last = (f"the last finite loss was {r['last_loss']:.4f} at step "
                    f"{int(r['last_loss_step'])}" if math.isfinite(r["last_loss"])
                    else "no step had a finite loss")
            raise Diverged(
                f"training diverged: {config['max_nonfinite_steps']} steps in a row up to step "
                f"{step} had a NaN or inf loss or gradient norm (skipped, not applied); {last}; "
                f"the learning rate at step {step} was {schedule(step):.4g}: lower --lr or set "
                f"--clip-grad and start a new run ({run.kept()})", everywhere=True)
        return r

    bar = loop_began = None
    # Ctrl-C and SIGTERM (one process) or SIGUSR1 (any): stop between two steps with a save
    run.stop = StopSignals(mpi=world.size > 1, speaks=run.speaks)  # agreed_stop reads it
    world.stoppable = True  # under MPI a SIGTERM now asks for a stop with a save (mpi.py)
    with quiet_float_warnings():  # the monitor counts what NumPy would warn about
        try:
            partners_loader = run.partners if run.partners is not None \
                else contextlib.nullcontext()
            with run.loader, run.val_loader, partners_loader, run.stop:
                for epoch in range(position.epoch, config["epochs"]):
                    model.train()
                    bar = tqdm(total=steps_per_epoch, initial=position.batch,
                               desc=f"epoch {epoch + 1}/{config['epochs']}",
                               dynamic_ncols=True, disable=not run.speaks,
                               **progress_options(world.size > 1))
                    loop_began = time.perf_counter()  # this process's share of the epoch
                    started = loop_began - position.epoch_seconds  # a resumed epoch's too
                    gpu_wait = GpuWait()
                    batches = waited(on_device(run.loader.epoch_batches(epoch, position.batch),
                                               config["backend"], gpu_wait),
                                     position, run.timings, gpu_wait)
                    partners = on_device(run.partners.epoch_batches(epoch, position.batch),
                                         config["backend"]) \
                        if run.partners is not None else itertools.repeat(None)
                    for batch, pair in zip(batches, partners):
                        counts, signum = agreed_stop(run, len(batch.labels))
                        total = sum(counts)
                        if signum is not None or (config["stop_after"] is not None
                                                  and position.step >= config["stop_after"]):
                            raise Interrupted(signum)  # between two steps: a consistent state
                        if total == 0:  # all its files unreadable
                            position.batch += 1
                            bar.update(1)
                            continue
                        lr = schedule(position.step)
                        x, t = batch_inputs(run, batch, pair)
                        images_done = train_step(model, run.optimizer, run.ema, run.monitor, x,
                                                 t, position.step, lr, config["label_smoothing"],
                                                 config["clip_grad"], run.scaler, run.recorded,
                                                 counts)
                        position.step += 1
                        position.batch += 1
                        position.epoch_images += images_done
                        bar.update(1)
                        if position.batch % LOG_EVERY == 0 or position.batch == steps_per_epoch:
                            r = read_monitor()  # the one host sync per LOG_EVERY steps
                            seconds = time.perf_counter() - started
                            scale = {} if run.scaler is None else \
                                {"scale": f"{r['loss_scale']:.0f}"}
                            bar.set_postfix(loss=f"{r['loss']:.3f}", lr=f"{lr:.2e}",
                                            img_s=f"{position.epoch_images / seconds:.0f}",
                                            **scale)
                        position.epoch_seconds = time.perf_counter() - started
                    read_monitor()
                    bar.close()
                    run.timings.training += time.perf_counter() - loop_began
                    loop_began = None
                    finish_epoch(run, epoch, time.perf_counter() - started)
        except Interrupted as stopped:
            if bar is not None:
                bar.close()
            read_monitor()
            if loop_began is not None:
                run.timings.training += time.perf_counter() - loop_began
            saving = time.perf_counter()
            save_run_state(run.last_path, run)
            world.barrier()  # no rank ends (and makes the launcher end rank 0) mid-write
            run.timings.saving += time.perf_counter() - saving
            if run.speaks:
                by = "" if stopped.signum is None else f" by {STOP_NAMES[stopped.signum]}"
                print(f"\ninterrupted at step {position.step}{by}: saved {run.last_path}; "
                      f"continue with --resume {run.last_path}", file=sys.stderr)
            raise
        except Diverged:
            if bar is not None:
                bar.close()
            raise
        finally:
            for what, source in (("training", run.loader), ("validation", run.val_loader)):
                if source.bad_files:
                    where = f"rank {world.rank}: " if world.size > 1 else ""
                    print(f"{where}skipped "
                          f"{plural(len(source.bad_files), f'unreadable {what} image')}",
                          file=sys.stderr)
    run.say(f"done: best validation top-1 {position.best_top1:.2f}%; checkpoints in {run.out}")
    run.say(run.timings.line())
    return run.history


def agreed_stop(run, count):
    """(every rank's count of samples in this step, the stop signal every rank acts on now,
    or None), from this rank's count and its stop request: a signal StopSignals caught, or
    under MPI a SIGTERM (mpi.py). One exchange with the other ranks, so that they stop
    together; the step's forward takes the counts from it."""
    return run.world.start_step(count, run.stop.requested or run.world.terminating)


def finish_epoch(run, epoch, train_seconds):
    """After an epoch's last step: validate, then record the epoch, checkpoint `last` (and
    `best`), write the metrics and the plot, and print the epoch's line."""
    position = run.position
    validating = time.perf_counter()
    record = epoch_record(run, epoch, train_seconds)
    saving = time.perf_counter()
    run.timings.validation += saving - validating
    run.history.append(record)
    # only a finite model with a strictly better score replaces `best`
    is_best = record["val_nonfinite"] == 0 and record["val_top1"] > position.best_top1
    position.next_epoch()
    if is_best:
        position.best_top1 = record["val_top1"]
    run.monitor.new_epoch()
    save_run_state(run.last_path, run)
    if is_best:
        save_run_state(run.best_path, run)
    if run.speaks:
        write_output(run, run.metrics_path, lambda: write_atomic(
            run.metrics_path, "".join(json_line(h) for h in run.history)))
        curves = os.path.join(run.out, "curves.png")
        write_output(run, curves, lambda: plot_curves(run.history, curves))
    run.timings.saving += time.perf_counter() - saving
    run.say(epoch_line(record, run.ema is not None))


def train(config, resume=None, world=None):
    """Run (or continue) training as configured: prepare() then fit(). Returns the metrics
    history. resume: load_checkpoint's (weights, meta, optimizer, ema) of the run to continue."""
    run = prepare(config, resume, world)
    try:
        return fit(run)
    finally:
        release_run_folder(run)


def _or_nan(value):
    return math.nan if value is None else float(value)


def _ignore(path, reason):
    """on_bad_file of the partners' loader: those files are another rank's to report."""


def epoch_record(run, epoch, train_seconds):
    """Evaluate (over every rank's piece) and assemble one line of metrics.jsonl."""
    model, ema, position = run.model, run.ema, run.position
    started = time.perf_counter()

    def stop_requested():
        """A stop signal cuts validation short: `last` then holds the epoch's steps, and a
        resumed run validates the epoch again. MPI ranks agree on the batch to stop at, as on
        the step in training (every rank scores a piece of every batch)."""
        _, signum = agreed_stop(run, 0)
        if signum is not None:
            raise Interrupted(signum)

    result = evaluate(model, run.val_loader, desc="validation", progress=run.speaks,
                      between_batches=stop_requested)
    k = top_k(model.num_classes)
    loss_images = position.epoch_loss_images
    record = {"epoch": epoch + 1, "step": position.step,
              "lr": run.schedule(max(position.step - 1, 0)),
              # the mean over the images of the finite steps; NaN if none was finite
              "train_loss": position.epoch_loss_sum / loss_images if loss_images
              else math.nan,
              "nonfinite_steps": position.nonfinite_steps,
              "val_loss": result["loss"], "val_top1": result["top1"],
              "val_nonfinite": result["nonfinite"],
              "images_per_sec": position.epoch_images / max(train_seconds, 1e-9),
              "train_seconds": train_seconds,
              # of which the loop waited for its next batch
              "data_seconds": position.epoch_data_seconds}
    if getattr(run, "scaler", None) is not None:
        record["loss_scale"] = run.scaler.state_dict()["scale"]
    if k:
        record[f"val_top{k}"] = result[f"top{k}"]
    if ema is not None:
        ema.swap_into(model)
        try:
            ema_result = evaluate(model, run.val_loader, desc="validation (EMA)",
                                  progress=run.speaks, between_batches=stop_requested)
        finally:
            ema.swap_into(model)  # the model's own weights back, also when a stop cut it short
        record.update(val_loss_ema=ema_result["loss"], val_top1_ema=ema_result["top1"])
        if k:
            record[f"val_top{k}_ema"] = ema_result[f"top{k}"]
    record["seconds"] = train_seconds + time.perf_counter() - started
    return record


def epoch_line(record, with_ema):
    """The line printed after each epoch."""
    topk = [key for key in record if key.startswith("val_top") and key[7:].isdigit()
            and key != "val_top1"]
    return (f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, val loss "
            f"{record['val_loss']:.4f}, top-1 {record['val_top1']:.2f}%"
            + "".join(f", top-{key[7:]} {record[key]:.2f}%" for key in topk)
            + (f", EMA top-1 {record['val_top1_ema']:.2f}%" if with_ema else "")
            + (f", {plural(record['nonfinite_steps'], 'non-finite step')} skipped"
               if record["nonfinite_steps"] else "")
            + (f", {record['val_nonfinite']} validation images with non-finite outputs "
               "(counted wrong)" if record["val_nonfinite"] else "")
            + f" ({record['images_per_sec']:.0f} img/s, waiting for data "
               f"{100 * record['data_seconds'] / max(record['train_seconds'], 1e-9):.0f}% of "
               "the time)")


def start(argv, world):
    """Everything before the first step, on every rank: the command line, the configuration,
    the checkpoint to resume, the data and the model -> a Run. Under MPI the ranks then agree
    (one allgather, World.start): WorldError on every rank if one of them failed, or if they
    differ in flags, code, data or weights. Alone, errors are raised as they come."""

    def build():
        args = build_parser().parse_args(argv)
        given = vars(build_parser(defaults=False).parse_args(argv))  # written out
        resume = None
        if args.resume is not None and args.init_from is not None:
            raise UsageError("--resume continues a run with its own weights; --init-from "
                             "starts a new one: give only one of them")
        if args.resume is None:
            config = resolve_config(args, given)
        else:
            if os.path.isdir(args.resume):  # a run's folder: continue from its `last`
                last = os.path.join(args.resume, "last.safetensors")
                if not os.path.isfile(last):
                    raise CheckpointError(f"--resume {args.resume} is a folder without a "
                                          "last.safetensors: pass the checkpoint of the run "
                                          "to continue")
                args.resume = last
            resume = load_checkpoint(args.resume)
            if "step" not in resume[1]:
                raise CheckpointError(f"{args.resume} holds weights only, not a training run "
                                      f"to continue: start from it with --init-from "
                                      f"{args.resume}")
            config = resumed_config(vars(args), given, resume[1])
        return prepare(config, resume, world)

    return world.start(build, (UsageError, *USER_ERRORS))


def main(argv=None):
    began = time.perf_counter()  # the run's last line says where the time since went
    keep_freed_memory()  # reuse freed arrays' memory: see backend.keep_freed_memory
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        world = mpi.join()  # one process, or this rank of mpirun's
    except WorldError as err:
        return user_error(err)
    try:
        run = start(argv, world)
    except WorldError as err:  # some rank failed to start, or the ranks disagree
        if world.rank == 0 and err.args[0] is not None:
            user_error(err)
        return err.exit_code
    except (UsageError, *USER_ERRORS) as err:
        return user_error(err)
    run.timings.started = began
    try:
        fit(run)
    except Interrupted as stopped:
        return stop_exit_code(stopped.signum)  # 128 + the signal's number
    except Diverged as err:
        if world.size == 1 or err.everywhere:
            if run.speaks:
                print(f"error: {err}", file=sys.stderr)
            return 3
        print(f"error: {err}", file=sys.stderr)
        world.abort(3)
    except (UsageError, WorldError, *USER_ERRORS) as err:
        if world.size == 1:
            return user_error(err)
        # on every rank alike (the evaluation's, summed over ranks) or on this one alone:
        # either way no rank may wait for another in the next sum
        where = f"rank {world.rank} of {world.size}: " if world.rank else ""
        print(f"error: {where}{err}", file=sys.stderr)
        world.abort(getattr(err, "exit_code", 2))
    except KeyboardInterrupt:  # a second stop signal: no save
        if world.size == 1:
            return 130
        world.abort(130)
    except BaseException:
        if world.size == 1:
            raise
        traceback.print_exc()  # a bug, on this rank: end every rank rather than hang
        print(f"error: rank {world.rank} of {world.size} failed (above); ending the job: "
              f"{run.kept()}", file=sys.stderr)
        world.abort(1)
    finally:
        release_run_folder(run)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # Ctrl-C before the first step (after it: saved, 130)
