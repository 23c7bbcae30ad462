"""The per-group schedule: a ``PerGroupDescriptor`` (the family, packed 4-bit storage,
float zero points, HQQ) + target -> ``KernelSpec``.

Every decision of these kernels (types, vector widths, loop shape, when to go parallel,
launch shape) is made here, so templates only spell out loops and text. A ``KernelSpec``
holds only validated enums, integers and strings chosen from fixed tables in this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..ir import DType, Layout, Op, PerGroupDescriptor
from ..isa import isa_features
from ..spec import (CONVERT, CUDA_GRID_WAVES, CUDA_STORAGE, F16C_ISAS, PARALLEL_MIN_ELEMENTS,
                    KernelSpec, Param, VectorStream, cuda_float_headers, element_formula, pointer)

# The element formulas, written out in each kernel's header comment.
FORMULAS = {
    Op.DEQUANTIZE: "y = F(C(q - zero_point) * C(scale))",
    Op.QUANTIZE: "q = clamp(rint(C(x) / C(scale)) + zero_point, q_min, q_max); t = 0 where scale == 0",
    Op.DEQUANTIZE_BACKWARD: "d_input = F(C(d_output) * C(scale))",
    Op.QUANTIZE_BACKWARD: ("d_input = F(C(d_output) / C(scale)) where q_min <= rint(C(x) / C(scale))"
                           " + zero_point <= q_max and scale != 0, else 0"),
}

# AVX-512 (the "avx512" feature): the dequantize register path runs in 512-bit registers,
# sixteen floats (eight doubles) a step. With AVX512-FP16, f16 results take a path of
# their own: q - zp in 16-bit lanes, converted exactly to f16 and multiplied by the f16
# scale in f16, thirty-two a step. f16 holds every integer up to 2048, and the product of
# two f16 values rounded once is F(C(q - zp) * C(scale)) (the f32 product is exact; FP16
# arithmetic never flushes subnormals), for every scale, NaN and infinities included.
FP16_ZERO_POINT_LIMIT = 2048 - 255
AVX512_HEADERS = ("avx512fintrin.h", "avx512vlintrin.h", "avx512bwintrin.h", "avx512dqintrin.h",
                  "avx512vlbwintrin.h")
BF16_HEADERS = ("avx512bf16vlintrin.h", "avx512bf16intrin.h")
# 16-bit float data is staged through float blocks of the largest of these sizes dividing the
# group: long enough for the loop vectorizer, short enough to stay in L1.
SIMD_BLOCKS = (64, 32, 16, 8)
# Outputs at least this large bypass the caches with non-temporal stores: they would not
# stay cached anyway, and skipping the read-for-ownership saves a third of the traffic.
# Smaller outputs stay in cache for whoever reads them next.
STREAMING_MIN_BYTES = 16 << 20
# |zero_point| up to this keeps q - zero_point exact in f32 for any 8-bit q (< 2^24), so
# the C kernels take a vectorizable float subtraction for such groups.
FAST_ZERO_POINT_LIMIT = (1 << 24) - 256
# C dequantize's fused path (f16/bf16) with groups this small or smaller loads the scales
# and zero points of GROUP_BATCH groups as vectors (one conversion, one range test for
# all): a scalar prologue a group costs about a fifth of a 32-element group's work. (For
# f32 a scale is a plain load, and batching measured no gain.)
GROUP_BATCH = 8
GROUP_BATCH_MAX_SIZE = 64
# bf16's sixteen-lane path subtracts the zero point in 16-bit lanes, one instruction for
# sixteen elements: |q - zp| must fit an int16 for any 8-bit q. Larger zero points (far
# outside any 8-bit range) take the exact element-by-element path.
FAST_ZERO_POINT_LIMIT_I16 = 32767 - 255
# The fused path of C dequantize into f16/bf16 (whose scales are f16/bf16 too). With a
# p-bit scale significand and |zp| <= (2^24 - 1) // (2^p - 1), q * s and zp * s are exact
# in f32 (at most 24 significant bits, multiples of the scale's quantum, which f32
# subnormals hold), so fma(q, s, -(zp * s)) rounds the exact (q - zp) * s once, exactly as
# the formula does. The scale must be positive (for a negative or zero one the fused sum's
# zero would be +0 where the formula gives -0), finite, and for bf16 below 2^100, so zp * s
# is finite: the largest allowed storage bits below. One instruction replaces the
# subtraction and the multiply; other groups take the other paths.
FMA_ZERO_POINT_LIMIT = {DType.F16: (2**24 - 1) // (2**11 - 1), DType.BF16: (2**24 - 1) // (2**8 - 1)}
FMA_SCALE_MAX_BITS = {DType.F16: 0x7bff, DType.BF16: ((127 + 100) << 7) - 1}
FMA_SCALE_NOTE = {DType.F16: "", DType.BF16: " below 2^100"}  # the bound, in the header comment
# With AVX512_BF16's narrowing (store_pairs), the smallest normal bf16: see _cpu_simd.
BF16_NORMAL_MIN_BITS = 0x0080
# A float zero point (DequantizeFloatZeroDescriptor), as torchao's tinygemm dequantize
# computes it on F tensors: the difference, the product and the sum each rounded to F.
FLOAT_ZERO_FORMULA = "y = F(F(F(C(q) - mid) * C(scale)) + C(zero_point)), mid = (q_max + q_min + 1) / 2"
# HQQ (HqqDequantizeDescriptor): the float zero subtracted from q, then the product.
HQQ_FORMULA = "y = F(F(C(q) - C(zero_point)) * C(scale)), q the bits-wide field at shift"
# The helper rounding a compute value to a 16-bit F and back (f32/f64 steps need none).
_ROUND_TO_FLOAT = {DType.F16: "round_f16", DType.BF16: "round_bf16"}
# Packed quantize with an odd group size: neighbouring groups share a byte, so the
# kernel stays on one thread (no two threads ever write the same byte).
SERIAL = 1 << 62
# CUDA: each thread moves one vector of VEC elements a step, VEC chosen so the widest
# per-element array moves in one 128-bit access a thread (narrower ones in shorter
# accesses), so that the threads of a warp touch consecutive bytes of every array
# (coalesced); VEC divides the group so one scale/zero point serves the whole vector. The grid fills every SM GRID_WAVES times
# at the kernel's occupancy and strides over the rest.
CUDA_THREADS_PER_BLOCK = 256
CUDA_VECTOR_BYTES = 16



@dataclass(frozen=True)
class VectorStore:
    """How one SIMD register of results reaches memory, as C text in which ``{address}``
    and ``{value}`` stand for the caller's: ``cached``, one unaligned store; ``streaming``,
    the non-temporal 128-bit pieces of the register, which need only the 16-byte alignment
    numpy gives large arrays."""

    cached: str
    streaming: tuple[str, ...]

    def cached_line(self, address: str, value: str) -> str:
        return self.cached.format(address=address, value=value)

    def streaming_lines(self, address: str, value: str) -> tuple[str, ...]:
        return tuple(line.format(address=address, value=value) for line in self.streaming)


def _quarters(stream: str, extract: str, step: int) -> tuple[str, ...]:
    """The four non-temporal 128-bit stores of a 512-bit register, ``step`` elements (or,
    with no step, 128-bit vectors) apart."""
    at = "{address} + %d" if step else "(__m128i *)({address}) + %d"
    return tuple(f"{stream}({at % (k * (step or 1))}, {extract}({{value}}, {k}));"
                 for k in range(4))


# Each register type's store, by what the register holds.
PS256 = VectorStore("_mm256_storeu_ps(({address}), {value});",
                    ("_mm_stream_ps({address}, _mm256_castps256_ps128({value}));",
                     "_mm_stream_ps({address} + 4, _mm256_extractf128_ps({value}, 1));"))
PD256 = VectorStore("_mm256_storeu_pd(({address}), {value});",
                    ("_mm_stream_pd({address}, _mm256_castpd256_pd128({value}));",
                     "_mm_stream_pd({address} + 2, _mm256_extractf128_pd({value}, 1));"))
SI256 = VectorStore("_mm256_storeu_si256((__m256i *)({address}), {value});",
                    ("_mm_stream_si128((__m128i *)({address}), _mm256_castsi256_si128({value}));",
                     "_mm_stream_si128((__m128i *)({address} + 8), _mm256_extracti128_si256({value}, 1));"))
SI128 = VectorStore("_mm_storeu_si128((__m128i *)({address}), {value});",
                    ("_mm_stream_si128((__m128i *)({address}), {value});",))
PS512 = VectorStore("_mm512_storeu_ps(({address}), {value});",
                    _quarters("_mm_stream_ps", "_mm512_extractf32x4_ps", 4))
PD512 = VectorStore("_mm512_storeu_pd(({address}), {value});",
                    _quarters("_mm_stream_pd", "_mm512_extractf64x2_pd", 2))
SI512 = VectorStore("_mm512_storeu_si512((void *)({address}), {value});",
                    _quarters("_mm_stream_si128", "_mm512_extracti32x4_epi32", 0))


@dataclass(frozen=True)
class SimdStores:
    """The vector store of each store helper of the C SIMD paths: the staged block's
    (f64: doubles; f16: the narrowed halves), the register path's, and AVX512_BF16's pair
    of vectors narrowed into one."""

    block: VectorStore
    register: VectorStore
    pair: VectorStore = SI512


def _simd_stores(simd: dict) -> SimdStores | None:
    """The stores of the SIMD paths ``simd`` (the _cpu_simd knobs) turns on."""
    convert = simd["simd_convert"]
    if not convert:
        return None
    wide = simd.get("vector_bits", 256) == 512
    if simd.get("half_path"):
        register = SI512
    elif simd.get("register_split"):
        register = SI256
    elif convert == DType.F32.value:
        register = PS512 if wide else PS256
    elif convert == DType.F64.value:
        register = PD512 if wide else PD256
    else:
        register = SI256 if wide else SI128
    return SimdStores(PD256 if convert == DType.F64.value else SI128, register)


def _params(desc: PerGroupDescriptor, storage: dict) -> tuple[Param, ...]:
    """The op's parameter list: inputs, output, then the runtime sizes and range."""
    f, q = desc.float_dtype, desc.int_type
    zp = ("zero_point", f if getattr(desc, "zero_kind", "int") == "float" else DType.I32)
    pointers = {
        Op.DEQUANTIZE: [("q", q), ("scale", f), zp],
        Op.QUANTIZE: [("x", f), ("scale", f), zp],
        Op.DEQUANTIZE_BACKWARD: [("d_output", f), ("scale", f)],
        Op.QUANTIZE_BACKWARD: [("d_output", f), ("x", f), ("scale", f), zp],
    }[desc.op]
    out_name = "q" if desc.op is Op.QUANTIZE else ("d_input" if "BACKWARD" in desc.op.name else "y")
    out_dtype = q if desc.op is Op.QUANTIZE else f
    params = [pointer(n, d, "in", storage) for n, d in pointers]
    params.append(pointer(out_name, out_dtype, "out", storage))
    params += [Param("outer", None, "scalar", "int64_t"), Param("axis", None, "scalar", "int64_t")]
    if desc.op in (Op.QUANTIZE, Op.QUANTIZE_BACKWARD):
        params += [Param("q_min", None, "scalar", "int32_t"), Param("q_max", None, "scalar", "int32_t")]
    if getattr(desc, "field_bits", 0):  # HQQ: the bit offset of the plane's fields
        params.append(Param("shift", None, "scalar", "int32_t"))
    return tuple(params)


def describe(desc: PerGroupDescriptor) -> str:
    """The kernel-relevant descriptor fields, for the header comment."""
    fields = [f"group_size={desc.group_size}", f"float_dtype={desc.float_dtype.value}"]
    if desc.int_type is not None:
        fields.append(f"int_dtype={desc.int_type.value}")
    return f"{type(desc).__name__}({', '.join(fields)})"


def _schedule_cuda(spec: KernelSpec, desc: PerGroupDescriptor) -> KernelSpec:
    """The CUDA launch shape and vector width (see ``CUDA_*`` above).

    Packed q moves VEC / 2 bytes a vector (at most 128 bits), so VEC stays even and a
    byte is never split between threads (quantize writes whole bytes). When no even VEC
    divides the group, VEC is 2 and each element looks up its own group.
    """
    streams = [p for p in spec.params
               if p.role != "scalar" and p.name not in ("scale", "zero_point")]
    packed = spec.layout is Layout.PACKED4
    widths = [p.dtype.itemsize for p in streams if not (packed and p.name == "q")]
    vec = max(1, CUDA_VECTOR_BYTES // max(widths))
    smallest = 1
    if packed:
        vec, smallest = min(vec, 2 * CUDA_VECTOR_BYTES), 2
    while desc.group_size % vec and vec > smallest:  # never split a group across a vector
        vec //= 2
    group_per_element = desc.group_size % vec != 0

    def stream(p: Param) -> VectorStream:
        nibbles = packed and p.name == "q"
        nbytes = vec // 2 if nibbles else vec * p.dtype.itemsize
        return VectorStream(p.name, p.role, CUDA_STORAGE[p.dtype], nbytes,
                            min(nbytes, CUDA_VECTOR_BYTES), *(("VEC / 2", "e0 / 2") if nibbles else ()))

    return dataclasses.replace(
        spec, threads_per_block=CUDA_THREADS_PER_BLOCK, vector_bytes=CUDA_VECTOR_BYTES,
        vector_elems=vec, vector_streams=tuple(stream(p) for p in streams),
        vector_align_check=vec > 1, grid_waves=CUDA_GRID_WAVES,
        group_per_element=group_per_element)


def _cpu_simd(desc: PerGroupDescriptor, target: str, arch: str, out: Param,
              float_inputs: tuple[str, ...]) -> dict:
    """The explicit-SIMD knobs of the C kernels (all off for other targets and ISAs).

    The compiler vectorizes neither the f16 (F16C) nor the bf16 (integer rounding)
    conversion well, nor the widening of q. Dequantize's fast path therefore runs in
    registers, from q to the (possibly non-temporal) store: eight elements at a time in
    AVX2 registers, sixteen (f64: eight) in AVX-512 ones, where f64 takes it too and
    AVX512_BF16 and AVX512-FP16 narrow and multiply what they can; the other ops stage
    f16 data through float blocks converted eight lanes at a time.
    """
    off = dict(simd_convert="", simd_block=SIMD_BLOCKS[-1], simd_blocks=0, simd_inputs=(),
               simd_output=False, simd_stage_int=False, register_lanes=8, scalar_tail=True,
               fast_needs_finite_scale=False, streaming_min_bytes=0, streaming_align=0)
    if target != "c" or arch not in F16C_ISAS:
        return off
    features = isa_features(arch)
    f = desc.float_dtype
    dequant = desc.op is Op.DEQUANTIZE
    packed = dequant and desc.int_type is not None and desc.int_type.is_packed
    if (packed and getattr(desc, "zero_kind", "int") == "float"
            and f not in (DType.F16, DType.BF16)):
        return off  # q is read a nibble at a time: element by element
    # packed q takes the eight-lane register path, eight nibbles a load (see register_q)
    convert = f if f in (DType.F16, DType.BF16) or (f in (DType.F32, DType.F64) and dequant) else None
    if convert is None:
        return off
    # bf16 widening is a shift the compiler vectorizes, so only f16 inputs are staged.
    staged_inputs = float_inputs if convert is DType.F16 else ()
    # The SIMD bf16 store assumes finite values, which only dequantize's fast path (finite
    # scale, exact difference) guarantees; other ops store bf16 element by element.
    simd_output = out.dtype is convert and (convert is DType.F16 or dequant)
    if not (staged_inputs or simd_output):
        return off
    float_zero = getattr(desc, "zero_kind", "int") == "float"
    # The 512-bit register path: plain int zero points (a float zero point's steps stay in
    # the AVX2 code), a whole vector of lanes in every block.
    half = bool(dequant and simd_output and convert is DType.F16 and not float_zero
                and not packed and "avx512_fp16" in features and desc.group_size >= 32)
    lanes = 32 if half else 8 if convert is DType.F64 else 16
    # packed q takes it in whole vectors only (its loader reads nibbles; no masked tail)
    wide = bool(dequant and simd_output and not float_zero
                and (not packed or (desc.group_size % lanes == 0 and convert is not DType.F64))
                and "avx512" in features and desc.group_size >= lanes)
    blocks = tuple(b for b in SIMD_BLOCKS if b % lanes == 0) if wide else SIMD_BLOCKS
    block = next((b for b in blocks if desc.group_size % b == 0), blocks[-1])
    if desc.group_size < block:
        return off  # no whole block in a group
    # Non-temporal stores go out in 128-bit pieces, which need 16-byte alignment (what numpy
    # gives large arrays): they are used only when every group starts aligned (the output
    # pointer is checked at run time).
    store_bytes = 16
    streaming = simd_output and (desc.group_size * out.dtype.itemsize) % store_bytes == 0
    knobs = dict(
        simd_convert=convert.value, simd_block=block, simd_blocks=desc.group_size // block,
        simd_inputs=staged_inputs, simd_output=simd_output,
        # AVX2 f64 has no register path: its exact difference vectorizes as it is, and only
        # the store needs explicit SIMD (non-temporal for large outputs).
        simd_stage_int=simd_output and dequant and (wide or convert is not DType.F64),
        scalar_tail=desc.group_size % block != 0,
        register_lanes=8,
        register_split=convert is DType.BF16 and block % 16 == 0 and not packed,
        fast_needs_finite_scale=simd_output and convert is DType.BF16,
        streaming_min_bytes=STREAMING_MIN_BYTES if streaming else 0,
        streaming_align=store_bytes if streaming else 0)
    if wide:
        knobs.update(
            register_lanes=lanes, register_split=False, half_path=half,
            fast_needs_finite_scale=convert is DType.BF16,
            # AVX512_BF16 narrows two vectors in one instruction, rounding to nearest-even
            # as store_bf16 does, but it flushes subnormal inputs: the fused path takes it
            # for normal scales only (|(q - zp) * s| >= s there unless zero, so no result is
            # subnormal), groups with subnormal scales go the exact way.
            store_pairs=(convert is DType.BF16 and "avx512_bf16" in features
                         and block % 32 == 0 and not packed),
            vector_bits=512, vec_float="__m512d" if convert is DType.F64 else "__m512",
            vec_int="__m512i", vec_prefix="_mm512", vec_broadcast="broadcast16")
        knobs["simd_headers"] = (AVX512_HEADERS
                                 + (BF16_HEADERS if knobs["store_pairs"] else ())
                                 + (("avx512fp16intrin.h",) if half else ()))
        # a remainder (fewer than `lanes` elements: no block size divides the group) goes
        # through masked loads and stores, one step
        knobs["tail_mask"] = (1 << (desc.group_size % block)) - 1
    return knobs


def lower_per_group(desc: PerGroupDescriptor, target: str, arch: str, storage: dict) -> KernelSpec:
    """Schedule a per-group descriptor: the family, packed storage, float zero points, HQQ
    (target and arch already checked, ``storage`` the target's C type table)."""
    packed = desc.int_type is not None and desc.int_type.is_packed
    float_zero = getattr(desc, "zero_kind", "int") == "float"
    compute = DType.F64 if desc.float_dtype is DType.F64 else DType.F32
    params = _params(desc, storage)
    out = params[len([p for p in params if p.role == "in"])]
    float_inputs = tuple(p.name for p in params
                         if p.role == "in" and p.dtype is desc.float_dtype
                         and p.name not in ("scale", "zero_point"))
    simd = _cpu_simd(desc, target, arch, out, float_inputs)
    zero_round = _ROUND_TO_FLOAT.get(desc.float_dtype, "") if float_zero else ""
    # Packed bf16 float zero points: the element loop's nibble reads do not vectorize, so
    # the eight-lane register path runs with each step and the value stored rounded by a
    # NaN-safe vector round_bf16 (the SIMD store then only drops the zero low halves).
    store_round = zero_round if packed and simd["simd_convert"] == "bf16" else ""
    if float_zero and simd["simd_convert"] == "bf16" and not store_round:
        # the SIMD bf16 store needs finite values, and z may be Inf or NaN
        simd = _cpu_simd(desc, "", arch, out, float_inputs)
    if store_round:  # any value stores exactly once rounded: no finite-scale test either
        simd = dict(simd, register_split=False, fast_needs_finite_scale=False)
    if zero_round and desc.float_dtype is not DType.F16 and not store_round:
        simd = dict(simd, simd_stage_int=False)  # no vector step rounding: element by element
    field_bits = getattr(desc, "field_bits", 0)
    if field_bits and desc.float_dtype is not DType.F16:
        # the SIMD paths load whole words, not fields: element by element (f16: see register_q)
        simd = _cpu_simd(desc, "", arch, out, float_inputs)
    # The register path's own loader where q is not one value a byte: eight nibbles, or
    # eight fields at the run-time shift (HQQ), widened to int32 lanes; the scalar F16C
    # conversions of the element loop do not vectorize, so f16 float zero points take it.
    group_lanes = 0
    if (target == "c" and arch in F16C_ISAS and float_zero and desc.group_size == 1
            and desc.float_dtype is DType.F16 and desc.op is Op.DEQUANTIZE):
        # groups of one value (HQQ's axis=0 rows): eight groups a step, their scales and
        # zero points loaded as vectors (no whole block in a group, so no other SIMD path)
        group_lanes = 8
        simd = dict(simd, simd_convert="f16", simd_output=True, simd_stage_int=True,
                    simd_blocks=0, scalar_tail=True)
    register_q_kind = ""
    if simd["simd_stage_int"] and (packed or field_bits):
        register_q_kind = (f"fields_{desc.int_type.value}" if field_bits
                           else f"nibbles_{desc.int_type.value}")
    zero_first = getattr(desc, "zero_first", False)
    mid = math.floor(desc.mid) if float_zero else 0
    half = "0.5" + ("" if compute is DType.F64 else "f")
    fast_limit = 0
    if target == "c" and desc.op is Op.DEQUANTIZE and compute is DType.F32:
        sixteen = simd["simd_stage_int"] and simd.get("register_split")
        fast_limit = (FP16_ZERO_POINT_LIMIT if simd.get("half_path") else
                      FAST_ZERO_POINT_LIMIT_I16 if sixteen else FAST_ZERO_POINT_LIMIT)
    fused = bool(fast_limit and simd["simd_stage_int"] and not float_zero and not simd.get("half_path")
                 and not packed and desc.float_dtype in FMA_ZERO_POINT_LIMIT)
    # the prelude's conversion helpers the kernel calls: the float inputs' load, the store
    helpers = tuple(h for h in (CONVERT.get(desc.float_dtype, ("", ""))[0],
                                CONVERT.get(out.dtype, ("", ""))[1]) if h)
    spec = KernelSpec(
        op=desc.op, uri=desc.uri, entry=f"dqgen_{desc.uri}", target=target, arch=arch,
        group_size=desc.group_size, float_dtype=desc.float_dtype, int_dtype=desc.int_type,
        compute_type="double" if compute is DType.F64 else "float", compute_dtype=compute,
        params=params, formula=(HQQ_FORMULA if zero_first else FLOAT_ZERO_FORMULA) if float_zero
        else FORMULAS[desc.op],
        descriptor=describe(desc),
        out_name=out.name, out_c_type=storage[out.dtype],
        has_zero_point=any(p.name == "zero_point" for p in params),
        load_float=CONVERT.get(desc.float_dtype, ("", ""))[0],
        store_out=(CONVERT.get(out.dtype, ("", ""))[1] if out.dtype.is_float
                   else f"({storage[out.dtype]})"),
        rint="rint" if compute is DType.F64 else "rintf",
        **simd,
        int_c_type=storage[desc.int_type] if desc.int_type else "",
        # how a stored byte widens in the vector loaders (sign or zero extension); every
        # kernel that renders them needs it, whether or not its own SIMD blocks are on
        int_widen="epi8" if desc.int_type is DType.S8 else "epu8",
        fast_zero_point_limit=fast_limit,
        needs_int_diff=desc.op is Op.DEQUANTIZE,
        # The element-wise 16-bit store is called unless every element of every group goes
        # through a SIMD block store (no remainder, no exact-difference path).
        needs_scalar_store=out.dtype in (DType.F16, DType.BF16) and (bool(zero_round) or not (
            simd["simd_output"] and not simd["scalar_tail"] and not fast_limit)),
        parallel_min_elements=(SERIAL if packed and desc.op is Op.QUANTIZE and desc.group_size % 2
                               else PARALLEL_MIN_ELEMENTS),
        threads_per_block=256, vector_bytes=16,
        layout=Layout.PACKED4 if packed else Layout.PLAIN, bits=4 if packed else 8,
        scalar_f16c=target == "c" and arch in F16C_ISAS and desc.float_dtype is DType.F16,
        group_batch=(GROUP_BATCH if fused and not simd["scalar_tail"]
                     and desc.group_size <= GROUP_BATCH_MAX_SIZE else 0),
        fma_zero_point_limit=FMA_ZERO_POINT_LIMIT[desc.float_dtype] if fused else 0,
        fma_scale_max_bits=FMA_SCALE_MAX_BITS[desc.float_dtype] if fused else 0,
        fma_scale_min_bits=BF16_NORMAL_MIN_BITS if fused and simd.get("store_pairs") else 1,
        fma_scale_note=FMA_SCALE_NOTE[desc.float_dtype] if fused else "",
        needs_f16=desc.float_dtype is DType.F16, needs_bf16=desc.float_dtype is DType.BF16,
        packed_q=packed, signed_nibbles=packed and desc.int_type is DType.S4,
        packed_store=packed and desc.op is Op.QUANTIZE,
        float_helpers=helpers,
        cuda_float_headers=cuda_float_headers(helpers) if target == "cuda" else (),
        zero_kind="float" if float_zero else "int", mid=mid,
        element=element_formula(desc.op, "float" if float_zero else "int", zero_first),
        mid_fraction=half if float_zero and desc.mid != mid else "", zero_round=zero_round,
        zero_round_vector=bool(zero_round) and simd["simd_stage_int"],
        zero_first=zero_first, field_mask=(1 << field_bits) - 1,
        register_q=f"load{simd['register_lanes']}_{register_q_kind}" if register_q_kind else "",
        register_q_kind=register_q_kind, group_lanes=group_lanes,
        register_store_round=store_round, stores=_simd_stores(simd),
    )
    return _schedule_cuda(spec, desc) if target == "cuda" else spec
