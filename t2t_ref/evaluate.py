"""Evaluate a checkpoint: top-1 / top-5 accuracy and loss on a validation split.

    python -m t2t_ref.evaluate --checkpoint runs/t2t/best.safetensors --data imagenette2-320
    python -m t2t_ref.evaluate --weights 71.7_T2T_ViT_7.pth.tar --model t2t_vit_7 --data imagenet

Without --data, a checkpoint is evaluated on the validation split it was trained beside: the
built-in shapes' validation set, or that of the dataset folder its run was trained on (the
folder stored in the checkpoint, where it still is; --data DIR names another place). A
checkpoint is evaluated as its own model (--model, if given, must name it) at its own size,
or with --img-size at another (the position table resized bicubically, as --weights does).
Images go through the checkpoint's evaluation transform
(its training run's --crop-pct and --interpolation): resize the shorter side to S / crop-pct,
centre crop S; --crop-pct and --interpolation here override them (--crop-pct 1: the whole
image). The JSON line says which were used (null for the built-in shapes: drawn at the
model's size, they are scored as drawn).

A damaged checkpoint is refused when loaded (checkpoint.check_intact: one `error:` line,
exit code 2); outputs that are NaN or inf (weights that overflow) end with one `error:` line
naming the file and exit code 2, after the scores are printed.

--weights evaluates official T2T-ViT weights (or any t2t_ref weight file; EMA weights where the
file has them) on DIR/val/<class>/ (DIR/train/ is not needed; DIR may also be the val folder
itself). For ImageNet the class folders are the 1000 synsets n01440764 ...: their sorted order
is the class order of the official weights.

Under mpirun each rank scores its piece of every batch and the sums are added over the ranks:
the numbers are one process's (the loss up to float rounding); rank 0 prints them.
"""

import argparse
import json
import math
import os
import sys
import time
import zlib

import numpy as np
from tqdm import tqdm

from .backend import BackendError, backend_name, keep_freed_memory, to_device, to_numpy
from .cli import Parser, UsageError, number, plural, progress_options, run as run_cli, user_error
from .checkpoint import CheckpointError, load_checkpoint
from .data import (ArrayDataset, DataError, FileDataset, Loader, default_workers,
                   find_splits, make_shapes_splits, model_input)
from .data.folder import scan_split, short_list
from .data.transforms import RESAMPLE
from .data.workers import workers_that_fit
from . import graphs
from .graphs import NEEDS_CUPY
from .guard import quiet_float_warnings
from .model import T2TViT, create_model
from .parallel import DataParallel, mpi
from .parallel.mpi import WorldError
from .ops.cross_entropy import cross_entropy
from .precision import PRECISIONS, PrecisionError
from .model import PATCH
from .pretrained import (PretrainedError, imagenet_classes, model_from_weights, read_weights,
                         resize_pos_embed)
from .recipe import eval_transform_of
from .variants import list_models


USER_ERRORS = (DataError, CheckpointError, BackendError, PretrainedError, PrecisionError,
               UsageError)


def top_k(num_classes):
    """The k of the top-k accuracy reported beside top-1: 5, or num_classes - 1 for fewer
    than 6 classes (top-K of K classes is always 100%); None for 2 classes, where top-1 is
    all there is."""
    k = min(5, num_classes - 1)
    return k if k >= 2 else None


def evaluate(model, loader, progress=True, desc="eval", between_batches=None, forward=None):
    """Mean loss (no smoothing), top-1 and top-k accuracy (in %) of model over loader:
    {"loss", "top1", "top<k>" (k = top_k(classes), left out for 2 classes), "images",
    "nonfinite"}.

    Scoring is honest about broken models: a sample is right at top-k only if fewer than k
    other classes score at least as high as its true class, so a tie counts against it (a model
    whose logits are all equal scores 0%, not 100%); a sample with any NaN or inf logit is
    wrong at every k, and "nonfinite" counts those samples (the loss is then NaN too).
    Sums stay on the device; the only host transfer is one stack of the sums at the end.
    A bare T2TViT is run on every core (t2t_ref.parallel.DataParallel). Under MPI (a
    DataParallel with a world of several ranks, the loader serving each its piece of every
    batch) the sums are added over the ranks: every rank returns the whole set's numbers.
    between_batches(): called before each batch (training's stop signals: it may raise).
    forward(x) -> logits: what computes a batch (default: model.forward(x, keep_cache=False));
    `evaluate --cuda-graphs` passes the forward recorded as a CUDA graph (graphs.py).
    """
    if isinstance(model, T2TViT):
        model = DataParallel(model)
    together = getattr(model, "world", None) is not None and model.world.size > 1
    xp, device = model.xp, model.device
    model.eval()
    K = model.num_classes
    k = top_k(K)
    loss_sum = top1 = topk = nonfinite = 0.0
    count = 0
    batches = loader.epoch_batches(0)
    if backend_name(xp) == "cupy":  # uploaded from pinned memory, a batch ahead
        from .data.upload import ahead
        batches = ahead(batches)
    for images, labels, _ in tqdm(batches, total=len(loader), desc=desc, leave=False,
                                  disable=not progress, **progress_options(together)):
        if between_batches is not None:
            between_batches()
        if len(labels) == 0 and not together:
            continue
        x = model_input(images, xp=xp, device=device, dtype=model.dtype)  # (B, 3, S, S)
        y = to_device(labels, xp, device)
        with quiet_float_warnings():  # non-finite outputs are counted below
            logits = forward(x) if forward is not None else \
                model.forward(x, keep_cache=False)  # (B, K)
            if len(labels) == 0:  # none of this batch here: the forward kept step with the
                continue          # other ranks (it gathers their counts)
            loss, _ = cross_entropy(logits, y)
        loss_sum = loss_sum + xp.astype(loss, xp.float64) * len(labels)
        finite = xp.all(xp.isfinite(logits), axis=1)  # (B,)
        # the true class's rank: how many other classes scored at least as high as it (the
        # true class itself is one of those >=, hence the - 1); K for a non-finite sample
        classes = xp.arange(K, device=device)
        true_logit = xp.sum(xp.where(y[:, None] == classes[None, :], logits, 0.0), axis=1)
        rank = xp.sum(xp.astype(logits >= true_logit[:, None], xp.int64), axis=1) - 1  # (B,)
        rank = xp.where(finite, rank, K)
        top1 = top1 + xp.sum(xp.astype(rank < 1, xp.float64))
        topk = topk + xp.sum(xp.astype(rank < (k or 1), xp.float64))
        nonfinite = nonfinite + xp.sum(xp.astype(xp.logical_not(finite), xp.float64))
        count += len(labels)
    sums = xp.stack([xp.asarray(v, dtype=xp.float64, device=device)
                     for v in (loss_sum, top1, topk, nonfinite, count)])  # (5,)
    if together:
        sums = model.sum_over_ranks(sums)
    loss_sum, top1, topk, nonfinite, count = (float(v) for v in to_numpy(sums))
    count = int(count)
    if count == 0:
        raise DataError("no validation image could be read: check the val/ folder")
    result = {"loss": loss_sum / count, "top1": 100.0 * top1 / count}
    if k:
        result[f"top{k}"] = 100.0 * topk / count
    result.update(images=count, nonfinite=int(nonfinite))
    return result


def summary(name, result):
    """The printed line: 'NAME on N images: top-1 ..%  top-5 ..%  loss ..', and how many
    images had non-finite outputs, if any."""
    scores = "  ".join(f"top-{key[3:]} {value:.2f}%" for key, value in result.items()
                       if key.startswith("top") and key[3:].isdigit())
    line = f"{name} on {result['images']} images: {scores}  loss {result['loss']:.4f}"
    if result["nonfinite"]:
        line += (f"  ({result['nonfinite']} images had NaN or inf outputs: counted wrong; the "
                 "weights are broken)")
    return line


def model_from_checkpoint(path, backend, dtype=None, precision="float32", img_size=None):
    """Rebuild the model a training checkpoint was made with, and load its weights; img_size
    (None: the checkpoint's) another image side, the position table (weights' and EMA's)
    resized bicubically to its grid as pretrained.fit_state_dict does.

    Returns (model, meta, ema). Raises CheckpointError if the weights do not fit the model.
    """
    weights, meta, _, ema = load_checkpoint(path)
    config = meta["config"]
    model = create_model(meta["model"], num_classes=len(meta["class_names"]),
                         img_size=img_size or config["img_size"], backend=backend,
                         dtype=dtype or config["dtype"], precision=precision)
    for tree in (weights, ema or {}):
        table = tree.get("pos_embed")
        if table is not None and table.ndim == 3 and model.img_size != config["img_size"]:
            tree["pos_embed"] = resize_pos_embed(table, model.grid)
    try:
        model.load_state_dict(weights)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return model, meta, ema


def validation_loader(meta, data, batch_size, workers, val_fraction=None, source="the file",
                      piece=None, crop_pct=None, interpolation=None, size=None, say=None):
    """The validation split a checkpoint's model is evaluated on, checked against its classes,
    with the checkpoint's evaluation transform (--crop-pct, --interpolation as trained;
    crop_pct / interpolation override them), at size (None: the checkpoint's image side).
    data None: the checkpoint's own data, the dataset folder stored in it (say(line) tells
    where it came from) or the built-in shapes."""
    config = meta["config"]
    size = size or config["img_size"]
    if data is None:
        if meta.get("weights_only"):  # written by convert (pretrained.save_weights)
            raise DataError(f"{source} holds converted weights, not a run trained here, so it "
                            "comes with no validation set: pass one with --data DIR")
        data = config.get("data")
        if data is not None:  # trained on a folder: where it was, if it still is (as --resume)
            if not os.path.isdir(data):
                raise DataError(f"the checkpoint was trained on {data}, which is not there "
                                "(moved, or another machine): give its place with --data")
            if say is not None:
                say(f"data: {data} (from the checkpoint)")
    if data is None:
        _, (images, labels), classes = make_shapes_splits(
            config["synthetic_train"], config["synthetic_val"], size, config["seed"],
            config["synthetic_classes"])
        dataset = ArrayDataset(images, labels)
    else:
        fraction = config["val_fraction"] if val_fraction is None else val_fraction
        classes, _, val = find_splits(data, fraction, config["seed"])
        if not val:
            raise DataError(f"{data} has no validation images: add val/<class>/ folders or "
                            "use --val-fraction > 0")
        dataset = FileDataset(val)
    in_model_order(dataset, classes, meta["class_names"],
                   lambda differ: f"the data's {len(classes)} classes differ from the "
                   f"checkpoint's {len(meta['class_names'])} (first differences: {differ}): "
                   "evaluate on the dataset the model was trained on")
    # the built-in shapes are scored as drawn, as in training (see train.py)
    transform = eval_transform_of(config, as_drawn=isinstance(dataset, ArrayDataset),
                                  crop_pct=crop_pct, interpolation=interpolation)
    return Loader(dataset, batch_size, size, train=False, workers=workers, transform=transform,
                  on_bad_file=warn_bad_file, piece=piece)


def val_folder_loader(data, class_names, num_classes, size, batch_size, workers, piece=None,
                      transform=None):
    """A loader over DIR/val/<class>/<image> (or DIR/<class>/<image> when DIR has neither val/
    nor train/), its sorted class folders checked against the weights' classes: class_names
    when known, else the ImageNet synsets for 1000 classes, else only their number."""
    root = os.fspath(data)
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root!r} does not exist: check the path (it should "
                        "contain val/<class>/ folders)")
    val_dir = os.path.join(root, "val")
    if not os.path.isdir(val_dir):
        if os.path.isdir(os.path.join(root, "train")):
            raise DataError(f"no val/ folder in {root!r}: --weights evaluates on "
                            f"{root}/val/<class>/<image>")
        val_dir = root
    classes, samples = scan_split(val_dir)
    dataset = FileDataset(samples)
    if class_names is None and num_classes == 1000:
        class_names = imagenet_classes()[0]
    if class_names is not None:
        in_model_order(dataset, classes, class_names,
                       lambda differ: f"the {len(classes)} class folders of {val_dir!r} are not "
                       f"the weights' {len(class_names)} classes (first differences: {differ}): "
                       + ("ImageNet weights need the 1000 synset folders n01440764 ..."
                          if num_classes == 1000
                          else "evaluate on the classes the weights were trained on"))
    if len(classes) != num_classes:
        raise DataError(f"{val_dir!r} has {len(classes)} class folders but the weights classify "
                        f"{num_classes} classes")
    return Loader(dataset, batch_size, size, train=False, workers=workers,
                  transform=transform, on_bad_file=warn_bad_file, piece=piece)


def in_model_order(dataset, classes, model_classes, message):
    """Relabel dataset, whose labels index classes (the folders' sorted names), to index
    model_classes instead: the same names in another order (a model trained on the built-in
    shapes, whose classes are not in sorted order) are matched by name. Other names: DataError
    with message(the first names in one list and not the other)."""
    classes, model_classes = list(classes), list(model_classes)
    if classes == model_classes:
        return
    if sorted(classes) != sorted(model_classes):
        raise DataError(message(short_list(sorted(set(classes) ^ set(model_classes)))))
    index = {name: i for i, name in enumerate(model_classes)}
    dataset.labels = np.asarray([index[name] for name in classes], dtype=np.int64)[dataset.labels]


def warn_bad_file(path, reason):
    """An unreadable image's report: on its own line, above the progress bar."""
    tqdm.write(f"warning: skipping unreadable image {path}: {reason}", file=sys.stderr)


def report(result, loader, name, **extra):
    """Print the summary line and the JSON result (and how many files were unreadable)."""
    if loader.bad_files:
        print(f"skipped {plural(len(loader.bad_files), 'unreadable image')}", file=sys.stderr)
    result.update(unreadable=len(loader.bad_files), **extra)
    print(summary(name, result))
    print(json_line(result), end="")


def json_line(record):
    """A record as one line of standard JSON: a value that is not finite (a mean loss over
    non-finite outputs) is written null, not Python's NaN, which other JSON readers refuse.
    evaluate's result line and each line of train's metrics.jsonl."""
    finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def build_parser():
    parser = Parser(prog="python -m t2t_ref.evaluate", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="FILE", help="a t2t_ref training checkpoint")
    source.add_argument("--weights", metavar="FILE",
                        help="official T2T-ViT weights (*.pth.tar) or a t2t_ref weight file, "
                        "evaluated on --data DIR's val/ split")
    parser.add_argument("--data", default=None,
                        help="ImageNet-style folder (its val/ split, or the held-out part of "
                             "train/) (default: what the checkpoint was trained on: the folder "
                             "stored in it, or the built-in shapes)")
    parser.add_argument("--batch-size", type=number(int, low=1), default=128)
    parser.add_argument("--workers", type=number(int, low=0), default=None,
                        help="background processes decoding images (default: the usable "
                        "cores less one, shared among an MPI job's ranks on one machine)")
    parser.add_argument("--crop-pct", type=number(float, above=0, high=1), default=None,
                        help="resize the shorter side to img-size / crop-pct and crop the "
                        "centre; 1 evaluates the whole (square) image (default: the "
                        "checkpoint's, 0.9 for --weights: the official 248 for 224)")
    parser.add_argument("--interpolation", default=None, choices=list(RESAMPLE),
                        help="resampling of that resize (default: the checkpoint's; bicubic "
                        "for --weights, the official one)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                        help="bf16 or fp16: inference in half precision (t2t_ref/precision.py)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="cupy: record the forward once as a CUDA graph and replay it for "
                        "each full batch (t2t_ref/graphs.py); one process only (default: on "
                        "with --backend cupy in one process)")
    parser.add_argument("--ema", action="store_true",
                        help="evaluate the checkpoint's EMA weights instead of the raw ones")
    parser.add_argument("--model", default=None, choices=list_models(), metavar="NAME",
                        help="with --weights: the variant (default: from the file's metadata, "
                        "its training arguments, or its shapes); with --checkpoint it can only "
                        "be the checkpoint's own model")
    parser.add_argument("--img-size", type=number(int, low=16), default=None,
                        help="image side, a multiple of 16; another than the file's resizes "
                        "the position table (default: the file's; 224 for the official "
                        "weights)")
    parser.add_argument("--no-ema", action="store_true",
                        help="with --weights: the raw weights, not the EMA ones")
    return parser


class Job:
    """What main() evaluates: model, loader, the summary's name and the JSON's extra fields,
    and under MPI what every rank must hold alike (fingerprint)."""

    def __init__(self, model, loader, name, extra, world, cuda_graphs=False, path=None):
        self.model, self.loader, self.name, self.extra = model, loader, name, extra
        self.cuda_graphs, self.path = cuda_graphs, path  # path: the weights' file
        self.fingerprint = None if world.size == 1 else {
            "code version": mpi.code_version(), "model": extra["model"],
            "weights (CRC-32)": zlib.crc32(memoryview(to_numpy(model.params.flat)).cast("B")),
            "validation images": len(loader.dataset)}


def prepare(argv, world):
    """The command line -> a Job (a user error raised as it comes)."""
    args = build_parser().parse_args(argv)
    piece = (world.rank, world.size) if world.size > 1 else None
    args.cuda_graphs = graphs.wanted(args.cuda_graphs, args.backend, world.size)
    if args.cuda_graphs and args.backend != "cupy":
        raise UsageError(NEEDS_CUPY)
    if args.cuda_graphs and world.size > 1:
        raise UsageError("--cuda-graphs runs in one process: under MPI the ranks' counts are "
                         "gathered between the recorded kernels; drop the flag")
    if args.img_size is not None and args.img_size % PATCH:
        raise UsageError(f"--img-size {args.img_size} is not a multiple of {PATCH}: give e.g. "
                         f"{max(PATCH, args.img_size // PATCH * PATCH)}")

    def say(line):  # a note on stderr, once (rank 0)
        if world.rank == 0:
            print(line, file=sys.stderr)

    def workers(size):  # --workers, else the cores less one, as many as /dev/shm has room for
        if args.workers is not None:
            return args.workers
        ranks = mpi.ranks_on_this_node(world)
        count, note = workers_that_fit(default_workers(ranks), args.batch_size * 3 * size ** 2,
                                       ranks_on_node=ranks)
        if note and world.rank == 0:
            print(note, file=sys.stderr)
        return count

    if args.weights is not None:
        if args.data is None:
            raise DataError("--weights needs --data DIR: an ImageNet-style folder with "
                            "val/<class>/ (for ImageNet: the 1000 synset folders)")
        weight_file = read_weights(args.weights, use_ema=not args.no_ema)
        if args.backend == "cupy":
            mpi.use_local_gpu(world)
        model, _ = model_from_weights(weight_file, args.model, img_size=args.img_size,
                                      backend=args.backend, precision=args.precision)
        transform = eval_transform_of(weight_file.meta["config"] if weight_file.meta and
                                      "config" in weight_file.meta else {},
                                      crop_pct=args.crop_pct, interpolation=args.interpolation)
        loader = val_folder_loader(args.data, weight_file.class_names, model.num_classes,
                                   model.img_size, args.batch_size, workers(model.img_size),
                                   piece,
                                   transform)
        name = f"{model.name} ({weight_file.which}) at {model.img_size}x{model.img_size}"
        extra = dict(weights=args.weights, which=weight_file.which, model=model.name,
                     img_size=model.img_size, crop_pct=transform.crop_pct,
                     interpolation=transform.interpolation, precision=args.precision)
        return Job(model, loader, name, extra, world, args.cuda_graphs, args.weights)
    if args.backend == "cupy":
        mpi.use_local_gpu(world)
    model, meta, ema = model_from_checkpoint(args.checkpoint, args.backend,
                                             precision=args.precision, img_size=args.img_size)
    if args.model is not None and args.model != meta["model"]:
        raise UsageError(f"--model {args.model} contradicts the checkpoint, which holds "
                         f"{meta['model']}: drop --model (a checkpoint is evaluated as its own "
                         "model)")
    if args.ema:
        if ema is None:
            raise CheckpointError(f"{args.checkpoint} holds no EMA weights (trained "
                                  "without --ema-decay)")
        model.load_state_dict({**model.state_dict(), **ema})
    trained = meta["config"]["img_size"]
    if model.img_size != trained:
        say(f"note: evaluating at {model.img_size}x{model.img_size}, trained at "
            f"{trained}x{trained}: position table resized bicubically from "
            f"{trained // PATCH}x{trained // PATCH} to {model.grid}x{model.grid}")
    loader = validation_loader(meta, args.data, args.batch_size, workers(model.img_size),
                               source=args.checkpoint, piece=piece, crop_pct=args.crop_pct,
                               interpolation=args.interpolation, size=model.img_size, say=say)
    # the built-in shapes are scored as drawn (no resize, no crop) at the size they were drawn
    as_drawn = loader.transform.as_drawn and model.img_size == trained
    name = meta["model"] + ("" if model.img_size == trained
                            else f" at {model.img_size}x{model.img_size}")
    return Job(model, loader, name, dict(
        checkpoint=args.checkpoint, model=meta["model"], img_size=model.img_size,
        crop_pct=None if as_drawn else loader.transform.crop_pct,
        interpolation=None if as_drawn else loader.transform.interpolation,
        precision=args.precision), world, args.cuda_graphs, args.checkpoint)


def non_finite_error(job, result):
    """The one line for scores over NaN or inf outputs: the weights are damaged."""
    line = (f"{job.path} is damaged: {result['nonfinite']} of {result['images']} images gave "
            "NaN or inf outputs (a corrupted file or a diverged run; the scores above count "
            "them wrong): evaluate another checkpoint")
    if job.extra.get("precision") == "fp16":
        line += ", or try --precision bf16 (fp16 may have overflowed)"
    return line


def main(argv=None):
    keep_freed_memory()  # reuse freed arrays' memory: see backend.keep_freed_memory
    try:
        world = mpi.join()  # one process, or this rank of mpirun's
    except WorldError as err:
        return user_error(err)
    try:
        job = world.start(lambda: prepare(argv, world), USER_ERRORS)
    except WorldError as err:  # a rank failed to start, or the ranks disagree
        if world.rank == 0 and err.args[0] is not None:
            user_error(err)
        return err.exit_code
    except USER_ERRORS as err:
        return user_error(err)
    start = time.perf_counter()
    try:
        forward = None
        if job.cuda_graphs:  # the forward recorded once, replayed for every full batch
            from .graphs import CupyRecorder, StepGraph
            model = job.model.eval()
            forward = StepGraph(lambda x: model.forward(x, keep_cache=False), CupyRecorder())
        with job.loader:
            result = evaluate(DataParallel(job.model, world=world), job.loader,
                              progress=world.rank == 0, forward=forward)
    except USER_ERRORS as err:  # on every rank alike: the counts were summed over them
        return user_error(err) if world.rank == 0 else 2
    if world.rank == 0:
        report(result, job.loader, job.name, **job.extra,
               seconds=round(time.perf_counter() - start, 2))
    if result["nonfinite"]:  # every rank alike: the counts were summed over them
        return user_error(non_finite_error(job, result)) if world.rank == 0 else 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
