"""GGML blocks as a format: ``blocks`` blocks of one type to floats, the block's math in
f32 as llama.cpp's ``to_float`` computes it, rounded once to the output dtype. The types
are data (``ggml_blocks.py``), lowered to knobs (``ggml_knobs.py``) one template prints;
gguf-py's ``gguf.quants.dequantize`` is the oracle."""

from __future__ import annotations

import numpy as np

from ..ir import DType, GgmlDequantizeDescriptor, ggml_type_name
from ..spec import Param, pointer
from . import ggml_knobs
from .ggml_blocks import LAYOUTS
from .own_loop import float_helpers, own_loop_spec
from .registry import FormatKind, register


class GgmlKind(FormatKind):
    descriptors = (GgmlDequantizeDescriptor,)
    aot_ops = ("ggml",)

    def lower(self, desc, target, arch, storage):
        f = desc.float_dtype
        params = (pointer("data", DType.U8, "in", storage), pointer("y", f, "out", storage),
                  Param("blocks", None, "scalar", "int64_t"))
        g = ggml_knobs.knobs(desc.layout, target, f)
        return own_loop_spec(
            desc, target, arch, storage, params, LAYOUTS[desc.layout].formula,
            float_helpers=float_helpers(desc, "load_f16_bits", *g.float_helpers),
            template="ggml", block_bytes=desc.block_bytes, bits=8, ggml=g,
            zero_kind="float" if g.m else "int", mid=0, load_float="load_f16")

    def array_shape(self, desc, param):
        return {"data": (desc.blocks, desc.block_bytes),
                "y": (desc.blocks, desc.group_size)}[param.name]

    def launch_elements(self, desc) -> int:
        return desc.blocks * desc.group_size

    def small_problem(self, desc, remake):
        return remake(blocks=7)

    def oracle(self, desc, arrays):
        try:
            import gguf.quants
        except ImportError:
            raise LookupError("the gguf package (the GGML oracle) is not installed") from None
        name = ggml_type_name(desc.qtype)
        with np.errstate(all="ignore"):
            try:
                values = gguf.quants.dequantize(arrays["data"], gguf.GGMLQuantizationType[name])
            except (NotImplementedError, KeyError) as exc:
                raise LookupError(f"the gguf package cannot dequantize {name}: {exc}") from None
            return np.asarray(values).reshape(arrays["y"].shape).astype(desc.float_dtype.np_dtype)


GGML = register(GgmlKind())
