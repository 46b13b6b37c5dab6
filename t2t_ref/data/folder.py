"""Finding the images of an ImageNet-style folder, and its train/val split.

The layout is the one ImageNet (after the usual val re-sorting) and Imagenette have when
unpacked:

    DIR/train/<class>/<image>      e.g. DIR/train/n01440764/n01440764_10026.JPEG
    DIR/val/<class>/<image>        optional; the same class folders as train/

A class's index is its folder name's position in sorted order, as torchvision's ImageFolder
numbers them, so labels agree with any checkpoint trained that way. An image is a file whose
extension is one of IMAGE_EXTENSIONS in any letter case (ImageNet's files end in .JPEG);
everything else (README files, .DS_Store, hidden files and folders) is ignored. As in
ImageFolder, a class's images may also lie in sub-folders of its folder (<class>/a/b.jpg), at
any depth, symbolic links followed (each real folder once: a link back up is no loop). Files
are only listed here, never opened: an unreadable image is found, skipped and reported by the
loader.

Without a val/ folder, a fraction of every class is held out of train/ as validation
("stratified"): which images are held out depends only on the seed, the class index and the
class's sorted file names, so the same seed gives the same split on every machine.

Anything wrong with the folder raises DataError, one line naming the problem and the fix.
"""

import os

import numpy as np

# torchvision's ImageFolder's list: what it reads, we read (decode handles every one of them)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset folder or setting that cannot be used; the message names the fix."""


def find_splits(root, val_fraction=0.1, seed=0):
    """Scan root and return (classes, train, val).

    classes : list[str], the sorted class folder names; a label is an index into it
    train   : list[(path: str, label: int)], sorted by label, then by file name
    val     : list[(path: str, label: int)], from root/val if it exists, else held out of
              root/train: round(val_fraction * n) images of each class of n images, chosen at
              random by (seed, label). val_fraction=0 holds nothing out (val is then []).
    val_fraction is ignored when root/val exists.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DataError(f"dataset folder {root!r} does not exist: check the path "
                        "(it should contain train/<class>/ folders)")
    if not os.path.isdir(root):
        raise DataError(f"dataset path {root!r} is a file, not a folder: pass the folder "
                        "that contains train/<class>/")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(train_dir):
        raise DataError(f"no train/ folder in {root!r}: expected {root}/train/<class>/<image> "
                        "(and optionally val/<class>/<image>)")

    classes = _class_folders(train_dir)
    train_files = {name: _images_of_class(train_dir, name) for name in classes}

    if os.path.isdir(val_dir):
        val_classes = _class_folders(val_dir)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise DataError(
                f"train/ and val/ in {root!r} have different class folders "
                f"(only in train: {short_list(only_train)}; only in val: {short_list(only_val)}): "
                "give both the same class folders, or remove val/ to hold out part of train/")
        val_files = {name: _images_of_class(val_dir, name) for name in classes}
        train = [(path, label) for label, name in enumerate(classes)
                 for path in train_files[name]]
        val = [(path, label) for label, name in enumerate(classes) for path in val_files[name]]
        return _at_least_two(classes, train_dir), train, val

    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} is outside [0, 1): "
                        "use e.g. 0.1 to hold out 10% of each class of train/ as validation")
    train, val = [], []
    for label, name in enumerate(classes):
        paths = train_files[name]
        n = len(paths)
        n_val = int(val_fraction * n + 0.5) if val_fraction > 0 else 0  # round half up
        if val_fraction > 0 and not 0 < n_val < n:
            need = "more" if n_val == 0 else "fewer"
            raise DataError(
                f"val_fraction={val_fraction} leaves class {name!r} ({n} images) with "
                f"{n_val} validation and {n - n_val} training images: hold out {need} "
                f"(val_fraction between {0.5 / n:.3g} and {1 - 0.5 / n:.3g} works for it), "
                "add images, or provide a val/ folder")
        # one generator per class: a class's split does not change when other classes do
        rng = np.random.default_rng([seed, label])
        held_out = set(rng.permutation(n)[:n_val].tolist())
        for i, path in enumerate(paths):
            (val if i in held_out else train).append((path, label))
    return _at_least_two(classes, train_dir), train, val


def _at_least_two(classes, train_dir):
    """classes, or DataError for one: with one class every answer is right (loss 0, 100%)."""
    if len(classes) < 2:
        raise DataError(f"{train_dir!r} has one class folder, {classes[0]!r}: a classifier "
                        "needs at least two classes (with one, every answer is right): add a "
                        "folder for each class")
    return classes


def scan_split(split_dir):
    """One split folder, split_dir/<class>/<image> -> (classes, samples): the sorted class
    folder names, and [(path, label)] sorted by label, then by file name. DataError if it has
    no class folders, or a class folder has no images."""
    classes = _class_folders(split_dir)
    samples = [(path, label) for label, name in enumerate(classes)
               for path in _images_of_class(split_dir, name)]
    return classes, samples


def _class_folders(split_dir):
    """Sorted names of the sub-folders of split_dir (hidden ones skipped); error if none."""
    with os.scandir(split_dir) as entries:
        names = sorted(e.name for e in entries
                       if e.is_dir() and not e.name.startswith("."))
    if not names:
        has_images = any(_is_image(name) for name in os.listdir(split_dir))
        hint = (" (its images lie directly in it; ImageNet's val/ must first be sorted into "
                "val/<class>/ folders)" if has_images else "")
        raise DataError(f"no class folders in {split_dir!r}{hint}: put each class's images "
                        f"in their own folder, {split_dir}/<class>/<image>")
    return names


def _images_of_class(split_dir, name):
    """Paths of the image files in split_dir/name and its sub-folders, sorted by their path
    within it (the file names, for a flat folder); error if none, or all are empty."""
    folder = os.path.join(split_dir, name)
    files = sorted(_image_files(folder))  # [(path within the class folder, path)]
    if not files:
        raise DataError(f"class folder {folder!r} has no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}, any case): add images or remove it")
    if all(os.path.getsize(path) == 0 for _, path in files):  # stops at the first non-empty
        raise DataError(f"every image file in class folder {folder!r} is empty (0 bytes): "
                        "re-copy or re-download that class")
    return [path for _, path in files]


def _image_files(folder, within=(), seen=None, on_error=None):
    """(path within the class folder as a tuple of names, path) of every image in folder and
    its sub-folders (hidden ones skipped), links followed, each real folder listed once. One
    scandir per folder and no stat per file (the directory entry's type), as ImageNet's 1.3
    million files on a network disk need. A folder that cannot be listed: on_error(folder,
    OSError) and the others go on, or without on_error a DataError."""
    seen = set() if seen is None else seen
    real = os.path.realpath(folder)
    if real in seen:  # reached again through a link: already listed
        return
    seen.add(real)
    try:
        with os.scandir(folder) as entries:
            entries = sorted(entries, key=lambda e: e.name)
    except OSError as err:
        if on_error is None:
            raise DataError(f"cannot read folder {folder!r} ({err.strerror or err}): fix its "
                            "permissions, or move it out of the data") from None
        on_error(folder, err)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file():  # follows a link to a file
            if _is_image(entry.name):
                yield (*within, entry.name), entry.path
        elif entry.is_dir():
            yield from _image_files(entry.path, (*within, entry.name), seen, on_error)


def images_under(folder, on_error=None):
    """Paths of every image file in folder and its sub-folders (as a class folder is read),
    sorted by their path within it; [] for none. on_error(folder, OSError) for a folder that
    cannot be listed (else DataError)."""
    return [path for _, path in sorted(_image_files(os.fspath(folder), on_error=on_error))]


def _is_image(file_name):
    """An image by its extension, in any letter case; hidden files (.DS_Store, ._x.jpg) are not."""
    return not file_name.startswith(".") and file_name.lower().endswith(IMAGE_EXTENSIONS)


def short_list(names, limit=5):  # for error messages
    """'a, b, c' or 'a, b, c, d, e and 7 more'; 'none' for an empty list."""
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
