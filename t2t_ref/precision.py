"""The precision policy: which dtype each part of a training step computes in.

    create_model(name, precision="bf16")       # or "fp16"; "float32" (the default)
    python -m t2t_ref.train --precision bf16 ...

Under "bf16" or "fp16" the parameters the optimizer updates, AdamW's moments, the EMA and the
gradient buffer stay float32 (the "master" copy); each forward rounds a half-precision copy
of the parameters from them, and matrix products and stored activations are half precision.
Where half precision breaks, an op works on float32 copies (a "float32 island") and rounds
its output back:

| op | float32 | bf16 | fp16 | why |
|---|---|---|---|---|
| matrix products (Linear, attention's q k^T and p v) | float32 | bf16 operands, float32 sums | fp16 operands, float32 sums | tensor cores sum in float32 (on CuPy one cuBLAS call: cupy_gemm.py); NumPy multiplies float32 copies the same way (gaps.matmul) |
| stored activations, input gradients | float32 | bf16 | fp16 | half the memory and bandwidth |
| weight and bias gradients | float32 | float32 | float32 | summed over all tokens, and into the float32 gradient buffer |
| LayerNorm (mean, variance, normalisation; its weight and bias the float32 master values) | float32 | float32 island | float32 island | a variance of hundreds of half values loses its digits |
| softmax | float32 | float32 island, p stored bf16 | float32 island, p stored fp16 | its sum of exponentials over a row of thousands |
| GELU | float32 | float32 island | float32 island | erf stays float32 (cupyx maps float16 erf to float64) |
| performer attention (exp of the random features, key sum, denominator + epsilon) | float32 | float32 island | float32 island | in fp16 exp overflows past 65504 and 1e-8 rounds to 0: the official code's NaNs (tutorial 4) |
| SE gate's mean and sigmoid | float32 | float32 island | float32 island | a mean over all tokens; exp |
| cross-entropy, the loss | float32 | float32 | float32 | log-sum-exp, and the loss is what is reported |
| gradient sum over threads and ranks | float32 | float32 | float32 | the flat float32 gradient buffer |
| AdamW, weight decay, EMA, clipping | float32 | float32 | float32 | updates far smaller than the weights |
| loss scale | none | none | dynamic, 2^16 at first (loss_scale.py) | fp16's smallest normal number is 6e-5: small gradients would flush to zero |

bfloat16 is ml_dtypes' (NumPy and CuPy both take it); float16 is the backends' own. The whole
policy runs on NumPy too, so the tests prove it without a GPU; on NumPy it is slower than
float32, not faster (no half-precision BLAS). array_api_strict has no half types.
"""

PRECISIONS = ("float32", "bf16", "fp16")


class PrecisionError(ValueError):
    """A precision this model or machine cannot compute in; the message is one line."""


def compute_dtype(xp, precision, master_dtype):
    """The dtype of a model's products and activations under the policy."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}: choose one of "
                             f"{', '.join(PRECISIONS)}")
    if precision == "float32":
        return master_dtype
    if master_dtype != xp.float32:
        raise PrecisionError(f"precision {precision} keeps float32 master weights: use "
                             "dtype float32 with it")
    if not hasattr(xp, "float16"):
        raise PrecisionError(f"precision {precision} needs half-precision arrays, which this "
                             "backend does not have: use numpy or cupy")
    if precision == "fp16":
        return xp.float16
    try:
        import ml_dtypes
    except ImportError:
        raise PrecisionError("precision bf16 needs the ml_dtypes package for its bfloat16 "
                             "type: pip install ml_dtypes") from None
    if "cupy" in xp.__name__:
        _check_gpu_bfloat16(ml_dtypes.bfloat16)
    return ml_dtypes.bfloat16


# bf16 on CuPy once gave wrong gradients (the first GPU run, an H200 with CuPy 14.2: T2T-ViT-t-14's
# were 0.6 to 0.8 off, by a different amount each run): CuPy 14's where has no bfloat16 loop and
# returns float32, so the soft split's backward (a gather and a where, on CuPy only) turned the
# gradient float32, and the fused softmax backward then read the bfloat16 attention map as
# float32, past its end. gaps.where keeps the dtype and the kernels refuse operands of another
# dtype (tests/test_precision.py types where as CuPy does); on the H200 since, bf16 matches
# NumPy's float32 within the policy's tolerances, the same on two runs (scripts/gpu_parity.py).


def _check_gpu_bfloat16(bfloat16):
    """bf16 on CuPy needs a GPU with bfloat16 arithmetic (compute capability 8.0 and up: cuBLAS
    has no bfloat16 products before, nor the GPU a bfloat16 conversion) and a CuPy that makes
    bfloat16 arrays (CuPy 14 and up)."""
    import cupy
    capability = int(cupy.cuda.Device().compute_capability)  # "75" for 7.5
    if capability < 80:
        raise PrecisionError(
            f"precision bf16 needs a GPU of compute capability 8.0 or newer (A100, RTX 30xx, "
            f"H100 and later), and this one is {capability // 10}.{capability % 10}: use "
            "--precision fp16")
    try:  # an array, and an elementwise kernel on it (CuPy 14 compiles bfloat16 loops only
        # with NumPy 2.1.2 or newer and ml_dtypes)
        probe = cupy.zeros((2,), dtype=bfloat16)
        (probe + probe).astype(cupy.float32)
    except Exception:  # CuPy's refusals vary: TypeError, ValueError, a failed compilation
        raise PrecisionError(
            f"precision bf16 needs a CuPy with bfloat16 arrays (CuPy 14 or newer, with NumPy "
            f"2.1.2 or newer), and this is CuPy {cupy.__version__}: upgrade CuPy (or NumPy) or "
            "use --precision fp16") from None
