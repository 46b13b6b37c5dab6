"""Parameters and multiply-accumulates of every model, stage by stage, from one function.

    print(t2t_ref.summary("t2t_vit_14"))              # a table like torchinfo's, 224 x 224
    rows = t2t_ref.summary_rows("t2t_vit_dense", 32)  # the same as data
    params, trainable, macs = t2t_ref.count("vit_small_patch16_224")

    python -m t2t_ref.summary t2t_vit_16_ghost --img-size 224
    python -m t2t_ref.summary --all                   # every model against the official figures

Parameters come from the model's own list of state-dict entries (model.param_specs, no weights
made), grouped by stage. MACs count the multiply-accumulates of the matrix products, as the
official figures do: an (n x k) @ (k x m) product costs n k m; elementwise work (LayerNorm,
GELU, softmax, exp, the SE gate's and the ghost cheap operations' per-channel scales) is left
out, which moves no figure here by 0.1%. tests/test_summary.py checks the MAC formulas against
a count of every matrix product of a real forward pass, for every kind of layer.

Where the official figures and ours disagree, OFFICIAL_GMACS's notes say so: the official
numbers are rounded to 0.1 G and were computed with another script (Google Electra's FLOPs
counter, halved, the authors say in the official issues #5 and #10).
"""

import math
import sys
from dataclasses import dataclass

from .backbone import backbone_layers, layer_macs
from .cli import Parser, number, run as run_cli, user_error
from .layers.tokens_to_token import PERFORMER_FEATURES, SOFT_SPLITS, TOKEN_DIM
from .model import PATCH, is_fixed, param_specs
from .variants import VARIANTS, get_variant

# The published GMACs at 224 x 224, 1000 classes: (GMACs, where from, what to know)
OFFICIAL_GMACS = {
    "t2t_vit_7": (1.1, "README", "the README's 1.1 / 1.5 / 1.8 G for T2T-ViT-7/10/12 agree "
                  "with this count; in the official issue #47 a user showed that the figures "
                  "first published (1.2 / 1.8 / 2.2 G) implied a T2T module of negative cost, "
                  "and the authors answered 1.57 / 1.9 / 2.2 G (0.7 G of T2T module + 0.125 G "
                  "a block), which this count does not support: its T2T module with the "
                  "project Linear is 0.27 G, a block 0.125 G; the paper's Table 1 lists "
                  "T2T-ViT-7 at depth 8, the code builds 7"),
    "t2t_vit_10": (1.5, "README", "see t2t_vit_7"),
    "t2t_vit_12": (1.8, "README", "see t2t_vit_7"),
    "t2t_vit_14": (4.8, "README", ""),
    "t2t_vit_19": (8.5, "README", ""),
    "t2t_vit_24": (13.8, "README", ""),
    "t2t_vit_t_14": (6.1, "README", ""),
    "t2t_vit_t_19": (9.8, "README", ""),
    "t2t_vit_t_24": (15.0, "README", ""),
    "t2t_vit_dense": (5.5, "paper Table 6", ""),
    "t2t_vit_14_se": (4.9, "paper Table 6", ""),
    "t2t_vit_16_ghost": (3.7, "paper Table 6", "Table 6 calls it 14 deep; the official code "
                         "builds 16 blocks, which the parameter count (16.3M) matches"),
    "vit_small_patch16_224": (10.1, "paper Table 6", "ViT-S/16: timm's own small ViT, "
                              "768 wide and 8 deep, not DeiT-S"),
}


@dataclass(frozen=True)
class Row:
    """One stage of a model: what comes out of it and what it costs for one image."""
    stage: str  # 'tokens_to_token.attention1', 'blocks.3', ...
    what: str  # 'T2T performer', 'block (se)', ...
    shape: tuple  # the output's shape, batch 1
    params: int  # its state-dict entries' scalars, fixed ones included
    trainable: int
    macs: int


def summary_rows(name, img_size=224, num_classes=1000):
    """The stages of a model (a name or a Variant) at this image size, in forward order."""
    variant = get_variant(name)
    if not (isinstance(img_size, int) and img_size >= PATCH and img_size % PATCH == 0):
        raise ValueError(f"img_size must be a positive multiple of {PATCH}, got {img_size!r}")
    params, trainable = {}, {}
    for key, shape, _ in param_specs(variant, img_size, num_classes):
        stage = _stage_of(key)
        params[stage] = params.get(stage, 0) + math.prod(shape)
        if not is_fixed(variant, key):
            trainable[stage] = trainable.get(stage, 0) + math.prod(shape)

    def row(stage, what, shape, macs=0):
        return Row(stage, what, shape, params.get(stage, 0), trainable.get(stage, 0), macs)

    D, grid = variant.embed_dim, img_size // PATCH
    N = grid * grid  # image tokens after the stem
    rows = []
    if variant.tokens_type == "patch":
        rows.append(row("patch_embed", "16x16 patches, Linear", (1, N, D), N * 3 * PATCH**2 * D))
    else:
        side, d_in = img_size, 3
        for i, (k, s, p) in enumerate(SOFT_SPLITS):
            side = (side + 2 * p - k) // s + 1
            d_in *= k * k
            rows.append(row(f"tokens_to_token.soft_split{i}", f"unfold k{k} s{s} p{p}",
                            (1, side * side, d_in)))
            if i < 2:
                layer = f"tokens_to_token.attention{i + 1}"
                rows.append(row(layer, f"T2T {variant.tokens_type}", (1, side * side, TOKEN_DIM),
                                _t2t_layer_macs(variant.tokens_type, side * side, d_in)))
                d_in = TOKEN_DIM
        rows.append(row("tokens_to_token.project", "Linear", (1, N, D), N * d_in * D))
    table = "learned" if variant.tokens_type == "patch" else "fixed"
    rows.append(row("cls_token, pos_embed", f"class token + {table} table", (1, N + 1, D)))
    for layer in backbone_layers(variant):
        what = {"plain": "block", "transition": "transition", "dense": "dense block"}.get(
            layer.kind, f"block ({layer.kind})")
        rows.append(row(f"blocks.{layer.index}", what, (1, N + 1, layer.out_width),
                        layer_macs(layer, N + 1)))
    width = rows[-1].shape[-1]
    rows.append(row("norm", "LayerNorm", (1, N + 1, width)))
    rows.append(row("head", "Linear on the class token", (1, num_classes), width * num_classes))
    return rows


def _stage_of(key):
    """The stage a state-dict key belongs to: 'blocks.3.attn.qkv.weight' -> 'blocks.3'."""
    if key in ("cls_token", "pos_embed"):
        return "cls_token, pos_embed"
    parts = key.split(".")
    if parts[0] in ("blocks", "tokens_to_token"):
        return ".".join(parts[:2])
    return parts[0]


def _t2t_layer_macs(tokens_type, N, d_in):
    """A T2T layer on N tokens of width d_in: its Linears (qkv, proj, the MLP's two), then the
    attention: full (q k^T and P v, N x N) or the performer's (the random features of q and
    k, the denominator, phi(k)^T v and the numerator, all linear in N)."""
    E, m = TOKEN_DIM, PERFORMER_FEATURES
    linears = N * (3 * E * d_in + E * E + 2 * E * E)
    if tokens_type == "performer":
        return linears + 2 * N * E * m + N * m + N * E * m + N * m * E
    return linears + 2 * N * N * E


def count(name, img_size=224, num_classes=1000):
    """(all parameters, trainable ones, MACs per image) of a model."""
    rows = summary_rows(name, img_size, num_classes)
    return (sum(r.params for r in rows), sum(r.trainable for r in rows),
            sum(r.macs for r in rows))


def summary(name, img_size=224, num_classes=1000):
    """The table of summary_rows as text, with totals (and the official figures, if any)."""
    rows = summary_rows(name, img_size, num_classes)
    label = name if isinstance(name, str) else "custom"
    lines = [f"{label} at {img_size}x{img_size}, {num_classes} classes",
             f"{'stage':30s} {'what':30s} {'output':>16s} {'params':>12s} {'MACs':>15s}",
             "-" * 107]
    for r in rows:
        shape = "(" + ", ".join(str(n) for n in r.shape) + ")"
        params = f"{r.params:,}" + ("" if r.params == r.trainable else "*")
        lines.append(f"{r.stage:30s} {r.what:30s} {shape:>16s} {params:>12s} {r.macs:>15,}")
    total, trainable, macs = count(name, img_size, num_classes)
    lines += ["-" * 107,
              f"parameters {total:,} ({trainable:,} trained; * marks fixed tensors: the "
              "sinusoid table, the performers' w)" if total != trainable
              else f"parameters {total:,} (all trained)",
              f"MACs per image {macs:,} ({macs / 1e9:.2f} G; matrix products only)"]
    if isinstance(name, str) and name in OFFICIAL_GMACS and (img_size, num_classes) == (224,
                                                                                         1000):
        gmacs, source, note = OFFICIAL_GMACS[name]
        lines.append(f"official: {gmacs} GMACs ({source})" + (f"; {note}" if note else ""))
    return "\n".join(lines)


def overview(img_size=224, num_classes=1000):
    """Every model at this image size and class count: parameters and GMACs, beside the
    official figures at 224 / 1000 classes (the only size they were published for)."""
    official_size = (img_size, num_classes) == (224, 1000)
    lines = [f"every model at {img_size}x{img_size}, {num_classes} classes"
             + ("" if official_size else
                " (the official figures are for 224x224, 1000 classes: not shown)"),
             f"{'model':24s} {'params':>12s} {'trainable':>12s} {'GMACs':>7s}"
             + (f" {'official':>9s}  source" if official_size else "")]
    for name in VARIANTS:
        total, trainable, macs = count(name, img_size, num_classes)
        line = f"{name:24s} {total:>12,} {trainable:>12,} {macs / 1e9:7.2f}"
        if official_size:
            gmacs, source, note = OFFICIAL_GMACS.get(name, (None, "", ""))
            official = f"{gmacs:9.1f}" if gmacs is not None else f"{'-':>9s}"
            line += f" {official}  {source}"
        lines.append(line)
    if not official_size:
        return "\n".join(lines)
    notes = [f"{name}: {note}" for name, (_, _, note) in OFFICIAL_GMACS.items() if note
             and not note.startswith("see ")]
    notes.append("the official figures are rounded to 0.1 G and come from another counter "
                 "(Google Electra's FLOPs script, halved): here they differ by up to 0.22 G "
                 "(t2t_vit_dense 5.28 vs 5.5, vit_small_patch16_224 9.89 vs 10.1)")
    return "\n".join(lines + ["", "notes:"] + [f"- {n}" for n in notes])


def main(argv=None):
    parser = Parser(prog="python -m t2t_ref.summary", description=__doc__)
    parser.add_argument("model", nargs="?", default=None, choices=list(VARIANTS), metavar="NAME",
                        help="one of: " + ", ".join(VARIANTS))
    parser.add_argument("--img-size", type=number(int, low=PATCH), default=224,
                        help=f"image side, a multiple of {PATCH}")
    parser.add_argument("--num-classes", type=number(int, low=1), default=1000)
    parser.add_argument("--all", action="store_true",
                        help="every model (at --img-size / --num-classes; at 224 / 1000 "
                        "classes beside the official figures)")
    args = parser.parse_args(argv)
    if args.all and args.model is not None:
        return user_error(f"--all lists every model: give either {args.model} or --all, "
                          "not both")
    if args.model is None and not args.all:
        return user_error("name a model, or give --all (see python -m t2t_ref.summary --help)")
    if args.img_size % PATCH:
        return user_error(f"--img-size {args.img_size} is not a multiple of {PATCH}")
    if args.all:
        print(overview(args.img_size, args.num_classes))
        return 0
    print(summary(args.model, args.img_size, args.num_classes))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
