"""Training checkpoints: one safetensors file, written atomically.

Layout of a checkpoint file (readable by any safetensors reader, e.g. safetensors.numpy):
- tensors under the official T2T-ViT keys (`cls_token`, `blocks.0.attn.qkv.weight`, ...) are the
  model weights, so `load_file(path)` filtered to those keys is an ordinary state dict;
- tensors under `optimizer/...` hold the optimizer state, under `ema/...` the EMA weights;
- the header's metadata holds one JSON document under "t2t_ref": model name, class names,
  the resolved configuration, the schedule position (epoch, step, batch within the epoch) and
  the best accuracy so far. Random numbers in training are derived from (seed, step), so the
  position is the whole RNG state.

Writing goes through atomic.write_atomic (a temporary file in the same folder, flushed to
disk, then renamed over the target): a kill at any moment leaves either the old file or the new
one, never half of one. The file is serialised in memory (safetensors.numpy.save) and written
by write_atomic alone: safetensors' save_file would go through a temporary file of its own,
which a kill leaves behind under a name nothing recognises. A checkpoint is never written with
a NaN or inf in it (NonFiniteError): a diverged model is not worth keeping, and must not
replace one that is. Each tensor's CRC-32 goes into the header too (under "t2t_ref_crc32"):
a file damaged later (a bad copy, a failing disk) is refused when loaded, by name, rather
than trained on or scored as if its weights were real.
"""

import json
import os
import zlib

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from .atomic import write_atomic

META_KEY = "t2t_ref"
CRC_KEY = "t2t_ref_crc32"  # {tensor name: CRC-32 of its bytes}, JSON, in the header
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable t2t_ref checkpoint."""


class NonFiniteError(CheckpointError):
    """Weights (or optimizer moments) with a NaN or inf in them, refused by save_checkpoint."""


def flatten(tree, prefix=""):
    """{'a': {'b': array}} -> {'a/b': array}; non-array leaves are returned separately."""
    arrays, scalars = {}, {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            sub_arrays, sub_scalars = flatten(value, name + "/")
            arrays.update(sub_arrays)
            scalars.update(sub_scalars)
        elif isinstance(value, np.ndarray):
            arrays[name] = value
        else:
            scalars[name] = value
    return arrays, scalars


def unflatten(arrays, scalars=None):
    """The inverse of flatten."""
    tree = {}
    for name, value in list(arrays.items()) + list((scalars or {}).items()):
        *parents, leaf = name.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def atomic_save(tensors, path, metadata):
    """Write a safetensors file atomically; NonFiniteError if a float tensor is not finite."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    broken = non_finite(tensors)
    if broken:
        raise NonFiniteError(f"{broken[0]} holds NaN or inf: not written to {path}")
    metadata = {**metadata, CRC_KEY: json.dumps({k: _crc32(v) for k, v in tensors.items()})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, save(tensors, metadata))  # the bytes in memory, then one temp file


def non_finite(tensors):
    """The names of the float tensors ({name: host array}; bfloat16 too) holding a NaN or inf."""
    def finite(value):
        if value.dtype.kind == "f":
            return np.isfinite(value).all()
        return value.dtype.name != "bfloat16" or np.isfinite(value.astype(np.float32)).all()
    return [key for key, value in tensors.items() if not finite(value)]


def _crc32(array):
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def check_intact(path, tensors, header):
    """CheckpointError if a tensor's bytes differ from the CRC-32 written with it (files
    written before the checksums were: their float tensors must at least be finite, as every
    checkpoint t2t_ref writes is)."""
    if CRC_KEY in header:
        expected = json.loads(header[CRC_KEY])
        damaged = [key for key, value in tensors.items() if _crc32(value) != expected.get(key)]
    else:
        damaged = non_finite(tensors)
    if damaged:
        raise CheckpointError(f"{path} is damaged: its tensor {damaged[0]} is not what was "
                              "written (a bad copy or disk): use another checkpoint (the run's "
                              "best.safetensors or last.safetensors, or a backup)")


def save_checkpoint(path, weights, meta, optimizer=None, ema=None):
    """weights {key: host array}; meta a JSON-able dict; optimizer a nested dict whose array
    leaves become tensors and whose other leaves go to the metadata; ema {key: host array}."""
    tensors = dict(weights)
    meta = dict(meta, format_version=FORMAT_VERSION)
    if optimizer is not None:
        arrays, scalars = flatten(optimizer, "optimizer/")
        tensors.update(arrays)
        meta["optimizer_scalars"] = scalars
    if ema is not None:
        tensors.update({f"ema/{k}": v for k, v in ema.items()})
    atomic_save(tensors, path, {META_KEY: json.dumps(meta)})


def checkpoint_meta(path):
    """The training metadata of checkpoint path, read from its header alone (no tensors)."""
    from safetensors import safe_open
    with safe_open(os.fspath(path), framework="numpy") as f:
        return json.loads((f.metadata() or {})[META_KEY])


def load_checkpoint(path):
    """-> (weights, meta, optimizer or None, ema or None), all on the host."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder: pass a checkpoint file, e.g. "
                              f"{os.path.join(path, 'best.safetensors')} or last.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    try:
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as f:
            header = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({err})") \
            from None
    if META_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file but not a t2t_ref training "
                              f"checkpoint (no '{META_KEY}' metadata)")
    check_intact(path, tensors, header)
    meta = json.loads(header[META_KEY])
    weights = {k: v for k, v in tensors.items() if "/" not in k}
    optimizer_arrays = {k[len("optimizer/"):]: v for k, v in tensors.items()
                        if k.startswith("optimizer/")}
    ema = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")} or None
    optimizer = None
    if optimizer_arrays or meta.get("optimizer_scalars"):
        scalars = {k[len("optimizer/"):]: v for k, v in meta.pop("optimizer_scalars", {}).items()}
        optimizer = unflatten(optimizer_arrays, scalars)
    return weights, meta, optimizer, ema
