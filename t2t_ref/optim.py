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
from .gaps import CHUNK, in_pieces
from .keys import compare_keys
from .parallel.threads import balanced_groups, check_threads, map_in_threads, thread_count

# The official models' no_weight_decay(): T2T-ViT's is the class token (its pos_embed is fixed,
# not trained); timm's ViT adds its learned pos_embed.
NO_WEIGHT_DECAY = frozenset({"cls_token", "pos_embed"})


def decays(name, shape, no_weight_decay=NO_WEIGHT_DECAY):
    """Does the parameter `name` of this shape get weight decay?

    The official recipe's rule (timm's add_weight_decay with the model's no_weight_decay()):
    no decay for 1-D tensors (every bias and every LayerNorm weight), for any name ending in
    '.bias', and for the names in no_weight_decay (the class token, ViT's position table);
    decay for the rest, i.e. the weight matrices (and the ghost models' (C, 1, 1) cheap
    operations, as timm's rule decays them too).
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
        self.step_count = 0  # calls of step; t, the updates made so far, less any skipped
        self._skipped = None  # steps skipped by found_inf: a 0-d device array, once there is one
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

    def _flat(self, params, grads):
        """Are params and grads flat buffers laid out as this optimizer's moments?"""
        return (isinstance(self.exp_avg, FlatTensors) and self.exp_avg.same_layout(params)
                and self.exp_avg.same_layout(grads))

    def step(self, params, grads, lr, found_inf=None):
        """One update of every parameter, in place (params[name] is the same array after).

        lr is a Python float (the schedule's value for this step), not a device array.
        found_inf: None, or a 0-d boolean array on the parameters' device, True when this
        step's loss or gradients are NaN or inf (see guard.py). The step is then skipped on the
        device, with no host transfer: parameters, moments and the count of updates stay as
        they were, as torch's fused AdamW skips a step under GradScaler's found_inf. (The
        constants become 0-d device arrays that turn the update into the identity; where
        found_inf is False, every result is bit for bit the one without it. On NumPy, whose
        device is the host, the flag is simply read.)
        """
        self._check(params, "params")
        self._check(grads, "grads")
        xp = self.xp
        if found_inf is not None and backend_name(xp) == "numpy":
            # NumPy's "device" is the host: reading the flag costs no transfer, and the plain
            # update is cheaper than the masked one (about 3 ms a step for T2T-ViT-7)
            if bool(found_inf):
                return
            found_inf = None
        (beta1, beta2), lr = self.betas, float(lr)
        self.step_count += 1
        flat = self._flat(params, grads)
        if flat and cupy_kernels.applies(params.flat):  # CuPy: the whole step in one kernel
            self._update_flat_kernel(params.flat, grads.flat, lr, found_inf)
            return
        if found_inf is None:
            t = self.step_count
            step_size = lr / (1.0 - beta1 ** t)  # lr / bias correction of m
            bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
            decay_factor = 1.0 - lr * self.weight_decay  # decoupled weight decay
            constants = (beta1, 1.0 - beta1, beta2, 1.0 - beta2, step_size,
                         bias_correction2_sqrt, decay_factor)
            constants = {dtype: constants for dtype in set(self.dtypes.values())}
        else:
            constants = self._skippable_constants(lr, found_inf)
        if flat:
            self._update_flat(params.flat, grads.flat, constants[params.flat.dtype], found_inf)
            return
        # NumPy: the tensors shared out among threads, one group each (parallel/threads.py)
        groups = balanced_groups(params, thread_count(backend_name(xp), self.threads))
        if len(groups) == 1:
            self._update(groups[0], params, grads, constants, found_inf)
        else:
            map_in_threads(self._update, [(names, params, grads, constants, found_inf)
                                          for names in groups])

    def _skippable_constants(self, lr, found_inf):
        """The step's constants as 0-d device arrays, per parameter dtype: as step computes
        them where found_inf is False; where it is True, the ones that leave p, m and v as they
        are (beta 1, 1 - beta 0, step size 0, decay factor 1) and do not count the step."""
        xp, (beta1, beta2) = self.xp, self.betas
        keep = xp.astype(xp.logical_not(found_inf), xp.float64)  # 1.0: update, 0.0: skip
        if self._skipped is None:
            self._skipped = xp.zeros((), dtype=xp.float64, device=self.device)
        self._skipped = self._skipped + (1.0 - keep)
        t = xp.maximum(self.step_count - self._skipped, 1.0)  # updates so far, this one too
        step_size = keep * lr / (1.0 - beta1 ** t)
        bias_correction2_sqrt = xp.sqrt(1.0 - beta2 ** t)
        decay_factor = 1.0 - keep * (lr * self.weight_decay)
        constants = (keep * beta1 + (1.0 - keep), keep * (1.0 - beta1),
                     keep * beta2 + (1.0 - keep), keep * (1.0 - beta2), step_size,
                     bias_correction2_sqrt, decay_factor)
        return {dtype: tuple(xp.astype(c, dtype) for c in constants)
                for dtype in set(self.dtypes.values())}

    def _update(self, names, params, grads, constants, found_inf=None):
        """The update of the parameters `names`, in place, tensor by tensor."""
        for name in names:
            dtype_constants = constants[self.dtypes[name]]
            arrays = (params[name], grads[name], self.exp_avg[name], self.exp_avg_sq[name])
            decays = self.decay[name] and self.weight_decay != 0.0
            # NumPy: cache-sized pieces of each tensor, so that the dozen passes below stay in
            # the cache instead of streaming the whole tensor through memory each time
            for p, g, m, v in in_pieces(arrays, read_only=(1,)):  # g is only read
                if decays:
                    p *= dtype_constants[-1]  # the decay factor
                self._adam(p, g, m, v, dtype_constants, found_inf)

    def _adam(self, p, g, m, v, constants, found_inf):
        """The formulas of the module docstring after the decay, in the same order, in place:
        no new parameter or moment arrays each step, only temporaries of p's size."""
        xp, eps = self.xp, self.eps
        (beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt,
         _) = constants
        if found_inf is not None:
            g = xp.where(found_inf, 0.0, g)  # a skipped step's NaN * 0 would be NaN
        m *= beta1
        m += one_minus_beta1 * g
        v *= beta2
        g_squared = one_minus_beta2 * g
        g_squared *= g
        v += g_squared
        denom = xp.sqrt(v)
        denom /= bias_correction2_sqrt
        denom += eps
        update = m / denom
        update *= step_size
        p -= update

    def _update_flat(self, p, g, constants, found_inf):
        """The update of the flat buffers p (parameters) and g (gradients), in place. NumPy:
        cut into one stretch per thread; other backends: the whole buffer at once."""
        m, v = self.exp_avg.flat, self.exp_avg_sq.flat
        n = p.shape[0]
        threads = thread_count(backend_name(self.xp), self.threads)
        bounds = [n * i // threads // CHUNK * CHUNK for i in range(threads)] + [n]
        work = [((p, g, m, v), a, b, constants, found_inf)
                for a, b in zip(bounds[:-1], bounds[1:]) if a < b]
        if len(work) == 1:
            self._update_range(*work[0])
        else:
            map_in_threads(self._update_range, work)

    def _update_range(self, buffers, start, stop, constants, found_inf):
        """The update of elements [start, stop) of the flat buffers, in NumPy's cache-sized
        pieces (other backends: in one piece); the decay where a piece meets a decay run."""
        decay_factor = constants[-1]
        piece = CHUNK if isinstance(buffers[0], np.ndarray) else stop - start
        for a in range(start, stop, piece):
            b = min(a + piece, stop)
            p, g, m, v = (x[a:b] for x in buffers)
            if self.weight_decay != 0.0:
                for run_start, run_stop in self.decay_runs:
                    lo, hi = max(a, run_start), min(b, run_stop)
                    if lo < hi:
                        part = p[lo - a:hi - a]
                        part *= decay_factor
            self._adam(p, g, m, v, constants, found_inf)

    def _update_flat_kernel(self, p, g, lr, found_inf):
        """CuPy: one kernel. It computes the step's constants itself (in double, from lr and
        t = calls less skipped steps), so that a step skipped by found_inf needs no host
        transfer: the kernel reads the flag and the count of skipped steps on the device."""
        xp = self.xp
        if self._decay_mask is None:
            mask = np.zeros(p.shape[0], dtype=np.uint8)
            for start, stop in self.decay_runs:
                mask[start:stop] = 1
            self._decay_mask = to_device(mask, xp, self.device)
        if found_inf is not None:
            if self._skipped is None:
                self._skipped = xp.zeros((), dtype=xp.float64, device=self.device)
            self._skipped = self._skipped + xp.astype(found_inf, xp.float64)
        (beta1, beta2), eps = self.betas, self.eps
        cupy_kernels.adamw_update(p, g, self.exp_avg.flat, self.exp_avg_sq.flat,
                                  self._decay_mask, beta1=beta1, beta2=beta2, eps=eps, lr=lr,
                                  weight_decay=self.weight_decay, step_count=self.step_count,
                                  found_inf=found_inf, skipped=self._skipped)

    def updates(self):
        """t: the updates made so far (calls of step less those skipped). Reads the device's
        count of skipped steps, if any: a host transfer."""
        skipped = 0 if self._skipped is None else int(to_numpy(self._skipped))
        return self.step_count - skipped

    def _check(self, arrays, what):
        missing, unexpected, wrong = compare_keys(arrays, self.shapes)
        wrong = [f"{k} {given} (optimizer has {want})" for k, given, want in wrong]
        if missing or unexpected or wrong:
            raise ValueError(f"{what} do not match the optimizer's parameters: "
                             f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}")

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self):
        """The state as host data, for a checkpoint: the step count, the hyperparameters, and
        {name: NumPy array} for m ('exp_avg') and v ('exp_avg_sq'). A deliberate host transfer."""
        return {
            "step": self.updates(),
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
            missing, unexpected, wrong = compare_keys(arrays, self.shapes)
            wrong = [f"{k} {given} (parameter {want})" for k, given, want in wrong]
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
        self.step_count, self._skipped = int(state["step"]), None
        self.weight_decay, self.eps = float(state["weight_decay"]), float(state["eps"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.no_weight_decay = frozenset(state["no_weight_decay"])
        self.decay = {name: decays(name, shape, self.no_weight_decay)
                      for name, shape in self.shapes.items()}
        if isinstance(self.exp_avg, FlatTensors):
            self._set_decay_runs()


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
    (model.grads, flat.py) are scaled in place, in one call over the whole buffer. Reading the
    returned norm (float(total_norm), for a log) is the one transfer, and it is the caller's.
    A NaN or inf norm is not an error (torch's default error_if_nonfinite=False): it spreads
    into the gradients.
    """
    if not grads:
        raise ValueError("clip_grad_norm needs at least one gradient")
    xp = array_namespace(*grads.values())
    total_norm = global_norm(grads)  # ()
    scale = xp.minimum(max_norm / (total_norm + 1e-6), xp.ones_like(total_norm))  # ()
    if isinstance(grads, FlatTensors):
        grads.flat *= scale
        return total_norm
    for name, g in grads.items():
        grads[name] = g * scale
    return total_norm


def global_norm(grads):
    """sqrt(sum over tensors of sum(g * g)): a 0-d array on the gradients' device; for flat
    gradients one dot product over the whole buffer."""
    xp = array_namespace(*grads.values())
    if isinstance(grads, FlatTensors):
        return xp.sqrt(xp.vecdot(grads.flat, grads.flat))
    squares = xp.stack([xp.sum(g * g) for g in grads.values()])  # (number of tensors,)
    return xp.sqrt(xp.sum(squares))
