"""The ``KernelSpec`` of a layout whose loop is its own template (GPTQ/AWQ matrices, GGML
blocks): the element math, dtypes, conversion helpers and launch knobs every such layout
shares. These templates do not read the per-group family's SIMD knobs, which are set
neutral."""

from __future__ import annotations

import dataclasses

from ..ir import DType, Op
from ..spec import (CONVERT, CUDA_GRID_WAVES, F16C_ISAS, PARALLEL_MIN_ELEMENTS, KernelSpec,
                    cuda_float_headers, element_formula)

CUDA_THREADS_PER_BLOCK = 256
# C: values of a row (a matrix tile, or a staged float run) converted as one batch.
MATRIX_TILE = 64
# Runtime arguments (like the family's outer/axis): never part of a kernel's text, so one
# kernel (and one bundle entry) serves every shape.
RUNTIME_FIELDS = ("op", "layout", "rows", "cols", "blocks")


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


def describe(desc) -> str:
    """The kernel-relevant descriptor fields, for the header comment."""
    skip = RUNTIME_FIELDS + (("group_size",) if getattr(desc, "act_order", False) else ())
    fields = ", ".join(f"{k}={v}" for k, v in desc.to_json().items() if k not in skip)
    return f"{type(desc).__name__}({fields})"


def float_helpers(desc, *extra: str) -> tuple[str, ...]:
    """The conversion helpers the prelude must define: the scales' load, the output's
    store, and whatever the layout adds."""
    scale = getattr(desc, "scale_dtype", None)
    helpers = {CONVERT[d][i] for d, i in ((scale, 0), (desc.float_dtype, 1)) if d in CONVERT}
    return tuple(sorted(helpers | set(extra)))


def own_loop_spec(desc, target: str, arch: str, storage: dict, params, formula: str,
                  **fields) -> KernelSpec:
    """``desc``'s spec from its layout's ``fields`` and ``params`` (target and arch checked)."""
    f = desc.float_dtype
    compute = DType.F64 if f is DType.F64 else DType.F32
    out = next(p for p in params if p.role == "out")
    fields["element"] = element_formula(Op.DEQUANTIZE, fields.get("zero_kind", "int"))
    narrow = fields.pop("narrow_int_diff", False)
    if target == "cuda":
        fields["cuda_float_headers"] = cuda_float_headers(fields["float_helpers"])
        # a layout whose integers and offsets are a few bits (|q - zp| < 2^24) subtracts
        # and converts in 32 bits: the same value, a cheaper conversion on a GPU
        wide = {DType.F64: "__ll2double_rn", DType.F32: "__ll2float_rn"}
        thin = {DType.F64: "__int2double_rn", DType.F32: "__int2float_rn"}
        fields["int_to_compute"] = (thin if narrow else wide)[compute]
        fields["int_diff_type"] = "int32_t" if narrow else "long long"
        fields["int_diff_bits"] = 32 if narrow else 64
    # f16 converts eight lanes an instruction with F16C where the ISA has it.
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
        float_dtype=f, int_dtype=None, layout=desc.layout,
        compute_type="double" if compute is DType.F64 else "float", compute_dtype=compute,
        params=params, formula=formula, descriptor=describe(desc),
        out_name=out.name, out_c_type=storage[f], has_zero_point=True,
        store_out=CONVERT.get(f, ("", ""))[1], rint="rintf",
        parallel_min_elements=PARALLEL_MIN_ELEMENTS,
        threads_per_block=CUDA_THREADS_PER_BLOCK, vector_bytes=16,
        grid_waves=CUDA_GRID_WAVES if target == "cuda" else 0)
    for field in dataclasses.fields(KernelSpec):
        if field.name not in fields and field.default is dataclasses.MISSING:
            fields[field.name] = _neutral(field)
    return KernelSpec(**fields)
