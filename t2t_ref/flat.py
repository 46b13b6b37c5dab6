"""Many tensors stored in one contiguous buffer: the model's parameters and gradients.

A T2T-ViT has 108 (T2T-ViT-7) to 295 (T2T-ViT-24) parameter tensors. Updating them one by
one costs a dozen array calls per tensor in AdamW alone (on a GPU each call is a kernel launch,
about as slow as the work of a small tensor); with every tensor a view into one flat array,
AdamW, weight decay, the EMA, gradient clipping, zeroing and summing gradients over workers are
each a few calls over the whole buffer, however many tensors there are. This is what PyTorch's fused
optimizers and DDP's gradient buckets do too.

    params = FlatTensors(xp, {"w": (3, 4), "b": (3,)}, dtype, device)
    params["w"]          # a (3, 4) view into params.flat[0:12]
    params["w"] = w0     # copies w0 into that view: params.flat stays the one storage
    params.flat          # (15,) all the values, in the layout's order

It is a dict, so code that reads tensors by name (the model's forward and backward, the state
dict) does not change; assigning to a name copies into its view instead of rebinding it.
"""

import math

from . import capture
from .backend import array_namespace


class FlatTensors(dict):
    """{name: view} over one 1-D buffer `flat` of one dtype.

    shapes: {name: shape}, in the order the dict iterates. order: the names in the order
    their values are laid out in `flat` (default: the same); `layout` lists (name, start,
    stop, shape) in that order.
    """

    def __init__(self, xp, shapes, dtype, device, order=None):
        super().__init__()
        order = list(shapes) if order is None else list(order)
        if sorted(order) != sorted(shapes):
            raise ValueError("order must name every tensor exactly once")
        layout, start = [], 0
        for name in order:
            size = math.prod(shapes[name])
            layout.append((name, start, start + size, tuple(shapes[name])))
            start += size
        self.layout = tuple(layout)
        self.flat = xp.zeros((start,), dtype=dtype, device=device)  # (total,)
        views = {name: xp.reshape(self.flat[a:b], shape) for name, a, b, shape in layout}
        for name in shapes:  # the dict's order is the shapes' order, not the layout's
            dict.__setitem__(self, name, views[name])

    def __setitem__(self, name, value):
        """Copy value into name's view (it must have the view's shape)."""
        self[name][...] = self._fitted(name, value)

    def _fitted(self, name, value):
        """value checked against name's view, in the buffer's dtype."""
        if name not in self:
            raise KeyError(f"{name!r} is not one of these tensors")
        shape = tuple(self[name].shape)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit {shape}")
        if value.dtype != self.flat.dtype:  # e.g. a half-precision gradient into float32
            value = array_namespace(value).astype(value, self.flat.dtype)
        return value

    def update(self, other=(), **kwargs):
        """Copy each value into its name's view. Given every tensor (a backward's gradients),
        on NumPy and CuPy that is one concatenation written straight into the buffer: on a
        GPU one kernel, where copying name by name was a kernel per tensor (108-319). Not
        while a CUDA graph records (capture.py): CuPy's concatenation of more than 8 arrays
        uploads their addresses from the host, which CuPy refuses while a stream captures;
        a replay makes the copies' launches free anyway."""
        tensors = dict(other, **kwargs)
        native = _native_module(self.flat)
        if native is None or capture.active() or tensors.keys() != self.keys() or any(
                native.may_share_memory(value, self.flat) for value in tensors.values()):
            for name, value in tensors.items():  # (a view of this buffer among them: its
                self[name] = value                # values may move before they are read)
            return
        xp = array_namespace(self.flat)
        pieces = [xp.reshape(self._fitted(name, tensors[name]), (-1,))
                  for name, *_ in self.layout]  # the buffer's order
        native.concatenate(pieces, out=self.flat)

    def zeros_like(self, dtype=None):
        """New FlatTensors of the same names and layout, all zero, in dtype (default: this
        buffer's)."""
        xp = array_namespace(self.flat)
        shapes = {name: tuple(view.shape) for name, view in self.items()}
        out = FlatTensors(xp, shapes, self.flat.dtype if dtype is None else dtype,
                          _device(self.flat), order=[name for name, *_ in self.layout])
        out.layout = self.layout  # the same object: same_layout() is then one identity test
        return out

    def copy(self):
        """A copy with its own buffer."""
        out = self.zeros_like()
        out.flat[...] = self.flat
        return out

    def same_layout(self, other):
        """Does other store the same names at the same places of a buffer of the same size?"""
        return isinstance(other, FlatTensors) and (other.layout is self.layout
                                                   or other.layout == self.layout)


def _native_module(x):
    """numpy or cupy for x's library (their concatenate writes into out=), or None
    (array_api_strict: the standard's concat has no out)."""
    module = type(x).__module__
    if module == "numpy":
        import numpy
        return numpy
    if module.startswith("cupy"):
        import cupy
        return cupy
    return None


def _device(x):
    from .backend import device_of
    return device_of(x)
