"""The official T2T-ViT ImageNet recipe as command-line flags, and the data transforms a run's
configuration describes.

    python -m t2t_ref.train --recipe official --model t2t_vit_14 --data imagenet --batch-size 256

--recipe official fills in every flag of the recipe (the official repository's README and
main.py) that the command line does not give itself:

    lr             1e-3 (T2T-ViT-7/10/12, width 256) or 5e-4 (the others) at a total batch of
                   512, scaled linearly to the run's --batch-size (timm's rule): lr * B / 512
    weight decay   0.03 (-7/10/12), 0.05 (-14), 0.065 (-19/24)
    schedule       310 epochs: a cosine over 300, warmup 10 from 1e-6 in place of its first
                   10 (timm's warmup_prefix=False), floor 1e-5, then 10 cooldown epochs at
                   the floor
    regularising   label smoothing 0.1, drop path 0.1, mixup 0.8, cutmix 1.0, EMA 0.99996
    augmentation   RandomResizedCrop 0.08-1, 3/4-4/3, random interpolation; flip 0.5;
                   RandAugment rand-m9-mstd0.5-inc1 (colour jitter 0.4 is set but unused, as
                   there: RandAugment replaces it); random erasing 0.25, pixel, 1
    evaluation     resize to S / 0.9 bicubic, centre crop S; image size 224 (not on the
                   built-in shapes, which stay at 32 unless --img-size says otherwise)

The run prints the command it resolved to; flags given explicitly win. The difference that
remains: timm steps the schedule per epoch, here it is evaluated per step (the same curve,
without the stairs).
"""

from .data import EvalTransform, RandomErasing, TrainTransform
from .variants import get_variant

RECIPES = ("official",)
OFFICIAL_BATCH = 512
OFFICIAL_AA = "rand-m9-mstd0.5-inc1"


def official(model, batch_size):
    """{flag dest: value} of the official recipe for `model` at a total batch of batch_size."""
    width = get_variant(model).embed_dim  # 256: -7/10/12; 384: -14; 448, 512: -19, -24
    base_lr = 1e-3 if width == 256 else 5e-4
    weight_decay = {256: 0.03, 448: 0.065, 512: 0.065}.get(width, 0.05)
    return dict(
        img_size=224, lr=base_lr * batch_size / OFFICIAL_BATCH, weight_decay=weight_decay,
        epochs=310, cooldown_epochs=10, warmup_epochs=10, warmup_prefix=False,
        warmup_lr=1e-6, min_lr=1e-5,
        label_smoothing=0.1, drop=0.0, drop_path=0.1, mixup=0.8, cutmix=1.0,
        ema_decay=0.99996, crop_scale=[0.08, 1.0], crop_ratio=[3 / 4, 4 / 3],
        train_interpolation="random", hflip=0.5, vflip=0.0, color_jitter=0.4,
        aa=OFFICIAL_AA, reprob=0.25, remode="pixel", recount=1, crop_pct=0.9,
        interpolation="bicubic")


# ---- a configuration's transforms (train.py's config dict, as a checkpoint keeps it) ------

# what a checkpoint written before these flags existed was trained and evaluated with
DATA_DEFAULTS = dict(hflip=0.5, vflip=0.0, train_interpolation="bicubic", color_jitter=0.0,
                     aa=None, reprob=0.0, remode="pixel", recount=1, no_aug=False,
                     crop_pct=0.9, interpolation="bicubic")


def train_transform_of(config):
    """The TrainTransform of a configuration (ValueError names a bad flag)."""
    c = {**DATA_DEFAULTS, **config}
    return TrainTransform(scale=tuple(c["crop_scale"]), ratio=tuple(c["crop_ratio"]),
                          hflip=c["hflip"], vflip=c["vflip"],
                          interpolation=c["train_interpolation"],
                          color_jitter=c["color_jitter"], aa=c["aa"], no_aug=c["no_aug"])


def erasing_of(config):
    """The RandomErasing of a configuration, or None (off, or --no-aug)."""
    c = {**DATA_DEFAULTS, **config}
    if c["reprob"] <= 0 or c["no_aug"]:
        return None
    return RandomErasing(c["reprob"], c["remode"], c["recount"])


def eval_transform_of(config, as_drawn=False, crop_pct=None, interpolation=None):
    """The EvalTransform of a configuration; crop_pct / interpolation override it."""
    c = {**DATA_DEFAULTS, **config}
    return EvalTransform(c["crop_pct"] if crop_pct is None else crop_pct,
                         c["interpolation"] if interpolation is None else interpolation,
                         as_drawn=as_drawn)
