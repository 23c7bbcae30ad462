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
# CPU ISAs with hardware f16 <-> f32 conversion (F16C / AVX-512), 8 lanes a block.
F16C_ISAS = ("avx2", "avx512")
SIMD_BLOCK = 8
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
    simd_f16: bool
    simd_block: int
    simd_blocks: int
    simd_inputs: tuple[str, ...]
    simd_output: bool
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
    simd_f16 = target == "c" and desc.float_dtype is DType.F16 and arch in F16C_ISAS
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
        simd_f16=simd_f16, simd_block=SIMD_BLOCK,
        simd_blocks=desc.group_size // SIMD_BLOCK if simd_f16 else 0,
        simd_inputs=float_inputs if simd_f16 else (),
        simd_output=simd_f16 and out.dtype is DType.F16,
        parallel_min_elements=PARALLEL_MIN_ELEMENTS,
        threads_per_block=256, vector_bytes=16,
    )
