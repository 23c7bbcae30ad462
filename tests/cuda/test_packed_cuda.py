"""Packed u4/s4 storage on the CUDA target, checked without a GPU.

* The schedule: VEC is even (a byte of q is never split between threads), the packed q
  vector is VEC / 2 bytes, and groups no even VEC divides read their scale and zero point
  element by element.
* NVRTC compiles packed dequantize and quantize for u4 and s4 without a warning.
* The emitted ``.cu`` text runs under host emulation (tests/cuda_emu) and equals
  dqgen.reference (applied to the unpacked values) bit for bit: both the aligned vector
  path and the element-by-element path, with fewer threads than vectors (grid-stride),
  even and odd group sizes, edge values, and a quantize output pre-filled with garbage so
  a byte not fully written (or a high nibble not cleared) cannot pass.
* The CUDA plan and the plain functions accept packed arrays (q as uint8 with axis / 2
  bytes a row), with the driver replaced by the emulator at its lowest edge.
"""

from __future__ import annotations

import math
import re
import shutil
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dqgen
from dqgen import reference
from dqgen.ir import (DequantizeFloatZeroDescriptor, DequantizePerGroupDescriptor, Op,
                      QuantizePerGroupDescriptor)
from dqgen.ir import Layout
from dqgen.render import render
from dqgen.runtime import cuda as rt
from tests import strategies as S
from tests.cuda_emu import kernels as K
from tests.oracles import checkpoints as oracle

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None,
                               reason="g++ is needed for the CUDA host emulation")

RANGES = {"u4": (0, 15), "s4": (-8, 7)}
EVEN_GROUPS = (2, 32, 128)
ODD_GROUPS = (3, 5)


def _descs():
    out = []
    for storage in RANGES:
        for f in ("f32", "f16", "bf16"):
            for g in EVEN_GROUPS + ODD_GROUPS:
                out += [DequantizePerGroupDescriptor(0, 0, g, f, storage),
                        QuantizePerGroupDescriptor(0, 0, g, f, storage)]
    out += [DequantizePerGroupDescriptor(0, 0, 32, "f64", "u4"),
            QuantizePerGroupDescriptor(0, 0, 32, "f64", "u4"),
            DequantizePerGroupDescriptor(0, 0, 3, "f64", "s4"),
            QuantizePerGroupDescriptor(0, 0, 3, "f64", "s4"),
            DequantizeFloatZeroDescriptor(0, 0, 32, "bf16", "u4"),
            DequantizeFloatZeroDescriptor(0, 0, 5, "f32", "s4")]
    return out


SPECS = [K.spec_of(d) for d in _descs()]
SPEC_BY_URI = {s.uri: s for s in SPECS}
assert len(SPEC_BY_URI) == len(SPECS)


def _storage(spec) -> str:
    return spec.int_dtype.value


# -------------------------------------------------------------------------- schedule

def test_schedule_keeps_bytes_whole():
    def spec(cls, f, i, g):
        return K.spec_of(cls(0, 0, g, f, i))

    dq, qu = DequantizePerGroupDescriptor, QuantizePerGroupDescriptor
    s = spec(dq, "f16", "s4", 128)
    assert (s.vector_elems, s.group_per_element, s.layout) == (8, False, Layout.PACKED4)
    assert [(v.name, v.vector_bytes, v.align_bytes) for v in s.vector_streams] == [
        ("q", 4, 4), ("y", 16, 16)]
    s = spec(qu, "f32", "u4", 32)
    assert (s.vector_elems, s.group_per_element) == (4, False)
    assert [(v.name, v.vector_bytes, v.align_bytes) for v in s.vector_streams] == [
        ("x", 16, 16), ("q", 2, 2)]
    assert spec(dq, "f64", "u4", 32).vector_streams[0].vector_bytes == 1
    # Halved until it divides the group, never below 2; odd groups: per element.
    assert [(spec(dq, "bf16", "u4", g).vector_elems, spec(dq, "bf16", "u4", g).group_per_element)
            for g in (2, 6, 12, 3, 5, 1)] == [
        (2, False), (2, False), (4, False), (2, True), (2, True), (2, True)]
    # Non-packed kernels keep their schedule (VEC 1 for an odd group, one group a vector).
    s8 = spec(dq, "f16", "s8", 3)
    assert (s8.vector_elems, s8.group_per_element) == (1, False)
    assert not any(s.group_per_element for s in (spec(qu, "f32", "u8", 5), spec(dq, "f32", "s8", 32)))


def test_packed_text_reads_nibbles_and_writes_whole_bytes():
    """The vector of q is VEC / 2 bytes at byte e0 / 2; quantize clears the high nibble on
    the even element; odd groups look up the group per element."""
    text = render(SPEC_BY_URI["quant_pg_s4_f16_g32"]).text
    assert "struct __align__(4) vec_q { uint8_t v[VEC / 2]; };" in text
    assert "reinterpret_cast<vec_q *>(q + e0 / 2) = q_r;" in text
    assert "if (((k) & 1) == 0) q_r.v[(k) >> 1] = (uint8_t)((uint32_t)((int32_t)v) & 15u);" in text
    assert "q[e0 / 2 + k] = q_r.v[k];" in text and "for (int k = 0; k < VEC / 2; ++k)" in text
    odd = render(SPEC_BY_URI["dequant_pg_u4_f32_g3"]).text
    assert "(uint64_t)(e0 + k) / (uint64_t)GROUP_SIZE" in odd
    assert "static_assert(VEC == 2" in odd and "GROUP_SIZE % VEC" not in odd
    assert "q_r.v[(k) >> 1] >> (((k) & 1) * 4)) & 15" in odd


# ----------------------------------------------------------------------------- NVRTC

def _nvrtc():
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed (pip install 'dqgen[cuda]')")
    return nvrtc


def test_nvrtc_compiles_packed_kernels():
    """Every packed kernel of the emulated set in one program (the large CUDA headers are
    parsed once): no warning, every entry present, no FMA, no flush-to-zero."""
    nvrtc = _nvrtc()
    art = nvrtc.compile_cuda(K.combined_source(SPECS), name="packed_sm_90", arch="sm_90")
    assert art.log == "", art.log
    ptx = art.ptx.decode()
    for s in SPECS:
        assert f".entry {s.entry}(" in ptx, s.entry
        assert f".text.{s.entry}\0".encode() in art.cubin, s.entry
    ops = {line.split()[0] for line in ptx.splitlines() if line.strip()[:1].isalpha()}
    assert not any(o.startswith("fma") for o in ops), "FMA contraction"
    assert not any(".ftz" in o or ".approx" in o for o in ops), "flush-to-zero or approx"


def test_nvrtc_wide_path_moves_128_bits_of_the_float_array():
    """f16 dequantize (VEC 8): y moves in 128-bit stores, q in one 32-bit load a vector."""
    nvrtc = _nvrtc()
    spec = SPEC_BY_URI["dequant_pg_s4_f16_g128"]
    ptx = nvrtc.compile_cuda(render(spec).text, name=spec.uri, arch="sm_90").ptx.decode()
    assert re.search(r"st\.global\.v4\.(b|u)32", ptx), "no 128-bit store of y"
    assert re.search(r"ld\.global\.nc\.(b|u)32", ptx), "no 32-bit load of q"


# -------------------------------------------------------------------- host emulation

@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed for the CUDA host emulation")
    libs = K.build_emulation(SPECS, tmp_path_factory.mktemp("packed-emu"))
    return K.load_emulation(libs, SPECS)


def _placed(arr: np.ndarray, shift: bool) -> np.ndarray:
    """A guarded copy of ``arr``: unshifted it ends against an unmapped page and starts as
    aligned as its size allows (every size here is a whole number of vectors); shifted it
    starts one element (one byte of packed q) earlier."""
    if not shift or arr.size == 0:
        return S.guarded(arr)
    flat = S.guarded_empty((arr.size + 1,), arr.dtype)
    view = flat[:-1].reshape(arr.shape)
    view[...] = arr
    return view


GARBAGE = 0xAB
SLACK = 32


def _output(shape, dtype, shift: bool) -> tuple[np.ndarray, np.ndarray]:
    """(output view, the whole buffer): filled with garbage, SLACK bytes on each side that
    must stay garbage; the view starts 64-byte aligned, or one element after that."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.full(nbytes + 2 * SLACK + 64 + dtype.itemsize, GARBAGE, np.uint8)
    start = (-K.address(buf)) % 64 + SLACK + (dtype.itemsize if shift else 0)
    view = buf[start:start + nbytes].view(dtype).reshape(shape)
    return view, buf[start - SLACK:start + nbytes + SLACK]


def _expected(spec, inputs, values, q_range):
    """The oracle on unpacked values: reference.* (or the float-zero oracle); quantize's
    result is packed again, so the comparison is of whole bytes."""
    gs = spec.group_size
    if spec.op is Op.QUANTIZE:
        q = reference.quantize_per_group(inputs["x"], inputs["scale"], inputs["zero_point"],
                                         gs, np.int64, *q_range)
        return oracle.pack_int4(q)
    if spec.zero_kind == "float":
        lo, hi = RANGES[_storage(spec)]
        return oracle.float_zero_dequantize(values, inputs["scale"], inputs["zero_point"], gs,
                                            lo, hi, inputs["scale"].dtype)
    return reference.dequantize_per_group(values, inputs["scale"], inputs["zero_point"], gs)


def _check(fn, spec, inputs, values, q_range, outer, axis, grid, block, shifts):
    expected = _expected(spec, inputs, values, q_range)
    arrays = {name: _placed(np.ascontiguousarray(a), shifts.get(name, False))
              for name, a in inputs.items()}
    out_shape = (outer, axis // 2) if spec.op is Op.QUANTIZE else (outer, axis)
    out, whole = _output(out_shape, expected.dtype, shifts.get(spec.out_name, False))
    arrays[spec.out_name] = out
    if outer * axis:  # the placement selects the path the test means to take
        wide = all(K.address(arrays[v.name]) % v.align_bytes == 0 for v in spec.vector_streams)
        assert wide == (not any(shifts.get(v.name) and v.align_bytes > arrays[v.name].itemsize
                                for v in spec.vector_streams)), shifts
    K.run_emulated(fn, spec, arrays, outer, axis, q_range, grid, block)
    what = f"{spec.uri} {outer}x{axis} grid={grid} block={block} shifts={shifts}"
    if spec.op is Op.QUANTIZE:
        assert out.tobytes() == expected.tobytes(), (
            what, np.argwhere(out != expected)[:5].tolist(), out[out != expected][:5],
            expected[out != expected][:5])
    else:
        S.assert_same_bits(out, expected, what)
    before, after = whole[:SLACK], whole[SLACK + out.nbytes:]
    assert (before == GARBAGE).all() and (after == GARBAGE).all(), f"{what}: wrote outside"


def _fixed_problem(spec, outer, axis, rng):
    """Edge values everywhere: zero, subnormal, huge, NaN and Inf scales; int32-extreme
    zero points (dequantize); NaN, Inf and ties in x (quantize)."""
    gs, f = spec.group_size, spec.float_dtype.value
    fd = S.np_dtype(f)
    gshape = (outer, axis // gs)
    lo, hi = RANGES[_storage(spec)]
    pool = np.array(S.scale_pool(f), dtype=np.float64)
    with np.errstate(all="ignore"):
        scale = (rng.uniform(0.05, 3, gshape) * rng.choice([-1, 1], gshape)).astype(fd)
        scale.flat[: min(len(pool), scale.size)] = pool[: scale.size].astype(fd)
    if spec.op is Op.QUANTIZE:
        scale.flat[len(pool):] = np.abs(scale.flat[len(pool):])
        zp = rng.integers(-3, 4, gshape).astype(np.int32)
        zp.flat[:2] = [2**31 - 1, -2**31][: zp.size]
        q_range = (lo, hi) if rng.random() < 0.5 else (lo + 1, hi - 2)
        t = rng.uniform(lo - 4, hi + 4, (outer, axis))
        t = np.where(rng.random((outer, axis)) < 0.3, np.floor(t) + 0.5, t)
        with np.errstate(all="ignore"):
            x = (t * np.repeat(scale.astype(np.float64), gs, axis=1)).astype(fd)
        x.flat[::7] = np.resize(np.array(S.float_specials(f)).astype(fd), x.flat[::7].size)
        return {"x": x, "scale": scale, "zero_point": zp}, None, q_range
    values = rng.integers(lo, hi + 1, (outer, axis))
    values.flat[:2] = [lo, hi][: values.size]
    if spec.zero_kind == "float":
        zero = (rng.standard_normal(gshape) * 2).astype(fd)
        zero.flat[:3] = np.array([np.inf, np.nan, -0.0])[: zero.size].astype(fd)
    else:
        zero = rng.integers(-20, 30, gshape).astype(np.int32)
        zero.flat[:4] = [-2**31, 2**31 - 1, -2**24 - 1, lo][: zero.size]
    return {"q": oracle.pack_int4(values), "scale": scale, "zero_point": zero}, values, None


@needs_gxx
@pytest.mark.parametrize("uri", list(SPEC_BY_URI))
def test_emulated_packed_both_paths(emulated, uri):
    """Each kernel aligned (vector path) and with every array one element off (element
    path), at the runtime's launch shape for a small GPU (every thread strides), and with
    a grid of one block of 7 threads."""
    spec = SPEC_BY_URI[uri]
    gs = spec.group_size
    outer, axis = 9, 2 * gs * max(1, 40 // gs)  # 9 rows: a multiple of no block or grid
    inputs, values, q_range = _fixed_problem(spec, outer, axis, np.random.default_rng(gs))
    names = [p.name for p in spec.params if p.role != "scalar"]
    for shift in (False, True):
        grid = rt.launch_grid(spec, outer * axis, 1)
        _check(emulated[spec.entry], spec, inputs, values, q_range, outer, axis, grid,
               spec.threads_per_block, {n: shift for n in names})
    _check(emulated[spec.entry], spec, inputs, values, q_range, outer, axis, 1, 7,
           {n: n == spec.out_name for n in names})


@needs_gxx
def test_emulated_quantize_clears_every_high_nibble(emulated):
    """Every value 0: the right output is all zero bytes, so any byte left with garbage
    (0xAB) in either nibble, or an OR into an uncleared byte, is caught."""
    for uri in ("quant_pg_u4_f32_g32", "quant_pg_s4_bf16_g5", "quant_pg_s4_f64_g3"):
        spec = SPEC_BY_URI[uri]
        outer, axis = 3, 2 * spec.group_size * 3
        f = spec.float_dtype.np_dtype
        inputs = {"x": np.zeros((outer, axis), f), "scale": np.ones((outer, 6), f),
                  "zero_point": np.zeros((outer, 6), np.int32)}
        for shift in (False, True):
            out, _ = _output((outer, axis // 2), np.uint8, shift)
            K.run_emulated(emulated[spec.entry], spec, {**inputs, "q": out}, outer, axis,
                           RANGES[_storage(spec)], 2, 5)
            assert not out.any(), (uri, shift, out)


@st.composite
def _packed_problem(draw, spec):
    gs, f = spec.group_size, spec.float_dtype.value
    outer = draw(st.integers(0, 5), "outer")
    axis = 2 * gs * draw(st.integers(1, 3), "pairs of groups")
    gshape = (outer, axis // gs)
    storage = _storage(spec)
    lo, hi = RANGES[storage]
    if draw(st.booleans(), "tie scales") and spec.op is Op.QUANTIZE:
        scale = draw(S.tie_scales(f, gshape), "scale")
    else:
        scale = draw(S.scales(f, gshape), "scale")
    if spec.op is Op.QUANTIZE:
        pair = draw(st.sampled_from([(lo, hi), (lo, lo), (hi, hi)])
                    | st.tuples(st.integers(lo, hi), st.integers(lo, hi)), "q_range")
        q_range = (min(pair), max(pair))
        zp = draw(S.zero_points(gshape, None), "zero_point")
        x = draw(S.quantize_inputs(f, scale, zp, gs, q_range), "x")
        return outer, axis, {"x": x, "scale": scale, "zero_point": zp}, None, q_range
    rng = draw(S.seeds(), "values")
    values = rng.integers(lo, hi + 1, (outer, axis))
    if spec.zero_kind == "float":
        zero = draw(S.float_values(f, gshape), "zero_point")
    else:
        zero = draw(S.zero_points(gshape, None), "zero_point")
    return outer, axis, {"q": oracle.pack_int4(values), "scale": scale, "zero_point": zero}, \
        values, None


@needs_gxx
@given(data=st.data())
def test_emulated_packed_matches_reference(emulated, data):
    """Any kernel, shape, values (extreme scales, NaN, Inf, int32 zero points), launch
    shape and placement of each array."""
    spec = SPEC_BY_URI[data.draw(st.sampled_from(sorted(SPEC_BY_URI)), "kernel")]
    outer, axis, inputs, values, q_range = data.draw(_packed_problem(spec))
    block = data.draw(st.sampled_from((256, 64, 7, 1)), "block")
    vectors = -(-outer * axis // spec.vector_elems)
    grid = data.draw(st.sampled_from((1, 2, 3, max(1, -(-vectors // block)))), "grid")
    names = [p.name for p in spec.params if p.role != "scalar"]
    shifts = {n: data.draw(st.booleans(), f"shift {n}") for n in names}
    with np.errstate(all="ignore"):
        _check(emulated[spec.entry], spec, inputs, values, q_range, outer, axis, grid, block,
               shifts)


# ----------------------------------------------------------- plans and plain functions

class CaiArray:
    """Host memory presented as a CUDA array through ``__cuda_array_interface__``."""

    def __init__(self, arr: np.ndarray, device: int = 0):
        self.arr = arr
        self.device = types.SimpleNamespace(id=device)
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    @property
    def __cuda_array_interface__(self):
        a = self.arr
        return {"data": (K.address(a), False), "shape": a.shape, "typestr": a.dtype.str,
                "version": 3, "strides": None}


class _EmulatedModule:
    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def launch(self, func, grid, block, args, stream=0, shared_mem=0):
        self.launches.append((func, grid, block))
        self.fn(grid, block, *[value for _, value in args])


@pytest.fixture
def launches(emulated, monkeypatch):
    """cuda:0 pretends to be an sm_90 whose launches run the emulated kernels."""
    _nvrtc()
    record: list = []
    monkeypatch.setattr(rt, "device_arch", lambda ordinal=0: "sm_90")
    monkeypatch.setattr(dqgen.plans, "_plan_memo", {})

    def loaded(self, device):
        return _EmulatedModule(emulated[self.spec.entry], record), self.spec.entry, 2

    monkeypatch.setattr(rt.CudaKernel, "_loaded", loaded)
    return record


def test_cuda_plan_takes_packed_arrays(launches):
    rng = np.random.default_rng(11)
    desc = DequantizePerGroupDescriptor(4, 192, 32, "f16", "s4")
    plan = dqgen.DequantizePerGroupPlan.select(desc, device="cuda")
    values = rng.integers(-8, 8, (4, 192))
    q = oracle.pack_int4(values)
    scale = rng.uniform(0.1, 2, (4, 6)).astype(np.float16)
    zp = rng.integers(-3, 4, (4, 6)).astype(np.int32)
    y = np.full((4, 192), np.nan, np.float16)
    args = dqgen.DequantizePerGroupArgs(CaiArray(q), CaiArray(scale), CaiArray(zp), CaiArray(y))
    plan.can_implement(args)
    plan.run(args)
    assert launches == [(plan._kernel.spec.entry, rt.launch_grid(plan._kernel.spec, 4 * 192, 2),
                         256)]
    S.assert_same_bits(y, reference.dequantize_per_group(values, scale, zp, 32))
    # q is [outer, axis / 2] uint8, exactly as on the CPU.
    for bad, message in ((np.zeros((4, 192), np.uint8), r"input has shape \(4, 192\), expected \(4, 96\)"),
                         (q.view(np.int8), "input has dtype int8, expected uint8")):
        with pytest.raises(dqgen.InvalidProblemError, match=message):
            plan.can_implement(dqgen.DequantizePerGroupArgs(CaiArray(bad), *list(args.__dict__.values())[1:]))

    qdesc = QuantizePerGroupDescriptor(3, 30, 5, "f32", "u4")
    qplan = dqgen.QuantizePerGroupPlan.select(qdesc, device="cuda")
    x = (rng.standard_normal((3, 30)) * 4).astype(np.float32)
    scale = rng.uniform(0.2, 1, (3, 6)).astype(np.float32)
    zp = rng.integers(5, 10, (3, 6)).astype(np.int32)
    out = np.full((3, 15), GARBAGE, np.uint8)
    qplan.run(dqgen.QuantizePerGroupArgs(CaiArray(x), CaiArray(scale), CaiArray(zp), CaiArray(out)))
    want = reference.quantize_per_group(x, scale, zp, 5, np.int64, 0, 15)
    assert out.tobytes() == oracle.pack_int4(want).tobytes()


def test_plain_functions_take_packed_cuda_arrays(launches):
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((2, 3, 64)) * 3).astype(np.float32)
    scale = rng.uniform(0.3, 1, (2, 3, 2)).astype(np.float32)
    zp = np.zeros((2, 3, 2), np.int32)
    # Leading dims of the inputs flatten; out is given as [rows, last axis] (a generic
    # CUDA array is not reshaped, see test_cuda_plans).
    q = np.full((6, 32), GARBAGE, np.uint8)
    got = dqgen.quantize_per_group(CaiArray(x), CaiArray(scale), CaiArray(zp), 32, dtype="s4",
                                   out=CaiArray(q))
    assert got.arr is q
    values = reference.quantize_per_group(x.reshape(6, 64), scale.reshape(6, 2),
                                          zp.reshape(6, 2), 32, np.int64, -8, 7)
    assert q.tobytes() == oracle.pack_int4(values).tobytes()
    y = np.zeros((6, 64), np.float32)
    dqgen.dequantize_per_group(CaiArray(q.reshape(2, 3, 32)), CaiArray(scale), CaiArray(zp), 32,
                               int_dtype="s4", out=CaiArray(y))
    S.assert_same_bits(y, reference.dequantize_per_group(
        values, scale.reshape(6, 2), zp.reshape(6, 2), 32))
    assert [entry for entry, _, _ in launches] == ["dqgen_quant_pg_s4_f32_g32",
                                                   "dqgen_dequant_pg_s4_f32_g32"]
