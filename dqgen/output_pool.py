"""Result arrays of the plain functions, recycled from results the caller has dropped.

A large new array is new memory: the OS zeroes each page on its first touch, which for a
64 MiB output costs about as much as dequantizing into it. A loop that dequantizes layer
after layer and drops each result would pay it every call. So results of at least
``MIN_BYTES`` are carved from buffers that come back here once the last array viewing
them is gone, and a later result of the same size class takes one back instead of
faulting in fresh pages (what PyTorch's caching allocator does for GPU memory).

Safety: each result views its buffer through a memoryview of its own (the one numpy
makes in ``frombuffer``), which every array derived from the result keeps alive (numpy
views hold their base); the buffer returns only when that memoryview is collected, so no
live array ever shares a recycled buffer. Where numpy would not make such a memoryview,
the buffer is simply never recycled.

At most ``DQGEN_OUTPUT_CACHE_BYTES`` (default 256 MiB; 0 turns recycling off) are held,
the most recently returned buffers first; ``release_cached_outputs()`` frees them.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np

from . import env
from .errors import InvalidProblemError

MIN_BYTES = 1 << 20       # smaller results come from numpy: the C allocator reuses them
SIZE_CLASS = 1 << 21      # buffers are whole 2 MiB huge pages, so near sizes share them
DEFAULT_LIMIT = 256 << 20

# An RLock: a finalizer may run in a garbage collection triggered while the same thread
# holds the lock.
_lock = threading.RLock()
_free: list[np.ndarray] = []   # oldest first; a returned buffer goes to the end
_held = 0


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_after_fork)


def limit_bytes() -> int:
    """``DQGEN_OUTPUT_CACHE_BYTES``, else the default."""
    return env.integer(env.OUTPUT_CACHE_BYTES, DEFAULT_LIMIT, minimum=0,
                       unit=" (bytes; 0 disables)")


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, from a recycled buffer where one fits."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < MIN_BYTES or limit_bytes() == 0:
        return np.empty(shape, dtype)
    size = -(-nbytes // SIZE_CLASS) * SIZE_CLASS
    global _held
    raw = None
    with _lock:
        for i in range(len(_free) - 1, -1, -1):  # the most recently returned of this size
            if _free[i].nbytes == size:
                raw = _free.pop(i)
                _held -= size
                break
    if raw is None:
        raw = np.empty(size, np.uint8)
    flat = np.frombuffer(memoryview(raw), dtype, count=count)
    owner = flat.base  # numpy's own memoryview of raw, kept alive by every derived array
    if isinstance(owner, memoryview) and owner.obj is raw:
        weakref.finalize(owner, _give_back, raw).atexit = False
    return flat.reshape(shape)


def _give_back(raw: np.ndarray) -> None:
    """Keep a buffer no array uses any more; past the limit the least recently returned
    ones go (a size the caller stopped using must not crowd out the one in use now)."""
    global _held
    try:
        limit = limit_bytes()
    except InvalidProblemError:
        return
    if raw.nbytes > limit:
        return
    with _lock:
        _free.append(raw)
        _held += raw.nbytes
        while _held > limit:
            _held -= _free.pop(0).nbytes


def cached_bytes() -> int:
    """Bytes held for reuse right now."""
    return _held


def release_cached_outputs() -> int:
    """Free every buffer held for reuse; returns how many bytes that was."""
    global _held
    with _lock:
        released = _held
        _free.clear()
        _held = 0
    return released
