"""Evaluate a checkpoint: top-1 / top-5 accuracy and loss on a validation split.

    python -m t2t_ref.evaluate --checkpoint runs/t2t/best.safetensors --data imagenette2-320
    python -m t2t_ref.evaluate --weights 71.7_T2T_ViT_7.pth.tar --model t2t_vit_7 --data imagenet

Without --data, a checkpoint trained on the built-in shapes is evaluated on the built-in
validation set it was trained beside.

--weights evaluates official T2T-ViT weights (or any t2t_ref weight file; EMA weights where the
file has them) on DIR/val/<class>/ (DIR/train/ is not needed; DIR may also be the val folder
itself). For ImageNet the class folders are the 1000 synsets n01440764 ...: their sorted order
is the class order of the official weights.
"""

import argparse
import json
import os
import sys
import time

from tqdm import tqdm

from .backend import BackendError, keep_freed_memory, to_device
from .cli import HelpFormatter, user_error
from .checkpoint import CheckpointError, load_checkpoint
from .data import ArrayDataset, DataError, FileDataset, Loader, find_splits, make_shapes_splits
from .data.folder import scan_split, short_list
from .model import create_model
from .ops.cross_entropy import cross_entropy
from .pretrained import PretrainedError, imagenet_classes, model_from_weights, read_weights
from .variants import list_models

USER_ERRORS = (DataError, CheckpointError, BackendError, PretrainedError)


def evaluate(model, loader, progress=True, desc="eval"):
    """Mean loss (no smoothing), top-1 and top-5 accuracy (in %) of model over loader.

    Sums stay on the device; the only host transfers are the three numbers at the end.
    """
    xp, device = model.xp, model.device
    model.eval()
    loss_sum = top1 = top5 = 0.0
    count = 0
    for images, labels in tqdm(loader.epoch_batches(0), total=len(loader), desc=desc,
                               leave=False, disable=not progress):
        if len(labels) == 0:
            continue
        x = xp.astype(to_device(images, xp, device), model.dtype)
        y = to_device(labels, xp, device)
        logits = model.forward(x, keep_cache=False)  # (B, K)
        loss, _ = cross_entropy(logits, y)
        loss_sum = loss_sum + loss * len(labels)
        # the true class's rank: how many classes scored higher than it
        classes = xp.arange(logits.shape[1], device=device)
        true_logit = xp.sum(xp.where(y[:, None] == classes[None, :], logits, 0.0), axis=1)
        rank = xp.sum(xp.astype(logits > true_logit[:, None], xp.int64), axis=1)  # (B,)
        top1 = top1 + xp.sum(xp.astype(rank < 1, model.dtype))
        top5 = top5 + xp.sum(xp.astype(rank < 5, model.dtype))
        count += len(labels)
    if count == 0:
        raise DataError("no validation image could be read: check the val/ folder")
    return {"loss": float(loss_sum) / count, "top1": 100.0 * float(top1) / count,
            "top5": 100.0 * float(top5) / count, "images": count}


def model_from_checkpoint(path, backend, dtype=None):
    """Rebuild the model a training checkpoint was made with, and load its weights.

    Returns (model, meta). Raises CheckpointError if the weights do not fit the model.
    """
    weights, meta, _, ema = load_checkpoint(path)
    config = meta["config"]
    model = create_model(meta["model"], num_classes=len(meta["class_names"]),
                         img_size=config["img_size"], backend=backend,
                         dtype=dtype or config["dtype"])
    try:
        model.load_state_dict(weights)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return model, meta, ema


def validation_loader(meta, data, batch_size, workers, val_fraction=None):
    """The validation split a checkpoint's model is evaluated on, checked against its classes."""
    config = meta["config"]
    size = config["img_size"]
    if data is None:
        if config.get("data") is not None:
            raise DataError("this checkpoint was trained on a dataset folder: pass it with "
                            "--data DIR")
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
    if list(classes) != list(meta["class_names"]):
        raise DataError(
            f"the data's {len(classes)} classes differ from the checkpoint's "
            f"{len(meta['class_names'])} (first differences: "
            f"{sorted(set(classes) ^ set(meta['class_names']))[:5]}): evaluate on the dataset "
            "the model was trained on")
    # the built-in shapes are scored as drawn, as in training (see train.py)
    return Loader(dataset, batch_size, size, train=False, workers=workers,
                  eval_resize=isinstance(dataset, FileDataset))


def val_folder_loader(data, class_names, num_classes, size, batch_size, workers):
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
    if class_names is None and num_classes == 1000:
        class_names = imagenet_classes()[0]
    if class_names is not None and list(classes) != list(class_names):
        differ = sorted(set(classes) ^ set(class_names))
        raise DataError(
            f"the {len(classes)} class folders of {val_dir!r} are not the weights' "
            f"{len(class_names)} classes (first differences: {short_list(differ)}): "
            + ("ImageNet weights need the 1000 synset folders n01440764 ..."
               if num_classes == 1000 else "evaluate on the classes the weights were trained on"))
    if len(classes) != num_classes:
        raise DataError(f"{val_dir!r} has {len(classes)} class folders but the weights classify "
                        f"{num_classes} classes")
    return Loader(FileDataset(samples), batch_size, size, train=False, workers=workers)


def main(argv=None):
    keep_freed_memory()  # reuse freed arrays' memory: see backend.keep_freed_memory
    parser = argparse.ArgumentParser(
        prog="python -m t2t_ref.evaluate", description=__doc__,
        formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a t2t_ref training checkpoint")
    source.add_argument("--weights", metavar="FILE",
                        help="official T2T-ViT weights (*.pth.tar) or a t2t_ref weight file, "
                        "evaluated on --data DIR's val/ split")
    parser.add_argument("--data", default=None,
                        help="ImageNet-style folder (its val/ split, or the held-out part of "
                             "train/); default: the built-in shapes the model was trained on")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--ema", action="store_true",
                        help="evaluate the checkpoint's EMA weights instead of the raw ones")
    parser.add_argument("--model", default=None, choices=list_models(), metavar="NAME",
                        help="with --weights: the variant (default: from the file's metadata, "
                        "its training arguments, or its shapes)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="with --weights: image side (default: the file's; 224 for the "
                        "official weights)")
    parser.add_argument("--no-ema", action="store_true",
                        help="with --weights: the raw weights, not the EMA ones")
    args = parser.parse_args(argv)
    if args.weights is not None:
        return main_weights(args)
    try:
        model, meta, ema = model_from_checkpoint(args.checkpoint, args.backend)
        if args.ema:
            if ema is None:
                raise CheckpointError(f"{args.checkpoint} holds no EMA weights (trained "
                                      "without --ema-decay)")
            model.load_state_dict({**model.state_dict(), **ema})
        start = time.perf_counter()
        with validation_loader(meta, args.data, args.batch_size, args.workers) as loader:
            result = evaluate(model, loader)
    except USER_ERRORS as err:
        return user_error(err)
    result.update(checkpoint=args.checkpoint, model=meta["model"],
                  seconds=round(time.perf_counter() - start, 2))
    print(f"{meta['model']} on {result['images']} images: top-1 {result['top1']:.2f}%  "
          f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
    print(json.dumps(result))
    return 0


def main_weights(args):
    """evaluate --weights FILE --data DIR: a weights file on an ImageNet-style val folder."""
    if args.data is None:
        return user_error("--weights needs --data DIR: an ImageNet-style folder with "
                          "val/<class>/ (for ImageNet: the 1000 synset folders)")
    try:
        weight_file = read_weights(args.weights, use_ema=not args.no_ema)
        model, _ = model_from_weights(weight_file, args.model, img_size=args.img_size,
                                      backend=args.backend)
        start = time.perf_counter()
        with val_folder_loader(args.data, weight_file.class_names, model.num_classes,
                               model.img_size, args.batch_size, args.workers) as loader:
            result = evaluate(model, loader)
    except USER_ERRORS as err:
        return user_error(err)
    result.update(weights=args.weights, which=weight_file.which, model=model.name,
                  img_size=model.img_size, seconds=round(time.perf_counter() - start, 2))
    print(f"{model.name} ({weight_file.which}) on {result['images']} images at "
          f"{model.img_size}x{model.img_size}: top-1 {result['top1']:.2f}%  "
          f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
