"""Checkpoint-format rows of the benchmark: GGML blocks against the gguf package, GPTQ
4-bit against a numpy unpack-and-scale path, float zero points against torchao, HQQ
against hqq, FP8 blocks against torch, MLX against mlx and compressed-tensors against its
own decompress (where installed); and every GGML type against gguf-py and a
stream over its bytes (``--gguf-types``, ``bench_gguf_types``).

Run by ``tools/bench.py`` (or alone: ``python tools/bench_formats.py``). Times are medians
of interleaved repetitions in one process; only the ratios are reported as results, since
absolute times on a shared machine are noisy. Every dqgen result is first checked bit for
bit against its contender's. Four contenders a row: dqgen returning a fresh array, dqgen
writing a caller's buffer (``out=``), the baseline (fresh, as it only can), and the stream
of tools/stream_baseline.c over one byte in and one output element out per value (at
least the bytes any dequantizer moves), into a new array each call and into a reused one:
their times give the largest speed-up over the baseline that memory bandwidth allows for
fresh outputs and for ``out=`` (``bound``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import Stream  # noqa: E402
from bench_timing import interleaved, summarize  # noqa: E402

import dqgen  # noqa: E402
from dqgen.formats import floatzp, ggml, gptq, hqq  # noqa: E402
from dqgen.formats.pack import quantize_gptq  # noqa: E402

# A 16 MiB f32 output may be reused by the allocator call after call (glibc's mmap
# threshold adapts up to 32 MiB); a 64 MiB one is new memory each call, whose page faults
# (the kernel zeroing it) cost about as much as the dequantization itself, for dqgen and
# gguf alike: hence the out= and the fresh-stream columns.
GGML_SHAPES = ((1024, 4096), (4096, 4096))
GPTQ_SHAPE = (4096, 11008)   # [K, N]: in_features x out_features of an MLP projection
GPTQ_GROUP = 128
# Float zero points (torchao's tinygemm rule) and HQQ on a [4096, 4096] weight, each against
# its peer's own dequantize on the same data: (storage, dtype) and (bits, dtype, axis).
ZERO_SHAPE = (4096, 4096)
FLOAT_ZERO_CASES = (("u8", "f16"), ("u4", "f16"), ("u8", "bf16"), ("u4", "bf16"))
HQQ_CASES = ((4, "f16", 1), (3, "f16", 1), (2, "f16", 1), (4, "bf16", 1), (4, "f16", 0))


def numpy_gptq(qweight, qzeros, scales, g_idx, bits=4):
    """The numpy way: unpack every word with shifts, gather per-row groups, scale (v1)."""
    pack = 32 // bits
    mask = (1 << bits) - 1
    shifts = (np.arange(pack, dtype=np.uint32) * bits)[None, :, None]
    words = qweight.view(np.uint32)
    q = ((words[:, None, :] >> shifts) & mask).reshape(-1, words.shape[1])
    zwords = qzeros.view(np.uint32)
    z = ((zwords[:, :, None] >> shifts.reshape(1, 1, -1)) & mask).reshape(zwords.shape[0], -1) + 1
    g = g_idx.astype(np.int64)
    diff = q.astype(np.int32) - z[g].astype(np.int32)
    return (diff.astype(np.float32) * scales[g].astype(np.float32)).astype(np.float16)


def _threads() -> int:
    """The thread count dqgen's kernels use here (OpenMP's default is every CPU we may run on)."""
    return int(os.environ.get("DQGEN_NUM_THREADS") or len(os.sched_getaffinity(0)))


def _row(name: str, times: dict, baseline: str) -> dict:
    med = {k: summarize(v)["median_s"] for k, v in times.items()}
    return {"case": name, "dqgen_ms": med["dqgen"] * 1e3, "dqgen_out_ms": med["dqgen_out"] * 1e3,
            "baseline": baseline, "baseline_ms": med[baseline] * 1e3,
            "stream_ms": med["stream"] * 1e3, "stream_fresh_ms": med["stream_fresh"] * 1e3,
            "speedup": med[baseline] / med["dqgen"],
            "speedup_out": med[baseline] / med["dqgen_out"],
            "bound": med[baseline] / med["stream_fresh"], "bound_out": med[baseline] / med["stream"]}


def _contenders(stream: Stream, fresh, into, baseline: str, theirs, values: int, out) -> dict:
    """The calls of a row; ``into(out)`` writes the caller's buffer ``out``. The stream runs
    into a reused buffer and, like a function returning a result, into a new one each call
    (whose page faults then count: the bound for fresh outputs)."""
    q = np.zeros(values, np.int8)
    width = out.dtype if out.dtype.itemsize != 2 else np.dtype(np.int16)
    threads = _threads()

    def stream_fresh():
        sink = np.empty(values, width)
        stream.bind(q, sink, False, threads)()
        return sink
    return {"dqgen": fresh, "dqgen_out": lambda: into(out), baseline: theirs,
            "stream": stream.bind(q, np.empty(values, width), False, threads),
            "stream_fresh": stream_fresh}


def bench_ggml(repeat: int, stream: Stream) -> list[dict]:
    import gguf
    rng = np.random.default_rng(0)
    rows = []
    for shape in GGML_SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        for name in ("Q4_0", "Q8_0"):
            qtype = getattr(gguf.GGMLQuantizationType, name)
            data = gguf.quants.quantize(x, qtype)
            ours, theirs = ggml.dequantize(data, name, "f32"), gguf.quants.dequantize(data, qtype)
            if not np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)):
                raise SystemExit(f"GGML {name}: dqgen and gguf disagree")
            calls = _contenders(stream, lambda: ggml.dequantize(data, name, "f32"),
                                lambda out: ggml.dequantize(data, name, "f32", out=out), "gguf",
                                lambda: gguf.quants.dequantize(data, qtype), x.size, ours)
            times = interleaved(calls, repeat=repeat, warmup=1)
            rows.append(_row(f"GGML {name} {list(shape)} -> f32", times, "gguf"))
    return rows


def bench_gptq(repeat: int, stream: Stream) -> list[dict]:
    rng = np.random.default_rng(1)
    k, n = GPTQ_SHAPE
    w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
    rows = []
    for label, perm in (("", None), (", act-order", rng.permutation(k))):
        layer = quantize_gptq(w, GPTQ_GROUP, bits=4, perm=perm)
        args = (layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"])
        ours = gptq.dequantize(*args, bits=4)
        theirs = numpy_gptq(*args)
        if not np.array_equal(ours.view(np.uint16), theirs.view(np.uint16)):
            raise SystemExit(f"GPTQ{label}: dqgen and the numpy path disagree")
        calls = _contenders(stream, lambda: gptq.dequantize(*args, bits=4),
                            lambda out: gptq.dequantize(*args, bits=4, out=out), "numpy",
                            lambda: numpy_gptq(*args), k * n, ours)
        times = interleaved(calls, repeat=repeat, warmup=1)
        rows.append(_row(f"GPTQ 4-bit {list(GPTQ_SHAPE)} g{GPTQ_GROUP}{label} -> f16", times,
                         "numpy"))
    return rows


def _bits(x) -> bytes:
    """The bytes of a numpy array or a CPU tensor (bfloat16 too)."""
    if isinstance(x, np.ndarray):
        return x.tobytes()
    import torch
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy().tobytes()


def _same_bits(ours, theirs, what: str) -> None:
    if _bits(ours) != _bits(theirs):
        raise SystemExit(f"{what}: dqgen and its peer disagree")


def bench_zero_points(repeat: int, stream: Stream) -> list[dict]:
    """Float zero points against torchao's ``_dequantize_affine_tinygemm`` and HQQ against
    ``hqq``'s ``Quantizer.dequantize`` (ImportError where either is missing)."""
    import ml_dtypes
    import torch
    from hqq.core.quantize import Quantizer
    from torchao.quantization import quant_primitives as qp
    rng = np.random.default_rng(2)
    rows, cols = ZERO_SHAPE
    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16}
    npdtype = {"f16": np.float16, "bf16": ml_dtypes.bfloat16}
    out_rows = []
    for storage, dtype in FLOAT_ZERO_CASES:
        group = 128
        values = rng.integers(0, 16 if storage == "u4" else 256, (rows, cols), dtype=np.uint8)
        q = values[:, 0::2] | (values[:, 1::2] << 4) if storage == "u4" else values
        scale = (rng.random((rows, cols // group)) * 0.01 + 1e-3).astype(npdtype[dtype])
        zero = (rng.random((rows, cols // group)) * 0.1).astype(npdtype[dtype])
        ts, tz = (torch.from_numpy(a.view(np.int16)).view(tdtype[dtype]) if dtype == "bf16"
                  else torch.from_numpy(a) for a in (scale, zero))
        tq = torch.from_numpy(values)
        qtype, hi = (torch.uint4, 15) if storage == "u4" else (torch.uint8, 255)

        def theirs(tq=tq, ts=ts, tz=tz, qtype=qtype, hi=hi, dtype=dtype):
            return qp._dequantize_affine_tinygemm(tq, (1, group), ts, tz, qtype, 0, hi,
                                                  output_dtype=tdtype[dtype])
        def ours(q=q, scale=scale, zero=zero, storage=storage, out=None):
            return floatzp.dequantize(q, scale, zero, group, storage, out=out)
        got = ours()
        _same_bits(got, theirs(), f"float zero {storage} -> {dtype}")
        times = interleaved(_contenders(stream, ours, lambda out, f=ours: f(out=out), "peer",
                                        theirs, rows * cols, got), repeat=repeat, warmup=1)
        out_rows.append(_row(f"float zero {storage} {list(ZERO_SHAPE)} g{group} -> {dtype} "
                             "(torchao)", times, "peer"))
    for bits, dtype, axis in HQQ_CASES:
        torch.manual_seed(bits)
        w = (torch.randn(*ZERO_SHAPE) * 0.02).to(tdtype[dtype])
        W_q, meta = Quantizer.quantize(w, nbits=bits, group_size=64, axis=axis, device="cpu",
                                       compute_dtype=tdtype[dtype], optimize=False)
        meta.update(compute_dtype=tdtype[dtype], scale=meta["scale"].to(tdtype[dtype]),
                    zero=meta["zero"].to(tdtype[dtype]))
        args = (W_q, meta["scale"], meta["zero"], bits, meta["shape"], 64, axis)

        def ours(args=args, out=None):
            return hqq.dequantize(*args, out=out)
        got = ours()
        _same_bits(got, Quantizer.dequantize(W_q, meta), f"HQQ {bits}-bit -> {dtype}")
        got_np = got.view(torch.int16).numpy().view(npdtype[dtype]) if dtype == "bf16" \
            else got.numpy()
        def theirs(W_q=W_q, meta=meta):
            return Quantizer.dequantize(W_q, meta)
        times = interleaved(_contenders(stream, ours, lambda out, f=ours: f(out=out), "peer",
                                        theirs, rows * cols, got_np), repeat=repeat, warmup=1)
        out_rows.append(_row(f"HQQ {bits}-bit {list(ZERO_SHAPE)} g64 axis={axis} -> {dtype} "
                             "(hqq)", times, "peer"))
    return out_rows


NEW_SHAPES = ((4096, 4096), (14336, 4096))


def _bf16_numpy(t):
    import ml_dtypes
    import torch
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 \
        else t.numpy()


def bench_new_formats(repeat: int, stream: Stream, shapes=NEW_SHAPES) -> list[dict]:
    """FP8 blocks against DeepSeek-V3's formula in torch, MLX 4-bit against
    ``mlx.core.dequantize`` and compressed-tensors' 4-bit pack-quantized against its own
    ``decompress``, each to bf16 (a row is skipped where its library is missing)."""
    import torch
    from dqgen.formats import compressed_tensors, fp8
    rng = np.random.default_rng(3)
    rows = []
    for n, k in shapes:
        codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes: the check compares bits
        w = torch.from_numpy(codes).view(torch.float8_e4m3fn)
        scale = torch.rand(-(-n // 128), -(-k // 128)) * 0.01
        r, c = torch.arange(n) // 128, torch.arange(k) // 128

        def theirs(w=w, scale=scale, r=r, c=c):
            return (w.to(torch.float32) * scale[r][:, c]).to(torch.bfloat16)

        def ours(w=w, scale=scale, out=None):
            return fp8.dequantize(w, scale, (128, 128), "bf16", out=out)
        got = _bf16_numpy(ours())
        _same_bits(got, theirs(), "FP8")
        times = interleaved(_contenders(stream, ours, lambda out, f=ours: f(out=out), "peer",
                                        theirs, n * k, got), repeat=repeat, warmup=1)
        rows.append(_row(f"FP8 e4m3 128x128 blocks {[n, k]} -> bf16 (torch)", times, "peer"))
        try:
            import mlx.core as mx
        except ImportError:
            print("mlx is not installed: MLX rows skipped", file=sys.stderr)
        else:
            from dqgen.formats import mlx as dqgen_mlx
            q, s, b = mx.quantize(mx.array(rng.standard_normal((n, k), dtype=np.float32))
                                  .astype(mx.bfloat16), group_size=64, bits=4)
            qn, sn, bn = (np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)
                          for a in (q, s, b))
            import ml_dtypes
            sn, bn = sn.astype(ml_dtypes.bfloat16), bn.astype(ml_dtypes.bfloat16)

            def theirs_mlx(q=q, s=s, b=b):
                out = mx.dequantize(q, s, b, group_size=64, bits=4)
                mx.eval(out)
                return out

            def ours_mlx(qn=qn, sn=sn, bn=bn, out=None):
                return dqgen_mlx.dequantize(qn, sn, bn, 64, 4, out=out)
            got = ours_mlx()
            want = np.array(theirs_mlx().astype(mx.float32)).astype(ml_dtypes.bfloat16)
            _same_bits(got, want, "MLX")
            times = interleaved(_contenders(stream, ours_mlx, lambda out, f=ours_mlx: f(out=out),
                                            "peer", theirs_mlx, n * k, got),
                                repeat=repeat, warmup=1)
            rows.append(_row(f"MLX 4-bit g64 {[n, k]} -> bf16 (mlx)", times, "peer"))
        try:
            from compressed_tensors.compressors import PackedQuantizationCompressor as P
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
            from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        except ImportError:
            print("compressed-tensors is not installed: its rows skipped", file=sys.stderr)
            continue
        values = torch.from_numpy(rng.integers(-8, 8, (n, k), dtype=np.int8))
        state = {"weight_packed": pack_to_int32(values, 4), "weight_shape": torch.tensor([n, k]),
                 "weight_scale": (torch.rand(n, k // 128) * 0.01).to(torch.bfloat16)}
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=128))

        def theirs_ct(state=state, scheme=scheme):
            return P.decompress(dict(state), scheme)["weight"]

        def ours_ct(state=state, out=None):
            return compressed_tensors.dequantize_packed(
                state["weight_packed"], state["weight_scale"], (n, k), None, 4, out=out)
        got = _bf16_numpy(ours_ct())
        _same_bits(got, theirs_ct(), "compressed-tensors")
        times = interleaved(_contenders(stream, ours_ct, lambda out, f=ours_ct: f(out=out),
                                        "peer", theirs_ct, n * k, got), repeat=repeat, warmup=1)
        rows.append(_row(f"compressed-tensors int4 g128 {[n, k]} -> bf16 (library)", times,
                         "peer"))
    return rows + bench_fp4(repeat, stream, shapes)


def bench_fp4(repeat: int, stream: Stream, shapes=NEW_SHAPES) -> list[dict]:
    """FP4: gpt-oss MXFP4 experts (8 of them, [8, N / 8, K] -> [8, K, N / 8]) against
    transformers' ``convert_moe_packed_tensors``, compressed-tensors' NVFP4 and MXFP4
    against the library's ``decompress``, each to bf16 (a row is skipped where its library
    is missing)."""
    import torch
    from dqgen.formats import compressed_tensors, fp4
    rng = np.random.default_rng(4)
    rows = []
    for n, k in shapes:
        packed = torch.from_numpy(rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
        e8m0 = torch.from_numpy(rng.integers(110, 130, (n, k // 32), dtype=np.uint8))
        e4m3 = torch.from_numpy(rng.integers(0, 0x7e, (n, k // 16), dtype=np.uint8))
        try:
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        except ImportError:
            print("transformers is not installed: the gpt-oss row skipped", file=sys.stderr)
        else:
            blocks, scales = packed.reshape(8, n // 8, k // 32, 16), e8m0.reshape(8, n // 8, -1)

            def theirs_gpt_oss(blocks=blocks, scales=scales):
                return convert_moe_packed_tensors(blocks, scales)

            def ours_gpt_oss(blocks=blocks, scales=scales, out=None):
                return fp4.dequantize_mxfp4(blocks, scales, out=out)
            got = _bf16_numpy(ours_gpt_oss())
            _same_bits(got, theirs_gpt_oss(), "gpt-oss MXFP4")
            times = interleaved(_contenders(stream, ours_gpt_oss,
                                            lambda out, f=ours_gpt_oss: f(out=out), "peer",
                                            theirs_gpt_oss, n * k, got), repeat=repeat, warmup=1)
            rows.append(_row(f"gpt-oss MXFP4 experts {[8, n // 8, k]} -> bf16 [E, K, N] "
                             "(transformers)", times, "peer"))
        try:
            from compressed_tensors.compressors import MXFP4PackedCompressor as MX
            from compressed_tensors.compressors import NVFP4PackedCompressor as NV
            from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        except ImportError:
            print("compressed-tensors is not installed: its FP4 rows skipped", file=sys.stderr)
            continue
        for name, compressor, group, state in (
                ("NVFP4", NV, 16, {"weight_packed": packed,
                                   "weight_scale": e4m3.view(torch.float8_e4m3fn),
                                   "weight_global_scale": torch.tensor([448.0 * 6 / 3.5])}),
                ("MXFP4", MX, 32, {"weight_packed": packed, "weight_scale": e8m0})):
            scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
                num_bits=4, type="float", symmetric=True, group_size=group,
                strategy="tensor_group" if group == 16 else "group"))

            def theirs_ct(c=compressor, state=state, scheme=scheme):
                return c.decompress(dict(state), scheme)["weight"]

            def ours_ct(state=state, group=group, out=None):
                if group == 16:
                    return compressed_tensors.dequantize_nvfp4(
                        state["weight_packed"], state["weight_scale"],
                        state["weight_global_scale"], out=out)
                return compressed_tensors.dequantize_mxfp4(state["weight_packed"],
                                                           state["weight_scale"], out=out)
            got = _bf16_numpy(ours_ct())
            _same_bits(got, theirs_ct(), f"compressed-tensors {name}")
            times = interleaved(_contenders(stream, ours_ct, lambda out, f=ours_ct: f(out=out),
                                            "peer", theirs_ct, n * k, got), repeat=repeat,
                                warmup=1)
            rows.append(_row(f"compressed-tensors {name} {[n, k]} -> bf16 (library)", times,
                             "peer"))
    return rows


class BlockStream:
    """tools/stream_blocks.c: reads a GGML tensor's block bytes and writes its output's
    bytes (a group's XOR spread over its outputs), built with dqgen's compiler and flags."""

    SOURCE = Path(__file__).resolve().parent / "stream_blocks.c"

    def __init__(self, workdir: Path) -> None:
        import cffi
        from dqgen.build import cc
        from dqgen.isa import host_isa
        lib_path = Path(workdir) / "stream_blocks.so"
        cc.compile_shared(cc.toolchain(), self.SOURCE, lib_path, host_isa())
        self.ffi = cffi.FFI()
        self.ffi.cdef("int32_t stream_blocks(const void *data, void *y, int64_t blocks, "
                      "int64_t bb, int64_t bv, int32_t width, int32_t num_threads);")
        self.lib = self.ffi.dlopen(str(lib_path))

    def bind(self, data: np.ndarray, out: np.ndarray, bb: int, bv: int, threads: int):
        fn, dp, yp = self.lib.stream_blocks, self.ffi.from_buffer(data), self.ffi.from_buffer(out)
        blocks, width = data.size // bb, out.itemsize

        def call() -> None:
            if fn(dp, yp, blocks, bb, bv, width, threads):
                raise SystemExit("bench: stream_blocks refused the width")
        call.keep = (data, out)
        return call


GGUF_SHAPE = (4096, 4096)


def gguf_blocks(rng, qtype: str, shape=GGUF_SHAPE) -> np.ndarray:
    """A [rows, row_bytes] tensor of ``qtype``: random bytes whose f16 d/dmin fields are
    small normal numbers (as a quantizer writes), float tensors of normal values."""
    from dqgen.layouts.ggml_blocks import LAYOUTS
    from dqgen.ir import parse_ggml_type
    layout = LAYOUTS[parse_ggml_type(qtype)]
    if layout.q is None and layout.grid is None:  # a float tensor
        x = rng.standard_normal(shape, dtype=np.float32)
        if qtype == "BF16":
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(shape[0], -1)
        return x.astype(np.float16 if qtype == "F16" else np.float32).view(np.uint8)
    rows, cols = shape
    data = rng.integers(0, 256, size=(rows, cols // layout.values * layout.block_bytes),
                        dtype=np.uint8)
    blocks = data.reshape(-1, layout.block_bytes)
    for scalar in (layout.d, layout.m):
        if scalar is not None and scalar.kind == "f16":
            d = (rng.random(blocks.shape[0]) * 0.01 + 1e-3).astype(np.float16)
            blocks[:, scalar.offset:scalar.offset + 2] = d.view(np.uint8).reshape(-1, 2)
    if layout.d.kind == "e8m0_half":  # scales 2^-10 .. 2^-1
        blocks[:, layout.d.offset] = rng.integers(118, 128, size=blocks.shape[0])
    if layout.d.kind == "f32":
        d = (rng.random(blocks.shape[0]) * 0.01 + 1e-3).astype(np.float32)
        blocks[:, layout.d.offset:layout.d.offset + 4] = d.view(np.uint8).reshape(-1, 4)
    return data


def bench_gguf_types(repeat: int, types=None) -> list[dict]:
    """Every GGML type, [4096, 4096] to f32 and f16, all on one thread: dqgen's kernel into
    a reused buffer, gguf-py's dequantize (then rounded to f16 with numpy for f16), and the
    block stream over the same bytes. Ratios: gguf / dqgen and dqgen / stream."""
    import gguf
    from dqgen.formats.plan import FormatPlan
    from dqgen.ir import GgmlDequantizeDescriptor
    from dqgen.plans import PlanPreference
    rng = np.random.default_rng(2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dqgen-bench-") as work:
        stream = BlockStream(Path(work))
        for name in types or ggml.TYPES:
            data = gguf_blocks(rng, name)
            bb, bv = ggml.block_bytes(name), ggml.block_values(name)
            qtype = gguf.GGMLQuantizationType[name]
            has_oracle = name != "Q8_K"  # gguf-py has no Q8_K dequantize
            for out_name, out_dtype in (("f32", np.float32), ("f16", np.float16)):
                blocks = data.size // bb
                desc = GgmlDequantizeDescriptor(blocks, name, out_name)
                plan = FormatPlan.select(desc, preference=PlanPreference(num_threads=1))
                flat = data.reshape(blocks, bb)
                out = np.empty((blocks, bv), out_dtype)
                plan.run({"data": flat, "y": out})
                theirs = (lambda: gguf.quants.dequantize(data, qtype).astype(out_dtype)) \
                    if has_oracle else None
                if has_oracle and not np.array_equal(
                        out.reshape(-1).view(np.uint8), theirs().reshape(-1).view(np.uint8)):
                    raise SystemExit(f"GGML {name} -> {out_name}: dqgen and gguf disagree")
                calls = {"dqgen": lambda: plan.run({"data": flat, "y": out}),
                         "stream": stream.bind(flat, np.empty_like(out), bb, bv, 1)}
                if has_oracle:
                    calls["gguf"] = theirs
                times = interleaved(calls, repeat=repeat, warmup=1)
                med = {k: summarize(v)["median_s"] * 1e3 for k, v in times.items()}
                rows.append({"case": f"{name} {list(GGUF_SHAPE)} -> {out_name}",
                             "bytes_in": data.nbytes, "bytes_out": out.nbytes,
                             "dqgen_ms": med["dqgen"], "stream_ms": med["stream"],
                             "gguf_ms": med.get("gguf"),
                             "vs_gguf": med["gguf"] / med["dqgen"] if has_oracle else None,
                             "vs_stream": med["dqgen"] / med["stream"]})
                print(gguf_table(rows[-1:], header=not rows[:-1]), flush=True)
    return rows


def gguf_table(rows: list[dict], header: bool = True) -> str:
    lines = ["| case | gguf ms | dqgen ms | stream ms | gguf / dqgen | dqgen / stream |",
             "|---|---|---|---|---|---|"] if header else []
    for r in rows:
        gguf_ms = f"{r['gguf_ms']:.1f}" if r["gguf_ms"] is not None else "n/a"
        vs = f"{r['vs_gguf']:.0f}x" if r["vs_gguf"] is not None else "n/a"
        lines.append(f"| {r['case']} | {gguf_ms} | {r['dqgen_ms']:.2f} | {r['stream_ms']:.2f} "
                     f"| {vs} | {r['vs_stream']:.2f} |")
    return "\n".join(lines)


def run(repeat: int = 10) -> list[dict]:
    """Every format row (GGML rows only where the gguf package is installed)."""
    with tempfile.TemporaryDirectory(prefix="dqgen-bench-") as work:
        stream = Stream(Path(work))
        stream.check()
        rows = bench_gptq(repeat, stream)
        try:
            rows = bench_ggml(repeat, stream) + rows
        except ImportError:
            print("gguf is not installed: GGML rows skipped", file=sys.stderr)
        try:
            rows += bench_zero_points(repeat, stream)
        except ImportError as exc:
            print(f"float zero / HQQ rows skipped ({exc})", file=sys.stderr)
        try:
            rows += bench_new_formats(repeat, stream)
        except ImportError as exc:
            print(f"FP8 / MLX / compressed-tensors rows skipped ({exc})", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | baseline | baseline ms | dqgen ms (fresh / out=) | stream ms (fresh / reused) "
             "| dqgen speed-up (fresh / out=) | bound (fresh / out=) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['baseline']} | {r['baseline_ms']:.1f} | {r['dqgen_ms']:.2f} / "
              f"{r['dqgen_out_ms']:.2f} | {r['stream_fresh_ms']:.2f} / {r['stream_ms']:.2f} | "
              f"{r['speedup']:.1f}x / {r['speedup_out']:.1f}x | {r['bound']:.1f}x / "
              f"{r['bound_out']:.1f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--new-formats", action="store_true",
                   help="only the FP8, MLX, compressed-tensors and FP4 rows")
    p.add_argument("--gguf-types", nargs="*", default=None, metavar="TYPE",
                   help="only the per-type GGML rows (every type, or those named), one thread")
    p.add_argument("--gguf-repeat", type=int, default=5,
                   help="repetitions of the per-type rows (gguf-py takes up to a second a call)")
    args = p.parse_args(argv)
    print(f"dqgen {dqgen.__version__}, threads: {_threads()}")
    rows = []
    if args.new_formats:
        with tempfile.TemporaryDirectory(prefix="dqgen-bench-") as work:
            stream = Stream(Path(work))
            stream.check()
            rows = bench_new_formats(args.repeat, stream)
        print(table(rows))
        return 0
    if args.gguf_types is None:
        rows = run(args.repeat)
        print(table(rows))
    types = bench_gguf_types(args.gguf_repeat, args.gguf_types or None)
    if args.json:
        Path(args.json).write_text(json.dumps({"formats": rows, "gguf_types": types},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
