"""The schedule's entry: descriptor + target -> ``KernelSpec``, everything a template needs.

``lower`` checks the target and its ISA or arch, then hands the descriptor to its
format's kind (``layouts``), whose schedule makes every decision (types, vector widths,
loop shape, when to go parallel, launch shape), so templates only spell out loops and
text. A ``KernelSpec`` holds only validated enums, integers and strings chosen from fixed
tables.
"""

from __future__ import annotations

from .errors import UnsupportedError
from .isa import check_isa
from .layouts import kind_of
from .spec import C_STORAGE, CUDA_STORAGE, KernelSpec


def lower(desc, target: str, arch: str) -> KernelSpec:
    """Schedule ``desc`` for ``target`` (``c`` with an ISA, or ``cuda`` with ``sm_XX``)."""
    if target == "c":
        check_isa(arch)
        storage = C_STORAGE
    elif target == "cuda":
        if not (arch.startswith(("sm_", "compute_")) and arch.split("_", 1)[1].isdigit()):
            raise UnsupportedError(f"CUDA arch {arch!r} is not of the form sm_XX or compute_XX")
        storage = CUDA_STORAGE
    else:
        raise UnsupportedError(f"target {target!r} is not supported; expected 'c' or 'cuda'")
    return kind_of(desc).lower(desc, target, arch, storage)
