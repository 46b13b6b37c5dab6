"""Convert T2T-ViT weights between the official PyTorch files and t2t_ref's own format.

    python -m t2t_ref.convert 71.7_T2T_ViT_7.pth.tar t2t_vit_7.safetensors   # official -> t2t_ref
    python -m t2t_ref.convert runs/t2t/best.safetensors t2t_vit_7.pth         # t2t_ref -> PyTorch

The output's extension picks its format:
  .safetensors                 t2t_ref's weight file (the weights under the official keys, with
                               the model name and class names as metadata): evaluate
                               --checkpoint, predict and train --init-from read it
  .pth .pt .pth.tar .bin       a bare PyTorch state dict: the official T2T_ViT loads it with
                               model.load_state_dict(torch.load(OUT), strict=True)
The input may be either kind (official files: their EMA weights unless --no-ema). Every key and
shape is checked against the model on the way through. PyTorch is needed for .pth files only.
"""

import os
import sys

from .checkpoint import CheckpointError
from .cli import Parser, run as run_cli, user_error
from .pretrained import PretrainedError, export_pth, model_from_weights, read_weights, \
    save_weights
from .variants import list_models

TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin")


def convert(source, target, model_name=None, use_ema=True):
    """Read source, check it against its model, write target. Returns a one-line summary."""
    if not target.endswith(".safetensors") and not target.endswith(TORCH_SUFFIXES):
        raise PretrainedError(f"cannot tell the output format from {target!r}: end it in "
                              f".safetensors (t2t_ref) or {', '.join(TORCH_SUFFIXES)} (PyTorch)")
    if os.path.exists(target) and os.path.samefile(source, target):
        raise PretrainedError(f"{target} is the input file itself: choose another output")
    weight_file = read_weights(source, use_ema)
    # the file's own dtype, so that converting never rounds a weight
    model, _ = model_from_weights(weight_file, model_name, dtype=weight_file.dtype)
    if target.endswith(".safetensors"):
        save_weights(target, model, class_names=weight_file.class_names,
                     source={"file": os.path.basename(source), "weights": weight_file.which})
    else:
        export_pth(target, model)
    return (f"wrote {target}: {model.name}, {model.num_classes} classes, "
            f"{model.img_size}x{model.img_size}, from {weight_file.which} of {source}")


def main(argv=None):
    parser = Parser(prog="python -m t2t_ref.convert", description=__doc__)
    parser.add_argument("input", metavar="IN", help="official .pth(.tar) or t2t_ref .safetensors")
    parser.add_argument("output", metavar="OUT", help="the file to write; its extension picks "
                        "the format")
    parser.add_argument("--model", default=None, choices=list_models(), metavar="NAME",
                        help="the variant (default: from the file's metadata, its training "
                        "arguments, or its shapes)")
    parser.add_argument("--no-ema", action="store_true",
                        help="take the raw weights, not the EMA ones where the file has both")
    args = parser.parse_args(argv)
    try:
        print(convert(args.input, args.output, args.model, use_ema=not args.no_ema))
    except (PretrainedError, CheckpointError, OSError) as err:
        return user_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
