"""Data for training T2T-ViT: image folders, the recipe's transforms, a synthetic set, batches.

    from t2t_ref.data import (find_splits, FileDataset, ArrayDataset, Loader, TrainTransform,
                              RandomErasing, model_input, make_shapes_splits)

    classes, train, val = find_splits("imagenette2", val_fraction=0.1, seed=0)
    erasing = RandomErasing(0.25)
    with Loader(FileDataset(train), 128, 224, train=True, workers=15, erasing=erasing,
                transform=TrainTransform(aa="rand-m9-mstd0.5-inc1")) as loader:
        for images, labels, erase in loader.epoch_batches(epoch):   # (B, 3, 224, 224) uint8
            x = model_input(images, erase, erasing, xp=xp, device=device)  # normalised

    (tr_x, tr_y), (va_x, va_y), names = make_shapes_splits(10_000, 1_000, 32, seed=0)
    loader = Loader(ArrayDataset(tr_x, tr_y), 128, 32, train=True,
                    transform=TrainTransform(scale=SYNTHETIC_CROP_SCALE))

folder.py      find_splits: ImageNet-style DIR/train/<class>/, DIR/val/<class>/ or a held-out part
transforms.py  decode, TrainTransform, EvalTransform (torchvision's and timm's algorithms, on
               PIL images), normalize (array API, on the consumer's device)
randaugment.py RandAugment in timm's spec grammar ("rand-m9-mstd0.5-inc1")
erasing.py     RandomErasing: rectangles drawn in the workers, filled on the consumer's device
synthetic.py   make_shapes: ten classes of shapes drawn with NumPy, told apart only by shape
digits.py      scikit-learn's 8x8 digit scans as class folders (python -m t2t_ref.data.digits)
datasets.py    FileDataset (paths) and ArrayDataset (uint8 arrays): sample i as a PIL image
loader.py      Loader: seeded, resumable uint8 batches, made in background workers
workers.py     the worker processes and the shared memory they hand batches over in
feed.py        model_input: upload, normalise, erase (the consumer's side of a batch)
upload.py      CuPy only: uploads from pinned memory, a batch ahead, on a side stream
"""

from .datasets import ArrayDataset, FileDataset
from .erasing import RandomErasing
from .feed import model_input
from .folder import IMAGE_EXTENSIONS, DataError, find_splits
from .loader import Batch, Loader, default_workers, sample_rng
from .synthetic import SHAPE_CLASSES, SYNTHETIC_CROP_SCALE, make_shapes, make_shapes_splits
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, CorruptImage, EvalTransform,
                         TrainTransform, decode, eval_transform, normalize,
                         random_resized_crop_params, train_transform)

__all__ = ["ArrayDataset", "FileDataset", "RandomErasing", "model_input", "IMAGE_EXTENSIONS",
           "DataError", "find_splits", "Batch", "Loader", "default_workers", "sample_rng",
           "SHAPE_CLASSES", "SYNTHETIC_CROP_SCALE", "make_shapes", "make_shapes_splits",
           "IMAGENET_MEAN", "IMAGENET_STD", "CorruptImage", "EvalTransform", "TrainTransform",
           "decode", "eval_transform", "normalize", "random_resized_crop_params",
           "train_transform"]
