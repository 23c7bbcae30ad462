"""bitsandbytes' weight formats (transformers' ``load_in_4bit`` / ``load_in_8bit``
checkpoints) as two formats of one module.

4-bit (NF4, FP4): ``W = F(code[q] * absmax[e / blocksize])`` for element ``e`` of the
row-major tensor flattened (blocks run across rows), ``q`` the 4-bit index packed two a
byte with element ``2i`` in the HIGH nibble of byte ``i``, ``code`` the 16-entry table
(``weight.quant_map``), the product in f32 and rounded once to F. With double
quantization the block's absmax is itself ``f32(f32(nested_code[u8 absmax[b]] *
nested_absmax[b / nested_blocksize]) + offset)``, as ``dequantize_blockwise`` then ``+=
offset`` compute it.

LLM.int8 (8-bit): ``W = F(f32(f32(q * SCB[row]) * C))`` with ``C`` the f32 nearest 1/127
(``int8_vectorwise_dequant`` multiplies, it does not divide); the constant is printed as an
exact hex float.

The fused linear reads both (``linear_view``): an LLM.int8 row is its own; a 4-bit row is
whole blocks when K is a multiple of the block size, and with double quantization whole
nested blocks (K a multiple of ``blocksize * nested_blocksize``), since the decode indexes
the nested absmax from its own first block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import DType, FormatDescriptor, Layout
from ..spec import Param, pointer
from .fp8 import c_float
from .own_loop import float_helpers, own_loop_spec
from .registry import FormatKind, LinearView, RowSlice, register

#: The block sizes ``bitsandbytes.functional.quantize_4bit`` writes (and dequantize takes).
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: The nested block of double quantization (``quantize_blockwise(absmax, blocksize=256)``).
NESTED_BLOCKSIZE = 256
BNB_FLOAT_DTYPES = (DType.BF16, DType.F16, DType.F32)
#: ``int8_vectorwise_dequant``'s multiplier, 1/127 as an f32.
INT8_SCALE = np.float32(7.874015718698502e-3)
FORMULA_4BIT = ("W[e] = F(code[q(e)] * absmax[e / blocksize]), e the flat index, q(e) the high "
                "nibble first")
FORMULA_NESTED = ("W[e] = F(code[q(e)] * a(b)), a(b) = f32(f32(nested_code[absmax[b]] * "
                  "nested_absmax[b / nested_blocksize]) + offset), b = e / blocksize")
FORMULA_INT8 = "W[i, j] = F(f32(f32(q[i, j] * SCB[i]) * C)), C = f32(1/127)"


@dataclass(frozen=True)
class Bnb4bitKnobs:
    """What the templates print for a 4-bit kernel."""

    packed: bool = True
    blocksize: int = 64
    nested_blocksize: int = 0   # 0: the absmax are f32, one a block
    absmax_c_type: str = ""     # the absmax parameter's C type (f32, or u8 when nested)

    @property
    def nested(self) -> bool:
        return self.nested_blocksize > 0


@dataclass(frozen=True)
class Bnb8bitKnobs:
    """What the templates print for an LLM.int8 kernel: the multiplier as an exact C
    constant and its bits."""

    packed: bool = False
    scale_bits: int = int(np.array([INT8_SCALE]).view(np.uint32)[0])

    @property
    def c_scale(self) -> str:
        return c_float(self.scale_bits)


@dataclass(frozen=True)
class Bnb4bitDescriptor(FormatDescriptor):
    """A ``rows`` x ``cols`` tensor of NF4/FP4 indices in blocks of ``blocksize`` over the
    flattened tensor, dequantized to ``float_dtype``; ``nested_blocksize`` > 0 reads
    double-quantized (uint8) absmax in nested blocks of that many."""

    layout: ClassVar[Layout] = Layout.BNB4
    float_dtypes: ClassVar[tuple[DType, ...]] = BNB_FLOAT_DTYPES
    rows: int
    cols: int
    blocksize: int = 64
    nested_blocksize: int = 0
    float_dtype: DType = DType.BF16

    def validate(self) -> None:
        rows, cols = self._set_int("rows"), self._set_int("cols")
        blocksize = self._set_int("blocksize", minimum=1)
        self._set_int("nested_blocksize", maximum=2**31 - 1)
        if blocksize not in BNB_BLOCKSIZES:
            raise UnsupportedError(f"blocksize={blocksize} is not a bitsandbytes 4-bit block "
                                   f"size; expected one of {', '.join(map(str, BNB_BLOCKSIZES))}")
        if rows * cols > 2**62:
            raise InvalidProblemError(f"rows*cols={rows * cols} does not fit int64")

    @property
    def group_size(self) -> int:  # the sku's: values an absmax covers
        return self.blocksize

    @property
    def elements(self) -> int:
        return self.rows * self.cols

    @property
    def num_blocks(self) -> int:
        return -(-self.elements // self.blocksize)

    @property
    def packed_bytes(self) -> int:
        """Bytes of packed indices (an odd count of values ends on a padding nibble)."""
        return (self.elements + 1) // 2

    @property
    def nested_blocks(self) -> int:
        return -(-self.num_blocks // self.nested_blocksize) if self.nested_blocksize else 0

    @property
    def uri(self) -> str:
        nested = f"_dq{self.nested_blocksize}" if self.nested_blocksize else ""
        return f"dequant_bnb4_b{self.blocksize}{nested}_{self.float_dtype.value}"


@dataclass(frozen=True)
class Bnb8bitDescriptor(FormatDescriptor):
    """A ``rows`` x ``cols`` LLM.int8 weight (int8, one f32 SCB a row) dequantized to
    ``float_dtype``."""

    layout: ClassVar[Layout] = Layout.BNB8
    float_dtypes: ClassVar[tuple[DType, ...]] = BNB_FLOAT_DTYPES
    rows: int
    cols: int
    float_dtype: DType = DType.BF16

    def validate(self) -> None:
        rows, cols = self._set_int("rows"), self._set_int("cols")
        if rows * cols > 2**62:
            raise InvalidProblemError(f"rows*cols={rows * cols} does not fit int64")

    @property
    def group_size(self) -> int:  # the sku's: a scale covers the whole row
        return 0

    @property
    def uri(self) -> str:
        return f"dequant_bnb8_{self.float_dtype.value}"


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` 4-bit indices of packed bytes, element ``2i`` the high nibble of
    byte ``i`` (the oracle's own unpacking)."""
    b = packed.reshape(-1).view(np.uint8)
    return np.stack([b >> 4, b & 15], axis=1).reshape(-1)[:n]


def block_absmax(desc: Bnb4bitDescriptor, arrays: dict) -> np.ndarray:
    """Each block's f32 absmax: as stored, or decoded from double quantization with the
    two f32 roundings of ``dequantize_blockwise`` and ``+= offset``."""
    if not desc.nested_blocksize:
        return arrays["absmax"].astype(np.float32)
    index = np.arange(desc.num_blocks) // desc.nested_blocksize
    with np.errstate(all="ignore"):
        scaled = arrays["nested_code"][arrays["absmax"]] * arrays["nested_absmax"][index]
        return (scaled + arrays["offset"][0]).astype(np.float32)


class _BnbKind(FormatKind):
    """What the two bitsandbytes kinds share: one loop per element, run-time shapes."""

    def launch_elements(self, desc) -> int:
        return desc.rows * desc.cols

    def aot_request(self, desc):
        op, _, _, knobs = super().aot_request(desc)
        knobs.pop("blocksize", None)  # the request's group size
        return op, None, desc.group_size, knobs


class Bnb4bitKind(_BnbKind):
    descriptors = (Bnb4bitDescriptor,)
    aot_ops = ("bnb4",)
    # transformers' default: blocksize 64; absmax as f32 or double-quantized (u8)
    aot_defaults = {"bnb4": {"float": ("bf16", "f16"), "group_size": (64,),
                             "scale": ("f32", "u8")}}
    aot_keys = {"bnb4": ("group_size", "scale")}

    def lower(self, desc, target, arch, storage):
        f = desc.float_dtype
        absmax_dtype = DType.U8 if desc.nested_blocksize else DType.F32
        absmax = pointer("absmax", absmax_dtype, "in", storage)
        params = [pointer("w", DType.U8, "in", storage), pointer("code", DType.F32, "in", storage),
                  absmax]
        if desc.nested_blocksize:
            params += [pointer("nested_code", DType.F32, "in", storage),
                       pointer("nested_absmax", DType.F32, "in", storage),
                       pointer("offset", DType.F32, "in", storage)]
        params += [pointer("y", f, "out", storage), Param("rows", None, "scalar", "int64_t"),
                   Param("cols", None, "scalar", "int64_t")]
        return own_loop_spec(
            desc, target, arch, storage, tuple(params),
            FORMULA_NESTED if desc.nested_blocksize else FORMULA_4BIT,
            float_helpers=float_helpers(desc), template="bitsandbytes",
            layout_knobs=Bnb4bitKnobs(True, desc.blocksize, desc.nested_blocksize, absmax.c_type),
            load_float="")

    def array_shape(self, desc, param):
        return {"w": (desc.packed_bytes,), "code": (16,), "absmax": (desc.num_blocks,),
                "nested_code": (256,), "nested_absmax": (desc.nested_blocks,), "offset": (1,),
                "y": (desc.rows, desc.cols)}[param.name]

    def small_problem(self, desc, remake):
        # an odd count of values (a padding nibble), blocks across rows, a partial last
        # block, and more than one nested block where the absmax are double-quantized
        nested = 2 * desc.nested_blocksize + 1
        blocks = nested if desc.nested_blocksize and nested * desc.blocksize <= 2**17 else 3
        cols = blocks * desc.blocksize // 3 - 1
        return remake(rows=3, cols=cols - (cols % 2 == 0))

    def oracle(self, desc, arrays):
        q = unpack_nibbles(arrays["w"], desc.elements)
        scale = np.repeat(block_absmax(desc, arrays), desc.blocksize)[:desc.elements]
        with np.errstate(all="ignore"):
            w = arrays["code"].astype(np.float32)[q] * scale
        return w.astype(desc.float_dtype.np_dtype).reshape(desc.rows, desc.cols)

    def linear_view(self, desc):
        # Blocks run over the flattened tensor: a row of W [N, K] (and a chunk of one) is
        # whole blocks, a pointer offset, when K is a multiple of the block size. The
        # decode indexes the nested absmax by its own block / nested_blocksize, so with
        # double quantization a row and a chunk must start a nested block as well.
        bs, nested = desc.blocksize, desc.nested_blocksize
        step = bs * nested if nested else bs
        slices = {"w": RowSlice(1, 1, 2), "code": RowSlice(0, 0), "absmax": RowSlice(1, 1, bs)}
        if nested:
            slices.update(nested_code=RowSlice(0, 0), nested_absmax=RowSlice(1, 1, step),
                          offset=RowSlice(0, 0))
        same = dict(blocksize=bs, nested_blocksize=nested, float_dtype=DType.F32)
        return LinearView(slices=slices, sizes={"rows": (0, 1), "cols": (1, 1)}, k_multiple=step,
                          cuda_value="bnb", decode=Bnb4bitDescriptor(0, 0, **same),
                          sized=lambda n, k: Bnb4bitDescriptor(n, k, **same))

    def aot_candidates(self, op, value):
        for f, g, s in itertools.product(value("float"), value("group_size"), value("scale")):
            yield lambda f=f, g=g, s=s: self.aot_descriptor(op, None, f, g, dict(
                nested_blocksize=_nested_from_scale(s)))

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return Bnb4bitDescriptor(0, 0, blocksize=group_size, float_dtype=float_dtype, **knobs)


def _nested_from_scale(scale: str) -> int:
    """``--scale`` for bnb4 names the absmax' storage: f32, or u8 (double quantization)."""
    if scale not in ("f32", "u8"):
        raise UnsupportedError(f"scale={scale!r}: bitsandbytes' absmax are f32, or u8 with "
                               "double quantization")
    return NESTED_BLOCKSIZE if scale == "u8" else 0


class Bnb8bitKind(_BnbKind):
    descriptors = (Bnb8bitDescriptor,)
    aot_ops = ("bnb8",)
    aot_defaults = {"bnb8": {"float": ("bf16", "f16")}}
    aot_keys = {"bnb8": ()}

    def lower(self, desc, target, arch, storage):
        params = (pointer("w", DType.S8, "in", storage), pointer("scb", DType.F32, "in", storage),
                  pointer("y", desc.float_dtype, "out", storage),
                  Param("rows", None, "scalar", "int64_t"),
                  Param("cols", None, "scalar", "int64_t"))
        return own_loop_spec(desc, target, arch, storage, params, FORMULA_INT8,
                             float_helpers=float_helpers(desc), template="bitsandbytes",
                             layout_knobs=Bnb8bitKnobs(), load_float="")

    def array_shape(self, desc, param):
        return {"w": (desc.rows, desc.cols), "scb": (desc.rows,),
                "y": (desc.rows, desc.cols)}[param.name]

    def small_problem(self, desc, remake):
        return remake(rows=5, cols=300)

    def oracle(self, desc, arrays):
        q = arrays["w"].astype(np.float32)
        with np.errstate(all="ignore"):
            w = (q * arrays["scb"].astype(np.float32)[:, None]) * INT8_SCALE
        return w.astype(desc.float_dtype.np_dtype)

    def linear_view(self, desc):
        # a row is its own: K int8 values and one SCB
        return LinearView(slices={"w": RowSlice(), "scb": RowSlice(1, 0, 1, 1)},
                          sizes={"rows": (0, 1), "cols": (1, 1)}, k_multiple=1, cuda_value="bnb",
                          decode=Bnb8bitDescriptor(0, 0, DType.F32),
                          sized=lambda n, k: Bnb8bitDescriptor(n, k, DType.F32))

    def aot_candidates(self, op, value):
        for f in value("float"):
            yield lambda f=f: self.aot_descriptor(op, None, f, 0, {})

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return Bnb8bitDescriptor(0, 0, float_dtype=float_dtype, **knobs)


BNB4 = register(Bnb4bitKind())
"""bitsandbytes NF4/FP4 (``quantize_4bit``, transformers' ``load_in_4bit``): ``W =
F(code[q] * absmax[e / blocksize])`` over the flattened tensor, plain or double-quantized
absmax, bit for bit what ``bitsandbytes.functional.dequantize_4bit`` returns (FORMATS.md)."""
BNB8 = register(Bnb8bitKind())
"""bitsandbytes LLM.int8 (``load_in_8bit``): ``W = F(f32(q * SCB) * f32(1/127))``, bit for
bit ``int8_vectorwise_dequant`` then ``.to(dtype)`` (FORMATS.md)."""
