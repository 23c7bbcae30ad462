"""The fused linear kernel: ``y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])`` with ``W`` a
quantized weight ``[N, K]`` of any format whose kind gives a ``linear_view``.

The weight is never written out: each thread decodes a few rows of ``W`` at a time with the
format's own dequantize kernel (compiled into the same object, f32 out) into a scratch tile
that stays in cache, and multiplies them with every row of ``x`` from registers. So the
decode is the dequantize kernel's, one source of truth. The sum's order is fixed
(SPEC.md §8): sixteen lanes, lane ``j`` summing the products of ``k = j (mod 16)`` in
ascending ``k`` with one fused multiply-add each from +0 (``K`` padded with zeros to a
multiple of 16), then the lanes added pairwise ``(j, j + 8)``, ``(j, j + 4)``,
``(j, j + 2)``, ``(0, 1)``, then the bias; one rounding to ``y``'s dtype. No thread count,
ISA level or tiling changes it; ``reference.linear`` computes the same.

``transpose`` makes the other product, ``y[m, k] = sum_n x[m, n] * W[n, k]`` (the gradient
of x: ``dx = dy @ W``), in the same order over ``n``: each thread owns a run of columns of
``W``, decodes them sixteen rows at a time and keeps a sum a lane per column and row of x.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import reference
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import DType, Layout, Op, check_int, parse_dtype
from ..spec import CONVERT, Param, cuda_float_headers, pointer
from . import linear_int8
from .own_loop import own_loop_spec
from .registry import FormatKind, descriptor_from_record, kind_for_op, kind_of, register

LANES = 16
# "f32": exact f32 products (§8); "int8": x quantized per block, integer dot products (§9)
COMPUTES = ("f32", "int8")
LINEAR_DTYPES = (DType.F32, DType.F16, DType.BF16)
FORMULA = ("y[m, n] = F(sum16(fma(x[m, k], W[n, k])) + bias[n]): W as the format's "
           "dequantize computes it in f32")
# Register tiles (rows of x, rows of W) of the micro-kernel by how many rows of x a call
# has, per ISA: 32 vector registers hold a 4 x 4 tile of 16-lane sums on AVX-512, 16 hold
# 2 x 2 on AVX2 (each sum two registers there).
MICRO_TILES = {"avx512": ((1, 8), (2, 4), (4, 4)), "avx2": ((1, 4), (2, 2), (4, 1)),
               "generic": ((1, 1),)}
# Rows of W decoded a step: a few for short x (the tile stays in L1/L2), more for long x
# (x is read once per step).
TILE_ROWS_SHORT = 8
TILE_ROWS_LONG = 32
LONG_M = 17
# Columns of W a thread decodes and sums at once in the transposed product (rounded to
# the format's chunk and the lanes): its sixteen lane sums of each row of x stay in L2.
CHUNK_COLUMNS = 256
# And at most this many lane sums a thread (4 MiB): more rows of x take more passes.
SUM_FLOATS = 1 << 20
# The CUDA forward product: rows of x a half-warp applies each decoded value to (registers)
CUDA_M_TILE = 8
# the tiles of x that get a loop of their own, without a test a row (decode steps: M = 1)
CUDA_EXACT_TILES = (1, 2, 4, 8)
# and 16-value steps a thread unrolls, its loads in flight at once (a small block's are
# unrolled by blocks): the loads are a byte or two a thread, so latency bounds them
CUDA_STEPS_IN_FLIGHT = 16


def _weight_from(value):
    """A weight descriptor, or one rebuilt from its record (a kernel record's nested
    ``weight``)."""
    return descriptor_from_record(value) if isinstance(value, dict) else value


@dataclass(frozen=True)
class LinearDescriptor:
    """``x [m, k]`` times the quantized ``weight [n, k]`` transposed, plus an optional
    ``bias [n]``; ``y [m, n]`` in ``y_dtype`` (default: x's). ``weight`` is a format
    descriptor (its sizes are ignored: ``n`` and ``k`` are the weight's). ``transpose``:
    ``x [m, n]`` times the weight, ``y [m, k]`` (no bias)."""

    op: ClassVar[Op] = Op.LINEAR
    weight: object
    m: int
    n: int
    k: int
    x_dtype: DType = DType.F32
    y_dtype: DType | None = None
    bias: bool = False
    transpose: bool = False
    compute: str = "f32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _weight_from(self.weight))
        self.validate()

    def validate(self) -> None:
        for name in ("m", "n", "k"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, minimum=0,
                                                     maximum=2**40))
        x = parse_dtype(self.x_dtype, "x_dtype", LINEAR_DTYPES)
        object.__setattr__(self, "x_dtype", x)
        y = x if self.y_dtype is None else parse_dtype(self.y_dtype, "y_dtype", LINEAR_DTYPES)
        object.__setattr__(self, "y_dtype", y)
        object.__setattr__(self, "bias", bool(self.bias))
        object.__setattr__(self, "transpose", bool(self.transpose))
        if self.bias and self.transpose:
            raise InvalidProblemError("the transposed product (x @ W) takes no bias")
        if self.compute not in COMPUTES:
            raise InvalidProblemError(f"compute={self.compute!r} is not one of "
                                      f"{', '.join(map(repr, COMPUTES))}")
        if self.compute == "int8":
            linear_int8.check_k(self.weight, self.k)
        view = self.view
        if self.k % view.k_multiple:
            raise InvalidProblemError(
                f"k={self.k} is not a multiple of {view.k_multiple}, which a row of this "
                f"weight's format ({self.weight.layout.value}) must be")

    @property
    def view(self):
        view = kind_of(self.weight).linear_view(self.weight)
        if view is None:
            layout = getattr(self.weight, "layout", None)
            named = layout.value if layout is not None else type(self.weight).__name__
            raise UnsupportedError(f"the linear kernel does not read {named} weights "
                                   f"({type(self.weight).__name__}) yet; dequantize them and "
                                   "use a float matmul")
        return view

    @property
    def float_dtype(self) -> DType:
        return self.y_dtype

    @property
    def layout(self) -> Layout:
        layout = getattr(self.weight, "layout", None)
        if layout is None:  # the family's descriptors: plain or packed storage
            layout = Layout.PACKED4 if self.weight.int_type.is_packed else Layout.PLAIN
        return layout

    @property
    def group_size(self) -> int:
        return self.weight.group_size

    @property
    def uri(self) -> str:
        return (f"linear{'_t' if self.transpose else ''}_{self.view.decode.uri}_"
                f"x{self.x_dtype.value}_y{self.y_dtype.value}" + ("_bias" if self.bias else "")
                + ("_i8" if self.compute == "int8" else ""))

    def to_json(self) -> dict:
        w = self.view.decode
        return {"op": "linear", "layout": self.layout.value,
                "weight": {"class": type(w).__name__, **w.to_json()},
                "m": self.m, "n": self.n, "k": self.k, "x_dtype": self.x_dtype.value,
                "y_dtype": self.y_dtype.value, "bias": self.bias, "transpose": self.transpose,
                "compute": self.compute}


@dataclass(frozen=True)
class WeightArg:
    """One argument of the decode call for row ``n``: a pointer into the weight's array
    (``RowSlice`` numbers), the scratch row (``out``), or a size ``K * num / den``."""

    role: str
    name: str
    c_type: str
    row_block: int = 0
    num: int = 0
    den: int = 1
    const: int = 0
    rows: int = 0            # a size: the whole weight's is N times the row's

    @property
    def is_input(self) -> bool:
        return self.role == "in"

    @property
    def is_output(self) -> bool:
        return self.role == "out"


@dataclass(frozen=True)
class LinearKnobs:
    """What the linear template prints: the weight's decode kernel (its spec, rendered in
    the same file) and how to call it for one row, the lane vector's registers, the
    micro-kernel tiles and the decode tile rows, and the 16-bit conversions x, bias and y
    need (defined under a prefix beside the decode's own)."""

    weight: object
    cuda_value: str          # the format's per-element macro (cuda/values.j2)
    cuda_setup: str          # and its setup macro (once a thread)
    transpose: bool
    m_tile: int              # CUDA: rows of x a half-warp takes (the forward product)
    exact_tiles: tuple[int, ...]  # and the row counts with a loop of their own (no row tests)
    block_values: int        # CUDA: values a block (a group) whose header they share (0: none)
    block_steps: int         # and its 16-value steps
    block_header: str        # the macros that read a block's header
    in_block: str            # and a value in the block
    block_unroll: int        # blocks a loop step: at least CUDA_STEPS_IN_FLIGHT steps' loads at once
    step_unroll: int         # and steps, value by value
    chunk_columns: int       # the transposed product: columns of W a step
    sum_floats: int          # and its lane sums a thread, at most
    weight_entry: str
    weight_args: tuple[WeightArg, ...]
    weight_inputs: tuple[WeightArg, ...]   # the weight's arrays
    weight_sizes: tuple[WeightArg, ...]    # its run-time sizes
    x_c_type: str
    bias_c_type: str         # "" without a bias
    lane_regs: int           # registers a 16-lane vector takes (1, 2), 0: plain floats
    micro_tiles: tuple[tuple[int, int], ...]
    tile_rows_short: int
    tile_rows_long: int
    long_m: int
    helpers: tuple[str, ...]
    decode_load: str         # a decode in a 16-bit dtype (MLX, float zero points): widened
    x_load: str
    bias_load: str
    y_store: str
    headers: tuple[str, ...]


def _isa_class(arch: str) -> str:
    return "avx512" if arch.startswith("avx512") else arch


def _weight_args(view, weight_spec) -> tuple[WeightArg, ...]:
    args = []
    for p in weight_spec.params:
        if p.role == "in":
            s = view.slices[p.name]
            args.append(WeightArg("in", p.name, p.c_type, s.row_block, s.num, s.den, s.const))
        elif p.role == "out":
            args.append(WeightArg("out", p.name, p.c_type))
        else:
            num, den, *rows = view.sizes[p.name]
            whole = rows[0] if rows else int(num == 0)
            args.append(WeightArg("scalar", p.name, p.c_type, num=num, den=den, rows=whole))
    return tuple(args)


def _candidate(weight, x, bias: bool, transpose: bool, compute: str) -> LinearDescriptor:
    """One ``dqgen aot --op linear`` kernel; int8 for a weight it does not read is refused
    (and so skipped)."""
    if compute == "int8":
        linear_int8.weight_view(weight)
    return LinearDescriptor(weight, 0, 0, 0, x, x, bias, transpose, compute)


class LinearKind(FormatKind):
    descriptors = (LinearDescriptor,)
    aot_ops = ("linear",)
    # a weight's kernels: with and without a bias, and x's gradient; y in x's dtype
    aot_defaults = {"linear": {"float": ("bf16", "f16", "f32")}}
    aot_keys = {"linear": ("weight", "int", "group_size", "ggml_type", "block", "fp8",
                           "scale", "compute")}

    def aot_candidates(self, op, value):
        for weight_op in value("weight"):
            kind = kind_for_op(weight_op)
            for make in kind.aot_candidates(weight_op, lambda key: value(key, weight_op)):
                for x, compute in itertools.product(value("float"), value("compute")):
                    # int8: the forward product only, of the weights it reads
                    shapes = ((False, False), (True, False)) + (
                        ((False, True),) if compute == "f32" else ())
                    for bias, transpose in shapes:
                        yield (lambda make=make, x=x, bias=bias, transpose=transpose,
                               compute=compute: _candidate(make(), x, bias, transpose, compute))

    def aot_request(self, desc):
        w = desc.view.decode
        knobs = {"weight": json.dumps({"class": type(w).__name__, **w.to_json()},
                                      sort_keys=True),
                 "x_dtype": desc.x_dtype.value, "bias": desc.bias, "transpose": desc.transpose}
        if desc.compute != "f32":
            knobs["compute"] = desc.compute
        return "linear", None, 0, knobs

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return LinearDescriptor(json.loads(knobs["weight"]), 0, 0, 0, knobs["x_dtype"],
                                float_dtype, knobs["bias"], knobs["transpose"],
                                knobs.get("compute", "f32"))

    def lower(self, desc, target, arch, storage):
        if desc.compute == "int8":
            return linear_int8.lower(desc, target, arch, storage)
        view = desc.view
        if target == "cuda" and not view.cuda_value:
            raise UnsupportedError(f"the linear kernel does not read {desc.layout.value} "
                                   "weights on CUDA yet; dequantize them and use a float matmul")
        weight_spec = kind_of(view.decode).lower(view.decode, target, arch, storage)
        isa = _isa_class(arch) if target == "c" else "generic"
        inputs = tuple(p for p in weight_spec.params if p.role == "in")
        params = inputs + (pointer("x", desc.x_dtype, "in", storage),)
        if desc.bias:
            params += (pointer("bias", desc.x_dtype, "in", storage),)
        params += (pointer("y", desc.y_dtype, "out", storage),
                   Param("m", None, "scalar", "int64_t"), Param("n", None, "scalar", "int64_t"),
                   Param("k", None, "scalar", "int64_t"))
        x_load = CONVERT.get(desc.x_dtype, ("", ""))[0]
        y_store = CONVERT.get(desc.y_dtype, ("", ""))[1]
        # a format that rounds its values to a 16-bit dtype decodes into it; widened exactly
        decode_load = CONVERT.get(view.decode.float_dtype, ("", ""))[0]
        chunk = int(np.lcm(view.chunk_multiple or view.k_multiple, LANES))
        args = _weight_args(view, weight_spec)
        knobs = LinearKnobs(
            weight=weight_spec, cuda_value=view.cuda_value,
            cuda_setup=f"{view.cuda_value}_setup" if view.cuda_value else "",
            transpose=desc.transpose, m_tile=CUDA_M_TILE, exact_tiles=CUDA_EXACT_TILES,
            block_values=view.cuda_block_values, block_steps=view.cuda_block_values // LANES,
            block_header=f"{view.cuda_value}_block" if view.cuda_block_values else "",
            in_block=f"{view.cuda_value}_in_block" if view.cuda_block_values else "",
            block_unroll=max(1, CUDA_STEPS_IN_FLIGHT * LANES // max(view.cuda_block_values, 1)),
            step_unroll=CUDA_STEPS_IN_FLIGHT,
            chunk_columns=chunk * max(1, -(-CHUNK_COLUMNS // chunk)), sum_floats=SUM_FLOATS,
            weight_entry=weight_spec.entry, weight_args=args,
            weight_inputs=tuple(a for a in args if a.is_input),
            weight_sizes=tuple(a for a in args if a.role == "scalar"),
            x_c_type=params[len(inputs)].c_type,
            bias_c_type=params[len(inputs) + 1].c_type if desc.bias else "",
            lane_regs={"avx512": 1, "avx2": 2}.get(isa, 0),
            micro_tiles=MICRO_TILES[isa], tile_rows_short=TILE_ROWS_SHORT,
            tile_rows_long=TILE_ROWS_LONG, long_m=LONG_M,
            helpers=tuple(sorted({h for h in (x_load, y_store, decode_load) if h})),
            decode_load=f"linear_{decode_load}" if decode_load else "",
            x_load=f"linear_{x_load}" if x_load else "",
            bias_load=f"linear_{x_load}" if x_load and desc.bias else "",
            y_store=f"linear_{y_store}" if y_store else "",
            headers=("avx512fintrin.h",) if isa == "avx512" else ())
        spec = own_loop_spec(desc, target, arch, storage, params, FORMULA, float_helpers=(),
                             template="linear", layout_knobs=knobs, load_float="")
        if target == "cuda":
            spec = dataclasses.replace(spec, cuda_float_headers=cuda_float_headers(knobs.helpers))
        # m, n and k are run-time arguments: the text names the kernel, not a problem
        return dataclasses.replace(spec, op=Op.LINEAR, descriptor=(
            f"LinearDescriptor(weight={view.decode.uri}, x_dtype={desc.x_dtype.value}, "
            f"y_dtype={desc.y_dtype.value}, bias={desc.bias}, transpose={desc.transpose})"))

    def array_shape(self, desc, param):
        if param.name == "x":
            return (desc.m, desc.n if desc.transpose else desc.k)
        if param.name == "bias":
            return (desc.n,)
        if param.name == "y":
            return (desc.m, desc.k if desc.transpose else desc.n)
        weight = desc.view.sized(desc.n, desc.k)
        return kind_of(weight).array_shape(weight, param)

    def launch_elements(self, desc) -> int:
        if desc.transpose:
            return desc.m * desc.k   # a thread an output
        return -(-desc.m // CUDA_M_TILE) * desc.n * LANES   # a half-warp a row of W and a tile of x

    def small_problem(self, desc, remake):
        # a K tail past the lanes where the format allows one, rows past a decode tile,
        # and x long enough for the long tile
        step = desc.view.k_multiple
        want = CHUNK_COLUMNS + 3 * LANES + 5 if desc.transpose else 3 * LANES + 5
        return remake(m=LONG_M + 2, n=2 * LANES + 3, k=step * max(1, -(-want // step)))

    def oracle(self, desc, arrays):
        if desc.compute == "int8":
            return linear_int8.oracle(desc, arrays)
        weight = desc.view.sized(desc.n, desc.k)
        y = np.empty((desc.n, desc.k), np.float32)
        w = kind_of(weight).oracle(weight, {**arrays, "y": y})
        w = np.asarray(w, np.float32).reshape(desc.n, desc.k)
        if desc.transpose:
            return reference.linear(arrays["x"], w.T, None, desc.y_dtype.np_dtype)
        bias = arrays.get("bias") if desc.bias else None
        return reference.linear(arrays["x"], w, bias, desc.y_dtype.np_dtype)

    def random_input(self, desc, name, shape, rng):
        weight = desc.view.sized(desc.n, desc.k)
        return kind_of(weight).random_input(weight, name, shape, rng)


LINEAR = register(LinearKind())
