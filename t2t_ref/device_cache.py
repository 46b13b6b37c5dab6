"""Read-only arrays made once per shape and kept on the device: the rows of ones that sum
columns (ops/rows.py), the soft split's gather indices (ops/soft_split.py) and dropout's
element hashes (gaps.py). A training step asks for the same few shapes over and over; on a
GPU each one saved is a kernel (or an upload) saved every step.

    _ONES = DeviceCache(limit=256)
    ones = _ONES.get(xp, device, (M, dtype), lambda: xp.ones((1, M), dtype=dtype, device=device))

A cache that holds `limit` shapes starts over (a user sweeping image sizes would otherwise keep
every shape's arrays for good). A CUDA graph (graphs.py) reads these arrays by address, so a
recording keeps everything the caches hold when it is made (`held()`): starting over then drops
the cache's references, not the graph's.
"""

import weakref

from .backend import backend_name

_CACHES = weakref.WeakSet()  # every DeviceCache alive: held() and clear_all() walk them


class DeviceCache:
    """key -> value (an array or a tuple of arrays) per backend and device, made by a function
    on the first request; at most `limit` keys, then it starts over."""

    def __init__(self, limit=64):
        self.limit = limit
        self._values = {}
        _CACHES.add(self)

    def get(self, xp, device, key, make):
        """The value kept for (xp's backend, device, *key), made by make() if there is none."""
        key = (backend_name(xp), str(device), *key)
        value = self._values.get(key)
        if value is None:
            if len(self._values) >= self.limit:  # many shapes: start over
                self._values.clear()
            value = self._values[key] = make()
        return value

    def clear(self):
        self._values.clear()


def held():
    """Every value the caches hold now, in one tuple: what a CUDA graph keeps alive."""
    return tuple(value for cache in _CACHES for value in cache._values.values())


def clear_all():
    """Empty every cache (the next request makes its arrays again)."""
    for cache in _CACHES:
        cache.clear()
