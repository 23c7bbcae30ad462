"""Generated CUDA kernels, checked without a GPU.

* NVRTC builds the kernels: cubin for sm_90 one by one through the cache path a plan
  uses, sm_80 and compute_90 in one program per arch; the PTX is inspected for the
  design's promises (128-bit accesses, no FMA, no flush-to-zero, no shared memory).
* The emitted ``.cu`` text runs under host emulation (tests/cuda_emu: g++ with a shim
  header, every block and thread in turn) and must equal dqgen.reference bit for bit:
  every kernel of the default set plus group sizes that force narrower vectors or the
  scalar fallback, over shapes, grids and block sizes drawn by hypothesis, with arrays
  that end against an unmapped page and start aligned or one element off (the
  element-by-element path). One AddressSanitizer run in a subprocess re-checks a
  representative subset with exactly sized heap arrays.
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dqgen import reference
from dqgen.ir import Op
from dqgen.runtime import cuda as rt
from tests import strategies as S
from tests.cuda_emu import emu
from tests.cuda_emu import kernels as K

ROOT = Path(__file__).resolve().parents[2]
HAS_GXX = shutil.which("g++") is not None
needs_gxx = pytest.mark.skipif(not HAS_GXX, reason="g++ is needed for the CUDA host emulation")

EMULATION_SPECS = [K.spec_of(d) for d in K.EMULATION_SET]
SPEC_BY_URI = {s.uri: s for s in EMULATION_SPECS}
G128 = [d for d in K.DEFAULT_SET if d.group_size == 128]
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _nvrtc():
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed (pip install 'dqgen[cuda]')")
    return nvrtc


# ------------------------------------------------------------------------ NVRTC builds

def _build_all(descs, arch):
    """Build ``descs`` for ``arch`` through the JIT's cache path, two at a time."""
    from dqgen.jit import build_cuda_kernel
    from dqgen.render import render

    def one(desc):
        spec = K.spec_of(desc, arch)
        return build_cuda_kernel(spec, render(spec))

    with futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, descs))


# sm_90 builds each kernel alone through the JIT's cache path: every g128 kernel and a
# sample of the other group sizes (they differ only in a constant). sm_80 and compute_90
# build the same texts together in one NVRTC program each (see combined_source), which
# checks every g128 kernel's code generation for those archs in one compile.
SM90_SET = G128 + [d for d in K.DEFAULT_SET if d.group_size != 128][::12] + K.EXTRA_SET[::8]


def test_nvrtc_builds_every_kernel_for_sm_90():
    _nvrtc()
    kernels = _build_all(SM90_SET, "sm_90")
    assert len({k.key for k in kernels}) == len(SM90_SET)
    for k in kernels:
        cubin, ptx = k.runner.asm["cubin"], k.runner.asm["ptx"]
        assert k.spec.arch == "sm_90" and cubin[:4] == b"\x7fELF" and len(cubin) > 1000
        assert k.runner.image == cubin
        assert f".entry {k.spec.entry}(" in ptx and ".target sm_90" in ptx
        assert sorted(p.name for p in k.entry_dir.iterdir()) == [
            "kernel.cu", "kernel.cubin", "kernel.ptx", "meta.json"]
        assert (k.entry_dir / "kernel.cu").read_text() == k.source.text


@pytest.mark.parametrize("arch", ["sm_80", "compute_90"])
def test_nvrtc_builds_every_g128_kernel_for_other_archs(arch):
    nvrtc = _nvrtc()
    specs = [K.spec_of(d, arch) for d in G128]
    art = nvrtc.compile_cuda(K.combined_source(specs), name=f"all_{arch}", arch=arch)
    assert art.log == "", art.log  # not even a warning
    ptx = art.ptx.decode()
    assert f".target {arch.replace('compute', 'sm')}" in ptx
    for s in specs:
        assert f".entry {s.entry}(" in ptx
        if arch.startswith("sm_"):
            assert f".text.{s.entry}\0".encode() in art.cubin, s.entry  # its code section
    assert (art.cubin is None) == arch.startswith("compute_")


def test_nvrtc_builds_ptx_for_a_virtual_arch_through_the_cache():
    _nvrtc()
    for k in _build_all(G128[::8], "compute_90"):
        assert "cubin" not in k.runner.asm and k.runner.image.startswith(b"//")
        assert f".entry {k.spec.entry}(" in k.runner.asm["ptx"]
        assert sorted(p.name for p in k.entry_dir.iterdir()) == [
            "kernel.cu", "kernel.ptx", "meta.json"]


def _instructions(ptx: str) -> set[str]:
    out = set()
    for line in ptx.splitlines():
        word = line.strip().lstrip("{").strip().split(" ")[0].split("\t")[0]
        if word and word[0].isalpha():
            out.add(word)
    return out


@pytest.mark.parametrize("desc", G128[::2], ids=lambda d: d.uri)
def test_ptx_keeps_the_design_promises(desc):
    """The widest per-element array moves in 128-bit accesses on the aligned path (so a
    warp's accesses to it are contiguous), no FMA, no flush-to-zero, no approximate
    division, no shared memory, and 64-bit element indices."""
    _nvrtc()
    (k,) = _build_all([desc], "sm_90")
    ptx = k.runner.asm["ptx"]
    ops = _instructions(ptx)
    wide = re.compile(r"\.(v4\.[buf]32|v2\.[buf]64)$")  # 128 bits an access
    streams = K.spec_of(desc).vector_streams
    widest = max(streams, key=lambda v: v.vector_bytes)
    access = "ld.global.nc." if widest.role == "in" else "st.global."
    assert widest.vector_bytes == 16, streams
    assert any(o.startswith(access) and wide.search(o) for o in ops), sorted(ops)
    assert not any(o.startswith("fma") for o in ops), "FMA contraction"
    assert not any(".ftz" in o or ".approx" in o for o in ops), "flush-to-zero or approx"
    assert ".shared" not in ptx and "bar.sync" not in ptx
    assert "setp.lt.s64" in ops or "setp.ge.s64" in ops  # the loop bounds are 64-bit


def test_schedule_decides_vector_width_and_launch_shape():
    """VEC fills 128 bits of the widest per-element array and divides the group."""
    def spec(op, i, f, g):
        return K.spec_of(K.descriptor(op, i, f, g))

    s = spec("dequant", "s8", "f32", 128)
    assert (s.vector_elems, s.threads_per_block, s.grid_waves) == (4, 256, 4)
    assert [(v.name, v.vector_bytes, v.align_bytes) for v in s.vector_streams] == [
        ("q", 4, 4), ("y", 16, 16)]
    assert spec("dequant_bwd", None, "f64", 128).vector_elems == 2
    assert spec("quant_bwd", None, "bf16", 64).vector_elems == 8
    assert spec("dequant", "u8", "f16", 12).vector_elems == 4
    narrow = spec("dequant", "s8", "f16", 3)
    assert narrow.vector_elems == 1 and not narrow.vector_align_check
    assert spec("quant", "s8", "f32", 8).vector_align_check
    # The grid: one thread a vector, at most grid_waves waves of resident blocks, >= 1.
    assert rt.launch_grid(s, 0, 132 * 8) == 1
    assert rt.launch_grid(s, 4 * 256 * 3, 132 * 8) == 3
    assert rt.launch_grid(s, 4 * 256 * 3 + 1, 132 * 8) == 4
    assert rt.launch_grid(s, 1 << 40, 132 * 8) == 132 * 8 * 4


# ------------------------------------------------------------------- host emulation

@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """entry -> emulated kernel, for every kernel of EMULATION_SET (two g++ in parallel)."""
    if not HAS_GXX:
        pytest.skip("g++ is needed for the CUDA host emulation")
    libs = K.build_emulation(EMULATION_SPECS, tmp_path_factory.mktemp("cuda-emu"))
    return K.load_emulation(libs, EMULATION_SPECS)


def _placed(arr: np.ndarray, shift: bool) -> np.ndarray:
    """A guarded copy of ``arr``. Unshifted, it ends against the unmapped page (a read or
    write past the end faults) and starts 16-byte aligned whenever its size allows.
    Shifted, it starts one element before that (off any 16-byte boundary, so only the
    element-by-element path may run) and ends one element before the page; that slack
    element is checked by ``_slack_intact``."""
    if not shift or arr.size == 0:
        return S.guarded(arr)
    flat = S.guarded_empty((arr.size + 1,), arr.dtype)
    view = flat[:-1].reshape(arr.shape)
    view[...] = arr
    return view


def _slack_intact(arr: np.ndarray) -> bool:
    """The bytes between a shifted array's end and its guard page are still canary."""
    end = arr.__array_interface__["data"][0] + arr.nbytes
    slack = (-end) % S.PAGE
    return slack == 0 or (np.ctypeslib.as_array(
        (np.ctypeslib.ctypes.c_uint8 * slack).from_address(end)) == S.CANARY).all()


def _problem(data, spec, outer: int, axis: int):
    """Inputs (by kernel parameter name), output dtype, q range and expected result."""
    gs, f = spec.group_size, spec.float_dtype.value
    gshape = (outer, axis // gs)
    if spec.op is Op.DEQUANTIZE:
        i = spec.int_dtype.value
        q = data.draw(S.int_values(i, (outer, axis)), "q")
        scale = data.draw(S.scales(f, gshape), "scale")
        zp = data.draw(S.zero_points(gshape, i), "zero_point")
        return ({"q": q, "scale": scale, "zero_point": zp}, S.np_dtype(f), None,
                reference.dequantize_per_group(q, scale, zp, gs))
    if spec.op is Op.DEQUANTIZE_BACKWARD:
        dy = data.draw(S.float_values(f, (outer, axis)), "dy")
        scale = data.draw(S.scales(f, gshape), "scale")
        return ({"d_output": dy, "scale": scale}, S.np_dtype(f), None,
                reference.dequantize_per_group_backward(dy, scale, gs))
    i = spec.int_dtype.value if spec.op is Op.QUANTIZE else data.draw(
        st.sampled_from(S.INT_NAMES), "storage")
    q_range = data.draw(S.q_ranges(i), "q_range")
    if data.draw(st.booleans(), "tie scales"):
        scale = data.draw(S.tie_scales(f, gshape), "scale")
    else:
        scale = data.draw(S.scales(f, gshape), "scale")
    zp = data.draw(S.zero_points(gshape, i), "zero_point")
    x = data.draw(S.quantize_inputs(f, scale, zp, gs, q_range), "x")
    if spec.op is Op.QUANTIZE:
        return ({"x": x, "scale": scale, "zero_point": zp}, S.np_dtype(i), q_range,
                reference.quantize_per_group(x, scale, zp, gs, S.np_dtype(i), *q_range))
    dy = data.draw(S.float_values(f, (outer, axis)), "dy")
    return ({"d_output": dy, "x": x, "scale": scale, "zero_point": zp}, S.np_dtype(f),
            q_range, reference.quantize_per_group_backward(dy, x, scale, zp, gs, *q_range))


def _check(fn, spec, inputs, out_dtype, q_range, expected, outer, axis, grid, block, shifts):
    arrays = {name: _placed(np.ascontiguousarray(a), shifts.get(name, False))
              for name, a in inputs.items()}
    # Uninitialised output (canary bytes): an element the kernel skips cannot pass.
    out = S.guarded_empty((outer * axis + 1,), out_dtype)
    out = (out[:-1] if shifts.get(spec.out_name) else out[1:]).reshape(outer, axis)
    arrays[spec.out_name] = out
    if outer * axis:  # the placement gives the path the test means to take
        for v in spec.vector_streams:
            arr = arrays[v.name]
            aligned = K.address(arr) % v.align_bytes == 0
            assert aligned != bool(shifts.get(v.name)) or v.align_bytes == arr.itemsize, v
    K.run_emulated(fn, spec, arrays, outer, axis, q_range, grid, block)
    S.assert_same_bits(out, expected, f"{spec.uri} grid={grid} block={block} shifts={shifts}")
    assert S.canary_intact(out) and _slack_intact(out)


@needs_gxx
@pytest.mark.parametrize("uri", list(SPEC_BY_URI))
@S.examples(0.25)
@given(data=st.data())
def test_emulated_kernel_matches_reference(emulated, uri, data):
    spec = SPEC_BY_URI[uri]
    outer, axis, gs = data.draw(S.shapes(group_sizes=(spec.group_size,)), "shape")
    inputs, out_dtype, q_range, expected = _problem(data, spec, outer, axis)
    block = data.draw(st.sampled_from((256, 64, 7, 1)), "block")
    # A few blocks (every thread strides many times) up to one thread a vector.
    vectors = -(-outer * axis // spec.vector_elems)
    grid = data.draw(st.sampled_from((1, 2, 3, max(1, -(-vectors // block)))), "grid")
    names = [p.name for p in spec.params if p.role != "scalar"]
    shifts = {n: data.draw(st.booleans(), f"shift {n}") for n in names}
    _check(emulated[spec.entry], spec, inputs, out_dtype, q_range, expected, outer, axis,
           grid, block, shifts)


def _fixed_problem(spec, outer: int, axis: int, seed: int = 0):
    """A deterministic problem with edge values (NaN, Inf, zero and subnormal scales,
    int32-extreme zero points), for the same checks as ``_problem``."""
    with np.errstate(all="ignore"):  # the reference's overflow to Inf is intended
        return _fixed_problem_values(spec, outer, axis, np.random.default_rng(seed))


def _fixed_problem_values(spec, outer, axis, rng):
    gs, f = spec.group_size, spec.float_dtype.value
    fd = S.np_dtype(f)
    gshape = (outer, axis // gs)
    pool = np.array(S.scale_pool(f), dtype=np.float64)
    scale = (rng.uniform(0.01, 4, gshape) * rng.choice([-1, 1], gshape)).astype(fd)
    scale.flat[: len(pool)] = pool[: scale.size].astype(fd)
    zp = rng.integers(-5, 260, gshape).astype(np.int32)
    zp.flat[:4] = [-2**31, 2**31 - 1, -2**24 - 1, 0][: zp.size]
    x = (rng.standard_normal((outer, axis)) * 150).astype(fd)
    x.flat[::97] = np.resize(np.array(S.float_specials(f)).astype(fd), x.flat[::97].size)
    if spec.op is Op.DEQUANTIZE:
        i = spec.int_dtype
        q = rng.integers(*i.int_range, (outer, axis), endpoint=True).astype(i.np_dtype)
        return ({"q": q, "scale": scale, "zero_point": zp}, fd, None,
                reference.dequantize_per_group(q, scale, zp, gs))
    if spec.op is Op.DEQUANTIZE_BACKWARD:
        return ({"d_output": x, "scale": scale}, fd, None,
                reference.dequantize_per_group_backward(x, scale, gs))
    q_range = (-100, 120)
    if spec.op is Op.QUANTIZE:
        i = spec.int_dtype
        q_range = (i.int_range[0] + 3, i.int_range[1] - 3)
        return ({"x": x, "scale": scale, "zero_point": zp}, i.np_dtype, q_range,
                reference.quantize_per_group(x, scale, zp, gs, i.np_dtype, *q_range))
    dy = (rng.standard_normal((outer, axis))).astype(fd)
    return ({"d_output": dy, "x": x, "scale": scale, "zero_point": zp}, fd, q_range,
            reference.quantize_per_group_backward(dy, x, scale, zp, gs, *q_range))


@needs_gxx
@pytest.mark.parametrize("uri", list(SPEC_BY_URI))
def test_emulated_kernel_both_paths_at_the_runtime_launch_shape(emulated, uri):
    """Each kernel once aligned (vector path) and once with every array one element off,
    at the launch shape the runtime picks for a small GPU (2 resident blocks: every thread
    strides several times)."""
    spec = SPEC_BY_URI[uri]
    outer, axis = 37, 3 * spec.group_size  # 111 groups: a multiple of no block or grid
    grid = rt.launch_grid(spec, outer * axis, 2)
    inputs, out_dtype, q_range, expected = _fixed_problem(spec, outer, axis)
    names = [p.name for p in spec.params if p.role != "scalar"]
    for shift in (False, True):
        _check(emulated[spec.entry], spec, inputs, out_dtype, q_range, expected, outer,
               axis, grid, spec.threads_per_block, {nm: shift for nm in names})


# ---------------------------------------------------------------- AddressSanitizer

ASAN_SET = ([d for d in G128 if getattr(d, "int_dtype", None) is None or d.int_dtype.value == "s8"]
            + K.EXTRA_SET[::4])

ASAN_SCRIPT = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from dqgen import reference
    from dqgen.ir import Op
    from cuda_emu import kernels as K

    uris = sys.argv[2].split(",")
    specs = [s for s in (K.spec_of(d) for d in K.EMULATION_SET) if s.uri in uris]
    fns = K.load_emulation([sys.argv[1]], specs)
    rng = np.random.default_rng(5)
    checked = 0
    for spec in specs:
        f = spec.float_dtype.np_dtype
        for outer, groups, shift in ((3, 2, 0), (1, 1, 1), (2, 5, 1), (0, 1, 0)):
            gs = spec.group_size
            axis = groups * gs
            n = outer * axis

            def exact(values, dtype):
                # Exactly the array's bytes on the heap (shifted: one element more, in
                # front), so ASan's redzone starts where the array ends.
                buf = np.empty(values.size + shift, dtype)
                view = buf[shift:].reshape(values.shape)
                view[...] = values
                return view

            gshape = (outer, groups)
            scale = exact(rng.uniform(0.5, 2, gshape).astype(f), f)
            zp = exact(rng.integers(-3, 4, gshape).astype(np.int32), np.int32)
            x = exact((rng.standard_normal((outer, axis)) * 40).astype(f), f)
            q_min, q_max = -128, 127
            if spec.op is Op.DEQUANTIZE:
                qd = spec.int_dtype.np_dtype
                q = exact(rng.integers(0, 100, (outer, axis)).astype(qd), qd)
                arrays = {"q": q, "scale": scale, "zero_point": zp}
                want = reference.dequantize_per_group(q, scale, zp, gs)
            elif spec.op is Op.QUANTIZE:
                qd = spec.int_dtype.np_dtype
                q_min, q_max = spec.int_dtype.int_range
                arrays = {"x": x, "scale": scale, "zero_point": zp}
                want = reference.quantize_per_group(x, scale, zp, gs, qd, q_min, q_max)
            elif spec.op is Op.DEQUANTIZE_BACKWARD:
                arrays = {"d_output": x, "scale": scale}
                want = reference.dequantize_per_group_backward(x, scale, gs)
            else:
                dy = exact(rng.standard_normal((outer, axis)).astype(f), f)
                arrays = {"d_output": dy, "x": x, "scale": scale, "zero_point": zp}
                want = reference.quantize_per_group_backward(dy, x, scale, zp, gs, q_min, q_max)
            out = exact(np.zeros((outer, axis), want.dtype), want.dtype)
            arrays[spec.out_name] = out
            K.run_emulated(fns[spec.entry], spec, arrays, outer, axis, (q_min, q_max),
                           grid=2, block=64)
            assert out.tobytes() == want.tobytes(), (spec.uri, outer, groups, shift)
            checked += 1
    print("checked", checked)
""")


@needs_gxx
def test_emulated_kernels_under_address_sanitizer(tmp_path):
    specs = [K.spec_of(d) for d in ASAN_SET]
    try:
        (lib,) = K.build_emulation(specs, tmp_path, sanitize="address", parts=1)
        runtime = emu.asan_runtime()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"AddressSanitizer is not usable here: {exc}")
    env = {**os.environ, "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0",
           "PYTHONPATH": str(ROOT / "tests")}  # this directory's helpers, by their own name
    proc = subprocess.run([sys.executable, "-c", ASAN_SCRIPT, str(lib),
                           ",".join(s.uri for s in specs)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"checked {4 * len(specs)}" in proc.stdout
