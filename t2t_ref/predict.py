"""Classify images with T2T-ViT weights: the top-5 classes and their probabilities per image.

    python -m t2t_ref.predict cat.jpg dog.png --weights 71.7_T2T_ViT_7.pth.tar
    python -m t2t_ref.predict shape.png --weights runs/t2t/best.safetensors
    python -m t2t_ref.predict photos/ --weights runs/t2t/best.safetensors   # every image in it

Prints, for each image, its path and then one "probability  class" line per class, best first.
A folder stands for every image file in it and its sub-folders, in order of their paths. The
images are read, classified and printed --batch-size at a time, so a folder of any size fits
in memory. An image that cannot be read, or whose output is NaN or inf, gets an "error:" line
on stderr instead, and the others go on; the exit code is then 1 (so it is for an empty folder
named beside images, and for a folder or sub-folder that cannot be listed). Nothing to classify
at all (only folders without image files) is a user mistake: one "error:" line, exit code 2.
Each image goes through the evaluation transform (short side resized to int(S / crop_pct),
centre crop S x S; ImageNet mean/std), with a t2t_ref checkpoint's --crop-pct and
--interpolation, else the official 0.9 and bicubic. Class names: those stored in a t2t_ref
checkpoint; the 1000 ImageNet-1k classes (index 0 tench) for 1000-class weights without
names, as the official ones; otherwise class_0, class_1, ...
"""

import os
import sys

import numpy as np

from .backend import BackendError, keep_freed_memory, to_device, to_numpy
from .checkpoint import non_finite
from .cli import Parser, number, plural, run as run_cli, user_error
from .data import CorruptImage, decode, eval_transform
from .data.folder import IMAGE_EXTENSIONS, images_under
from .guard import quiet_float_warnings
from .model import T2TViT
from .parallel import DataParallel
from .precision import PRECISIONS
from .pretrained import PretrainedError, display_names, model_from_weights, read_weights
from .recipe import eval_transform_of
from .variants import list_models


def softmax_host(logits):
    """(B, K) logits on the host -> probabilities, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predict(model, images, batch_size=16):
    """Probabilities (N, K) float64 for images (N, 3, S, S) as eval_transform makes them; the
    row of an image whose logits are not all finite is NaN. A bare T2TViT is run on every
    core (t2t_ref.parallel.DataParallel)."""
    model = (DataParallel(model) if isinstance(model, T2TViT) else model).eval()
    probs = []
    for start in range(0, len(images), batch_size):
        x = to_device(images[start:start + batch_size], model.xp, model.device)
        with quiet_float_warnings():  # a non-finite output is refused below, per image
            logits = to_numpy(model.forward(model.xp.astype(x, model.dtype), keep_cache=False))
            p = softmax_host(logits)  # (B, K)
        p[~np.isfinite(logits).all(axis=1)] = np.nan
        probs.append(p)
    return np.concatenate(probs)


def main(argv=None):
    keep_freed_memory()  # reuse freed arrays' memory: see backend.keep_freed_memory
    parser = Parser(prog="python -m t2t_ref.predict", description=__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files, or folders of them")
    parser.add_argument("--weights", "--checkpoint", required=True, metavar="FILE",
                        help="official .pth(.tar) or a t2t_ref .safetensors checkpoint "
                        "(--checkpoint: the same, by evaluate's name)")
    parser.add_argument("--model", default=None, choices=list_models(), metavar="NAME",
                        help="the variant (default: from the file's metadata, its training "
                        "arguments, or its shapes)")
    parser.add_argument("--img-size", type=number(int, low=16), default=None,
                        help="image side, a multiple of 16 (default: the file's; 224 for the "
                        "official weights)")
    parser.add_argument("--top", type=number(int, low=1), default=5,
                        help="classes shown per image")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw weights, not the EMA ones where the file has both")
    parser.add_argument("--batch-size", type=number(int, low=1), default=16)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                        help="bf16 or fp16: inference in half precision (t2t_ref/precision.py)")
    args = parser.parse_args(argv)
    # the images first (cheap): with none at all there is nothing to do
    paths, empty_folders, unreadable = [], [], []

    def cannot_list(folder, err):  # a folder (or sub-folder) that cannot be listed: said below
        unreadable.append(f"cannot read folder {folder!r} ({err.strerror or err})")

    for path in args.images:
        if os.path.isdir(path):
            found = images_under(path, on_error=cannot_list)
            if not found and not unreadable:
                empty_folders.append(path)
            paths += found
        else:
            paths.append(path)
    kinds = f"{', '.join(IMAGE_EXTENSIONS)}, any case, sub-folders included"
    if not paths and not unreadable:
        named = " or ".join(repr(folder) for folder in empty_folders)
        return user_error(f"no image files in {'folder' if len(empty_folders) == 1 else 'folders'}"
                          f" {named} ({kinds}): name image files, or a folder that holds some")
    try:
        weight_file = read_weights(args.weights, use_ema=not args.no_ema)
        broken = non_finite(weight_file.weights)
        if broken:
            raise PretrainedError(f"{args.weights} holds NaN or inf weights ({len(broken)} "
                                  f"tensors, e.g. {broken[0]}), as a diverged run leaves: "
                                  "predict with another checkpoint")
        model, _ = model_from_weights(weight_file, args.model, img_size=args.img_size,
                                      backend=args.backend, precision=args.precision)
        names = display_names(weight_file.class_names, model.num_classes)
    except (PretrainedError, BackendError, ValueError) as err:
        return user_error(err)
    except MemoryError:
        return user_error(f"not enough memory for the model at --img-size {args.img_size}: "
                          "give a smaller --img-size")
    # the evaluation transform the weights were trained with (a t2t_ref run's), else official
    transform = eval_transform_of((weight_file.meta or {}).get("config", {}))
    # every image on its own: one that cannot be read is reported, and the rest go on
    failed, empty = 0, len(empty_folders)
    for folder in empty_folders:  # beside images to classify: said, and the others go on
        print(f"error: no image files in folder {folder!r} ({kinds})", file=sys.stderr)
    for line in unreadable:
        print(f"error: {line}", file=sys.stderr)
    k = min(args.top, model.num_classes)
    for start in range(0, len(paths), args.batch_size):  # read, classify, print: a batch
        images, good = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                images.append(eval_transform(decode(path), model.img_size, transform.crop_pct,
                                             transform.interpolation))  # (3, S, S)
                good.append(path)
            except CorruptImage as err:
                print(f"error: {err}", file=sys.stderr)
                failed += 1
        try:
            probs = predict(model, np.stack(images), args.batch_size) if images else []
        except MemoryError:
            return user_error(f"not enough memory for a batch of {len(images)} images of "
                              f"{model.img_size}x{model.img_size}: give a smaller --batch-size"
                              " or --img-size")
        for path, p in zip(good, probs):
            if not np.isfinite(p).all():
                print(f"error: {path}: the model's output is NaN or inf, no prediction",
                      file=sys.stderr)
                failed += 1
                continue
            print(path)
            for index in np.argsort(-p, kind="stable")[:k]:
                print(f"  {p[index]:.4f}  {names[index]}")
    if failed:
        print(f"{failed} of {plural(len(paths), 'image')} failed", file=sys.stderr)
    return 1 if failed or empty or unreadable else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
