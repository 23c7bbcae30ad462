"""The ``dqgen`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    """Quantize a real-sized weight, JIT-build the dequantize kernel and check it."""
    import ml_dtypes

    from . import cache, dequantize_per_group, plans, quantize_per_group, reference
    from .api import choose_qparams_per_group
    from .ir import DequantizePerGroupDescriptor

    rows, cols, group = args.rows, args.cols, args.group_size
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((rows, cols), dtype=np.float32)
    scale, zero_point = choose_qparams_per_group(weight, group, dtype="s8")
    q = quantize_per_group(weight, scale, zero_point, group, dtype="s8")
    scale_bf16 = scale.astype(ml_dtypes.bfloat16)

    desc = DequantizePerGroupDescriptor(rows, cols, group, "bf16", "s8")
    start = time.perf_counter()
    plan = plans.DequantizePerGroupPlan.select(desc)
    select_s = time.perf_counter() - start
    out = np.empty((rows, cols), dtype=ml_dtypes.bfloat16)
    call = plans.DequantizePerGroupArgs(q, scale_bf16, zero_point, out)
    plan.run(call)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        plan.run(call)
        times.append(time.perf_counter() - start)
    expected = reference.dequantize_per_group(q, scale_bf16, zero_point, group)
    exact = np.array_equal(out.view(np.uint16), expected.view(np.uint16))
    again = dequantize_per_group(q, scale_bf16, zero_point, group)
    exact &= np.array_equal(again.view(np.uint16), expected.view(np.uint16))
    best = min(times)
    moved = q.nbytes + out.nbytes
    kernel = plan._kernel
    print(f"dqgen {__version__}: dequantize s8 -> bf16, [{rows}, {cols}], group {group}")
    print(f"  kernel      {plan.sku()}")
    print(f"  select      {select_s * 1e3:.1f} ms ({'built now' if kernel.compiled else 'loaded from cache'})")
    print(f"  run         {best * 1e3:.3f} ms best of {args.repeat} ({moved / best / 1e9:.1f} GB/s)")
    print(f"  bit-exact   {'yes' if exact else 'NO'} (against dqgen.reference)")
    print(f"  max |w - dequant(quant(w))| = {np.abs(out.astype(np.float32) - weight).max():.4g}")
    print(f"  cache entry {kernel.entry_dir}")
    print(f"  source      {kernel.entry_dir / 'kernel.c'}")
    print(f"  cache root  {cache.cache_root()}")
    return 0 if exact else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqgen", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dqgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a kernel, dequantize a 4096x4096 s8 weight to "
                          "bf16, check it bit for bit and show timing and cache location")
    demo.add_argument("--rows", type=int, default=4096)
    demo.add_argument("--cols", type=int, default=4096)
    demo.add_argument("--group-size", type=int, default=128)
    demo.add_argument("--repeat", type=int, default=20)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import DqgenError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DqgenError as exc:
        print(f"dqgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
