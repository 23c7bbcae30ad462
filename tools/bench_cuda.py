"""GPU part of tools/bench.py (``--device cuda``): effective bandwidth of dqgen's CUDA plan
beside a device-to-device copy of the same bytes, a cast-copy ``q -> output`` (what a
stream of the same bytes is on a GPU) and torch eager ``(q - zp) * scale``.

Times come from CUDA events around ``INNER`` back-to-back calls (launch overhead spread
over them), median of the repetitions, contenders interleaved. dqgen is assumed to
launch on torch's current stream (the default stream here), which the events time.
``run_device`` takes a torch device so the same code can be exercised on the CPU.
"""

from __future__ import annotations

import datetime
import random
import statistics
import time

import dqgen

SHAPES = ((8192, 8192), (11008, 4096))
FLOATS = ("f16", "bf16", "f32")
INNER = 10


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


def _case(torch, dev, timed, rows, cols, group, float_name, q, zp, repeat, gen) -> dict:
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
        desc = dqgen.DequantizePerGroupDescriptor(rows, cols, group, float_name, "s8")
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
        want = ((q.view(rows, groups, group).to(torch.int32) - zp.unsqueeze(-1)).to(torch.float32)
                * scale.to(torch.float32).unsqueeze(-1)).view(rows, cols).to(tf)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
        exact = bool(torch.equal(out.view(bits), want.view(bits)))
        if not exact:
            raise SystemExit(f"bench: dqgen's s8->{float_name} output on {dev} is not bit-exact")
    med = {n: statistics.median(t) for n, t in times.items()}
    gbps = {"dqgen": moved / med["dqgen"] / 1e9 if "dqgen" in med else None,
            "d2d_copy": 2 * half / med["d2d_copy"] / 1e9,
            "cast_copy": (q.nbytes + out.nbytes) / med["cast_copy"] / 1e9,
            "torch_eager": moved / med["torch_eager"] / 1e9}
    case = {"shape": [rows, cols], "int": "s8", "float": float_name, "group": group, "bytes": moved,
            "median_s": med, "gbps": gbps, "bit_exact": exact, "note": note, "samples_s": times}
    if "dqgen" in med:
        case["ratios"] = {"dqgen/d2d_copy": med["dqgen"] / med["d2d_copy"],
                          "dqgen/cast_copy": med["dqgen"] / med["cast_copy"],
                          "torch_eager/dqgen": med["torch_eager"] / med["dqgen"]}
    return case


def run_device(shapes=None, floats=None, group: int = 128, repeat: int = 20,
               torch_device: str = "cuda") -> dict | None:
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
                    capability=f"sm_{props.major}{props.minor}", cuda=torch.version.cuda)
    print(f"dqgen bench --device {dev}: {info.get('name', dev)}", flush=True)
    timed = _timer(torch, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = []
    for rows, cols in shapes or SHAPES:
        if cols % group:
            raise SystemExit(f"bench: axis {cols} is not a multiple of group {group}")
        q = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, device=dev, generator=gen)
        zp = torch.randint(-16, 16, (rows, cols // group), dtype=torch.int32, device=dev, generator=gen)
        for float_name in floats or FLOATS:
            case = _case(torch, dev, timed, rows, cols, group, float_name, q, zp, repeat, gen)
            cases.append(case)
            shown = "  ".join(f"{n} {v:.0f} GB/s" for n, v in case["gbps"].items() if v is not None)
            print(f"  [{rows}, {cols}] s8->{float_name} g{group}: {shown}", flush=True)
        del q, zp
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"date": _now(), "device": info, "repeat": repeat, "inner": INNER, "group": group,
            "cases": cases}


def print_device(result: dict) -> None:
    print()
    print(f"{'case':28s} {'dqgen':>10s} {'d2d copy':>10s} {'cast copy':>10s} {'torch eager':>12s}  "
          "GB/s; dqgen/copy")
    for c in result["cases"]:
        g = c["gbps"]
        cell = lambda v: f"{v:10.0f}" if v is not None else f"{'-':>10s}"  # noqa: E731
        ratio = f"{c['ratios']['dqgen/d2d_copy']:.2f}" if "ratios" in c else "-"
        print(f"[{c['shape'][0]}, {c['shape'][1]}] s8->{c['float']:5s} {cell(g['dqgen'])} "
              f"{cell(g['d2d_copy'])} {cell(g['cast_copy'])} {cell(g['torch_eager']):>12s}  {ratio}")
