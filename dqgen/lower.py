"""The schedule: descriptor + target -> ``KernelSpec``, everything a template needs.

Every decision (types, vector widths, loop shape, when to go parallel, launch shape)
is made here, so templates only spell out loops and text. A ``KernelSpec`` holds only
validated enums, integers and strings chosen from fixed tables in this module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import UnsupportedError
from .ir import DType, Op, _PerGroupDescriptor
from .isa import check_isa

# Storage types as C spells them; f16/bf16 travel as their 16-bit patterns.
C_STORAGE = {
    DType.S8: "int8_t", DType.U8: "uint8_t", DType.I32: "int32_t", DType.F16: "uint16_t",
    DType.BF16: "uint16_t", DType.F32: "float", DType.F64: "double",
}
CUDA_STORAGE = {**C_STORAGE, DType.F16: "__half", DType.BF16: "__nv_bfloat16"}

# The element formulas, written out in each kernel's header comment.
FORMULAS = {
    Op.DEQUANTIZE: "y = F(C(q - zero_point) * C(scale))",
    Op.QUANTIZE: "q = clamp(rint(C(x) / C(scale)) + zero_point, q_min, q_max); t = 0 where scale == 0",
    Op.DEQUANTIZE_BACKWARD: "d_input = F(C(d_output) * C(scale))",
    Op.QUANTIZE_BACKWARD: ("d_input = F(C(d_output) / C(scale)) where q_min <= rint(C(x) / C(scale))"
                           " + zero_point <= q_max and scale != 0, else 0"),
}

# Problems smaller than this many elements run on the calling thread: a parallel
# region costs more than it saves below it.
PARALLEL_MIN_ELEMENTS = 1 << 15
# CPU ISAs with F16C and AVX2 integer ops (8 lanes an instruction).
F16C_ISAS = ("avx2", "avx512")
# 16-bit float data is staged through float blocks of the largest of these sizes dividing the
# group: long enough for the loop vectorizer, short enough to stay in L1.
SIMD_BLOCKS = (64, 32, 16, 8)
# |zero_point| up to this keeps q - zero_point exact in f32 for any 8-bit q (< 2^24), so
# the C kernels take a vectorizable float subtraction for such groups.
FAST_ZERO_POINT_LIMIT = (1 << 24) - 256
# Helpers (load, store) each target's prelude defines for the 16-bit float types.
_CONVERT = {DType.F16: ("load_f16", "store_f16"), DType.BF16: ("load_bf16", "store_bf16")}


@dataclass(frozen=True)
class Param:
    """One kernel parameter: name, C type and role (``in``, ``out`` or ``scalar``)."""

    name: str
    dtype: DType | None
    role: str
    c_type: str


@dataclass(frozen=True)
class KernelSpec:
    """The lowered kernel: everything the templates read, nothing they must decide."""

    op: Op
    uri: str
    entry: str
    target: str
    arch: str
    group_size: int
    float_dtype: DType
    int_dtype: DType | None
    compute_type: str
    compute_dtype: DType
    params: tuple[Param, ...]
    formula: str
    descriptor: str
    out_name: str
    out_c_type: str
    has_zero_point: bool
    # Conversion helpers by name ("" where the storage already is the compute type).
    load_float: str
    store_out: str
    rint: str
    # CPU schedule
    simd_convert: str          # "" or the 16-bit float type converted with SIMD blocks
    simd_block: int
    simd_blocks: int
    simd_inputs: tuple[str, ...]
    simd_output: bool
    simd_stage_int: bool       # dequantize: widen q to float in SIMD blocks
    int_c_type: str
    scalar_tail: bool
    bf16_lanes: int
    fast_zero_point_limit: int
    fast_needs_finite_scale: bool
    parallel_min_elements: int
    # CUDA schedule
    threads_per_block: int
    vector_bytes: int

    def to_json(self) -> dict:
        def plain(v):
            if isinstance(v, (DType, Op)):
                return v.value
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            return v
        return plain(self)

    def pretty(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def param(self, role: str) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.role == role)


def _pointer(name: str, dtype: DType, role: str, storage: dict) -> Param:
    const = "const " if role == "in" else ""
    return Param(name, dtype, role, f"{const}{storage[dtype]} *")


def _params(desc: _PerGroupDescriptor, storage: dict) -> tuple[Param, ...]:
    """The op's parameter list: inputs, output, then the runtime sizes and range."""
    f, q = desc.float_dtype, desc.int_type
    zp = ("zero_point", DType.I32)
    pointers = {
        Op.DEQUANTIZE: [("q", q), ("scale", f), zp],
        Op.QUANTIZE: [("x", f), ("scale", f), zp],
        Op.DEQUANTIZE_BACKWARD: [("d_output", f), ("scale", f)],
        Op.QUANTIZE_BACKWARD: [("d_output", f), ("x", f), ("scale", f), zp],
    }[desc.op]
    out_name = "q" if desc.op is Op.QUANTIZE else ("d_input" if "BACKWARD" in desc.op.name else "y")
    out_dtype = q if desc.op is Op.QUANTIZE else f
    params = [_pointer(n, d, "in", storage) for n, d in pointers]
    params.append(_pointer(out_name, out_dtype, "out", storage))
    params += [Param("outer", None, "scalar", "int64_t"), Param("axis", None, "scalar", "int64_t")]
    if desc.op in (Op.QUANTIZE, Op.QUANTIZE_BACKWARD):
        params += [Param("q_min", None, "scalar", "int32_t"), Param("q_max", None, "scalar", "int32_t")]
    return tuple(params)


def describe(desc: _PerGroupDescriptor) -> str:
    """The kernel-relevant descriptor fields, for the header comment."""
    fields = [f"group_size={desc.group_size}", f"float_dtype={desc.float_dtype.value}"]
    if desc.int_type is not None:
        fields.append(f"int_dtype={desc.int_type.value}")
    return f"{type(desc).__name__}({', '.join(fields)})"


def lower(desc: _PerGroupDescriptor, target: str, arch: str) -> KernelSpec:
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
    compute = DType.F64 if desc.float_dtype is DType.F64 else DType.F32
    params = _params(desc, storage)
    out = params[len([p for p in params if p.role == "in"])]
    float_inputs = tuple(p.name for p in params
                         if p.role == "in" and p.dtype is desc.float_dtype and p.name != "scale")
    # f16 (F16C) and bf16 (integer rounding in AVX2 registers) convert in explicit SIMD
    # blocks; the compiler vectorizes neither conversion well on its own.
    simd_dtype = desc.float_dtype if desc.float_dtype in (DType.F16, DType.BF16) else None
    simd = target == "c" and arch in F16C_ISAS and simd_dtype is not None
    # bf16 widening is a shift the compiler vectorizes, so only f16 inputs are staged.
    staged_inputs = float_inputs if simd and simd_dtype is DType.F16 else ()
    # The SIMD bf16 store assumes finite values, which only dequantize's fast path (finite
    # scale, exact difference) guarantees; other ops store bf16 element by element.
    simd_output = simd and out.dtype is simd_dtype and (
        simd_dtype is DType.F16 or desc.op is Op.DEQUANTIZE)
    simd = simd and bool(staged_inputs or simd_output)
    simd_block = next((b for b in SIMD_BLOCKS if desc.group_size % b == 0), SIMD_BLOCKS[-1])
    return KernelSpec(
        op=desc.op, uri=desc.uri, entry=f"dqgen_{desc.uri}", target=target, arch=arch,
        group_size=desc.group_size, float_dtype=desc.float_dtype, int_dtype=desc.int_type,
        compute_type="double" if compute is DType.F64 else "float", compute_dtype=compute,
        params=params, formula=FORMULAS[desc.op], descriptor=describe(desc),
        out_name=out.name, out_c_type=storage[out.dtype],
        has_zero_point=any(p.name == "zero_point" for p in params),
        load_float=_CONVERT.get(desc.float_dtype, ("", ""))[0],
        store_out=(_CONVERT.get(out.dtype, ("", ""))[1] if out.dtype.is_float
                   else f"({storage[out.dtype]})"),
        rint="rint" if compute is DType.F64 else "rintf",
        simd_convert=simd_dtype.value if simd else "", simd_block=simd_block,
        simd_blocks=desc.group_size // simd_block if simd else 0,
        simd_inputs=staged_inputs, simd_output=simd_output,
        simd_stage_int=simd and simd_output and desc.op is Op.DEQUANTIZE,
        int_c_type=storage[desc.int_type] if desc.int_type else "",
        scalar_tail=not simd or desc.group_size % simd_block != 0,
        bf16_lanes=16 if simd_block % 16 == 0 else 8,
        fast_needs_finite_scale=simd_output and simd_dtype is DType.BF16,
        fast_zero_point_limit=(FAST_ZERO_POINT_LIMIT if target == "c" and desc.op is Op.DEQUANTIZE
                               and compute is DType.F32 else 0),
        parallel_min_elements=PARALLEL_MIN_ELEMENTS,
        threads_per_block=256, vector_bytes=16,
    )
