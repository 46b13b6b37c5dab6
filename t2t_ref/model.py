"""T2T-ViT, its backbone explorations and the plain ViT: the whole model, forward and backward,
on any array-API backend.

    image (B, 3, S, S)
    stem                              -> (B, G*G, D)     G = S/16
        T2T-ViTs: the tokens-to-token module (layers/tokens_to_token.py: three soft splits
        and two T2T layers, then a Linear to D); the plain ViT: hard 16x16 patches and a
        Linear (layers/patch_embed.py)
    [class token; tokens] + pos_embed -> (B, G*G+1, D), dropout
        T2T-ViT's position table is a fixed sinusoid; ViT's is learned
    backbone layers                   -> (B, G*G+1, D')  (backbone.py: plain, SE, ghost or
                                                          dense blocks; D' = D but for dense)
    LayerNorm, class token, head      -> (B, num_classes)

At 224 the grids are 56, 28 and 14 (196 tokens), at 32 they are 8, 4 and 2 (4 tokens).

Parameters live in `model.params` (trained) and `model.buffers` (fixed: T2T-ViT's `pos_embed`
and the performers' `w`), both under the official checkpoint names, so `state_dict()` is the
official format. `forward` keeps a cache of what `backward` needs; `backward` fills `model.grads`.
model.params and model.grads are FlatTensors (flat.py): dicts whose tensors are views into
one buffer each, so that the optimizer updates all of them in a few array calls; like
PyTorch's .grad, model.grads is overwritten by the next backward.
The model computes a batch in the calling thread; running it over cores, processes or GPUs is
the job of t2t_ref.parallel, which wraps it.
"""

import math

import numpy as np

from .backbone import backbone_layers, layer_backward, layer_forward, layer_specs
from .backend import BACKENDS, array_namespace, backend_name, get_dtype, get_namespace, \
    to_device, to_numpy
from .flat import FlatTensors
from .keys import compare_keys
from .gaps import make_rng, wide
from .init import linear_specs, norm_specs, performer_features, sinusoid_table, trunc_normal
from .layers import add_prefix, sub_dict
from .layers import patch_embed, tokens_to_token
# re-exported: bench.py, its tests and the tutorials use these from here
from .layers.tokens_to_token import (PERFORMER_FEATURES, SOFT_SPLITS, T2T_LAYERS,  # noqa: F401
                                     TOKEN_DIM)
from .ops.dropout import dropout_backward, dropout_forward
from .ops.layernorm import layernorm_backward, layernorm_forward
from .ops.linear import linear_backward, linear_forward
from .precision import compute_dtype
from .variants import Variant, get_variant

PATCH = 16  # both stems shrink the image 16x: S must be a multiple of it
# tokens_type -> (state-dict prefix, forward, backward) of the stem
STEMS = {
    "performer": (tokens_to_token.PREFIX, tokens_to_token.tokens_to_token_forward,
                  tokens_to_token.tokens_to_token_backward),
    "transformer": (tokens_to_token.PREFIX, tokens_to_token.tokens_to_token_forward,
                    tokens_to_token.tokens_to_token_backward),
    "patch": (patch_embed.PREFIX, patch_embed.patch_embed_forward,
              patch_embed.patch_embed_backward),
}


class IncompatibleKeys(tuple):
    """(missing_keys, unexpected_keys), as torch's load_state_dict returns."""

    def __new__(cls, missing_keys, unexpected_keys):
        return super().__new__(cls, (missing_keys, unexpected_keys))

    missing_keys = property(lambda self: self[0])
    unexpected_keys = property(lambda self: self[1])


class T2TViT:
    """One T2T-ViT (or the plain ViT, tokens_type 'patch'). Build it with
    t2t_ref.create_model(name, ...)."""

    def __init__(self, name, *, num_classes=1000, img_size=224, backend="numpy",
                 dtype="float32", seed=0, drop_rate=0.0, drop_path_rate=0.0, qk_scale=None,
                 precision="float32"):
        variant = get_variant(name)
        if not (isinstance(img_size, int) and img_size >= PATCH and img_size % PATCH == 0):
            raise ValueError(f"img_size must be a positive multiple of {PATCH} "
                             f"(the stem shrinks it 16x), got {img_size!r}")
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        for flag, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {rate!r}")
        self.xp, self.device = get_namespace(backend)
        self.dtype = get_dtype(self.xp, dtype)  # the parameters' (master) dtype
        # the products' and activations' dtype (precision.py): self.dtype, or a half type
        self.precision = precision
        self.compute_dtype = compute_dtype(self.xp, precision, self.dtype)
        # a Variant built by hand (tutorial 9's miniatures) has no name of its own
        self.name = name if isinstance(name, str) else "custom"
        self.variant, self.backend, self.dtype_name = variant, backend, dtype
        self.num_classes, self.img_size = num_classes, img_size
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate
        # the backbone's layers (backbone.py); each has its width, heads, scale, drop path
        self.layers = backbone_layers(variant, drop_path_rate, qk_scale)
        self.scale = self.layers[0].scale  # the first block's q k^T scale
        self.drop_path_rates = [layer.drop_path for layer in self.layers]
        self.num_features = self.layers[-1].out_width  # what the final norm and head read
        self.grid = img_size // PATCH  # tokens per side after the stem
        self.training = False
        # dropout's decisions (gaps.KeyedRandom: keyed by sample); the weights use `seed`
        self.rng = make_rng(self.xp, seed + 1)
        # what the last forward kept for backward: {"stem": ..., "block0": ..., ...}, each
        # layer's own cache (the tutorials read attention maps from it); None after backward
        self.cache = None
        self.grads = {}
        self._init_weights(seed)

    # ---- parameters -------------------------------------------------------------------------

    def _param_specs(self):
        """(name, shape, how to initialise) for every state-dict entry, in the official order."""
        return param_specs(self.variant, self.img_size, self.num_classes)

    def _init_weights(self, seed):
        rng = np.random.default_rng(seed)
        host = {}
        for name, shape, how in self._param_specs():
            if how == "trunc_normal":
                host[name] = trunc_normal(rng, shape)
            elif how == "orthogonal":
                host[name] = performer_features(rng, *shape)
            elif how == "sinusoid":
                host[name] = sinusoid_table(shape[1], shape[2])[None]
            elif isinstance(how, tuple):  # ("uniform", bound): PyTorch's default conv init
                host[name] = rng.uniform(-how[1], how[1], size=shape)
            else:
                host[name] = np.full(shape, 1.0 if how == "ones" else 0.0)
        trained = {name: shape for name, shape, _ in self._param_specs()
                   if not self._is_fixed(name)}
        # matrices first, then the vectors (biases, LayerNorm weights): the tensors that get
        # weight decay then lie in one stretch of the buffer (see optim.AdamW)
        order = sorted(trained, key=lambda name: len(trained[name]) <= 1)
        self.params = FlatTensors(self.xp, trained, self.dtype, self.device, order=order)
        self.norm_names = [name for name in trained if _is_layernorm(name)]  # compute_params
        self.buffers = {}
        # where backward writes the gradients (model.grads is this buffer after a backward):
        # made by the first backward; t2t_ref.parallel gives each piece of a batch its own
        self.grad_buffer = None
        # half precision: the forward's half copy of the parameters, made from them each
        # forward (t2t_ref.parallel gives each piece its own, too)
        self.compute_buffer = None
        self.load_state_dict(host)

    def _is_fixed(self, name):
        return is_fixed(self.variant, name)

    def state_dict(self):
        """{official key: host NumPy array} for every parameter and fixed buffer."""
        return {name: to_numpy(self._tensor(name)).copy() for name, _, _ in self._param_specs()}

    def _tensor(self, name):
        return self.buffers[name] if self._is_fixed(name) else self.params[name]

    def load_state_dict(self, state_dict, strict=True):
        """Copy weights in from {key: array-like} (NumPy arrays, or anything np.asarray takes).

        Every shape must fit. strict=True also requires exactly the model's keys; with
        strict=False, missing and unexpected keys are skipped and returned.
        Raises ValueError naming every offending key.
        """
        expected = {name: shape for name, shape, _ in self._param_specs()}
        missing, unexpected, wrong = compare_keys(state_dict, expected)
        wrong_shape = [f"{k}: checkpoint {given}, model {want}" for k, given, want in wrong]
        problems = []
        if wrong_shape:
            problems.append("wrong shape for " + "; ".join(wrong_shape))
        if strict and missing:
            problems.append("missing keys " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys " + ", ".join(unexpected))
        if problems:
            raise ValueError(f"state dict does not fit {self.name} "
                             f"(img_size {self.img_size}, {self.num_classes} classes): "
                             + " | ".join(problems))
        for name in expected:
            if name in state_dict:
                # C order always: a layout that depends on where the weights came from would
                # change BLAS's summation order, and so the last bits of every result
                value = np.ascontiguousarray(state_dict[name], dtype=np.float64)
                array = self.xp.astype(to_device(value, self.xp, self.device), self.dtype)
                (self.buffers if self._is_fixed(name) else self.params)[name] = array
        return IncompatibleKeys(missing, unexpected)

    def num_parameters(self, trainable_only=False):
        """Number of scalars in the state dict (or only in the trained parameters)."""
        tensors = list(self.params.values())
        if not trainable_only:
            tensors += list(self.buffers.values())
        return sum(math.prod(t.shape) for t in tensors)

    # ---- modes ------------------------------------------------------------------------------

    def train(self, mode=True):
        """Training mode: dropout and drop path act. Returns self, as PyTorch does."""
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # ---- forward and backward ---------------------------------------------------------------

    def _check_input(self, x):
        try:
            xp = array_namespace(x)
        except TypeError:
            raise ValueError(f"input must be an array of the {self.backend} backend, "
                             f"got {type(x).__name__}") from None
        if backend_name(xp) != self.backend:
            raise ValueError(f"input is a {backend_name(xp)} array but the model runs on "
                             f"{self.backend}: move it with t2t_ref.backend.to_device")
        if x.dtype != self.dtype:
            raise ValueError(f"input dtype {x.dtype} does not match the model's dtype "
                             f"{self.dtype_name}: convert the input to {self.dtype_name}")
        S = self.img_size
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must have shape (B, 3, {S}, {S}) (RGB images), "
                             f"got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != (S, S):
            raise ValueError(f"input images are {x.shape[2]}x{x.shape[3]} but the model was "
                             f"built for {S}x{S}: resize or crop them to {S}x{S}, or create the "
                             f"model with another img_size (a multiple of {PATCH})")

    def forward(self, x, keep_cache=True):
        """x (B, 3, S, S) on the model's backend and dtype -> logits (B, num_classes).

        keep_cache=True keeps every layer's activations for backward() (in eval mode too, so
        that saliency maps and gradient checks work). keep_cache=False is inference, as under
        torch.no_grad(): each layer's activations are dropped as soon as the next layer has
        them, so memory stays at about one layer's worth; backward() then raises.
        """
        self._check_input(x)
        self.cache = None  # an earlier forward's activations are not needed any more
        xp, p = self.xp, self.compute_params()
        x = xp.astype(x, self.compute_dtype) if x.dtype != self.compute_dtype else x
        opts = dict(rng=self.rng, training=self.training)
        B = x.shape[0]
        caches = {} if keep_cache else _Discard()

        # The stem: tokens-to-token (T2T-ViT) or hard patches (ViT).
        prefix, stem_forward, _ = STEMS[self.variant.tokens_type]
        stem_params = {**sub_dict(p, prefix), **sub_dict(self.buffers, prefix)}
        if self.variant.tokens_type == "patch":
            tokens, caches["stem"] = stem_forward(x, stem_params)  # (B, G*G, D)
        else:
            tokens, caches["stem"] = stem_forward(x, stem_params, self.variant.tokens_type,
                                                  **opts)  # (B, G*G, D)

        # Class token in front, position table added.
        cls = xp.broadcast_to(p["cls_token"], (B, 1, tokens.shape[2]))  # (B, 1, D)
        table = p["pos_embed"] if "pos_embed" in p else self.buffers["pos_embed"]
        h = xp.concat([cls, tokens], axis=1) + xp.astype(table, tokens.dtype)  # (B, G*G+1, D)
        h, caches["pos_drop"] = dropout_forward(h, self.drop_rate, **opts)

        for i, layer in enumerate(self.layers):
            h, caches[f"block{i}"] = layer_forward(layer, h, sub_dict(p, layer.prefix),
                                                   drop=self.drop_rate, **opts)  # (B, N, D')

        h, caches["norm"] = layernorm_forward(h, p["norm.weight"], p["norm.bias"])
        logits, caches["head"] = linear_forward(h[:, 0, :], p["head.weight"], p["head.bias"])
        caches["tokens_shape"] = h.shape
        self.cache = caches if keep_cache else None
        return xp.astype(logits, self.dtype)  # (B, num_classes) in the master dtype

    def compute_params(self):
        """The parameters the forward computes with: model.params itself, or under a half
        precision their copy in compute_dtype, rounded afresh (one pass over the buffer),
        but for the LayerNorms' weights and biases: LayerNorm computes in float32 under every
        policy (its island), so it takes the float32 master values themselves, as under
        torch.autocast (on a GPU that also spares each LayerNorm two conversions a step)."""
        if self.compute_dtype == self.dtype:
            return self.params
        buffer = self.compute_buffer
        if buffer is None or not buffer.same_layout(self.params):
            buffer = self.compute_buffer = self.params.zeros_like(dtype=self.compute_dtype)
        buffer.flat[...] = self.xp.astype(self.params.flat, self.compute_dtype)
        return {**buffer, **{name: self.params[name] for name in self.norm_names}}

    __call__ = forward

    def backward(self, dlogits):
        """dlogits (B, num_classes) -> d(input) (B, 3, S, S); fills self.grads.

        Unwinds forward in reverse. Fixed tensors (T2T-ViT's pos_embed, the performers' w)
        get no gradient. Must follow a forward; the cache is released afterwards.
        """
        if self.cache is None:
            raise RuntimeError("backward() needs a forward(x) first, with keep_cache=True "
                               "(its cache is used once)")
        caches, self.cache = self.cache, None
        xp, g = self.xp, {}
        dlogits = xp.astype(dlogits, self.compute_dtype)  # (B, K): under bf16/fp16 half

        dcls_out, g["head.weight"], g["head.bias"] = linear_backward(dlogits, caches["head"])
        # only the class token's row fed the head: the other rows get zero gradient
        B, N, D = caches["tokens_shape"]
        zeros = xp.zeros((B, N - 1, D), dtype=dlogits.dtype, device=self.device)
        dh = xp.concat([dcls_out[:, None, :], zeros], axis=1)  # (B, N, D')
        dh, g["norm.weight"], g["norm.bias"] = layernorm_backward(dh, caches["norm"])

        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            dh, layer_grads = layer_backward(layer, dh, caches[f"block{i}"])
            g.update(add_prefix(layer_grads, layer.prefix))

        dh = dropout_backward(dh, caches["pos_drop"])
        # the class token and the position table were broadcast over the batch: their
        # gradients sum over it (the table's only where it is trained: ViT's)
        # (in float32 when dh is half: sums over the batch go into the float32 buffer)
        g["cls_token"] = xp.sum(wide(dh[:, :1, :]), axis=0, keepdims=True)  # (1, 1, D)
        if not self._is_fixed("pos_embed"):
            g["pos_embed"] = xp.sum(wide(dh), axis=0, keepdims=True)  # (1, G*G+1, D)
        prefix, _, stem_backward = STEMS[self.variant.tokens_type]
        dx, stem_grads = stem_backward(dh[:, 1:, :], caches["stem"])  # (B, 3, S, S)
        g.update(add_prefix(stem_grads, prefix))
        if self.grad_buffer is None or not self.grad_buffer.same_layout(self.params):
            self.grad_buffer = self.params.zeros_like()
        self.grads = self.grad_buffer
        self.grads.update(g)  # copied into the flat buffer's views (and its dtype)
        return xp.astype(dx, self.dtype)  # (B, 3, S, S) in the master dtype


def _is_layernorm(name):
    """Is the parameter a LayerNorm's weight or bias ('blocks.3.norm1.weight', 'norm.bias')?
    Every norm of every variant is a LayerNorm (norm, norm1, norm2)."""
    parts = name.rsplit(".", 2)
    return len(parts) >= 2 and parts[-2].startswith("norm")


class _Discard(dict):
    """A dict that forgets whatever is stored in it: forward's caches when none are kept."""

    def __setitem__(self, key, value):
        pass


def param_specs(variant, img_size, num_classes):
    """(name, shape, how to initialise) of every state-dict entry of a model, in the official
    order (as the official module's state_dict() lists them: its own tensors, then its
    submodules'), with no weights made. variant: a Variant or a name."""
    variant = get_variant(variant)
    D, positions = variant.embed_dim, (img_size // PATCH) ** 2 + 1
    layers = backbone_layers(variant)
    if variant.tokens_type == "patch":  # timm's ViT: a learned table, trunc normal 0.02
        specs = [("cls_token", (1, 1, D), "trunc_normal"),
                 ("pos_embed", (1, positions, D), "trunc_normal")]
        specs += patch_embed.patch_embed_specs(D)
    else:  # T2T-ViT: the fixed sinusoid table
        specs = [("cls_token", (1, 1, D), "trunc_normal"),
                 ("pos_embed", (1, positions, D), "sinusoid")]
        specs += tokens_to_token.tokens_to_token_specs(variant.tokens_type, D)
    for layer in layers:
        specs += layer_specs(layer)
    width = layers[-1].out_width
    return specs + norm_specs("norm.", width) + linear_specs("head.", width, num_classes)


def is_fixed(variant, name):
    """Is this state-dict entry stored but never trained? T2T-ViT's sinusoid pos_embed and the
    performers' w; nothing of the ViT (its position table is learned)."""
    if get_variant(variant).tokens_type == "patch":
        return False
    return name == "pos_embed" or tokens_to_token.is_fixed(name)


def create_model(name, *, num_classes=1000, img_size=224, backend="numpy", dtype="float32",
                 seed=0, drop_rate=0.0, drop_path_rate=0.0, qk_scale=None,
                 precision="float32"):
    """Build a model by name (see list_models()), freshly initialised; or, given a
    t2t_ref.variants.Variant, a model of that shape (named 'custom').
    It computes each batch in the calling thread; t2t_ref.parallel.DataParallel(model) runs
    it on every core (or over MPI ranks). precision "bf16" or "fp16": products and
    activations in half precision, float32 master weights (precision.py)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not isinstance(name, (str, Variant)):
        raise ValueError(f"model must be a name or a Variant, got {type(name).__name__}")
    return T2TViT(name, num_classes=num_classes, img_size=img_size, backend=backend,
                  dtype=dtype, seed=seed, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                  qk_scale=qk_scale, precision=precision)
