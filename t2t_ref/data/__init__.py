"""Data for training T2T-ViT: image folders, the recipe's transforms, a synthetic set, batches.

    from t2t_ref.data import find_splits, FileDataset, ArrayDataset, Loader, make_shapes_splits

    classes, train, val = find_splits("imagenette2", val_fraction=0.1, seed=0)
    with Loader(FileDataset(train), 128, 224, train=True, workers=2) as loader:
        for images, labels in loader.epoch_batches(epoch):   # (B, 3, 224, 224), (B,)
            ...

    (tr_x, tr_y), (va_x, va_y), names = make_shapes_splits(10_000, 1_000, 32, seed=0)
    loader = Loader(ArrayDataset(tr_x, tr_y), 128, 32, train=True, scale=SYNTHETIC_CROP_SCALE)

folder.py     find_splits: ImageNet-style DIR/train/<class>/, DIR/val/<class>/ or a held-out part
transforms.py decode, train_transform, eval_transform (torchvision's algorithms, on PIL images)
synthetic.py  make_shapes: ten classes of shapes drawn with NumPy, told apart only by shape
datasets.py   FileDataset (paths) and ArrayDataset (uint8 arrays): sample i as a PIL image
loader.py     Loader: seeded, resumable batches, made in background workers
"""

from .datasets import ArrayDataset, FileDataset
from .folder import IMAGE_EXTENSIONS, DataError, find_splits
from .loader import Loader, sample_rng
from .synthetic import SHAPE_CLASSES, SYNTHETIC_CROP_SCALE, make_shapes, make_shapes_splits
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, CorruptImage, decode, eval_transform,
                         random_resized_crop_params, train_transform)

__all__ = ["ArrayDataset", "FileDataset", "IMAGE_EXTENSIONS", "DataError", "find_splits",
           "Loader", "sample_rng", "SHAPE_CLASSES", "SYNTHETIC_CROP_SCALE", "make_shapes",
           "make_shapes_splits", "IMAGENET_MEAN", "IMAGENET_STD", "CorruptImage", "decode",
           "eval_transform", "random_resized_crop_params", "train_transform"]
