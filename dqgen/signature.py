"""The kernel entry's signature, spelled in one place from ``spec.params``.

The templates print ``entry_signature(spec)`` (a Jinja global), the bundle header
declares ``c_prototype(spec)`` and the CPU loader calls through ``cffi_type(spec)``, so
the three can never disagree on a parameter's type, order or name. A target changes only
its ``EntryConvention`` (``dqgen.targets``): how a pointer parameter is qualified and the
parameters it passes after the spec's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import KernelSpec, Param

# C entries take the thread count last (0 asks for OpenMP's default); CUDA kernels take
# their parallelism from the launch.
NUM_THREADS = Param("num_threads", None, "scalar", "int32_t")


@dataclass(frozen=True)
class EntryConvention:
    """A target's spelling of an entry beyond ``spec.params``: what a pointer parameter's
    type is followed by (CUDA promises no aliasing, so loads may take the read-only
    cache) and the parameters the target passes after the spec's."""

    pointer_qualifier: str = ""
    trailing_params: tuple[Param, ...] = ()


def entry_params(spec: KernelSpec, convention: EntryConvention) -> tuple[Param, ...]:
    """Every parameter of the entry point, in order: the spec's, then the target's own."""
    return spec.params + convention.trailing_params


def entry_signature(spec: KernelSpec, convention: EntryConvention) -> str:
    """``name(type name, ...)``: the entry's declarator, as every template defines it."""
    qualifier = convention.pointer_qualifier
    params = ", ".join(f"{p.c_type}{qualifier if p.c_type.endswith('*') else ' '}{p.name}"
                       for p in entry_params(spec, convention))
    return f"{spec.entry}({params})"


def c_prototype(spec: KernelSpec, convention: EntryConvention) -> str:
    """The C declaration of a C kernel's entry point, for the bundle header."""
    return f"void {entry_signature(spec, convention)};"


def cffi_type(spec: KernelSpec, convention: EntryConvention) -> str:
    """The entry's C type as a function pointer, pointers as ``void *`` (the CPU loader
    passes buffer addresses)."""
    params = ", ".join("void *" if p.role != "scalar" else p.c_type
                       for p in entry_params(spec, convention))
    return f"void(*)({params})"
