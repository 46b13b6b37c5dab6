"""T2T-ViT: the whole model, forward and backward, on any array-API backend.

Shapes for a 224 x 224 input (B batch, D backbone width; at size S the grids are S/4, S/8, S/16):

    image (B, 3, 224, 224)
    soft split 0: unfold k7 s4 p2     -> (B, 3136, 147)      56 x 56 tokens of 3*7*7 values
    T2T layer 1 (performer/transformer) -> (B, 3136, 64)
    re-structurize                    -> (B, 64, 56, 56)
    soft split 1: unfold k3 s2 p1     -> (B, 784, 576)       28 x 28 tokens of 64*3*3
    T2T layer 2                       -> (B, 784, 64) -> (B, 64, 28, 28)
    soft split 2: unfold k3 s2 p1     -> (B, 196, 576)       14 x 14 tokens
    project Linear(576 -> D)          -> (B, 196, D)
    [class token; tokens] + pos_embed -> (B, 197, D), dropout
    depth x Block                     -> (B, 197, D)
    LayerNorm, class token, head      -> (B, num_classes)

Parameters live in `model.params` (trained) and `model.buffers` (fixed: `pos_embed` and the
performers' `w`), both under the official checkpoint names, so `state_dict()` is the official
format. `forward` keeps a cache of what `backward` needs; `backward` fills `model.grads`.
model.params and model.grads are FlatTensors (flat.py): dicts whose tensors are views into
one buffer each, so that the optimizer updates all of them in a few array calls; like
PyTorch's .grad, model.grads is overwritten by the next backward.
The model computes a batch in the calling thread; running it over cores, processes or GPUs is
the job of t2t_ref.parallel, which wraps it.
"""

import math

import numpy as np

from .backend import BACKENDS, array_namespace, backend_name, get_dtype, get_namespace, \
    to_device, to_numpy
from .flat import FlatTensors
from .keys import compare_keys
from .gaps import make_rng
from .init import performer_features, sinusoid_table, trunc_normal
from .layers import add_prefix, sub_dict
from .layers import token_performer, token_transformer
from .layers.block import block_backward, block_forward
from .ops.dropout import dropout_backward, dropout_forward
from .ops.layernorm import layernorm_backward, layernorm_forward
from .ops.linear import linear_backward, linear_forward
from .ops.soft_split import soft_split_backward, soft_split_forward
from .variants import get_variant

TOKEN_DIM = 64  # width of the T2T layers' output tokens
PERFORMER_FEATURES = 32  # m = int(TOKEN_DIM * kernel_ratio 0.5)
# (kernel, stride, padding) of the three soft splits; together they shrink the grid 16x
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
PATCH = 16
T2T_LAYERS = {  # tokens_type -> (forward, backward) of the T2T layer kind
    "performer": (token_performer.token_performer_forward,
                  token_performer.token_performer_backward),
    "transformer": (token_transformer.token_transformer_forward,
                    token_transformer.token_transformer_backward),
}


class IncompatibleKeys(tuple):
    """(missing_keys, unexpected_keys), as torch's load_state_dict returns."""

    def __new__(cls, missing_keys, unexpected_keys):
        return super().__new__(cls, (missing_keys, unexpected_keys))

    missing_keys = property(lambda self: self[0])
    unexpected_keys = property(lambda self: self[1])


class T2TViT:
    """One T2T-ViT. Build it with t2t_ref.create_model(name, ...)."""

    def __init__(self, name, *, num_classes=1000, img_size=224, backend="numpy",
                 dtype="float32", seed=0, drop_rate=0.0, drop_path_rate=0.0, qk_scale=None):
        variant = get_variant(name)
        if not (isinstance(img_size, int) and img_size >= PATCH and img_size % PATCH == 0):
            raise ValueError(f"img_size must be a positive multiple of {PATCH} "
                             f"(the three soft splits shrink it 16x), got {img_size!r}")
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        for flag, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {rate!r}")
        self.xp, self.device = get_namespace(backend)
        self.dtype = get_dtype(self.xp, dtype)
        self.name, self.variant, self.backend, self.dtype_name = name, variant, backend, dtype
        self.num_classes, self.img_size = num_classes, img_size
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate
        D, h = variant.embed_dim, variant.num_heads
        self.scale = qk_scale if qk_scale is not None else (D // h) ** -0.5
        # drop path grows linearly from 0 at the first block to drop_path_rate at the last
        depth = variant.depth
        self.drop_path_rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0
                                for i in range(depth)]
        self.grid = img_size // PATCH  # tokens per side after the last soft split
        self.training = False
        # dropout's decisions (gaps.KeyedRandom: keyed by sample); the weights use `seed`
        self.rng = make_rng(self.xp, seed + 1)
        # what the last forward kept for backward: {"split0": ..., "block0": ..., ...}, each
        # layer's own cache (the tutorials read attention maps from it); None after backward
        self.cache = None
        self.grads = {}
        self._init_weights(seed)

    # ---- parameters -------------------------------------------------------------------------

    def _param_specs(self):
        """(name, shape, how to initialise) for every state-dict entry, in the official order."""
        D, depth, r = self.variant.embed_dim, self.variant.depth, self.variant.mlp_ratio
        E, hidden = TOKEN_DIM, int(D * r)
        specs = [("cls_token", (1, 1, D), "trunc_normal"),
                 ("pos_embed", (1, self.grid * self.grid + 1, D), "sinusoid")]
        for layer, d_in in (("attention1", 3 * 7 * 7), ("attention2", E * 3 * 3)):
            specs += _t2t_layer_specs(f"tokens_to_token.{layer}.", self.variant.tokens_type,
                                      d_in, E)
        specs += _linear_specs("tokens_to_token.project.", E * 3 * 3, D)
        for i in range(depth):
            p = f"blocks.{i}."
            specs += _norm_specs(p + "norm1.", D)
            specs += _linear_specs(p + "attn.qkv.", D, 3 * D, bias=False)
            specs += _linear_specs(p + "attn.proj.", D, D)
            specs += _norm_specs(p + "norm2.", D)
            specs += _linear_specs(p + "mlp.fc1.", D, hidden)
            specs += _linear_specs(p + "mlp.fc2.", hidden, D)
        specs += _norm_specs("norm.", D)
        specs += _linear_specs("head.", D, self.num_classes)
        return specs

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
            else:
                host[name] = np.full(shape, 1.0 if how == "ones" else 0.0)
        trained = {name: shape for name, shape, _ in self._param_specs()
                   if not self._is_fixed(name)}
        # matrices first, then the vectors (biases, LayerNorm weights): the tensors that get
        # weight decay then lie in one stretch of the buffer (see optim.AdamW)
        order = sorted(trained, key=lambda name: len(trained[name]) <= 1)
        self.params = FlatTensors(self.xp, trained, self.dtype, self.device, order=order)
        self.buffers = {}
        # where backward writes the gradients (model.grads is this buffer after a backward):
        # made by the first backward; t2t_ref.parallel gives each piece of a batch its own
        self.grad_buffer = None
        self.load_state_dict(host)

    def _is_fixed(self, name):
        return name == "pos_embed" or name.endswith(".w")

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
        xp, p = self.xp, self.params
        t2t_forward = T2T_LAYERS[self.variant.tokens_type][0]
        opts = dict(rng=self.rng, training=self.training)
        B = x.shape[0]
        caches = {} if keep_cache else _Discard()

        # Tokens-to-token: soft split, T2T layer, re-structurize, twice; then a last split.
        tokens, caches["split0"] = soft_split_forward(x, *SOFT_SPLITS[0])  # (B, S/4^2, 147)
        for i, layer in ((1, "attention1"), (2, "attention2")):
            layer_params = {**sub_dict(p, f"tokens_to_token.{layer}."),
                            **sub_dict(self.buffers, f"tokens_to_token.{layer}.")}
            tokens, caches[layer] = t2t_forward(tokens, layer_params, **opts)  # (B, N, 64)
            image = _tokens_to_image(tokens)  # (B, 64, side, side)
            tokens, caches[f"split{i}"] = soft_split_forward(image, *SOFT_SPLITS[i])  # (B,N/4,576)
        tokens, caches["project"] = linear_forward(tokens, p["tokens_to_token.project.weight"],
                                                   p["tokens_to_token.project.bias"])  # (B,G*G,D)

        # Class token in front, fixed position table added.
        cls = xp.broadcast_to(p["cls_token"], (B, 1, tokens.shape[2]))  # (B, 1, D)
        h = xp.concat([cls, tokens], axis=1) + self.buffers["pos_embed"]  # (B, G*G+1, D)
        h, caches["pos_drop"] = dropout_forward(h, self.drop_rate, **opts)

        for i, rate in enumerate(self.drop_path_rates):
            h, caches[f"block{i}"] = block_forward(
                h, sub_dict(p, f"blocks.{i}."), num_heads=self.variant.num_heads,
                scale=self.scale, drop=self.drop_rate, drop_path=rate, **opts)  # (B, N, D)

        h, caches["norm"] = layernorm_forward(h, p["norm.weight"], p["norm.bias"])
        logits, caches["head"] = linear_forward(h[:, 0, :], p["head.weight"], p["head.bias"])
        caches["tokens_shape"] = h.shape
        self.cache = caches if keep_cache else None
        return logits  # (B, num_classes)

    __call__ = forward

    def backward(self, dlogits):
        """dlogits (B, num_classes) -> d(input) (B, 3, S, S); fills self.grads.

        Unwinds forward in reverse. Fixed tensors (pos_embed, the performers' w) get no
        gradient. Must follow a forward; the cache is released afterwards.
        """
        if self.cache is None:
            raise RuntimeError("backward() needs a forward(x) first, with keep_cache=True "
                               "(its cache is used once)")
        caches, self.cache = self.cache, None
        xp, g = self.xp, {}
        t2t_backward = T2T_LAYERS[self.variant.tokens_type][1]

        dcls_out, g["head.weight"], g["head.bias"] = linear_backward(dlogits, caches["head"])
        # only the class token's row fed the head: the other rows get zero gradient
        B, N, D = caches["tokens_shape"]
        zeros = xp.zeros((B, N - 1, D), dtype=dlogits.dtype, device=self.device)
        dh = xp.concat([dcls_out[:, None, :], zeros], axis=1)  # (B, N, D)
        dh, g["norm.weight"], g["norm.bias"] = layernorm_backward(dh, caches["norm"])

        for i in reversed(range(len(self.drop_path_rates))):
            dh, block_grads = block_backward(dh, caches[f"block{i}"])
            g.update(add_prefix(block_grads, f"blocks.{i}."))

        dh = dropout_backward(dh, caches["pos_drop"])
        # the class token was broadcast over the batch: its gradient sums over it
        g["cls_token"] = xp.sum(dh[:, :1, :], axis=0, keepdims=True)  # (1, 1, D)
        dtokens = dh[:, 1:, :]  # (B, G*G, D)

        dtokens, g["tokens_to_token.project.weight"], g["tokens_to_token.project.bias"] = \
            linear_backward(dtokens, caches["project"])
        for i, layer in ((2, "attention2"), (1, "attention1")):
            dimage = soft_split_backward(dtokens, caches[f"split{i}"])  # (B, 64, side, side)
            dtokens = _image_to_tokens(dimage)  # (B, side*side, 64)
            dtokens, layer_grads = t2t_backward(dtokens, caches[layer])
            g.update(add_prefix(layer_grads, f"tokens_to_token.{layer}."))
        dx = soft_split_backward(dtokens, caches["split0"])  # (B, 3, S, S)
        if self.grad_buffer is None or not self.grad_buffer.same_layout(self.params):
            self.grad_buffer = self.params.zeros_like()
        self.grads = self.grad_buffer
        self.grads.update(g)  # copied into the flat buffer's views
        return dx


class _Discard(dict):
    """A dict that forgets whatever is stored in it: forward's caches when none are kept."""

    def __setitem__(self, key, value):
        pass


def _tokens_to_image(tokens):
    """Re-structurize: (B, N, C) tokens of a square grid -> image (B, C, sqrt N, sqrt N)."""
    xp = array_namespace(tokens)
    B, N, C = tokens.shape
    side = math.isqrt(N)
    return xp.reshape(xp.permute_dims(tokens, (0, 2, 1)), (B, C, side, side))


def _image_to_tokens(image):
    """The inverse of _tokens_to_image: (B, C, H, W) -> (B, H*W, C)."""
    xp = array_namespace(image)
    B, C, H, W = image.shape
    return xp.permute_dims(xp.reshape(image, (B, C, H * W)), (0, 2, 1))


def _linear_specs(prefix, d_in, d_out, bias=True):
    specs = [(prefix + "weight", (d_out, d_in), "trunc_normal")]
    return specs + [(prefix + "bias", (d_out,), "zeros")] if bias else specs


def _norm_specs(prefix, width):
    return [(prefix + "weight", (width,), "ones"), (prefix + "bias", (width,), "zeros")]


def _t2t_layer_specs(prefix, tokens_type, d_in, E):
    if tokens_type == "performer":
        return ([(prefix + "w", (PERFORMER_FEATURES, E), "orthogonal")]
                + _linear_specs(prefix + "kqv.", d_in, 3 * E)
                + _linear_specs(prefix + "proj.", E, E)
                + _norm_specs(prefix + "norm1.", d_in) + _norm_specs(prefix + "norm2.", E)
                + _linear_specs(prefix + "mlp.0.", E, E) + _linear_specs(prefix + "mlp.2.", E, E))
    return (_norm_specs(prefix + "norm1.", d_in)
            + _linear_specs(prefix + "attn.qkv.", d_in, 3 * E, bias=False)
            + _linear_specs(prefix + "attn.proj.", E, E)
            + _norm_specs(prefix + "norm2.", E)
            + _linear_specs(prefix + "mlp.fc1.", E, E) + _linear_specs(prefix + "mlp.fc2.", E, E))


def create_model(name, *, num_classes=1000, img_size=224, backend="numpy", dtype="float32",
                 seed=0, drop_rate=0.0, drop_path_rate=0.0, qk_scale=None):
    """Build an official T2T-ViT variant by name (see list_models()), freshly initialised.
    It computes each batch in the calling thread; t2t_ref.parallel.DataParallel(model) runs
    it on every core (or over MPI ranks)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return T2TViT(name, num_classes=num_classes, img_size=img_size, backend=backend,
                  dtype=dtype, seed=seed, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                  qk_scale=qk_scale)
