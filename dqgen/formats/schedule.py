"""Lowering of the checkpoint layouts (GPTQ, AWQ, GGML) to a ``KernelSpec``.

These kernels have a loop structure of their own (rows of an int32-packed matrix, or
byte blocks) rendered by their own template, but they share the family's element math
(``templates/base.j2``), so they are specs of the same type. The family's SIMD knobs
do not apply to these templates and are set neutral.
"""

from __future__ import annotations

import dataclasses

from ..ir import (AwqDequantizeDescriptor, DType, GgmlDequantizeDescriptor,
                  GptqDequantizeDescriptor, Layout, Op, gptq_v1_word_offset)
from ..spec import (CONVERT, CUDA_GRID_WAVES, F16C_ISAS, PARALLEL_MIN_ELEMENTS, KernelSpec, Param,
                    cuda_float_headers, element_formula, pointer)
from . import ggml_layouts

FORMULAS = {
    Layout.GPTQ: "W[k, n] = F(C(q[k, n] - z[g, n]) * C(scales[g, n])), g = g_idx[k] (default k / G)",
    Layout.AWQ: "W[k, n] = F(C(q[k, n] - z[k / G, n]) * C(scales[k / G, n]))",
    **{layout: block.formula for layout, block in ggml_layouts.LAYOUTS.items()},
}
TEMPLATES = {Layout.GPTQ: "matrix", Layout.AWQ: "matrix"}  # GGML layouts: "ggml"
CUDA_THREADS_PER_BLOCK = 256
# C: columns of a GPTQ/AWQ row handled as one tile (scales, zeros, values and results
# staged through float arrays of this length, so every loop vectorizes; fits in L1).
MATRIX_TILE = 64
# C act-order GPTQ: every group's scales and zero points for every column, unpacked into
# one table a thread, let each row be written whole (rows come in any group order). A
# table larger than this (groups * cols * 8 bytes; a 4096 x 14336 layer at group 128
# needs 3.7 MB) would no longer stay in the last-level cache, and the kernel goes one
# column tile at a time with a table a tile instead.
MATRIX_TABLE_MAX_BYTES = 32 << 20


def _neutral(field: dataclasses.Field):
    """A do-nothing value for a family schedule knob these templates never read."""
    kind = str(field.type)
    if kind.startswith("bool"):
        return False
    if kind.startswith("int"):
        return 0
    if kind.startswith("tuple"):
        return ()
    return ""


# Runtime arguments (like the family's outer/axis): never part of a kernel's text, so one
# kernel (and one bundle entry) serves every shape.
RUNTIME_FIELDS = ("op", "layout", "rows", "cols", "blocks")


def _describe(desc) -> str:
    skip = RUNTIME_FIELDS + (("group_size",) if getattr(desc, "act_order", False) else ())
    fields = ", ".join(f"{k}={v}" for k, v in desc.to_json().items() if k not in skip)
    return f"{type(desc).__name__}({fields})"


def gptq_zero_rule(desc) -> tuple[int, int, int]:
    """``(word_add, field_add, field_mask)``: a zero point is ``((field n of (word +
    word_add) mod 2^32) + field_add) & field_mask``. GPTQModel's v1 adds a 1 in every
    field to the whole word (the inverse of its word-wise subtraction on export, borrows
    and all); AutoGPTQ's adds 1 to the field modulo 2^bits, exllama's without the modulo;
    v2 stores the zero point itself."""
    everything = 0xFFFFFFFF
    if desc.checkpoint_format != "gptq":
        return 0, 0, everything
    if desc.v1_zeros == "autogptq":
        return 0, 1, (1 << desc.bits) - 1
    if desc.v1_zeros == "exllama":
        return 0, 1, everything
    return gptq_v1_word_offset(desc.bits), 0, everything


def _matrix_params(desc, storage: dict) -> tuple[Param, ...]:
    params = [pointer("qweight", DType.I32, "in", storage),
              pointer("qzeros", DType.I32, "in", storage),
              pointer("scales", desc.scale_dtype, "in", storage)]
    if getattr(desc, "act_order", False):
        params.append(pointer("g_idx", DType.I32, "in", storage))
    params.append(pointer("y", desc.float_dtype, "out", storage))
    params += [Param("rows", None, "scalar", "int64_t"), Param("cols", None, "scalar", "int64_t")]
    return tuple(params)


def lower_format(desc, target: str, arch: str, storage: dict) -> KernelSpec:
    """Schedule a GPTQ, AWQ or GGML descriptor (target and arch already checked)."""
    f = desc.float_dtype
    compute = DType.F64 if f is DType.F64 else DType.F32
    # The conversion helpers the prelude must define: the scales' load, the output's
    # store, and (GGML) a load of raw binary16 bits from the block bytes.
    scale = getattr(desc, "scale_dtype", None)
    helpers = {CONVERT[d][i] for d, i in ((scale, 0), (f, 1)) if d in CONVERT}
    if isinstance(desc, GgmlDequantizeDescriptor):
        helpers.add("load_f16_bits")
    fields = {"layout": desc.layout, "float_helpers": tuple(sorted(helpers))}
    if isinstance(desc, (GptqDequantizeDescriptor, AwqDequantizeDescriptor)):
        params = _matrix_params(desc, storage)
        gptq = isinstance(desc, GptqDequantizeDescriptor)
        word_add, field_add, field_mask = gptq_zero_rule(desc) if gptq else (0, 0, 0xFFFFFFFF)
        fields.update(template=TEMPLATES[desc.layout], bits=desc.bits if gptq else 4,
                      zero_offset=field_add, zero_word_add=word_add, zero_mask=field_mask,
                      act_order=gptq and desc.act_order, matrix_along_k=gptq,
                      table_max_bytes=MATRIX_TABLE_MAX_BYTES if gptq and desc.act_order else 0,
                      load_float=CONVERT.get(desc.scale_dtype, ("", ""))[0])
    elif isinstance(desc, GgmlDequantizeDescriptor):
        params = (pointer("data", DType.U8, "in", storage), pointer("y", f, "out", storage),
                  Param("blocks", None, "scalar", "int64_t"))
        g = ggml_layouts.knobs(desc.layout, target, f)
        fields.update(template="ggml", block_bytes=desc.block_bytes, bits=8, ggml=g,
                      zero_kind="float" if g.m else "int", mid=0, load_float="load_f16",
                      float_helpers=tuple(sorted(helpers | set(g.float_helpers))))
    else:
        raise TypeError(f"no lowering for {type(desc).__name__}")
    out = next(p for p in params if p.role == "out")
    # f16 converts eight lanes an instruction with F16C where the ISA has it.
    fields["element"] = element_formula(Op.DEQUANTIZE, fields.get("zero_kind", "int"))
    if target == "cuda":
        fields["cuda_float_headers"] = cuda_float_headers(fields["float_helpers"])
        fields["int_to_compute"] = "__ll2double_rn" if compute is DType.F64 else "__ll2float_rn"
    fields["simd_convert"] = "f16c" if target == "c" and arch in F16C_ISAS else ""
    # The one staged array a layout converts in a batch: the scales of a matrix tile, or
    # the raw values of a float GGML tensor.
    fields["staged_load"] = fields["ggml"].raw[1] if "ggml" in fields else fields["load_float"]
    fields["staged_load_f16c"] = (fields["staged_load"] == "load_f16" and compute is DType.F32
                                  and bool(fields["simd_convert"]))
    # Results are staged in a block only to convert them eight at a time; other dtypes
    # store straight from the value loop, which is faster than a staged copy.
    fields["simd_output"] = bool(fields["simd_convert"]) and f is DType.F16
    fields["simd_block"] = MATRIX_TILE
    fields.update(
        op=Op.DEQUANTIZE, uri=desc.uri, entry=f"dqgen_{desc.uri}", target=target, arch=arch,
        # act-order takes each row's group from g_idx: one kernel for every group size
        # (its URI names none), so its text must not name one either
        group_size=0 if getattr(desc, "act_order", False) else desc.group_size,
        float_dtype=f, int_dtype=None,
        compute_type="double" if compute is DType.F64 else "float", compute_dtype=compute,
        params=params, formula=FORMULAS[desc.layout], descriptor=_describe(desc),
        out_name=out.name, out_c_type=storage[f], has_zero_point=True,
        store_out=CONVERT.get(f, ("", ""))[1], rint="rintf",
        parallel_min_elements=PARALLEL_MIN_ELEMENTS,
        threads_per_block=CUDA_THREADS_PER_BLOCK, vector_bytes=16,
        grid_waves=CUDA_GRID_WAVES if target == "cuda" else 0)
    for field in dataclasses.fields(KernelSpec):
        if field.name not in fields and field.default is dataclasses.MISSING:
            fields[field.name] = _neutral(field)
    return KernelSpec(**fields)


# The descriptor classes this module lowers (``lower.LOWERERS`` adds the per-group ones).
FORMAT_LOWERERS = {GptqDequantizeDescriptor: lower_format, AwqDequantizeDescriptor: lower_format,
                   GgmlDequantizeDescriptor: lower_format}
