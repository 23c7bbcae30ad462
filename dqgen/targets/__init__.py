"""The compile targets, one ``Backend`` a module (``c.py``, ``cuda.py``), found by name.

Everything that differs between targets is a backend's answer (``base.Backend``): the
arch it takes and which archs may stand in for it, its storage types and entry
convention, its templates, toolchain, cache key fields, build, binary files, runner and
the arch of a plan's device. The rest of the pipeline runs one sequence for any target
(``jit.get_kernel``: lower, render, bundle, cache or build, load). A new target is a
module here, a row in ``_MODULES`` and its templates under ``templates/<name>/``.
"""

from __future__ import annotations

from ..errors import UnsupportedError
from . import c, cuda
from .base import Backend

_MODULES = (c, cuda)
_BACKENDS: dict[str, Backend] = {m.BACKEND.name: m.BACKEND for m in _MODULES}


def names() -> tuple[str, ...]:
    """Every target's name, in registration order (``c``, ``cuda``)."""
    return tuple(_BACKENDS)


def find(name: str) -> Backend | None:
    """The backend called ``name``, or None."""
    return _BACKENDS.get(name) if isinstance(name, str) else None


def backend(name: str) -> Backend:
    """The backend of target ``name``; an unknown one raises ``UnsupportedError``
    naming it."""
    found = find(name)
    if found is None:
        expected = " or ".join(repr(n) for n in _BACKENDS)
        raise UnsupportedError(f"target {name!r} is not supported; expected {expected}")
    return found


def parse_target(text: str) -> tuple[str, str]:
    """``NAME[:ARCH]`` as ``(name, arch)``: ``c`` (this machine's ISA), ``c:avx2``,
    ``cuda`` (sm_90) or ``cuda:sm_90``."""
    name, _, arch = str(text).strip().lower().partition(":")
    found = find(name)
    if found is None:
        expected = " or ".join(b.syntax for b in _BACKENDS.values())
        raise UnsupportedError(f"target {text!r} is not known; expected {expected}")
    return found.name, found.parse_arch(arch)


def for_device(device: str) -> Backend:
    """The backend a plan on ``device`` (``cpu``, ``cuda:N``, as ``plans.parse_device``
    spells it) runs."""
    kind = device.partition(":")[0]
    for found in _BACKENDS.values():
        if found.device == kind:
            return found
    raise UnsupportedError(f"device={device!r} has no target here")
