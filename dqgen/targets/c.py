"""The C target: OpenMP + SIMD C, built by gcc/clang into a shared object, run through
cffi on this CPU. Its archs are the ISA levels of ``isa.py``."""

from __future__ import annotations

from pathlib import Path

from .. import cache
from ..build import cc
from ..errors import UnsupportedError
from ..isa import ISA_LEVELS, check_isa, host_isa, supported_isas
from ..runtime.cpu import CpuKernel
from ..signature import NUM_THREADS, EntryConvention, c_prototype, cffi_type
from ..spec import C_STORAGE, KernelSpec
from .base import Backend

# KernelSpec fields only the C schedule fills and reads: the SIMD paths, the OpenMP
# threshold, streaming stores, the C prelude's helpers.
SCHEDULE_KNOBS = frozenset({
    "simd_convert", "simd_block", "simd_blocks", "simd_inputs", "simd_output",
    "simd_stage_int", "register_lanes", "int_c_type", "scalar_tail", "fast_zero_point_limit",
    "needs_scalar_store", "fast_needs_finite_scale", "streaming_min_bytes", "streaming_align",
    "parallel_min_elements", "group_batch", "fma_zero_point_limit", "fma_scale_max_bits",
    "fma_scale_min_bits", "fma_scale_note", "scalar_f16c", "zero_round_vector", "register_q",
    "register_q_kind", "group_lanes", "register_store_round", "table_max_bytes",
    "staged_load", "staged_load_f16c", "vector_bits", "vec_float", "vec_int", "vec_prefix",
    "vec_broadcast", "int_widen", "register_split", "half_path", "store_pairs",
    "simd_headers", "tail_mask", "needs_f16", "needs_bf16", "stores"})


class CBackend(Backend):
    name = "c"
    syntax = "c[:ISA]"
    arch_field = "isa"
    device = "cpu"
    source_suffix = "c"
    storage = C_STORAGE
    # the thread count comes last (0 asks for OpenMP's default)
    convention = EntryConvention("", (NUM_THREADS,))
    binary_kinds = ("so",)
    required_files = ("kernel.so",)
    executable_kinds = frozenset({"so"})
    loads_by_path = True
    toolchain_name = "C compiler"
    schedule_knobs = SCHEDULE_KNOBS

    def default_arch(self) -> str:
        return host_isa()

    def check_arch(self, arch: str) -> None:
        check_isa(arch)

    def compatible_archs(self, arch: str) -> list[str]:
        """A kernel built for a lower ISA level that this CPU runs gives the same bits
        (only speed differs), so an ``avx2`` request can use a ``generic`` kernel."""
        if arch not in ISA_LEVELS:
            return [arch]
        lower_levels = ISA_LEVELS[ISA_LEVELS.index(arch) + 1:]
        return [arch] + [level for level in lower_levels if level in supported_isas()]

    def device_arch(self, device: str, preference) -> str:
        """The preference's ISA, else the host's; it must run here."""
        isa = check_isa(preference.isa) if preference.isa else host_isa()
        if isa not in supported_isas():
            raise UnsupportedError(f"ISA {isa} cannot run on this CPU")
        return isa

    def prototype(self, spec: KernelSpec) -> str:
        return c_prototype(spec, self.convention)

    def toolchain(self, arch: str) -> cc.Toolchain:
        """The C compiler, its version probe kept in the cache so that a new process with
        a warm cache does not run the compiler at all."""
        return cc.toolchain(memo=lambda fingerprint, compute:
                            cache.memo_json("cc", fingerprint, compute))

    def key_fields(self, toolchain: cc.Toolchain, arch: str) -> dict:
        return {"isa": arch, "compiler": toolchain.identity, "flags": list(toolchain.flags(arch))}

    def toolchain_record(self, toolchain: cc.Toolchain, arch: str) -> dict:
        return {"compiler": toolchain.identity.rsplit("|", 1)[-1],
                "identity": toolchain.identity, "flags": list(toolchain.flags(arch))}

    def build(self, spec: KernelSpec, source_path: Path, toolchain: cc.Toolchain,
              out: Path) -> dict:
        command = cc.compile_shared(toolchain, source_path, out / "kernel.so", spec.arch)
        return {"compiler": toolchain.identity, "command": command}

    def load(self, artifact, binaries: dict[str, bytes] | None = None) -> tuple[object, dict]:
        """The shared object opened by path; ``asm``: the source, the ISA and the flags
        it was compiled with (where recorded)."""
        spec = artifact.spec
        runner = CpuKernel(spec, artifact.entry_dir / artifact.files["so"],
                           cffi_type(spec, self.convention))
        asm = {"c": artifact.source.text, "isa": spec.arch}
        flags = artifact.toolchain.get("flags") if isinstance(artifact.toolchain, dict) else None
        if flags is not None:
            asm["flags"] = list(flags)
        return runner, asm

    def unrunnable(self, arch: str) -> str:
        return "" if arch in supported_isas() else f"this CPU cannot run ISA {arch}"

    def run_once(self, spec: KernelSpec, binary: Path | bytes, arrays: dict, arguments,
                 scalars, elements: int) -> None:
        kernel = CpuKernel(spec, binary, cffi_type(spec, self.convention))
        kernel.function(*[kernel.pointer(arrays[a.name]) for a in arguments], *scalars, 0)


BACKEND = CBackend()
