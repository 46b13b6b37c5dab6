"""Official T2T-ViT checkpoints in and out: read the release's `*.pth.tar` files, fit them to a
model (another image size, another class count), and write t2t_ref or PyTorch weight files.

    model = t2t_ref.load_pretrained("71.7_T2T_ViT_7.pth.tar", "t2t_vit_7")      # ImageNet, 224
    model = t2t_ref.load_pretrained("81.5_T2T_ViT_14.pth.tar", "t2t_vit_14",
                                    img_size=384, num_classes=10)  # table resized, new head

Files read_weights understands:
- official release files: a torch.save'd dict holding `state_dict` and usually
  `state_dict_ema` (the weight EMA, which the release's accuracies were measured with: it is
  taken by default), beside training leftovers (`optimizer`, `epoch`, and `args`, an
  argparse.Namespace); also timm / DeiT's `{'model': ..., 'model_ema': ...}` (the EMA taken
  by default here too), `{'net': state_dict}` files, bare state dicts (what export_pth
  writes), and keys carrying DataParallel's `module.` prefix;
- t2t_ref files (safetensors): training checkpoints (checkpoint.py; their `ema/` weights,
  present when trained with --ema-decay, count as the EMA) and the weight files save_weights
  writes; a plain safetensors state dict under the official keys too.

Safety. A `.pth` file is a Python pickle, and unpickling can run any code the file names. It is
read here with torch.load(weights_only=True): only tensors, plain containers, numbers and
strings are rebuilt, plus argparse.Namespace, allowed by name because the official files pickle
their training arguments as one (a Namespace only holds attributes; rebuilding it runs no
code). A file that pickles anything else is refused, with a note on how to clean it if its
source is trusted. safetensors files hold no code at all.

Fitting a file to a model (fit_state_dict), as the official transfer-learning code does:
- pos_embed (1, 1 + g*g, D) for another grid G: the g x g part is resized bicubically to
  G x G, like torch's F.interpolate(mode='bicubic', align_corners=False) in the official
  resize_pos_embed; the class token's row is kept. Done here in NumPy, in float64. The plain
  ViT's learned table is resized the same way (the official vit.py's own resize is bilinear).
- head.*: dropped when the class counts differ; the model keeps its own seeded fresh head
  (trunc normal std 0.02, zero bias).
- everything else must match key for key and shape for shape; otherwise one error line names
  the first keys and shapes that do not fit, and the variant the file looks like.

PyTorch is needed only to read and write `.pth` files: pip install 't2t_ref[torch]'.
Shape letters: D embedding width, g / G the old / new side of the position grid.
"""

import argparse
import collections
import functools
import math
import os
import pickle
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .keys import compare_keys
from .model import PATCH, create_model, param_specs
from .variants import VARIANTS

META_KEY = "t2t_ref"  # the safetensors metadata key of t2t_ref files (as checkpoint.py)
# where a torch.save'd dict keeps its weights, in the order they are looked for
RAW_KEYS = ("state_dict", "net", "model")
EMA_KEY = "state_dict_ema"
# the EMA beside the raw weights: the release's (timm's CheckpointSaver) and timm / DeiT's
# {'model': ..., 'model_ema': ...} layout
EMA_KEYS = (EMA_KEY, "model_ema")
# the evaluation transform of a t2t_ref run's configuration (recipe.eval_transform_of)
TRANSFORM_KEYS = ("crop_pct", "interpolation")
TORCH_HINT = "pip install 't2t_ref[torch]'"
CUBIC_A = -0.75  # the cubic convolution constant of torch's (and OpenCV's) bicubic


class PretrainedError(ValueError):
    """A weights file that cannot be read, or does not fit the model; one line says why."""


@dataclass
class WeightFile:
    """What read_weights found in a file.

    weights : {official key: host NumPy array}, `module.` prefixes stripped
    which   : the part of the file the weights came from ('state_dict_ema', 'state_dict',
              'model_ema', 'model', 'net', 'state dict' for a bare one, 'weights' / 'ema'
              for t2t_ref files)
    meta    : a t2t_ref file's metadata (model, class_names, config), else None
    args    : an official file's training arguments (its Namespace, as a dict), else None
    """
    path: str
    weights: dict
    which: str
    meta: dict = None
    args: dict = None

    @property
    def num_classes(self):
        head = self.weights.get("head.weight")
        return None if head is None else int(head.shape[0])

    @property
    def img_size(self):
        """The image side the file was made for: its metadata's, else read off pos_embed."""
        if self.meta and "img_size" in self.meta.get("config", {}):
            return int(self.meta["config"]["img_size"])
        table = self.weights.get("pos_embed")
        if table is None or table.ndim != 3:
            return None
        grid = math.isqrt(table.shape[1] - 1)
        return grid * PATCH if grid * grid == table.shape[1] - 1 else None

    @property
    def class_names(self):
        return list(self.meta["class_names"]) if self.meta and "class_names" in self.meta \
            else None

    @property
    def dtype(self):
        """'float64' if any weight is float64, else 'float32': the dtype that keeps every bit."""
        return "float64" if any(v.dtype == np.float64 for v in self.weights.values()) \
            else "float32"


# ---- reading ---------------------------------------------------------------------------------


def read_weights(path, use_ema=True):
    """Read a weights file of any kind this module knows -> WeightFile.

    use_ema: take the EMA weights where the file has them (official `state_dict_ema`, a t2t_ref
    checkpoint's `ema/`); False takes the raw ones. Raises PretrainedError.
    """
    path = check_weights_path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head, os.path.getsize(path)):
        return _read_safetensors(path, use_ema)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch's zip, or a bare pickle
        return _read_torch(path, use_ema)
    raise PretrainedError(f"{path} is not a checkpoint: neither a PyTorch file (.pth, "
                          ".pth.tar) nor a safetensors file")


def check_weights_path(path):
    """path (as a str) if it names an existing file, else PretrainedError saying what to fix."""
    path = os.fspath(path)
    if not path.strip():
        raise PretrainedError("an empty weights file path: give the file to read")
    if not os.path.exists(path):
        raise PretrainedError(f"weights file {path} does not exist: check the path")
    if os.path.isdir(path):
        raise PretrainedError(f"{path} is a folder, not a weights file: pass a file, e.g. "
                              f"{os.path.join(path, 'best.safetensors')} of a t2t_ref run")
    return path


def _looks_like_safetensors(head, size):
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size


def _read_safetensors(path, use_ema):
    from safetensors import SafetensorError, safe_open

    from .checkpoint import CheckpointError, load_checkpoint
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise PretrainedError(f"{path} is not a readable safetensors file ({err})") from None
    if META_KEY not in metadata:  # a plain state dict
        return WeightFile(path, _strip_module(tensors), "weights")
    try:
        weights, meta, _, ema = load_checkpoint(path)
    except CheckpointError as err:
        raise PretrainedError(str(err)) from None
    if use_ema and ema:
        # the EMA covers the trained parameters; the fixed tensors come from the weights
        return WeightFile(path, {**weights, **ema}, "ema", meta=meta)
    return WeightFile(path, weights, "weights", meta=meta)


def _read_torch(path, use_ema):
    torch = import_torch(f"reading the PyTorch file {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the refused global: "GLOBAL x.y was not an allowed global" (older), or
        # "Trying to load unsupported GLOBAL x.y whose module x is blocked" (2.6 and later)
        found = re.search(r"GLOBAL (\S+) (was not an allowed|whose module)", str(err))
        if found:
            raise PretrainedError(
                f"{path} pickles {found.group(1)}, which is not loaded because unpickling it "
                "could run arbitrary code; if you trust the file's source, keep only its "
                f"weights in PyTorch: torch.save(torch.load(path, weights_only=False)"
                f"['state_dict'], 'clean.pth')") from None
        raise PretrainedError(f"{path} is not a readable PyTorch checkpoint "
                              f"({_first_line(err)})") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise PretrainedError(f"{path} is not a readable PyTorch checkpoint "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    state_dict, which = _select_state_dict(path, obj, use_ema, torch)
    weights = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            tensor = tensor.float()
        weights[key] = tensor.numpy()
    args = obj.get("args") if isinstance(obj, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else None
    return WeightFile(path, _strip_module(weights), which, args=args)


def _select_state_dict(path, obj, use_ema, torch):
    """The {key: tensor} inside what torch.load returned, and where it was."""
    def is_state_dict(value):
        return (isinstance(value, dict) and value
                and all(isinstance(v, torch.Tensor) for v in value.values()))

    if is_state_dict(obj):
        return obj, "state dict"
    if not isinstance(obj, dict):
        raise PretrainedError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict "
                              "of weights")
    keys = (EMA_KEYS if use_ema else ()) + RAW_KEYS
    for key in keys:
        if is_state_dict(obj.get(key)):
            return obj[key], key
    ema_only = [key for key in EMA_KEYS if is_state_dict(obj.get(key))]
    if not use_ema and ema_only:
        raise PretrainedError(f"{path} holds only EMA weights ({ema_only[0]}): load them with "
                              "the EMA (drop --no-ema, or use_ema=True)")
    shown = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
    raise PretrainedError(f"{path} is not a checkpoint: no state dict in it (looked for "
                          f"{', '.join(keys)}; its keys: {shown})")


def _strip_module(weights):
    """DataParallel saves 'module.blocks.0...': drop the prefix."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in weights.items()}


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def import_torch(purpose):
    """torch, or a PretrainedError saying what to install."""
    try:
        import torch
    except ImportError:
        raise PretrainedError(f"{purpose} needs PyTorch, which is not installed: "
                              f"{TORCH_HINT}") from None
    return torch


# ---- which model ------------------------------------------------------------------------------


def matching_variants(weights):
    """The model names whose state dict the weights have: the same keys with the same shapes,
    all but the head's and the position table's (whose sizes follow the class count and the
    image size).

    t2t_vit_14 and t2t_vit_14_resnext differ only in their head count, so both match the same
    weights."""
    def structure(entries):
        return {key: tuple(shape) for key, shape in entries
                if not (key.startswith("head.") or key == "pos_embed")}

    if "cls_token" not in weights:
        return []
    found = structure((key, np.shape(value)) for key, value in weights.items())
    return [name for name in VARIANTS
            if structure((key, shape) for key, shape, _ in param_specs(name, PATCH, 1))
            == found]


def resolve_model_name(weight_file, model_name=None):
    """The variant to build: the one given, else the file's metadata, else the official file's
    training arguments (args.model), else the only variant the shapes fit."""
    if model_name is not None:
        return model_name
    meta, args = weight_file.meta or {}, weight_file.args or {}
    if meta.get("model") in VARIANTS:
        return meta["model"]
    if isinstance(args.get("model"), str) and args["model"].lower() in VARIANTS:
        return args["model"].lower()
    candidates = matching_variants(weight_file.weights)
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise PretrainedError(f"{weight_file.path} fits {' and '.join(candidates)} alike (they "
                              "differ only in head count): say which with --model")
    keys = ", ".join(list(weight_file.weights)[:5]) or "none"
    raise PretrainedError(f"{weight_file.path} holds no weights of a model this package knows "
                          f"(first keys: {keys})")


# ---- fitting a file to a model ------------------------------------------------------------


def bicubic_matrix(n_in, n_out):
    """(n_out, n_in) matrix M: M @ x is torch's 1-D bicubic resize of x, align_corners=False.

    Output pixel i samples the input at src = (i + 0.5) * n_in / n_out - 0.5 (pixel centres
    aligned, not clamped); with left = floor(src) and t = src - left, the four taps
    left-1 .. left+2 get Keys' cubic convolution weights (A = -0.75), and a tap outside the
    input reads the nearest edge pixel, so its weight adds to that pixel's column.
    """
    def near(x):  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    M = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * (n_in / n_out) - 0.5
        left = math.floor(src)
        t = src - left
        for tap, weight in zip(range(left - 1, left + 3), (far(t + 1), near(t), near(1 - t),
                                                           far(2 - t))):
            M[i, min(max(tap, 0), n_in - 1)] += weight
    return M


def resize_pos_embed(table, grid):
    """Position table (1, 1 + g*g, D) -> (1, 1 + grid*grid, D), in float64.

    The class token's row is kept; the g x g grid part, read as a D-channel image (the official
    code's permute to (1, D, g, g)), is resized bicubically: rows, then columns.
    """
    table = np.asarray(table, dtype=np.float64)
    cls_row, cells = table[:, :1, :], table[0, 1:, :]  # (1, 1, D), (g*g, D)
    g, D = math.isqrt(cells.shape[0]), cells.shape[1]
    image = cells.T.reshape(D, g, g)  # (D, g, g)
    M = bicubic_matrix(g, grid)  # (G, g)
    resized = M @ image @ M.T  # (D, G, G)
    cells = resized.reshape(D, grid * grid).T  # (G*G, D)
    return np.concatenate([cls_row, cells[None]], axis=1)  # (1, 1 + G*G, D)


def fit_state_dict(weight_file, model):
    """The file's weights made to fit model -> (state dict, notes).

    Resizes pos_embed to the model's grid and drops a head of another class count (notes say
    so); raises PretrainedError, one line, when anything else does not fit.
    """
    weights = dict(weight_file.weights)
    expected = {name: shape for name, shape, _ in model._param_specs()}
    notes = []
    head = weights.get("head.weight")
    new_head = False
    if head is None and "head.bias" not in weights:
        new_head = True
        notes.append(f"new {model.num_classes}-class head (the file has none)")
    elif head is not None and head.shape[0] != model.num_classes \
            and head.shape[1:] == expected["head.weight"][1:]:
        new_head = True
        del weights["head.weight"]
        weights.pop("head.bias", None)
        notes.append(f"new {model.num_classes}-class head (the file's has {head.shape[0]})")
    table = weights.get("pos_embed")
    want = expected["pos_embed"]
    if table is not None and table.ndim == 3 and table.shape != want \
            and table.shape[2] == want[2]:
        g = math.isqrt(table.shape[1] - 1)
        if g * g == table.shape[1] - 1:
            weights["pos_embed"] = resize_pos_embed(table, model.grid)
            notes.append(f"position table resized bicubically from {g}x{g} to "
                         f"{model.grid}x{model.grid}")

    missing, unexpected, wrong = compare_keys(
        weights, expected, optional=[k for k in expected if new_head and k.startswith("head.")])
    wrong = [f"{k} {given} in the file, {want} in the model" for k, given, want in wrong]
    if missing or unexpected or wrong:
        problems = []
        if wrong:
            problems.append(f"{len(wrong)} keys with another shape ({_some(wrong)})")
        if missing:
            problems.append(f"{len(missing)} missing keys ({_some(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
        guesses = matching_variants(weight_file.weights)
        hint = (f"; the file looks like {' or '.join(guesses)}"
                if guesses and model.name not in guesses else "")
        raise PretrainedError(f"{weight_file.path} does not fit {model.name}: "
                              + "; ".join(problems) + hint)
    return weights, notes


def _some(items, limit=3):
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def load_weights_into(model, source, use_ema=True):
    """Copy a file's weights (path or WeightFile) into an existing model, fitted as
    fit_state_dict does. Returns the notes (new head, resized table)."""
    weight_file = source if isinstance(source, WeightFile) else read_weights(source, use_ema)
    weights, notes = fit_state_dict(weight_file, model)
    model.load_state_dict(weights, strict=False)  # every key was checked above
    return notes


def model_from_weights(weight_file, model_name=None, *, img_size=None, num_classes=None,
                       backend="numpy", dtype="float32", seed=0, **model_options):
    """Build a model for a WeightFile and load it -> (model, notes). None sizes: the file's."""
    name = resolve_model_name(weight_file, model_name)
    model = create_model(name, num_classes=num_classes or weight_file.num_classes or 1000,
                         img_size=img_size or weight_file.img_size or 224, backend=backend,
                         dtype=dtype, seed=seed, **model_options)
    return model, load_weights_into(model, weight_file)


def load_pretrained(path, model_name=None, *, img_size=None, num_classes=None, use_ema=True,
                    backend="numpy", dtype="float32", seed=0, **model_options):
    """A ready model from an official T2T-ViT checkpoint (or any t2t_ref weight file).

    path        : `*.pth.tar` / `.pth` of the official release, or a t2t_ref safetensors file
    model_name  : e.g. "t2t_vit_7"; None: the file's (t2t_ref metadata, the official file's
                  args.model, or the only variant its shapes fit)
    img_size    : None: the file's (224 for the official files); another multiple of 16 resizes
                  the position table bicubically (class row kept)
    num_classes : None: the file's (1000 for ImageNet); another count starts a fresh head,
                  initialised as the model's own (seeded by `seed`)
    use_ema     : the EMA weights where the file has them (the release's reported accuracies
                  are theirs); False: the raw `state_dict`
    backend, dtype, seed, model_options (drop_rate, drop_path_rate, qk_scale): as create_model

    Reading a `.pth` file needs PyTorch (pip install 't2t_ref[torch]'); it is unpickled with
    weights_only=True, so no code in the file runs (see the module docstring).
    Raises PretrainedError (a ValueError) with one line saying what is wrong.
    """
    model, _ = model_from_weights(read_weights(path, use_ema), model_name,
                                  img_size=img_size, num_classes=num_classes,
                                  backend=backend, dtype=dtype, seed=seed, **model_options)
    return model


# ---- writing ---------------------------------------------------------------------------------


def save_weights(path, model, class_names=None, source=None, transform=None):
    """Write t2t_ref's own weight file: the checkpoint format of checkpoint.py (a safetensors
    file under the official keys) with metadata, but no optimizer or schedule position, so
    evaluate --checkpoint, predict and train --init-from read it, and --resume refuses it.

    transform: the evaluation transform the weights were trained with ({'crop_pct': 0.95,
    'interpolation': 'bilinear'}, a t2t_ref run's config; see transform_of), kept in the
    file's config so that predict and evaluate use it; None or missing keys: the official
    0.9 / bicubic."""
    from .checkpoint import save_checkpoint

    class_names = list(class_names) if class_names is not None \
        else default_class_names(model.num_classes)
    config = {"model": model.name, "img_size": model.img_size, "dtype": model.dtype_name,
              "data": "unknown: converted weights", "val_fraction": 0.0, "seed": 0}
    config.update({k: v for k, v in (transform or {}).items() if k in TRANSFORM_KEYS})
    meta = {"model": model.name, "class_names": class_names, "config": config,
            "weights_only": True, "source": source}
    save_checkpoint(path, model.state_dict(), meta)


def transform_of(weight_file):
    """The evaluation transform settings a t2t_ref file's config holds ({'crop_pct': ...,
    'interpolation': ...}; {} for official files), for save_weights to keep."""
    config = (weight_file.meta or {}).get("config") or {}
    return {k: config[k] for k in TRANSFORM_KEYS if k in config}


def export_pth(path, model):
    """Write model's weights as a bare PyTorch state dict (.pth): the official T2T_ViT loads it
    with load_state_dict(torch.load(path), strict=True). Written atomically."""
    torch = import_torch(f"writing the PyTorch file {path}")
    state = collections.OrderedDict((k, torch.from_numpy(v))
                                    for k, v in model.state_dict().items())
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- class names -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """(synsets, names) of the 1000 ImageNet-1k classes in their standard order (sorted synset
    ids, as ImageFolder numbers ImageNet's class folders): synsets[0] is 'n01440764', names[0]
    'tench' (each class's first WordNet lemma). From the data file imagenet_classes.txt."""
    text = resources.files("t2t_ref").joinpath("imagenet_classes.txt").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines()
            if line.strip() and not line.startswith("#")]
    return [synset for synset, _ in rows], [lemmas.split(",")[0].strip() for _, lemmas in rows]


def default_class_names(num_classes):
    """The ImageNet synsets for 1000 classes, else 'class_0', 'class_1', ..."""
    if num_classes == 1000:
        return list(imagenet_classes()[0])
    return [f"class_{i}" for i in range(num_classes)]


def display_names(class_names, num_classes):
    """Readable names of a model's classes: ImageNet synsets become their names ('tench');
    stored names stay as they are; without any, 1000 classes are ImageNet's."""
    synsets, names = imagenet_classes()
    if class_names is None:
        return list(names) if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
    return list(names) if list(class_names) == synsets else list(class_names)
