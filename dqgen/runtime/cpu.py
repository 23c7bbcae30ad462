"""CPU kernels: a built ``.so`` opened with cffi in ABI mode and called zero-copy.

The entry point is looked up as a function pointer of the type the C target spells from
the spec (``signature.cffi_type``: pointers as ``void *``, so ``ffi.from_buffer(array)``,
the cheapest zero-copy route from a numpy array to a pointer, can be passed directly).
The FFI is cffi's compiled one (``_cffi_backend.FFI``, what cffi's out-of-line modules
build on), which parses such a type itself: ``cffi.FFI().cdef`` would import pycparser,
two thirds of the time a new process takes to load a kernel from the cache. cffi
releases the GIL for the duration of the call. Loaded libraries are kept for the life of
the process (never unloaded), and their files are never rewritten in place.
"""

from __future__ import annotations

import functools
import numbers
import os
import threading
import warnings
import weakref
from pathlib import Path

import _cffi_backend

from .. import env
from ..errors import InvalidProblemError
from ..spec import KernelSpec

_loaded: list[object] = []  # keeps every library alive: kernels are never unloaded
_load_lock = threading.Lock()
forked_child = False


def _after_fork_in_child() -> None:
    # libgomp's thread pool does not survive fork: entering a parallel region in the
    # child waits forever for threads that do not exist, so a child runs kernels on
    # one thread. A lock another thread held at fork time would never be released.
    global forked_child, _load_lock
    forked_child = True
    _load_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def thread_limit() -> int:
    """The most threads a kernel call runs on: a few per usable CPU. More cannot run at
    once, and far more exhaust what the process may create (libgomp then fails or
    crashes); a few more than the CPUs still split the work unevenly, as tests need."""
    return THREADS_PER_CPU * usable_cpus()


THREADS_PER_CPU = 4
_warned_limits: set[tuple[str, int]] = set()


def bounded_threads(requested: int, name: str) -> int:
    """``requested`` (already checked >= 1), lowered to ``thread_limit()`` with a warning
    naming ``name`` (the setting it came from), given once per setting and value."""
    limit = thread_limit()
    if requested <= limit:
        return requested
    if (name, requested) not in _warned_limits:
        _warned_limits.add((name, requested))
        warnings.warn(f"dqgen: {name}={requested} is more threads than this machine can use "
                      f"({usable_cpus()} CPUs); running {limit}", RuntimeWarning, stacklevel=3)
    return limit


def check_thread_count(value, name: str) -> int:
    """A thread count given by the caller: a whole number >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidProblemError(f"{name}={value!r} must be a whole number of threads")
    if value < 1:
        raise InvalidProblemError(f"{name}={value} must be >= 1")
    return int(value)


def num_threads(requested: int | None = None) -> int:
    """Threads for a call: the request, else ``DQGEN_NUM_THREADS``, else 0 (OpenMP's
    default), at most ``thread_limit()``; always 1 in a process forked from one that may
    have used OpenMP."""
    if forked_child:
        return 1
    if requested is None:
        from_env = env.integer(env.NUM_THREADS, None, minimum=1)
        return 0 if from_env is None else bounded_threads(from_env, env.NUM_THREADS)
    return bounded_threads(check_thread_count(requested, "num_threads"), "num_threads")


_ffi = _cffi_backend.FFI()  # types, buffers and casts for every CPU kernel


def _no_array():
    return None  # a reference that never matches: the slot is empty


class ArgumentPointers:
    """The raw address of the array last passed in each argument position of a plan,
    kept with a weak reference to that array, so that a plan run again on the same arrays
    skips the buffer export (a quarter of a microsecond an array) and keeps nothing alive.

    An address stays right as long as its array lives: numpy refuses ``ndarray.resize``
    on an array that is weakly referenced (even with ``refcheck=False``), and ``data``
    cannot be assigned. A slot's (reference, pointer) pair is replaced whole, so
    threads sharing a plan never see a pointer with another array's reference.
    """

    __slots__ = ("slots", "_export", "_cast")

    def __init__(self, kernel: "CpuKernel", count: int) -> None:
        self.slots = [(_no_array, None)] * count
        self._export = kernel.pointer
        self._cast = functools.partial(_ffi.cast, "void *")  # keeps nothing alive

    def remember(self, index: int, array) -> object:
        """The address of ``array`` (a numpy array), now remembered at ``index``."""
        pointer = self._cast(self._export(array))
        self.slots[index] = (weakref.ref(array), pointer)
        return pointer


class CpuKernel:
    """A loaded CPU kernel; calling it runs the entry point with raw addresses."""

    __slots__ = ("spec", "path", "function", "pointer")

    def __init__(self, spec: KernelSpec, path: Path, function_type: str) -> None:
        """Open ``path`` and look its entry up as ``function_type`` (a cffi function
        pointer type, as the C target spells it for ``spec``)."""
        self.spec = spec
        self.path = path
        with _load_lock:
            lib = _cffi_backend.load_library(str(path), 0)  # 0: cffi's default, RTLD_NOW
            _loaded.append(lib)
        self.function = lib.load_function(_ffi.typeof(function_type), spec.entry)
        self.pointer = _ffi.from_buffer  # numpy array -> zero-copy pointer for ``function``
