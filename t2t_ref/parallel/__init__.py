"""Data parallelism as a layer around the model: a batch cut into pieces, one result.

The model (model.py) computes a batch in the calling thread and knows nothing of how it is
run. DataParallel wraps it, as PyTorch's DDP wraps a module:

    model = DataParallel(create_model("t2t_vit_7", ...))        # threads: one per core
    logits = model.forward(x)          # (B, K): the pieces' logits, joined
    dx = model.backward(dlogits)       # model.grads: the sum of the pieces' gradients

Why the result does not depend on the cut:
- the loss is a sum over samples, so its gradient with respect to a weight is the sum of the
  pieces' gradients (the pieces' float additions happen in another order: results agree to
  rounding, ~1e-16 relative in float64);
- dropout's decisions are keyed by the sample's index in the batch (gaps.KeyedRandom), so a
  sample gets the same mask in any piece: each piece draws from model.rng.piece(start).

Each piece runs on a shallow copy of the model (a replica): the same parameter arrays, its own
activation cache, random generator and gradient buffer. After the backward the replicas'
flat gradient buffers are summed into the model's (a few array calls, whatever the tensor
count).

Transports: threads in one process (threads.py; NumPy only, where it puts every core to work:
CuPy's kernels use the whole GPU already). Across processes, see mpi.py.
"""

import copy

from .threads import check_threads, map_in_threads, thread_count

__all__ = ["DataParallel", "piece_sizes", "split_rows"]


def piece_sizes(batch, pieces):
    """Split batch samples into min(batch, pieces) pieces as even as can be (sizes differ by
    at most one, larger first): piece_sizes(10, 4) == [3, 3, 2, 2]."""
    n = max(1, min(batch, pieces))
    base, extra = divmod(batch, n)
    return [base + 1 if i < extra else base for i in range(n)]


def split_rows(x, sizes):
    """x (B, ...) -> [x[0:s0], x[s0:s0+s1], ...] for the piece sizes (views, no copies)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [x[start:start + size, ...] for start, size in zip(starts, sizes)]


class DataParallel:
    """A model run over pieces of each batch, one thread each (see the module docstring).

    threads: how many pieces at most (None: NumPy's BLAS thread count, that is, the cores the
    process was given; always 1 off NumPy). Everything else (params, grads, rng, buffers,
    state_dict(), ...) is the wrapped model's, read and written through.
    """

    def __init__(self, model, *, threads=None):
        check_threads(threads)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "threads", threads)
        object.__setattr__(self, "_pieces", None)  # forward's replicas, for the backward
        object.__setattr__(self, "_buffers", [])  # the gradient buffers of pieces 1, 2, ...

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __setattr__(self, name, value):  # model.rng = ..., model.params = ...: the model's
        setattr(self.model, name, value)

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def piece_count(self, batch):
        """Into how many pieces a batch of this size is cut now."""
        return len(piece_sizes(batch, thread_count(self.model.backend, self.threads)))

    def forward(self, x, keep_cache=True):
        """As the model's forward; the pieces run in threads."""
        model = self.model
        sizes = piece_sizes(x.shape[0], thread_count(model.backend, self.threads))
        object.__setattr__(self, "_pieces", None)
        if len(sizes) == 1:
            return model.forward(x, keep_cache)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        replicas = [self._replica(i, start) for i, start in enumerate(starts)]
        logits = map_in_threads(_forward, [(replica, piece, keep_cache) for replica, piece
                                           in zip(replicas, split_rows(x, sizes))])
        model.rng.draws = replicas[0].rng.draws  # as many draws as one forward makes
        if keep_cache:
            object.__setattr__(self, "_pieces", (replicas, sizes))
        return model.xp.concat(logits, axis=0)  # (B, K)

    __call__ = forward

    def backward(self, dlogits):
        """As the model's backward: fills model.grads with the sum over the pieces."""
        if self._pieces is None:
            return self.model.backward(dlogits)
        (replicas, sizes), xp = self._pieces, self.model.xp
        object.__setattr__(self, "_pieces", None)
        dxs = map_in_threads(_backward, list(zip(replicas, split_rows(dlogits, sizes))))
        total = replicas[0].grads  # piece 0 wrote into the model's own buffer
        others = [replica.grads.flat for replica in replicas[1:]]
        n = total.flat.shape[0]
        bounds = [n * i // len(replicas) for i in range(len(replicas))] + [n]
        map_in_threads(_sum_into, [(total.flat, others, a, b)
                                   for a, b in zip(bounds[:-1], bounds[1:]) if a < b])
        self.model.grads = total
        return xp.concat(dxs, axis=0)  # (B, 3, S, S)

    def _replica(self, index, start):
        """The model for piece `index` (first sample `start`): shares every parameter, has
        its own cache, random generator and (but piece 0) gradient buffer."""
        model = self.model
        if model.grad_buffer is None or not model.grad_buffer.same_layout(model.params):
            model.grad_buffer = model.params.zeros_like()
        replica = copy.copy(model)
        replica.cache = None
        replica.rng = model.rng.piece(start)
        if index > 0:
            while len(self._buffers) < index:
                self._buffers.append(None)
            buffer = self._buffers[index - 1]
            if buffer is None or not buffer.same_layout(model.params):
                buffer = self._buffers[index - 1] = model.params.zeros_like()
            replica.grad_buffer = buffer
        return replica


def _forward(replica, x, keep_cache):
    return replica.forward(x, keep_cache)


def _backward(replica, dlogits):
    return replica.backward(dlogits)


def _sum_into(total, others, start, stop):
    """total[start:stop] += every other buffer's [start:stop]."""
    view = total[start:stop]
    for other in others:
        view += other[start:stop]
