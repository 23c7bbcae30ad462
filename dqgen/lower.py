"""The schedule's entry: descriptor + target -> ``KernelSpec``, everything a template needs.

``lower`` asks the target's backend (``dqgen.targets``) to check the arch and for its
storage types, then hands the descriptor to its format's kind (``layouts``), whose
schedule makes every decision (types, vector widths, loop shape, when to go parallel,
launch shape), so templates only spell out loops and text. A ``KernelSpec`` holds only
validated enums, integers and strings chosen from fixed tables.
"""

from __future__ import annotations

from .layouts import kind_of
from .spec import KernelSpec
from .targets import backend


def lower(desc, target: str, arch: str) -> KernelSpec:
    """Schedule ``desc`` for ``target`` (``c`` with an ISA, or ``cuda`` with ``sm_XX``)."""
    chosen = backend(target)
    chosen.check_arch(arch)
    return kind_of(desc).lower(desc, target, arch, chosen.storage)
