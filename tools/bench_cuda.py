"""GPU part of tools/bench.py (``--device cuda``): effective bandwidth of dqgen's CUDA plan
beside a device-to-device copy of the same bytes, a cast-copy ``q -> output`` (what a
stream of the same bytes is on a GPU) and torch eager ``(q - zp) * scale``.

Times come from CUDA events around ``INNER`` back-to-back calls (launch overhead spread
over them), median of the repetitions, contenders interleaved. dqgen is assumed to
launch on torch's current stream (the default stream here), which the events time.
``run_device`` takes a torch device so the same code can be exercised on the CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import random
import statistics
import time

import dqgen

SHAPES = ((8192, 8192), (11008, 4096))
FLOATS = ("f16", "bf16", "f32", "f64")
INTS = ("s8", "u8")
INNER = 10
# The targets (issue 17): dqgen's effective bandwidth at least this fraction of a
# device-to-device copy of the same bytes, and torch eager at least this many times slower.
COPY_FRACTION = 0.85
EAGER_RATIO = 3.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _timer(torch, dev):
    cuda = dev.type == "cuda"

    def timed(fn) -> float:
        """Seconds a call, averaged over INNER back-to-back calls."""
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(INNER):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3 / INNER
        t0 = time.perf_counter()
        for _ in range(INNER):
            fn()
        return (time.perf_counter() - t0) / INNER
    return timed


def _case(torch, dev, timed, rows, cols, group, int_name, float_name, q, zp, repeat, gen) -> dict:
    tf = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}[float_name]
    groups = cols // group
    scale = (torch.rand((rows, groups), device=dev, generator=gen) * 0.02 + 1e-3).to(tf)
    out = torch.empty((rows, cols), dtype=tf, device=dev)
    cast_out = torch.empty_like(out)
    moved = q.nbytes + out.nbytes + scale.nbytes + zp.nbytes
    half = (q.nbytes + out.nbytes) // 2  # a memcpy of `half` bytes reads and writes q + out
    copy_src = torch.empty(half, dtype=torch.uint8, device=dev)
    copy_dst = torch.empty_like(copy_src)
    calls = {
        "d2d_copy": lambda: copy_dst.copy_(copy_src),
        "cast_copy": lambda: cast_out.copy_(q),
        "torch_eager": lambda: (q.view(rows, groups, group) - zp.unsqueeze(-1)) * scale.unsqueeze(-1),
    }
    note = None
    try:
        desc = dqgen.DequantizePerGroupDescriptor(rows, cols, group, float_name, int_name)
        plan = dqgen.DequantizePerGroupPlan.select(desc, device=str(dev))
        run_args = dqgen.DequantizePerGroupArgs(q, scale, zp, out)
        calls["dqgen"] = lambda: plan.run(run_args)
    except dqgen.DqgenError as exc:
        note = f"dqgen plan unavailable: {exc}"
        print(f"  {note}", flush=True)
    for fn in calls.values():  # warm-up (and the first launch's module load)
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    for _ in range(repeat):
        order.shuffle(names)  # a new order every repetition, as on the CPU
        for name in names:
            times[name].append(timed(calls[name]))
    exact = None
    if "dqgen" in calls:
        plan.run(run_args)
        compute = torch.float64 if float_name == "f64" else torch.float32
        want = ((q.view(rows, groups, group).to(torch.int32) - zp.unsqueeze(-1)).to(compute)
                * scale.to(compute).unsqueeze(-1)).view(rows, cols).to(tf)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
        exact = bool(torch.equal(out.view(bits), want.view(bits)))
        if not exact:
            raise SystemExit(f"bench: dqgen's {int_name}->{float_name} output on {dev} is not bit-exact")
    med = {n: statistics.median(t) for n, t in times.items()}
    gbps = {"dqgen": moved / med["dqgen"] / 1e9 if "dqgen" in med else None,
            "d2d_copy": 2 * half / med["d2d_copy"] / 1e9,
            "cast_copy": (q.nbytes + out.nbytes) / med["cast_copy"] / 1e9,
            "torch_eager": moved / med["torch_eager"] / 1e9}
    case = {"shape": [rows, cols], "int": int_name, "float": float_name, "group": group, "bytes": moved,
            "median_s": med, "gbps": gbps, "bit_exact": exact, "note": note, "samples_s": times}
    if "dqgen" in med:
        case["ratios"] = {"dqgen/d2d_copy": med["dqgen"] / med["d2d_copy"],
                          "dqgen/cast_copy": med["dqgen"] / med["cast_copy"],
                          "torch_eager/dqgen": med["torch_eager"] / med["dqgen"],
                          # effective bandwidth over the copy's (dqgen also moves scale and zp)
                          "copy_fraction": gbps["dqgen"] / gbps["d2d_copy"]}
    return case


def evaluate(cases: list[dict]) -> dict:
    """The two GPU targets over every case: met, or the cases that miss."""
    out = {}
    for name, key, limit, upper in (("copy_fraction", "copy_fraction", COPY_FRACTION, False),
                                    ("torch_eager", "torch_eager/dqgen", EAGER_RATIO, False)):
        have = [c for c in cases if key in c.get("ratios", {})]
        misses = [c for c in have if c["ratios"][key] < limit]
        out[name] = {"limit": limit, "cases": len(have),
                     "status": "not measured" if not have else "missed" if misses else "met",
                     "worst": min((c["ratios"][key] for c in have), default=None),
                     "misses": [f"{label(c)} {c['ratios'][key]:.2f}" for c in misses]}
    return out


def label(c: dict) -> str:
    return f"[{c['shape'][0]}, {c['shape'][1]}] {c['int']}->{c['float']} g{c['group']}"


def run_device(shapes=None, floats=None, group: int = 128, repeat: int = 20,
               torch_device: str = "cuda", ints=None, groups=None) -> dict | None:
    """The GPU benchmark, or None (with a message saying why) where it cannot run."""
    try:
        import torch
    except ImportError:
        print("bench: --device cuda needs torch built with CUDA; torch is not installed. Skipped.")
        return None
    dev = torch.device(torch_device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"bench: --device cuda skipped: no usable CUDA device (torch {torch.__version__}, "
              f"built for CUDA {torch.version.cuda}; torch.cuda.is_available() is False).")
        return None
    info = {"torch": torch.__version__, "device": str(dev)}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"sm_{props.major}{props.minor}", cuda=torch.version.cuda,
                    multiprocessors=props.multi_processor_count, driver=_driver_version())
    print(f"dqgen bench --device {dev}: {info.get('name', dev)}", flush=True)
    timed = _timer(torch, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = []
    groups = tuple(groups or (group,))
    for rows, cols in shapes or SHAPES:
        for int_name in ints or INTS:
            lo, hi, qdtype = (-128, 128, torch.int8) if int_name == "s8" else (0, 256, torch.uint8)
            q = torch.randint(lo, hi, (rows, cols), dtype=qdtype, device=dev, generator=gen)
            mid = 0 if int_name == "s8" else 128
            for g in groups:
                if cols % g:
                    raise SystemExit(f"bench: axis {cols} is not a multiple of group {g}")
                zp = torch.randint(mid - 16, mid + 16, (rows, cols // g), dtype=torch.int32, device=dev,
                                   generator=gen)
                for float_name in floats or FLOATS:
                    case = _case(torch, dev, timed, rows, cols, g, int_name, float_name, q, zp, repeat, gen)
                    cases.append(case)
                    shown = "  ".join(f"{n} {v:.0f} GB/s" for n, v in case["gbps"].items() if v is not None)
                    print(f"  {label(case)}: {shown}", flush=True)
                del zp
            del q
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {"date": _now(), "device": info, "repeat": repeat, "inner": INNER, "groups": list(groups),
            "cases": cases, "targets": evaluate(cases)}


def _driver_version() -> str | None:
    """The NVIDIA driver's version, from the driver API (None where it cannot be read)."""
    try:
        from cuda.bindings import driver as drv
        err, version = drv.cuDriverGetVersion()
        return f"CUDA driver API {version // 1000}.{version % 1000 // 10}" if int(err) == 0 else None
    except Exception:  # noqa: BLE001 - informational only
        return None


def report_lines(result: dict) -> list[str]:
    """The table of every case (GB/s, the copy fraction, torch eager / dqgen) and the targets."""
    lines = [f"{'case':32s} {'dqgen':>8s} {'d2d copy':>9s} {'cast copy':>9s} {'eager':>8s}  "
             "GB/s;  of copy  eager/dqgen"]
    for c in result["cases"]:
        g, r = c["gbps"], c.get("ratios", {})
        cell = lambda v, w=8: f"{v:{w}.0f}" if v is not None else f"{'-':>{w}s}"  # noqa: E731
        frac = f"{r['copy_fraction'] * 100:5.0f}%" if "copy_fraction" in r else "    -"
        eager = f"{r['torch_eager/dqgen']:6.2f}x" if "torch_eager/dqgen" in r else "     -"
        lines.append(f"{label(c):32s} {cell(g['dqgen'])} {cell(g['d2d_copy'], 9)} {cell(g['cast_copy'], 9)} "
                     f"{cell(g['torch_eager'])}  {frac:>12s} {eager:>11s}")
    for name, t in (result.get("targets") or {}).items():
        worst = "-" if t["worst"] is None else f"{t['worst']:.2f}"
        lines.append(f"target {name} (>= {t['limit']}): {t['status']}, worst {worst} of {t['cases']} cases"
                     + (f"; misses: {', '.join(t['misses'][:8])}" if t["misses"] else ""))
    return lines


def print_device(result: dict) -> None:
    print()
    print("\n".join(report_lines(result)))


# --------------------------------------------------------------------------- formats

FORMAT_SHAPE = (8192, 8192)


def _format_calls(torch, dev, rows: int, cols: int, gen, out):
    """(name, call, input bytes) of each checkpoint format's dequantize into ``out`` (f16),
    on random stored bits (every GGML type, GPTQ and AWQ 4-bit g128, HQQ 4-bit g64,
    float zero point u4 g128)."""
    from dqgen.formats import awq, floatzp, ggml, gptq, hqq
    from dqgen.ir import GGML_BLOCK_BYTES, GGML_BLOCK_VALUES, ggml_type_name

    def bits(shape, dtype=torch.int32):
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, dtype=dtype, device=dev, generator=gen)

    def halves(shape):
        return (torch.rand(shape, device=dev, generator=gen) * 0.02 + 1e-3).half()

    n = rows * cols
    for layout, nbytes in GGML_BLOCK_BYTES.items():
        name, per = ggml_type_name(layout), GGML_BLOCK_VALUES[layout]
        data = bits((n // per, nbytes), torch.uint8)
        if name in ("F16", "BF16", "F32"):  # float tensors: keep the values finite
            data = halves((n // per * nbytes // 2,)).view(torch.uint8).view(n // per, nbytes)
        flat = out.view(n // per, per)
        yield f"GGML {name}", (lambda d=data, q=name, o=flat: ggml.dequantize(d, q, "f16", out=o)), data.nbytes
    g = 128
    qw, qz, sc = bits((rows // 8, cols)), bits((rows // g, cols // 8)), halves((rows // g, cols))
    yield "GPTQ 4-bit g128", (lambda: gptq.dequantize(qw, qz, sc, out=out)), qw.nbytes + qz.nbytes + sc.nbytes
    aw, az = bits((rows, cols // 8)), bits((rows // g, cols // 8))
    yield "AWQ 4-bit g128", (lambda: awq.dequantize(aw, az, sc, out=out)), aw.nbytes + az.nbytes + sc.nbytes
    hq = bits((n // 64 // 2, 64), torch.uint8)
    hs, hz = halves((n // 64, 1)), halves((n // 64, 1))
    flat64 = out.view(n // 64, 64)
    yield "HQQ 4-bit g64", (lambda: hqq.dequantize(hq, hs, hz, 4, (rows, cols), 64, out=out)), \
        hq.nbytes + hs.nbytes + hz.nbytes
    del flat64
    fq = bits((rows, cols // 2), torch.uint8)
    fs, fz = halves((rows, cols // g)), halves((rows, cols // g))
    yield "float zero u4 g128", (lambda: floatzp.dequantize(fq, fs, fz, g, "u4", out=out)), \
        fq.nbytes + fs.nbytes + fz.nbytes


def _torch_on(torch_device: str, what: str):
    """(torch, its device), or None with a line saying why ``what`` cannot run there."""
    try:
        import torch
    except ImportError:
        print(f"bench: {what} on --device cuda needs torch; torch is not installed. Skipped.")
        return None
    dev = torch.device(torch_device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"bench: {what} skipped: no usable CUDA device")
        return None
    return torch, dev


def run_formats(torch_device: str = "cuda", shape=FORMAT_SHAPE, repeat: int = 10) -> dict | None:
    """Each checkpoint format's kernel on the device: effective GB/s (its input bytes and
    its f16 output once) beside a device-to-device copy that reads and writes as many."""
    found = _torch_on(torch_device, "the formats")
    if found is None:
        return None
    torch, dev = found
    timed = _timer(torch, dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    rows, cols = shape
    out = torch.empty((rows, cols), dtype=torch.float16, device=dev)
    cases = []
    for name, call, in_bytes in _format_calls(torch, dev, rows, cols, gen, out):
        moved = in_bytes + out.nbytes
        src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy = lambda s=src, d=dst: d.copy_(s)  # noqa: E731
        call(), copy()  # warm-up: the first launch loads the module
        times = {"dqgen": [], "d2d_copy": []}
        for _ in range(repeat):
            times["dqgen"].append(timed(call))
            times["d2d_copy"].append(timed(copy))
        med = {k: statistics.median(v) for k, v in times.items()}
        case = {"format": name, "shape": [rows, cols], "bytes": moved, "median_s": med,
                "gbps": {"dqgen": moved / med["dqgen"] / 1e9, "d2d_copy": moved / med["d2d_copy"] / 1e9},
                "copy_fraction": med["d2d_copy"] / med["dqgen"]}
        cases.append(case)
        print(f"  {name}: dqgen {case['gbps']['dqgen']:.0f} GB/s, copy {case['gbps']['d2d_copy']:.0f} GB/s "
              f"({case['copy_fraction'] * 100:.0f}%)", flush=True)
        del src, dst
    return {"date": _now(), "shape": list(shape), "repeat": repeat, "inner": INNER, "cases": cases}


def format_lines(result: dict) -> list[str]:
    lines = [f"{'format [%d, %d] -> f16' % tuple(result['shape']):32s} {'dqgen':>8s} {'d2d copy':>9s}  of copy"]
    for c in result["cases"]:
        lines.append(f"{c['format']:32s} {c['gbps']['dqgen']:8.0f} {c['gbps']['d2d_copy']:9.0f}  "
                     f"{c['copy_fraction'] * 100:6.0f}%")
    return lines


# --------------------------------------------------------------------------- linear

LINEAR_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
LINEAR_FORMATS = ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "u4 g128")
LINEAR_MS = (1, 8, 64)
LINEAR_WIDE = ((4096, 14336), ("Q4_0", "u4 g128"), (512,))  # the large-M cases: few, they are slow


def _linear_weight(rng, fmt: str, n: int, k: int):
    """A QuantizedWeight of ``fmt`` on random valid stored bits (bench_formats' GGML blocks,
    random family codes), built on the CPU."""
    import numpy as np

    from dqgen.formats.weight import QuantizedWeight
    if fmt == "u4 g128":
        q = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
        scale = rng.random((n, k // 128), dtype=np.float32) * 0.02 + 1e-3
        zp = rng.integers(4, 12, (n, k // 128), dtype=np.int32)
        return QuantizedWeight.per_group(q, scale, zp, 128, "u4")
    from bench_formats import gguf_blocks
    return QuantizedWeight.ggml(gguf_blocks(rng, fmt, (n, k)), fmt, (n, k))


def _linear_case(torch, dev, timed, weight, on_dev: dict, m: int, repeat: int, gen) -> dict:
    """dqgen's fused linear (f16 x, f16 y) at one M beside a copy of the weight's bytes,
    torch.matmul on the f16 weight, and dqgen's dequantize + torch.matmul."""
    import numpy as np

    from dqgen.formats.plan import FormatPlan
    from dqgen.ir import DType
    from dqgen.layouts.linear import LinearDescriptor
    n, k = weight.shape
    x = torch.randn((m, k), device=dev, generator=gen).half()
    y = torch.empty((m, n), device=dev, dtype=torch.float16)
    desc = LinearDescriptor(weight.descriptor, m, n, k, "f16", "f16")
    plan = FormatPlan.select(desc, device=str(dev))
    arrays = dict(on_dev, x=x, y=y)
    w16 = torch.empty((n, k), device=dev, dtype=torch.float16)
    # the weight's own dequantize, to f16 (the device tests check the values; this times)
    whole = dataclasses.replace(desc.view.sized(n, k), float_dtype=DType.F16)
    dequant = FormatPlan.select(whole, device=str(dev))
    out = next(a for a in dequant.arguments if a.is_out)
    dq_arrays = {out.name: w16.view(out.shape)}
    for a in dequant.arguments:   # the family's f16 decode takes f16 scales
        if not a.is_out:
            want = torch.from_numpy(np.empty(0, a.dtype)).dtype
            dq_arrays[a.name] = on_dev[a.name].to(want)
    wbytes = sum(v.nbytes for v in on_dev.values())
    src = torch.empty(wbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    calls = {"dqgen": lambda: plan.run(arrays),
             "read_copy": lambda: dst.copy_(src),
             "torch_f16": lambda: torch.matmul(x, w16.t()),
             "dequant_matmul": lambda: (dequant.run(dq_arrays), torch.matmul(x, w16.t()))}
    for fn in calls.values():
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    times = {name: [] for name in calls}
    names = list(calls)
    order = random.Random(m)
    for _ in range(repeat):
        order.shuffle(names)
        for name in names:
            times[name].append(timed(calls[name]))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"shape": [n, k], "m": m, "weight_bytes": wbytes, "median_s": med,
            "weight_gbps": wbytes / med["dqgen"] / 1e9,
            "copy_gbps": 2 * wbytes / med["read_copy"] / 1e9,
            "ratios": {"torch_f16/dqgen": med["torch_f16"] / med["dqgen"],
                       "dequant_matmul/dqgen": med["dequant_matmul"] / med["dqgen"]}}


def run_linear(torch_device: str = "cuda", shapes=LINEAR_SHAPES, formats=LINEAR_FORMATS,
               ms=LINEAR_MS, wide=LINEAR_WIDE, repeat: int = 5) -> dict | None:
    """The fused linear on the device: weight bytes a second at M = 1 beside a copy of the
    same bytes (the copy's read and written bytes a second), and against torch.matmul on
    the f16 weight and dqgen dequantize + torch.matmul at M in ``ms`` (and ``wide``)."""
    import numpy as np
    found = _torch_on(torch_device, "the linear")
    if found is None:
        return None
    torch, dev = found
    timed = _timer(torch, dev)
    gen = torch.Generator(device=dev).manual_seed(2)
    rng = np.random.default_rng(2)
    plan = [(shape, fmt, ms) for shape in shapes for fmt in formats]
    plan += [(wide[0], fmt, wide[2]) for fmt in wide[1]]
    cases = []
    for (n, k), fmt, case_ms in plan:
        weight = _linear_weight(rng, fmt, n, k)
        on_dev = {a: torch.from_numpy(v).to(dev) for a, v in weight.arrays.items()}
        for m in case_ms:
            case = dict(_linear_case(torch, dev, timed, weight, on_dev, m, repeat, gen), format=fmt)
            cases.append(case)
            r = case["ratios"]
            print(f"  linear {fmt} [{n}, {k}] M={m}: {case['weight_gbps']:.0f} GB/s of weight "
                  f"(copy {case['copy_gbps']:.0f}), torch f16 matmul / dqgen {r['torch_f16/dqgen']:.2f}, "
                  f"dequantize+matmul / dqgen {r['dequant_matmul/dqgen']:.2f}", flush=True)
        del on_dev
    return {"date": _now(), "repeat": repeat, "inner": INNER, "cases": cases}


def linear_lines(result: dict) -> list[str]:
    lines = [f"{'linear (f16 x, f16 y)':34s} {'M':>4s} {'W GB/s':>7s} {'copy':>6s}  of copy  "
             "torch f16/dqgen  dequant+mm/dqgen"]
    for c in result["cases"]:
        r = c["ratios"]
        lines.append(f"{c['format'] + ' [%d, %d]' % tuple(c['shape']):34s} {c['m']:4d} "
                     f"{c['weight_gbps']:7.0f} {c['copy_gbps']:6.0f}  {c['weight_gbps'] / c['copy_gbps'] * 100:6.0f}%  "
                     f"{r['torch_f16/dqgen']:15.2f}  {r['dequant_matmul/dqgen']:16.2f}")
    return lines
