"""A small real dataset as class folders: scikit-learn's 1,797 handwritten digit scans (8 x 8,
17 grey levels, from the UCI "optical recognition of handwritten digits" set), shipped inside
scikit-learn itself, so nothing is downloaded.

    pip install scikit-learn
    python -m t2t_ref.data.digits digits                    # digits/train/0..9, digits/val/0..9
    python -m t2t_ref.train --data digits --img-size 64 --hflip 0 --crop-pct 1

Each scan becomes an 8 x 8 grayscale PNG (value v of 0..16 stored as round(v * 255 / 16));
the training transforms upscale it to --img-size. A stratified, seeded --val-fraction of each
class goes to val/. Digits are a case where the photo recipe's defaults hurt: a flipped 2 or 7
is no longer that digit, and the evaluation crop (--crop-pct 0.9) cuts the strokes at the
border of a scan the digit fills (README, "Training": the numbers).
"""

import os
import sys

import numpy as np
from PIL import Image

from ..cli import Parser, number, run as run_cli, user_error


def write_digits(root, val_fraction=0.2, seed=0):
    """Write root/train/<digit>/<index>.png and root/val/<digit>/<index>.png; returns
    {"train": count, "val": count}. ImportError without scikit-learn."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)       # (N, 8, 8)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(label,)))
        held_out = set(rng.choice(indices, round(val_fraction * len(indices)), replace=False))
        for index in indices:
            split = "val" if index in held_out else "train"
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels[index]).save(os.path.join(folder, f"{index:04d}.png"))
            counts[split] += 1
    return counts


def main(argv=None):
    parser = Parser(prog="python -m t2t_ref.data.digits", description=__doc__)
    parser.add_argument("out", metavar="DIR", help="a new or empty folder to write into")
    parser.add_argument("--val-fraction", type=number(float, above=0, below=1), default=0.2,
                        help="part of each class held out in val/")
    parser.add_argument("--seed", type=number(int, low=0), default=0,
                        help="chooses the held-out scans")
    args = parser.parse_args(argv)
    if os.path.isfile(args.out) or (os.path.isdir(args.out) and os.listdir(args.out)):
        return user_error(f"{args.out} exists and is not an empty folder: choose a new one")
    try:
        counts = write_digits(args.out, args.val_fraction, args.seed)
    except ImportError:
        return user_error("the digits come with scikit-learn: pip install scikit-learn")
    print(f"wrote {counts['train']} training and {counts['val']} validation scans (8 x 8) of "
          f"10 classes to {args.out}/train and {args.out}/val")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
