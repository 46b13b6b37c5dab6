"""Classify images with T2T-ViT weights: the top-5 classes and their probabilities per image.

    python -m t2t_ref.predict cat.jpg dog.png --weights 71.7_T2T_ViT_7.pth.tar
    python -m t2t_ref.predict shape.png --weights runs/t2t/best.safetensors

Prints, for each image, its path and then one "probability  class" line per class, best first.
Each image goes through the evaluation transform (short side resized to int(S / 0.9),
bicubic; centre crop S x S; ImageNet mean/std). Class names: those stored in a t2t_ref
checkpoint; the 1000 ImageNet-1k classes (index 0 tench) for 1000-class weights without
names, as the official ones; otherwise class_0, class_1, ...
"""

import argparse
import sys

import numpy as np

from .backend import BackendError, keep_freed_memory, to_device, to_numpy
from .cli import HelpFormatter, user_error
from .data import CorruptImage, decode, eval_transform
from .pretrained import PretrainedError, display_names, model_from_weights, read_weights
from .variants import list_models


def softmax_host(logits):
    """(B, K) logits on the host -> probabilities, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predict(model, paths, batch_size=16):
    """Probabilities (N, K) float64 for image files; raises CorruptImage for an unreadable one
    (all files are decoded before the model runs)."""
    S = model.img_size
    images = np.stack([eval_transform(decode(path), S) for path in paths])  # (N, 3, S, S)
    model.eval()
    probs = []
    for start in range(0, len(images), batch_size):
        x = to_device(images[start:start + batch_size], model.xp, model.device)
        logits = model.forward(model.xp.astype(x, model.dtype), keep_cache=False)  # (B, K)
        probs.append(softmax_host(to_numpy(logits)))
    return np.concatenate(probs)


def main(argv=None):
    keep_freed_memory()  # reuse freed arrays' memory: see backend.keep_freed_memory
    parser = argparse.ArgumentParser(prog="python -m t2t_ref.predict", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="official .pth(.tar) or a t2t_ref .safetensors checkpoint")
    parser.add_argument("--model", default=None, choices=list_models(), metavar="NAME",
                        help="the variant (default: from the file's metadata, its training "
                        "arguments, or its shapes)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="image side, a multiple of 16 (default: the file's; 224 for the "
                        "official weights)")
    parser.add_argument("--top", type=int, default=5, help="classes shown per image")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw weights, not the EMA ones where the file has both")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    args = parser.parse_args(argv)
    try:
        weight_file = read_weights(args.weights, use_ema=not args.no_ema)
        model, _ = model_from_weights(weight_file, args.model, img_size=args.img_size,
                                      backend=args.backend)
        names = display_names(weight_file.class_names, model.num_classes)
        probs = predict(model, args.images, max(args.batch_size, 1))
    except (PretrainedError, BackendError, CorruptImage, ValueError) as err:
        return user_error(err)
    k = max(1, min(args.top, model.num_classes))
    for path, p in zip(args.images, probs):
        print(path)
        for index in np.argsort(-p, kind="stable")[:k]:
            print(f"  {p[index]:.4f}  {names[index]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
