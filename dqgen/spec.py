"""The lowered kernel's data: ``KernelSpec``, its ``Param``s, and the storage tables
and thresholds that every format's schedule (``layouts/``) shares. It sits below them,
so no schedule imports another for data, and everything downstream (render, build, runtime, bundle) reads only this.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .ir import DType, Layout, Op

# Storage types as C spells them; f16/bf16 travel as their 16-bit patterns.
C_STORAGE = {
    DType.S8: "int8_t", DType.U8: "uint8_t", DType.I32: "int32_t", DType.F16: "uint16_t",
    DType.BF16: "uint16_t", DType.F32: "float", DType.F64: "double",
    DType.S4: "uint8_t", DType.U4: "uint8_t",  # packed: bytes of two values
}
CUDA_STORAGE = {**C_STORAGE, DType.F16: "__half", DType.BF16: "__nv_bfloat16"}

# Problems smaller than this many elements run on the calling thread: a parallel
# region costs more than it saves below it.
PARALLEL_MIN_ELEMENTS = 1 << 15
# CPU ISAs with F16C and AVX2 integer ops (8 lanes an instruction).
F16C_ISAS = ("avx2", "avx512", "avx512_bf16", "avx512_fp16")
# Helpers (load, store) each target's prelude defines for the 16-bit float types.
CONVERT = {DType.F16: ("load_f16", "store_f16"), DType.BF16: ("load_bf16", "store_bf16")}
# CUDA: the header defining each 16-bit float type, and the conversion helpers that use it.
CUDA_FLOAT_HEADERS = (("cuda_fp16.h", ("load_f16", "store_f16", "load_f16_bits")),
                      ("cuda_bf16.h", ("load_bf16", "store_bf16")))


def cuda_float_headers(helpers: tuple[str, ...]) -> tuple[str, ...]:
    """The CUDA headers a kernel calling ``helpers`` (conversion helper names) includes."""
    return tuple(header for header, names in CUDA_FLOAT_HEADERS if set(helpers) & set(names))


# CUDA: the grid fills every SM this many times at the kernel's occupancy and strides
# over the rest (see layouts/per_group.py's CUDA_* for the family's vector width).
CUDA_GRID_WAVES = 4


def element_formula(op: Op, zero_kind: str = "int", zero_first: bool = False) -> str:
    """Which of base.j2's element formulas a kernel runs: HQQ's zero subtracted first, a
    float zero point added last, or the op's own."""
    if op is Op.DEQUANTIZE and zero_first:
        return "zero_first"
    if op is Op.DEQUANTIZE and zero_kind == "float":
        return "float_zero"
    return op.name.lower()


@dataclass(frozen=True)
class Param:
    """One kernel parameter: name, C type and role (``in``, ``out`` or ``scalar``)."""

    name: str
    dtype: DType | None
    role: str
    c_type: str


@dataclass(frozen=True)
class VectorStream:
    """One per-element array of a CUDA kernel: a vector of it is ``vector_bytes`` long and
    moves in accesses of ``align_bytes`` (at most 128 bits), which its address must be a
    multiple of for the wide path. ``items`` and ``start`` spell, in terms of VEC and of
    the vector's first element e0, how many items it holds and where it begins (packed q:
    a byte holds two elements, so VEC / 2 bytes from byte e0 / 2)."""

    name: str
    role: str
    storage: str
    vector_bytes: int
    align_bytes: int
    items: str = "VEC"
    start: str = "e0"


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
    simd_stage_int: bool       # dequantize's fast path runs in AVX registers
    register_lanes: int        # elements a vector of that path holds
    int_c_type: str
    scalar_tail: bool
    fast_zero_point_limit: int
    needs_int_diff: bool       # the C prelude defines only the helpers the kernel calls
    needs_scalar_store: bool
    fast_needs_finite_scale: bool
    streaming_min_bytes: int   # outputs this large use non-temporal stores (0: never)
    streaming_align: int
    parallel_min_elements: int
    # CUDA schedule
    threads_per_block: int
    vector_bytes: int
    vector_elems: int = 1                       # elements a thread moves per step
    vector_streams: tuple[VectorStream, ...] = ()
    vector_align_check: bool = False            # wide accesses need a run-time alignment test
    grid_waves: int = 0                         # grid = SMs * resident blocks * waves, at most
    group_batch: int = 0            # C fused path: groups whose scales/zero points load as one vector
    fma_zero_point_limit: int = 0   # C dequantize into f16/bf16: the fused path's |zp| bound (0: none)
    fma_scale_max_bits: int = 0     # and the largest scale storage bits it takes
    scalar_f16c: bool = False       # C: single f16 values convert with F16C (else on the bits)
    group_per_element: bool = False             # packed q, VEC not dividing the group: each
                                                # element looks up its own scale/zero point
    # Storage layouts beyond the seed (FORMATS.md); the defaults are the seed's.
    layout: Layout = Layout.PLAIN
    zero_kind: str = "int"          # "int": int32 zero points; "float": (q - mid) * s + z
    mid: int = 0                    # float zero point: the integer part of the q value that maps to z
    mid_fraction: str = ""          # and its half, a compute-type literal ("" when mid is an integer)
    zero_round: str = ""            # float zero point: helper rounding each step to F ("": none)
    zero_round_vector: bool = False  # and an eight-lane one for the register path (F16C)
    zero_first: bool = False        # float zero point subtracted from q before the product (HQQ)
    field_mask: int = 0             # q is the field (word >> shift) & field_mask (0: the whole word)
    register_q: str = ""            # C register path: loader of eight q values ("": a byte each)
    register_q_kind: str = ""       # and what it reads: nibbles_u4/s4, fields_u8/i32 (HQQ)
    group_lanes: int = 0            # C groups of one value, f16 float zero: this many a step
    register_store_round: str = ""  # C register path: vector rounding before the store ("": none)
    template: str = ""              # the layout's own loop template ("" = the family's)
    bits: int = 8                   # bits of one stored value
    zero_offset: int = 0            # added to a stored zero point's field (AutoGPTQ's v1: 1)
    zero_word_add: int = 0          # added to a whole qzeros word first (GPTQModel's v1)
    zero_mask: int = 0xFFFFFFFF     # and the field plus zero_offset masked (AutoGPTQ's v1)
    act_order: bool = False         # group of a row from g_idx, not row // group_size
    block_bytes: int = 0            # GGML: bytes of one block
    table_max_bytes: int = 0        # C act-order GPTQ: largest whole-row table of scales/zeros
    float_helpers: tuple[str, ...] = ()  # 16-bit types whose load/store the prelude defines
    staged_load: str = ""           # C layouts: the conversion of a staged array's loads
    staged_load_f16c: bool = False  # ... done eight lanes an instruction with F16C
    ggml: object = None             # GGML: the block type's knobs (layouts/ggml_knobs.py)
    layout_knobs: object = None     # a layout's own knob record (layouts/fp8.py's Fp8Knobs)
    # C register path: its vectors (types and intrinsic prefix from the table in _cpu_simd)
    vector_bits: int = 256
    vec_float: str = "__m256"       # the compute-type vector
    vec_int: str = "__m256i"
    vec_prefix: str = "_mm256"
    vec_broadcast: str = "_mm256_broadcast_ss"  # a float from memory into every lane
    int_widen: str = ""             # "epi8" or "epu8": how q widens (sign or zero extension)
    register_split: bool = False    # AVX2 bf16: sixteen lanes as even/odd float vectors, one blend
    half_path: bool = False         # AVX512-FP16 f16 path (see FP16_ZERO_POINT_LIMIT)
    store_pairs: bool = False       # AVX512_BF16: two float vectors narrowed and stored as one
    fma_scale_min_bits: int = 1     # the fused path's smallest scale storage bits
    simd_headers: tuple[str, ...] = ()  # intrinsics headers beyond the AVX2 ones
    tail_mask: int = 0              # AVX-512: a group's remainder as one masked step (its lanes)
    # What the templates would otherwise read off the op, layout or dtype names.
    needs_f16: bool = False         # C: the prelude defines the binary16 conversions
    needs_bf16: bool = False        # C: the prelude defines the bfloat16 conversions
    packed_q: bool = False          # q holds two values a byte (element 2k in the low nibble)
    signed_nibbles: bool = False    # and they are s4: each sign-extended from 4 bits
    packed_store: bool = False      # the output is packed q: a byte is written in two halves
    cuda_float_headers: tuple[str, ...] = ()  # CUDA: the headers of the 16-bit float types used
    int_to_compute: str = ""        # CUDA layouts: the rounding conversion of the difference
    int_diff_type: str = "long long"  # CUDA layouts: q - zero_point's integer type (exact)
    int_diff_bits: int = 64
    fma_scale_note: str = ""        # the fused path's scale bound beyond "positive finite"
    element: str = ""               # the element formula base.j2 spells (see element_formula)
    matrix_along_k: bool = False    # GPTQ: a word holds values of one column (rows packed);
                                    # AWQ: a word holds 8 columns of one row
    stores: object = None           # C SIMD paths: how each store helper's vector reaches
                                    # memory (layouts/per_group.py's SimdStores)

    # What the templates branch on, answered here so no template compares a name: the
    # 16-bit (or f32/f64) type the C SIMD paths convert, the register path's q loader,
    # the zero point's kind.
    @property
    def simd_f16(self) -> bool:
        return self.simd_convert == "f16"

    @property
    def simd_bf16(self) -> bool:
        return self.simd_convert == "bf16"

    @property
    def simd_f32(self) -> bool:
        return self.simd_convert == "f32"

    @property
    def simd_f64(self) -> bool:
        return self.simd_convert == "f64"

    @property
    def register_q_nibbles(self) -> bool:
        return self.register_q_kind.startswith("nibbles")

    @property
    def register_q_signed(self) -> bool:
        return self.register_q_kind == "nibbles_s4"

    @property
    def register_q_words(self) -> bool:
        """The register path's q is whole int32 words (HQQ's 3-bit planes)."""
        return self.register_q_kind == "fields_i32"

    @property
    def float_zero(self) -> bool:
        return self.zero_kind == "float"

    @property
    def helpers_f16(self) -> bool:
        """The C layouts' prelude defines the binary16 conversions: the kernel calls one."""
        return bool(set(self.float_helpers) & set(dict(CUDA_FLOAT_HEADERS)["cuda_fp16.h"]))

    @property
    def helpers_bf16(self) -> bool:
        """The C layouts' prelude defines the bfloat16 conversions: the kernel calls one."""
        return bool(set(self.float_helpers) & set(dict(CUDA_FLOAT_HEADERS)["cuda_bf16.h"]))

    @property
    def pointer_params(self) -> tuple[Param, ...]:
        """The array parameters, inputs and output, in order."""
        return tuple(p for p in self.params if p.role != "scalar")

    @property
    def range_params(self) -> tuple[Param, ...]:
        """The scalars after the sizes (quantize's q range, HQQ's shift), which the family's
        group functions take."""
        return tuple(p for p in self.param("scalar") if p.name not in ("outer", "axis"))

    @property
    def vector_inputs(self) -> tuple[VectorStream, ...]:
        """CUDA: the per-element arrays a vector step loads."""
        return tuple(a for a in self.vector_streams if a.role == "in")

    @property
    def vector_outputs(self) -> tuple[VectorStream, ...]:
        """CUDA: the per-element arrays a vector step stores."""
        return tuple(a for a in self.vector_streams if a.role == "out")

    def to_json(self) -> dict:
        def plain(v):
            if isinstance(v, (DType, Op, Layout)):
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


def pointer(name: str, dtype: DType, role: str, storage: dict) -> Param:
    """A pointer parameter: ``const`` for inputs, the element type from ``storage``."""
    const = "const " if role == "in" else ""
    return Param(name, dtype, role, f"{const}{storage[dtype]} *")
