"""CPU kernels: a built ``.so`` opened with cffi in ABI mode and called zero-copy.

Pointer parameters are declared to cffi as ``void *`` so that ``ffi.from_buffer(array)``
(the cheapest zero-copy route from a numpy array to a pointer) can be passed directly.
cffi releases the GIL for the duration of the call. Loaded libraries are kept for the life of the
process (never unloaded), and their files are never rewritten in place.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from pathlib import Path

import cffi

from ..errors import InvalidProblemError
from ..lower import KernelSpec

_loaded: list[object] = []  # keeps every FFI and library alive: kernels are never unloaded
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


def num_threads(requested: int | None = None) -> int:
    """Threads for a call: the request, else ``DQGEN_NUM_THREADS``, else 0 (OpenMP's
    default); always 1 in a process forked from one that may have used OpenMP."""
    if forked_child:
        return 1
    if requested is None:
        env = os.environ.get("DQGEN_NUM_THREADS", "").strip()
        if not env:
            return 0
        try:
            requested = int(env)
        except ValueError:
            raise InvalidProblemError(f"DQGEN_NUM_THREADS={env!r} is not an integer") from None
    if requested < 1:
        raise InvalidProblemError(f"num_threads={requested} must be >= 1")
    return requested


def declaration(spec: KernelSpec) -> str:
    """The cffi declaration of the entry point (pointers as ``void *``, see module doc)."""
    params = ", ".join("void *" + p.name if p.role != "scalar" else f"{p.c_type} {p.name}"
                       for p in spec.params)
    return f"void {spec.entry}({params}, int32_t num_threads);"


def buffer_pointer(ffi):
    """``ffi.from_buffer`` without its Python-level argument handling (a third of a
    microsecond a call, four calls a run): the same backend call with the same default
    ``char[]`` type where this cffi exposes them, else ``ffi.from_buffer`` itself."""
    backend, char_array = getattr(ffi, "_backend", None), getattr(ffi, "BCharA", None)
    if backend is None or char_array is None or not hasattr(backend, "from_buffer"):
        return ffi.from_buffer
    return functools.partial(backend.from_buffer, char_array)


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
        self._cast = kernel.cast_pointer

    def remember(self, index: int, array) -> object:
        """The address of ``array`` (a numpy array), now remembered at ``index``."""
        pointer = self._cast(self._export(array))
        self.slots[index] = (weakref.ref(array), pointer)
        return pointer


class CpuKernel:
    """A loaded CPU kernel; calling it runs the entry point with raw addresses."""

    __slots__ = ("spec", "path", "function", "pointer", "cast_pointer")

    def __init__(self, spec: KernelSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        ffi = cffi.FFI()
        ffi.cdef(declaration(spec))
        with _load_lock:
            lib = ffi.dlopen(str(path))
            _loaded.append((ffi, lib))
        self.function = getattr(lib, spec.entry)
        self.pointer = buffer_pointer(ffi)  # numpy array -> zero-copy pointer for ``function``
        # a buffer pointer -> a plain ``void *`` that keeps nothing alive
        self.cast_pointer = functools.partial(ffi.cast, "void *")
