"""The bandwidth baseline: tools/stream_baseline.c built with dqgen's own compiler and
flags (``dqgen.build.cc``), loaded with cffi, called with pointers cast once.

Loading it links the system libgomp into the process before torch is imported, so
dqgen's kernels, the stream and torch all share one OpenMP runtime.
"""

from __future__ import annotations

from pathlib import Path

import cffi
import ml_dtypes
import numpy as np

from dqgen.build import cc
from dqgen.isa import host_isa

SOURCE = Path(__file__).resolve().parent / "stream_baseline.c"
CDEF = ("int32_t stream_i8(const void *q, void *y, int64_t n, int32_t width, int32_t nontemporal, "
        "int32_t num_threads, int64_t parallel_min);\nint32_t stream_nt_available(void);\n"
        "int32_t floor_i8(const void *q, void *y, int64_t n, int32_t kind, int32_t num_threads, "
        "int64_t parallel_min);\nint32_t stream_floor_available(void);")
FLOOR_KINDS = {"f16": 0, "bf16": 1}


class Stream:
    """``y[i] = widen(q[i])`` over the same bytes a dequantize reads and writes."""

    def __init__(self, workdir: Path) -> None:
        self.isa = host_isa()
        self.toolchain = cc.toolchain()
        self.flags = list(self.toolchain.flags(self.isa))
        lib_path = Path(workdir) / "stream_baseline.so"
        cc.compile_shared(self.toolchain, SOURCE, lib_path, self.isa)
        self.command = [*self.toolchain.command, *self.flags, "-o", lib_path.name,
                        f"tools/{SOURCE.name}"]
        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        self.lib = self.ffi.dlopen(str(lib_path))
        self.nt_available = bool(self.lib.stream_nt_available())
        self.floor_available = bool(self.lib.stream_floor_available())
        try:  # the same size below which dqgen's kernels stay on one thread
            from dqgen.spec import PARALLEL_MIN_ELEMENTS
            self.parallel_min = int(PARALLEL_MIN_ELEMENTS)
        except ImportError:
            self.parallel_min = 1 << 15

    def bind(self, q: np.ndarray, out: np.ndarray, nontemporal: bool, threads: int):
        """A zero-argument call that streams ``q`` into ``out``."""
        if out.itemsize not in (2, 4, 8) or q.itemsize != 1 or out.size != q.size:
            raise ValueError("the stream reads 1-byte values and writes as many 2-, 4- or 8-byte ones")
        fn, qp, yp = self.lib.stream_i8, self.ffi.from_buffer(q), self.ffi.from_buffer(out)
        n, width, nt, pmin = q.size, out.itemsize, int(nontemporal), self.parallel_min

        def call() -> None:
            fn(qp, yp, n, width, nt, threads, pmin)
        call.keep = (q, out)  # the arrays must outlive the pointers
        return call

    def bind_floor(self, q: np.ndarray, out: np.ndarray, float_name: str, threads: int):
        """A zero-argument call that converts ``q`` to f16/bf16 into ``out`` (the
        conversion floor), or None where it is not compiled in or the dtype has none."""
        kind = FLOOR_KINDS.get(float_name)
        if kind is None or not self.floor_available:
            return None
        if out.itemsize != 2 or q.itemsize != 1 or out.size != q.size:
            raise ValueError("the floor reads 1-byte values and writes as many 2-byte ones")
        fn, qp, yp = self.lib.floor_i8, self.ffi.from_buffer(q), self.ffi.from_buffer(out)
        n, pmin = q.size, self.parallel_min

        def call() -> None:
            fn(qp, yp, n, kind, threads, pmin)
        call.keep = (q, out)
        return call

    def check(self) -> None:
        """Every width, store kind and thread count writes exactly widen(q), so the loop
        does the work it is timed for."""
        q = np.arange(-128, 128, dtype=np.int8).repeat(257)
        for dt in (np.int16, np.float32, np.float64):
            for nontemporal in (False, True):
                for threads in (1, 2):
                    out = np.zeros(q.size + 3, dtype=dt)[1:-2]  # misaligned on purpose
                    self.bind(q, out, nontemporal, threads)()
                    if not np.array_equal(out, q.astype(dt)):
                        raise SystemExit(f"bench: the stream baseline is wrong ({np.dtype(dt)}, "
                                         f"nontemporal={nontemporal}, threads={threads})")
        for name, dt in (("f16", np.float16), ("bf16", ml_dtypes.bfloat16)):
            for threads in (1, 2):
                out = np.zeros(q.size + 3, dtype=np.uint16)[1:-2]
                call = self.bind_floor(q, out, name, threads)
                if call is None:
                    continue
                call()
                if not np.array_equal(out, q.astype(dt).view(np.uint16)):
                    raise SystemExit(f"bench: the conversion floor is wrong ({name}, threads={threads})")
