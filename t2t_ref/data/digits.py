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

from ..atomic import folder_path_problem
from ..cli import Parser, number, path, plural, run as run_cli, user_error


def held_out_count(class_size, val_fraction):
    """How many scans of a class of class_size go to val/."""
    return round(val_fraction * class_size)


def empty_split(targets, val_fraction):
    """None if every class keeps scans in both train/ and val/ at this fraction, else one
    line naming the counts and a fraction that works."""
    sizes = np.bincount(targets)
    val = [held_out_count(n, val_fraction) for n in sizes]
    n_val, n_train = sum(val), int(sizes.sum()) - sum(val)
    short = [("val/", str(d)) for d, v in enumerate(val) if v == 0] + \
        [("train/", str(d)) for d, (v, n) in enumerate(zip(val, sizes)) if v == n]
    if not short:
        return None
    low, high = 0.5 / sizes.min(), 1 - 0.5 / sizes.min()
    split = short[0][0]
    classes = [d for s, d in short if s == split]
    classes = ("digit " if len(classes) == 1 else "digits ") + ", ".join(classes)
    return (f"--val-fraction {val_fraction} leaves {plural(n_train, 'training scan')} and "
            f"{plural(n_val, 'validation scan')} ({split} has none of {classes}): give a "
            f"fraction from {low:.3f} to {high:.3f}, e.g. 0.2")


def check_out_dir(out):
    """None if out can become the data set's folder, else one line saying why not. Creates
    nothing."""
    if os.path.islink(out) and not os.path.exists(out):
        return (f"{out} is a symbolic link to {os.readlink(out)}, which does not exist: "
                "choose a new folder")
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        return f"{out} exists and is not an empty folder: choose a new one"
    problem = folder_path_problem(out)
    if problem is None:
        return None
    return f"{out}{': ' if problem.startswith('cannot') else ' '}{problem}"


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
        held_out = set(rng.choice(indices, held_out_count(len(indices), val_fraction),
                                  replace=False))
        for index in indices:
            split = "val" if index in held_out else "train"
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels[index]).save(os.path.join(folder, f"{index:04d}.png"))
            counts[split] += 1
    return counts


def main(argv=None):
    parser = Parser(prog="python -m t2t_ref.data.digits", description=__doc__)
    parser.add_argument("out", metavar="DIR", type=path("a new or empty folder to write into"),
                        help="a new or empty folder to write into")
    parser.add_argument("--val-fraction", type=number(float, above=0, below=1), default=0.2,
                        help="part of each class held out in val/")
    parser.add_argument("--seed", type=number(int, low=0), default=0,
                        help="chooses the held-out scans")
    args = parser.parse_args(argv)
    problem = check_out_dir(args.out)
    if problem is not None:
        return user_error(problem)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return user_error("the digits come with scikit-learn: pip install scikit-learn")
    problem = empty_split(load_digits().target, args.val_fraction)
    if problem is not None:
        return user_error(problem)
    try:
        counts = write_digits(args.out, args.val_fraction, args.seed)
    except OSError as err:  # the disk filled, the folder went away meanwhile
        return user_error(f"could not write the scans into {args.out} "
                          f"({err.strerror or err}): free space or choose another folder")
    print(f"wrote {counts['train']} training and {counts['val']} validation scans (8 x 8) of "
          f"10 classes to {os.path.join(args.out, 'train')} and "
          f"{os.path.join(args.out, 'val')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
