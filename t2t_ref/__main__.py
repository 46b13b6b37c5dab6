"""python -m t2t_ref: build a T2T-ViT, run one forward and backward pass on random images,
and print the loss and the largest gradient. A check, in about a second, that everything
works."""

import sys
import time

import numpy as np

import t2t_ref
from t2t_ref.cli import Parser, number, run as run_cli, user_error
from t2t_ref.model import PATCH
from t2t_ref.parallel import DataParallel


def synchronize(xp):
    """Wait until the GPU has done all the work queued so far (nothing to wait for on a CPU)."""
    if t2t_ref.backend.backend_name(xp) == "cupy":
        import cupy
        cupy.cuda.get_current_stream().synchronize()


def main(argv=None):
    parser = Parser(prog="python -m t2t_ref", description=__doc__)
    parser.add_argument("--model", default="t2t_vit_7", choices=t2t_ref.list_models())
    parser.add_argument("--img-size", type=number(int, low=PATCH), default=224,
                        help=f"image side, a multiple of {PATCH}")
    parser.add_argument("--batch-size", type=number(int, low=1), default=2)
    parser.add_argument("--num-classes", type=number(int, low=1), default=1000)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    S = args.img_size
    if S % PATCH:  # the words of train's check
        return user_error(f"--img-size {S} is not a multiple of {PATCH}: every model cuts the "
                          f"image into a grid 16x smaller (T2T-ViT's three soft splits, ViT's "
                          f"16x16 patches); try {max(PATCH, S // PATCH * PATCH)}")
    try:
        return check(args)
    except MemoryError:
        return user_error(out_of_memory(args))
    except Exception as err:  # CuPy's OutOfMemoryError is no MemoryError
        if type(err).__name__ != "OutOfMemoryError":
            raise
        return user_error(out_of_memory(args))


def out_of_memory(args):
    """The one line for a check too big for the memory there is."""
    where = "the GPU" if args.backend == "cupy" else "this machine"
    return (f"out of memory: batch {args.batch_size} of {args.img_size}x{args.img_size} images "
            f"(--num-classes {args.num_classes}) needs more than {where} has: lower "
            "--batch-size or --img-size")


def check(args):
    """Build the model, run one step, print what it found; the exit code."""
    try:
        model = DataParallel(t2t_ref.create_model(  # every core (t2t_ref.parallel)
            args.model, num_classes=args.num_classes, img_size=args.img_size,
            backend=args.backend, dtype=args.dtype))
    except ValueError as err:
        return user_error(err)
    rng = np.random.default_rng(0)
    S = args.img_size
    images = rng.normal(size=(args.batch_size, 3, S, S)).astype(args.dtype)
    labels = rng.integers(0, args.num_classes, size=args.batch_size)
    xp, device = model.xp, model.device
    images = t2t_ref.to_device(images, xp, device)
    labels = t2t_ref.to_device(labels, xp, device)

    synchronize(xp)
    start = time.perf_counter()
    logits = model.train().forward(images)  # (B, num_classes)
    loss, dlogits = t2t_ref.cross_entropy(logits, labels, smoothing=0.1)
    model.backward(dlogits)
    synchronize(xp)  # on a GPU the calls above only queued the work
    seconds = time.perf_counter() - start
    name, grad = max(model.grads.items(), key=lambda kv: float(xp.max(xp.abs(kv[1]))))
    print(f"{args.model} at {S}x{S}, batch {args.batch_size}, {args.backend}/{args.dtype}: "
          f"{model.num_parameters():,} parameters ({model.num_parameters(True):,} trainable)")
    print(f"loss {float(loss):.4f} (ln {args.num_classes} = {np.log(args.num_classes):.4f})")
    print(f"largest gradient |{name}| = {float(xp.max(xp.abs(grad))):.4e}")
    print(f"forward + backward took {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
