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
CuPy's kernels use the whole GPU already), and MPI ranks (mpi.py): with world=mpi.join() under
mpirun, each rank's forward gets its own piece of the global batch, and the backward's summed
gradient is summed once more over the ranks, by one allreduce of the flat buffer. A rank's
samples are numbered from its offset in the global batch (the ranks' counts are gathered at
each forward: a few bytes), so its dropout masks are those one process would draw.

The loss of the global batch is the mean over all its samples; each rank has only its own:

    logits = model.forward(x)                          # (b, K): this rank's b samples
    loss, dlogits = cross_entropy(logits, t)           # the mean over those b
    loss, dlogits = model.batch_mean(loss, dlogits)    # the mean over all B: loss summed
    model.backward(dlogits)                            #   over ranks, dlogits * b / B

With one process batch_mean returns its arguments: the same code runs alone and under mpirun.
"""

import copy

from .mpi import World
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
    """A model run over pieces of each batch, one thread each, and over MPI ranks (see the
    module docstring).

    threads: how many pieces at most in this process (None: NumPy's BLAS thread count, that
    is, the cores the process was given; always 1 off NumPy). world: the ranks (mpi.World;
    None: this process alone); each rank passes forward() its own piece of the global batch.
    Everything else (params, grads, rng, buffers, state_dict(), ...) is the wrapped model's,
    read and written through. After a forward, `samples` is the global batch's size.
    """

    def __init__(self, model, *, threads=None, world=None):
        check_threads(threads)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "threads", threads)
        object.__setattr__(self, "world", world if world is not None else World())
        object.__setattr__(self, "samples", 0)  # the last forward's global batch size
        object.__setattr__(self, "_share", (0, 0))  # (this rank's samples, all ranks')
        object.__setattr__(self, "_pieces", None)  # forward's replicas, for the backward
        # [gradient buffer, half-precision parameters] of pieces 1, 2, ...
        object.__setattr__(self, "_buffers", [])

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

    def forward(self, x, keep_cache=True, counts=None):
        """As the model's forward, on this rank's piece x (b, 3, S, S) of the global batch;
        the piece's pieces run in threads. Returns this rank's logits (b, K). counts: every
        rank's b for this step where the caller has them (training gathers them with the stop
        requests: World.start_step), else gathered here."""
        model = self.model
        if counts is None:
            counts = self.world.gather_counts(x.shape[0])  # every rank's b (host ints)
        elif len(counts) != self.world.size or counts[self.world.rank] != x.shape[0]:
            raise ValueError(f"counts {counts} do not fit this rank's {x.shape[0]} samples "
                             f"among {self.world.size} ranks")
        offset = sum(counts[:self.world.rank])  # this piece's first sample, globally
        object.__setattr__(self, "samples", sum(counts))
        object.__setattr__(self, "_share", (x.shape[0], sum(counts)))
        object.__setattr__(self, "_pieces", None)
        if x.shape[0] == 0:  # a rank left without samples (unreadable files) still sums
            object.__setattr__(self, "_pieces", "empty")
            return model.xp.zeros((0, model.num_classes), dtype=model.dtype,
                                  device=model.device)
        base = model.rng
        rng = base.piece(offset) if offset else base
        sizes = piece_sizes(x.shape[0], thread_count(model.backend, self.threads))
        if len(sizes) == 1:
            model.rng = rng
            try:
                return model.forward(x, keep_cache)
            finally:
                base.draws, model.rng = rng.draws, base
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        replicas = [self._replica(i, rng.piece(start)) for i, start in enumerate(starts)]
        logits = map_in_threads(_forward, [(replica, piece, keep_cache) for replica, piece
                                           in zip(replicas, split_rows(x, sizes))])
        base.draws = replicas[0].rng.draws  # as many draws as one forward makes
        if keep_cache:
            object.__setattr__(self, "_pieces", (replicas, sizes))
        return model.xp.concat(logits, axis=0)  # (b, K)

    def batch_mean(self, loss, dlogits):
        """(loss, dlogits) of the mean over this rank's samples -> those of the mean over the
        global batch: the loss (a 0-d float64 array) summed over the ranks with weights b/B,
        dlogits * b/B. One process: returned as they are."""
        if self.world.size == 1:
            return loss, dlogits
        xp = self.model.xp
        b, total = self._share
        weight = b / total
        share = xp.reshape(xp.asarray(loss, dtype=xp.float64, copy=True), (1,)) * weight \
            if b else xp.zeros((1,), dtype=xp.float64, device=self.model.device)
        return self.world.sum(share)[0], dlogits * weight

    def sum_over_ranks(self, array):
        """array summed over the ranks (in place; a contiguous array): evaluate's counts."""
        return self.world.sum(array)

    __call__ = forward

    def backward(self, dlogits):
        """As the model's backward: fills model.grads with the sum over the pieces and the
        ranks (one allreduce of the flat buffer). dlogits (b, K): the gradient of the global
        loss with respect to this rank's logits (batch_mean's)."""
        dx = self._backward_here(dlogits)
        self.world.sum(self.model.grads.flat)
        return dx

    def _backward_here(self, dlogits):
        """This process's part: the sum over its threads' pieces."""
        model = self.model
        if isinstance(self._pieces, str):  # no samples here: a zero gradient
            object.__setattr__(self, "_pieces", None)
            if model.grad_buffer is None or not model.grad_buffer.same_layout(model.params):
                model.grad_buffer = model.params.zeros_like()
            model.grad_buffer.flat[...] = 0
            model.grads = model.grad_buffer
            return model.xp.zeros((0, 3, model.img_size, model.img_size), dtype=model.dtype,
                                  device=model.device)
        if self._pieces is None:
            return model.backward(dlogits)
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

    def _replica(self, index, rng):
        """The model for piece `index` (its generator `rng`): shares every parameter, has
        its own cache, random generator and (but piece 0) gradient buffer and half-precision
        copy of the parameters (precision.py: each forward rounds it afresh)."""
        model = self.model
        if model.grad_buffer is None or not model.grad_buffer.same_layout(model.params):
            model.grad_buffer = model.params.zeros_like()
        if model.compute_dtype != model.dtype and (
                model.compute_buffer is None
                or not model.compute_buffer.same_layout(model.params)):
            model.compute_buffer = model.params.zeros_like(dtype=model.compute_dtype)
        replica = copy.copy(model)
        replica.cache = None
        replica.rng = rng
        if index > 0:
            while len(self._buffers) < index:
                self._buffers.append([None, None])
            buffers = self._buffers[index - 1]  # [gradient buffer, half copy]
            if buffers[0] is None or not buffers[0].same_layout(model.params):
                buffers[0] = model.params.zeros_like()
            if model.compute_dtype != model.dtype and (
                    buffers[1] is None or not buffers[1].same_layout(model.params)):
                buffers[1] = model.params.zeros_like(dtype=model.compute_dtype)
            replica.grad_buffer, replica.compute_buffer = buffers
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
