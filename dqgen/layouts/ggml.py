"""GGML blocks as a format: ``blocks`` blocks of one type to floats, the block's math in
f32 as llama.cpp's ``to_float`` computes it, rounded once to the output dtype. The types
are data (``ggml_blocks.py``), lowered to knobs (``ggml_knobs.py``) one template prints;
gguf-py's ``gguf.quants.dequantize`` is the oracle."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from ..errors import DqgenError, UnsupportedError
from ..ir import GGML_BLOCK_BYTES, DType, GgmlDequantizeDescriptor, ggml_type_name
from ..spec import Param, pointer
from . import ggml_knobs
from .ggml_blocks import LAYOUTS
from .ggml_integers import (block_parts, codes_unsigned, int8_layout, superblock_layout,
                            superblock_parts)
from .ggml_int8 import int8_ggml_knobs
from .own_loop import float_helpers, own_loop_spec
from .registry import FormatKind, Int8View, LinearView, RowSlice, cuda_block_values, register


def ggml_type_names() -> tuple[str, ...]:
    """Every GGML block type this dqgen dequantizes ("Q4_0", ...): the block table's."""
    return tuple(ggml_type_name(layout) for layout in GGML_BLOCK_BYTES if layout in LAYOUTS)


class GgmlKind(FormatKind):
    descriptors = (GgmlDequantizeDescriptor,)
    aot_ops = ("ggml",)
    aot_defaults = {"ggml": {"float": ("f32", "f16", "bf16")}}
    aot_keys = {"ggml": ("ggml_type",)}

    def aot_candidates(self, op, value):
        for qt, f in itertools.product(value("ggml_type"), value("float")):
            yield lambda qt=qt, f=f: self._lowerable(self.aot_descriptor(
                op, None, f, 0, dict(qtype=qt)))

    def _lowerable(self, desc):
        """``desc`` if it lowers (a type the IR names may not have its schedule yet)."""
        try:
            ggml_knobs.knobs(desc.layout, "c", desc.float_dtype)
        except DqgenError:
            raise
        except Exception as exc:  # noqa: BLE001 - a registry entry without a lowering
            raise UnsupportedError(f"{desc.uri} has no schedule in this dqgen "
                                   f"({type(exc).__name__}: {exc})") from None
        return desc

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return GgmlDequantizeDescriptor(0, float_dtype=float_dtype, **knobs)

    def aot_request(self, desc):
        return self.aot_ops[0], None, 0, {"qtype": ggml_type_name(desc.qtype)}

    def lower(self, desc, target, arch, storage):
        f = desc.float_dtype
        params = (pointer("data", DType.U8, "in", storage), pointer("y", f, "out", storage),
                  Param("blocks", None, "scalar", "int64_t"))
        g = ggml_knobs.knobs(desc.layout, target, f)
        return own_loop_spec(
            desc, target, arch, storage, params, LAYOUTS[desc.layout].formula,
            float_helpers=float_helpers(desc, "load_f16_bits", *g.float_helpers),
            template="ggml", block_bytes=desc.block_bytes, bits=8, ggml=g, narrow_int_diff=True,
            zero_kind="float" if g.m else "int", mid=0, load_float="load_f16")

    def linear_view(self, desc):
        qtype, values = desc.qtype, desc.group_size
        return LinearView(
            slices={"data": RowSlice(1, desc.block_bytes, values)},
            sizes={"blocks": (1, values, 1)}, k_multiple=values, cuda_value="ggml",
            cuda_block_values=cuda_block_values(values),   # a float tensor's: 0
            decode=GgmlDequantizeDescriptor(0, qtype, DType.F32),
            sized=lambda n, k: GgmlDequantizeDescriptor(n * k // values, qtype, DType.F32))

    def int8_view(self, desc):
        block = int8_layout(desc.layout)
        if block is None:
            return None
        sub = block.sub or block.values
        name = (f"GGML {ggml_type_name(desc.qtype)} blocks ({block.block_bytes} bytes, "
                f"{block.values} values)")
        def parts(arrays, n, k):
            codes, scales, mins = block_parts(desc.layout, arrays["data"])
            return (codes.reshape(n, k), scales.reshape(n, k // sub),
                    None if mins is None else mins.reshape(n, k // sub))
        knobs = int8_ggml_knobs(desc.layout, block)
        view = Int8View("c/int8_ggml.j2", knobs, sub, block.m is not None, block.values, parts,
                        name, lane_pieces=knobs.lane_pieces)
        if superblock_layout(desc.layout) is None:
            return view

        def superblock(arrays, n, k):
            codes, sc, d, mins, dmin = superblock_parts(desc.layout, arrays["data"])
            rows = (lambda a, per: None if a is None else a.reshape(n, k // per))
            return (codes.reshape(n, k), rows(sc, sub), rows(d, block.values),
                    rows(mins, sub), rows(dmin, block.values))
        return dataclasses.replace(view, block=block.values, block_parts=superblock,
                                   unsigned_codes=codes_unsigned(block),
                                   slot_runs=view.knobs.slot_runs,
                                   code_pieces=knobs.code_pieces,
                                   lane_pieces=knobs.block_lane_pieces)

    def format_name(self, desc) -> str:
        return ggml_type_name(desc.qtype)

    def int8_names(self) -> tuple[str, ...]:
        names = (ggml_type_name(t) for t in LAYOUTS if int8_layout(t) is not None)
        return (f"GGML blocks whose values are int8 integers times a scale ({', '.join(names)})",)

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
