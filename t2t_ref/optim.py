"""AdamW (decoupled weight decay) as torch.optim.AdamW, and gradient-norm clipping, as
torch.nn.utils.clip_grad_norm_, on any array-API backend.

Names: p a parameter, g its gradient, m the first moment (torch's exp_avg), v the second
moment (exp_avg_sq), t the number of updates so far including this one (1 on the first),
lr the learning rate of this step (the schedule's, see t2t_ref.schedule), wd the weight decay.

One AdamW update of one parameter, in torch's order (torch.optim.adam._single_tensor_adam
with decoupled_weight_decay=True):

    p = p * (1 - lr * wd)                          weight decay, decoupled: before the Adam
                                                   step and only where decays(name, shape)
    m = beta1 * m + (1 - beta1) * g                torch writes m.lerp_(g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    denom = sqrt(v) / sqrt(1 - beta2^t) + eps      eps after the bias correction of v (torch's
                                                   way; not sqrt(v_hat + eps))
    p = p - lr / (1 - beta1^t) * (m / denom)       the bias correction of m in the step size

With the model's flat buffers (flat.py: every parameter a view into one array, every gradient
into another), a step is these formulas once over the whole buffer: a dozen array calls (one
CUDA kernel on CuPy, cupy_kernels.py) whatever the number of tensors; weight decay then
multiplies the stretch of the buffer that holds the decayed matrices. Given plain dicts, it
runs the formulas tensor by tensor; the result is the same.

The optimizer keeps only m, v and t. The parameters live in the model's dict; `step` updates
them, m and v in place (the standard's in-place operators, p -= update), as torch does, so a
step allocates no new weights: keep a copy (p + 0.0, or model.state_dict()) to compare
before and after. Everything runs on the parameters' device: lr, the betas and the bias
corrections are Python floats, so a step makes no host transfer.

    opt = AdamW(model.params, weight_decay=0.05)
    for s in range(total_steps):
        loss, dlogits = cross_entropy(model.forward(x), y, smoothing=0.1)
        model.backward(dlogits)
        clip_grad_norm(model.grads, max_norm=1.0)        # optional
        opt.step(model.params, model.grads, lr=lr_at(s, base_lr=5e-4, ...))
"""

import math

import numpy as np

from . import cupy_kernels
from .backend import array_namespace, backend_name, device_of, to_device, to_numpy
from .flat import FlatTensors
from .shards import balanced_groups, check_threads, map_in_threads, thread_count

# The official model's no_weight_decay(): the class token. (pos_embed is fixed, not trained.)
NO_WEIGHT_DECAY = frozenset({"cls_token"})


def decays(name, shape, no_weight_decay=NO_WEIGHT_DECAY):
    """Does the parameter `name` of this shape get weight decay?

    The official recipe's rule (timm's add_weight_decay with the model's no_weight_decay()):
    no decay for 1-D tensors (every bias and every LayerNorm weight), for any name ending in
    '.bias', and for the names in no_weight_decay (the class token); decay for the rest, i.e.
    the weight matrices of the linear layers.
    """
    return not (len(shape) <= 1 or name.endswith(".bias") or name in no_weight_decay)


class AdamW:
    """AdamW over a dict of parameters {name: array}, all on one backend and device.

    The parameters passed here fix the names, shapes, dtypes and device of the state (m and v
    start at zero, as in torch); `step` must then get arrays of the same names and shapes.
    threads (NumPy only): how many threads share the tensors of a step, each updating its own
    (None: as many as NumPy's BLAS uses); every tensor's update is the same either way.
    """

    def __init__(self, params, *, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
                 no_weight_decay=NO_WEIGHT_DECAY, threads=None):
        if not params:
            raise ValueError("AdamW needs at least one parameter")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps!r}, {weight_decay!r}")
        self.xp = array_namespace(*params.values())
        self.device = device_of(next(iter(params.values())))
        self.weight_decay, self.betas, self.eps = float(weight_decay), tuple(betas), float(eps)
        self.no_weight_decay = frozenset(no_weight_decay)
        self.shapes = {name: tuple(p.shape) for name, p in params.items()}
        self.dtypes = {name: p.dtype for name, p in params.items()}
        self.decay = {name: decays(name, shape, self.no_weight_decay)
                      for name, shape in self.shapes.items()}
        check_threads(threads)
        self.threads = threads  # NumPy: how many threads share a step's tensors
        self.step_count = 0  # t: updates made so far
        if isinstance(params, FlatTensors):  # m and v laid out as the parameters
            self.exp_avg, self.exp_avg_sq = params.zeros_like(), params.zeros_like()
            self._set_decay_runs()
        else:
            self.exp_avg = {name: self.xp.zeros_like(p) for name, p in params.items()}  # m
            self.exp_avg_sq = {name: self.xp.zeros_like(p) for name, p in params.items()}  # v

    def _set_decay_runs(self):
        """The stretches [start, stop) of the flat buffer whose elements get weight decay
        (one, with the model's layout), and for the CUDA kernel the same as a 0/1 mask."""
        runs = []
        for name, start, stop, _ in self.exp_avg.layout:
            if self.decay[name]:
                if runs and runs[-1][1] == start:
                    runs[-1][1] = stop
                else:
                    runs.append([start, stop])
        self.decay_runs = [tuple(run) for run in runs]
        self._decay_mask = None

    def step(self, params, grads, lr):
        """One update of every parameter, in place (params[name] is the same array after).

        lr is a Python float (the schedule's value for this step), not a device array.
        """
        self._check(params, "params")
        self._check(grads, "grads")
        xp = self.xp
        (beta1, beta2), lr = self.betas, float(lr)
        self.step_count += 1
        t = self.step_count
        step_size = lr / (1.0 - beta1 ** t)  # lr / bias correction of m
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
        decay_factor = 1.0 - lr * self.weight_decay  # decoupled weight decay
        constants = (step_size, bias_correction2_sqrt, decay_factor)
        if isinstance(self.exp_avg, FlatTensors) and self.exp_avg.same_layout(params) \
                and self.exp_avg.same_layout(grads):
            self._update_flat(params.flat, grads.flat, constants)
            return
        # NumPy: the tensors shared out among threads, one group each (see shards.py)
        groups = balanced_groups(params, thread_count(backend_name(xp), self.threads))
        if len(groups) == 1:
            self._update(groups[0], params, grads, constants)
        else:
            map_in_threads(self._update, [(names, params, grads, constants)
                                          for names in groups])

    def _update(self, names, params, grads, constants):
        """The update of the parameters `names`, in place, tensor by tensor."""
        decay_factor = constants[2]
        for name in names:
            arrays = (params[name], grads[name], self.exp_avg[name], self.exp_avg_sq[name])
            decays = self.decay[name] and self.weight_decay != 0.0
            # NumPy: cache-sized pieces of each tensor, so that the dozen passes below stay in
            # the cache instead of streaming the whole tensor through memory each time
            for p, g, m, v in _pieces(self.xp, arrays):
                if decays:
                    p *= decay_factor
                self._adam(p, g, m, v, constants)

    def _adam(self, p, g, m, v, constants):
        """The formulas of the module docstring after the decay, in the same order, in place:
        no new parameter or moment arrays each step, only temporaries of p's size."""
        xp = self.xp
        (beta1, beta2), eps = self.betas, self.eps
        step_size, bias_correction2_sqrt, _ = constants
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        g_squared = (1.0 - beta2) * g
        g_squared *= g
        v += g_squared
        denom = xp.sqrt(v)
        denom /= bias_correction2_sqrt
        denom += eps
        update = m / denom
        update *= step_size
        p -= update

    def _update_flat(self, p, g, constants):
        """The update of the flat buffers p (parameters) and g (gradients), in place."""
        m, v = self.exp_avg.flat, self.exp_avg_sq.flat
        step_size, bias_correction2_sqrt, decay_factor = constants
        if cupy_kernels.applies(p):  # CuPy: the whole update in one kernel
            if self._decay_mask is None:
                mask = np.zeros(p.shape[0], dtype=np.uint8)
                for start, stop in self.decay_runs:
                    mask[start:stop] = 1
                self._decay_mask = to_device(mask, self.xp, self.device)
            if self.weight_decay == 0.0:
                decay_factor = 1.0
            (beta1, beta2), eps = self.betas, self.eps
            cupy_kernels.adamw_update(p, g, m, v, self._decay_mask, beta1=beta1, beta2=beta2,
                                      eps=eps, step_size=step_size,
                                      bias_correction2_sqrt=bias_correction2_sqrt,
                                      decay_factor=decay_factor)
            return
        # NumPy: cut into one stretch per thread; others: the whole buffer at once
        n = p.shape[0]
        threads = thread_count(backend_name(self.xp), self.threads)
        bounds = [n * i // threads // _PIECE * _PIECE for i in range(threads)] + [n]
        ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if a < b]
        work = [((p, g, m, v), a, b, constants) for a, b in ranges]
        if len(work) == 1:
            self._update_range(*work[0])
        else:
            map_in_threads(self._update_range, work)

    def _update_range(self, buffers, start, stop, constants):
        """The update of elements [start, stop) of the flat buffers, in NumPy's cache-sized
        pieces (other backends: in one piece); the decay where a piece meets a decay run."""
        decay_factor = constants[2]
        numpy = isinstance(buffers[0], np.ndarray)
        piece = _PIECE if numpy else stop - start
        for a in range(start, stop, piece):
            b = min(a + piece, stop)
            p, g, m, v = (x[a:b] for x in buffers)
            if self.weight_decay != 0.0:
                for run_start, run_stop in self.decay_runs:
                    lo, hi = max(a, run_start), min(b, run_stop)
                    if lo < hi:
                        part = p[lo - a:hi - a]
                        part *= decay_factor
            self._adam(p, g, m, v, constants)

    def _check(self, arrays, what):
        missing = [k for k in self.shapes if k not in arrays]
        unexpected = [k for k in arrays if k not in self.shapes]
        wrong = [f"{k} {tuple(arrays[k].shape)} (optimizer has {self.shapes[k]})"
                 for k in self.shapes if k in arrays and tuple(arrays[k].shape) != self.shapes[k]]
        if missing or unexpected or wrong:
            raise ValueError(f"{what} do not match the optimizer's parameters: "
                             f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}")

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self):
        """The state as host data, for a checkpoint: the step count, the hyperparameters, and
        {name: NumPy array} for m ('exp_avg') and v ('exp_avg_sq'). A deliberate host transfer."""
        return {
            "step": self.step_count,
            "weight_decay": self.weight_decay,
            "betas": self.betas,
            "eps": self.eps,
            "no_weight_decay": sorted(self.no_weight_decay),
            "exp_avg": {name: to_numpy(m).copy() for name, m in self.exp_avg.items()},
            "exp_avg_sq": {name: to_numpy(v).copy() for name, v in self.exp_avg_sq.items()},
        }

    def load_state_dict(self, state):
        """Restore a state_dict() (host NumPy arrays or anything np.asarray takes), moving m
        and v to this optimizer's device and dtypes. Raises ValueError naming every key or
        shape that does not fit this optimizer's parameters."""
        problems = []
        for part in ("exp_avg", "exp_avg_sq"):
            arrays = state[part]
            missing = [k for k in self.shapes if k not in arrays]
            unexpected = [k for k in arrays if k not in self.shapes]
            wrong = [f"{k} {tuple(np.shape(arrays[k]))} (parameter {self.shapes[k]})"
                     for k in self.shapes if k in arrays
                     and tuple(np.shape(arrays[k])) != self.shapes[k]]
            if missing or unexpected or wrong:
                problems.append(f"{part}: missing {missing}, unexpected {unexpected}, "
                                f"wrong shape {wrong}")
        if problems:
            raise ValueError("optimizer state does not fit these parameters: "
                             + " | ".join(problems))
        xp, device = self.xp, self.device
        for part, target in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            for name in self.shapes:
                array = to_device(np.asarray(state[part][name]), xp, device)
                target[name] = xp.astype(array, self.dtypes[name])
        self.step_count = int(state["step"])
        self.weight_decay, self.eps = float(state["weight_decay"]), float(state["eps"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.no_weight_decay = frozenset(state["no_weight_decay"])
        self.decay = {name: decays(name, shape, self.no_weight_decay)
                      for name, shape in self.shapes.items()}
        if isinstance(self.exp_avg, FlatTensors):
            self._set_decay_runs()


# elements per piece: p, g, m, v and the temporaries fit in a 2 MiB cache, and each NumPy call
# is long enough that two threads seldom wait on each other for Python's GIL
_PIECE = 1 << 16


def _pieces(xp, arrays):
    """Yield (p, g, m, v) whole, or, for C-contiguous NumPy tensors, as matching slices of
    their flat views, _PIECE elements at a time: writing into a slice writes into the tensor.
    (Other backends: whole tensors; CuPy runs each pass as one kernel anyway.)"""
    p, g, m, v = arrays
    if not (isinstance(p, np.ndarray) and all(a.flags.c_contiguous for a in (p, m, v))
            and p.size > _PIECE):
        yield arrays
        return
    flat = [np.reshape(a, -1) for a in (p, np.asarray(g), m, v)]  # views (g: maybe a copy)
    for start in range(0, p.size, _PIECE):
        yield tuple(a[start:start + _PIECE] for a in flat)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm, as
    torch.nn.utils.clip_grad_norm_(parameters, max_norm) (norm_type 2). Returns the norm
    *before* clipping, a 0-d array on the gradients' device; grads[name] are replaced.

        total_norm = sqrt(sum over tensors of sum(g * g))
        g = g * min(1, max_norm / (total_norm + 1e-6))

    No host transfer: the scale stays on the device and every gradient is multiplied by it,
    clipped or not (by exactly 1 when the norm is already small), as torch does, instead of
    branching on the norm in Python. (xp.minimum, not xp.clip: array-api-compat's clip
    indexes with boolean masks, which CuPy resolves on the host.) Flat gradients
    (model.grads, flat.py) are scaled in place, in one call over the whole buffer. Reading the returned norm (float(total_norm), for a log)
    is the one transfer, and it is the caller's. A NaN or inf norm is not an error (torch's
    default error_if_nonfinite=False): it spreads into the gradients.
    """
    if not grads:
        raise ValueError("clip_grad_norm needs at least one gradient")
    xp = array_namespace(*grads.values())
    if isinstance(grads, FlatTensors):
        total_norm = xp.sqrt(xp.vecdot(grads.flat, grads.flat))  # ()
    else:
        squares = xp.stack([xp.sum(g * g) for g in grads.values()])  # (number of tensors,)
        total_norm = xp.sqrt(xp.sum(squares))  # ()
    scale = xp.minimum(max_norm / (total_norm + 1e-6), xp.ones_like(total_norm))  # ()
    if isinstance(grads, FlatTensors):
        grads.flat *= scale
        return total_norm
    for name, g in grads.items():
        grads[name] = g * scale
    return total_norm
