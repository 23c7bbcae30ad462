"""Big inputs: indices are 64-bit end to end (Python, cffi, generated C).

A real problem with more than 2**31 elements, run through the Plan API, without
needing gigabytes of memory:

- inputs are zero-filled numpy arrays: untouched pages all map the kernel's shared zero
  page, so only the last rows, filled with random data, cost memory;
- the output is 4 GiB of address space whose head cycles over one small ``memfd`` (every
  64 MiB of addresses map the same pages) and whose tail, straddling element 2**31, is
  real private memory, pre-filled with NaN; 8 GiB of unmapped guard space lies before it.

A 32-bit index would wrap to a negative offset and fault in the guard, or leave the tail
unwritten; the tail is compared bit for bit with ``dqgen.reference``. Two shapes: one
row longer than 2**31 (``axis`` itself does not fit in int32) on two threads (the
parallel split), and many rows whose product passes 2**31 on one (the serial loop).
"""

from __future__ import annotations

import json
import platform
import sys

import pytest

from test_reliability_support import child_env, needs_cc, run_child

pytestmark = [
    needs_cc,
    pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() not in
                       ("x86_64", "aarch64"), reason="needs Linux memfd/mmap on a 64-bit CPU"),
]

BIG = """
import ctypes, json, os, sys, time
import numpy as np, dqgen
from dqgen import reference

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_NONE, PROT_RW = 0, 3
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANON, MAP_NORESERVE = 0x1, 0x2, 0x10, 0x20, 0x4000
GUARD, CHUNK = 8 << 30, 64 << 20


def mmap(addr, length, prot, flags, fd=-1):
    p = libc.mmap(addr, length, prot, flags, fd, 0)
    if p is None or p == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap failed")
    return p


def aliased_output(nbytes, tail):
    # [GUARD unmapped][head: CHUNK-sized views of one memfd][tail: private memory]
    head = nbytes - tail
    reserved = GUARD + nbytes + (1 << 20)
    base = mmap(None, reserved, PROT_NONE, MAP_PRIVATE | MAP_ANON | MAP_NORESERVE)
    start = base + GUARD
    fd = os.memfd_create("dqgen-big-input-test")
    try:
        os.ftruncate(fd, CHUNK)
        for offset in range(0, head, CHUNK):
            mmap(start + offset, min(CHUNK, head - offset), PROT_RW, MAP_SHARED | MAP_FIXED, fd)
    finally:
        os.close(fd)
    mmap(start + head, tail, PROT_RW, MAP_PRIVATE | MAP_FIXED | MAP_ANON)
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(start))
    return raw, (base, reserved)


G = 128
TAIL = 3 << 17  # elements checked: the last ones, straddling 2**31
results = []
for outer, axis, threads in json.loads(sys.argv[1]):
    n = outer * axis
    first = n - TAIL
    desc = dqgen.DequantizePerGroupDescriptor(outer, axis, G, "f16", "u8")
    plan = dqgen.DequantizePerGroupPlan.select(
        desc, preference=dqgen.PlanPreference(num_threads=threads))
    q = np.zeros((outer, axis), np.uint8)
    scale = np.zeros((outer, axis // G), np.float16)
    zp = np.zeros((outer, axis // G), np.int32)
    qf, sf, zf = q.reshape(-1), scale.reshape(-1), zp.reshape(-1)
    rng = np.random.default_rng(outer)
    qf[first:] = rng.integers(0, 256, TAIL, dtype=np.uint8)
    sf[first // G:] = rng.standard_normal(TAIL // G).astype(np.float16)
    zf[first // G:] = rng.integers(-300, 300, TAIL // G).astype(np.int32)
    raw, mapping = aliased_output(2 * n, 2 * TAIL)
    y = raw.view(np.float16).reshape(outer, axis)
    yf = y.reshape(-1)
    yf[first:] = np.float16("nan")
    start = time.perf_counter()
    plan.run(dqgen.DequantizePerGroupArgs(q, scale, zp, y))
    seconds = time.perf_counter() - start
    ref = reference.dequantize_per_group(qf[None, first:], sf[None, first // G:],
                                         zf[None, first // G:], G)[0]
    got = yf[first:].view(np.uint16)
    results.append({"outer": outer, "axis": axis, "threads": threads, "elements": n,
                    "seconds": round(seconds, 2),
                    "mismatches": int((got != ref.view(np.uint16)).sum())})
    libc.munmap(*mapping)
print(json.dumps(results))
"""

SHAPES = [(1, 2**31 + 2**18, 2),         # one row longer than int32 can index
          (2**14 + 2, 2**17, 1)]         # rows whose product passes 2**31, serial path


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_more_than_2_31_elements(tmp_path):
    if _available_bytes() < 1 << 30:
        pytest.skip("needs about 1 GiB of free memory (the inputs' tails, 64 MiB of output)")
    proc = run_child(BIG, child_env(tmp_path / "cache"), json.dumps(SHAPES), timeout=300,
                     check=False)
    assert proc.returncode == 0, (
        f"the big-input run died (status {proc.returncode}): a negative status is a signal, "
        f"e.g. a 32-bit index that wrapped into the guard region\n{proc.stderr[-3000:]}")
    results = json.loads(proc.stdout.splitlines()[-1])
    print(json.dumps(results))  # for docs/RELIABILITY.md
    assert len(results) == len(SHAPES)
    for result in results:
        assert result["elements"] > 2**31
        assert result["mismatches"] == 0, result
