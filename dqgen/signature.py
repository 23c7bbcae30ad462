"""The kernel entry's signature, spelled in one place from ``spec.params``.

The templates print ``entry_signature(spec)`` (a Jinja global), the bundle header
declares ``c_prototype(spec)`` and the CPU loader calls through ``cffi_type(spec)``, so
the three can never disagree on a parameter's type, order or name. A target changes only
knobs: how a pointer parameter is qualified and whether the thread count is passed.
"""

from __future__ import annotations

from .spec import KernelSpec, Param

# C entries take the thread count last (0 asks for OpenMP's default); CUDA kernels take
# their parallelism from the launch.
NUM_THREADS = Param("num_threads", None, "scalar", "int32_t")
# What a pointer parameter's type is followed by: CUDA promises no aliasing, so the
# compiler may route loads through the read-only cache.
POINTER_QUALIFIER = {"c": "", "cuda": "__restrict__ "}
TRAILING_PARAMS = {"c": (NUM_THREADS,), "cuda": ()}


def entry_params(spec: KernelSpec) -> tuple[Param, ...]:
    """Every parameter of the entry point, in order: the spec's, then the target's own."""
    return spec.params + TRAILING_PARAMS[spec.target]


def entry_signature(spec: KernelSpec) -> str:
    """``name(type name, ...)``: the entry's declarator, as every template defines it."""
    qualifier = POINTER_QUALIFIER[spec.target]
    params = ", ".join(f"{p.c_type}{qualifier if p.c_type.endswith('*') else ' '}{p.name}"
                       for p in entry_params(spec))
    return f"{spec.entry}({params})"


def c_prototype(spec: KernelSpec) -> str:
    """The C declaration of a C kernel's entry point, for the bundle header."""
    return f"void {entry_signature(spec)};"


def cffi_type(spec: KernelSpec) -> str:
    """The entry's C type as a function pointer, pointers as ``void *`` (the CPU loader
    passes buffer addresses)."""
    params = ", ".join("void *" if p.role != "scalar" else p.c_type for p in entry_params(spec))
    return f"void(*)({params})"
