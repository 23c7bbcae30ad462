"""PyTorch rows of the benchmark: dqgen.torch's registered ops against the plain functions
and against fake quantization written in torch.

Run by ``tools/bench.py`` (or alone: ``python tools/bench_torch.py``). Medians of
interleaved repetitions in one process (tools/bench_timing.py), every dqgen result first
checked bit for bit against SPEC.md written in torch. Two parts:

* per-call overhead on a [64, 4096] and a [1, 128] s8 -> f32 dequantize (group 128), one
  thread: the plain function, the registered op (``torch.ops.dqgen.dequantize_per_group``)
  with grad mode on, and in ``torch.inference_mode()`` (where the dispatcher skips
  autograd), an op registered the same way that does nothing (what the dispatch itself
  costs), and the plain function followed by that empty op (the dispatch also leaves the
  next call colder caches than a tight loop of plain calls);
* fake quantize forward + backward on [4096, 4096] f32 (group 128, 4-bit range) at 1 and
  2 threads: ``dqgen.torch.fake_quantize_per_group`` against the same per-group STE written
  by hand in torch (an autograd.Function: round, clamp, scale, mask) and against
  ``torch.fake_quantize_per_channel_affine`` on the [rows * groups, group] view (one
  channel a group; torch's rounding convention differs, so only its time is compared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import dqgen  # noqa: E402
from bench_timing import LoadMeter, interleaved, summarize  # noqa: E402

try:
    import torch
except ImportError:  # run() says so and returns None
    torch = None

OVERHEAD_SHAPE = (64, 4096)
SMALL_SHAPE = (1, 128)  # the fixed cost, where caches hold everything
FAKE_SHAPE = (4096, 4096)
GROUP = 128
Q_RANGE = (-8, 7)


def _nothing_op():
    """An op with dequantize's schema, registered as dqgen.torch registers its own (the
    same Autograd kernel), that does nothing: the floor of a ``dqgen::`` call."""
    if not hasattr(torch.ops.dqgen, "bench_nothing"):
        from dqgen.torch import _op

        @_op("bench_nothing")
        def nothing(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    group_size: int) -> torch.Tensor:
            return scale.new_empty(0)

        nothing.register_fake(lambda q, scale, zero_point, group_size: scale.new_empty(0))
    return torch.ops.dqgen.bench_nothing.default


def _median_us(samples: list[float]) -> float:
    return summarize(samples)["median_s"] * 1e6


def overhead(shape=OVERHEAD_SHAPE, repeat: int = 200) -> dict:
    """Microseconds a call: plain function, registered op, op in inference mode, empty op."""
    import dqgen.torch  # noqa: F401  (registers torch.ops.dqgen)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    scale, zp = dqgen.choose_qparams_per_group(x, GROUP, dtype="s8")
    q = dqgen.quantize_per_group(x, scale, zp, GROUP, dtype="s8")
    plain = dqgen.dequantize_per_group(q, scale, zp, GROUP)
    if not torch.equal(torch.ops.dqgen.dequantize_per_group(q, scale, zp, GROUP), plain):
        raise SystemExit("dqgen.torch: the op and the plain function disagree")
    op = torch.ops.dqgen.dequantize_per_group.default
    nothing = _nothing_op()

    def inference():
        with torch.inference_mode():
            return op(q, scale, zp, GROUP)

    calls = {"plain": lambda: dqgen.dequantize_per_group(q, scale, zp, GROUP),
             "op": lambda: op(q, scale, zp, GROUP), "op_inference": inference,
             "empty_op": lambda: nothing(q, scale, zp, GROUP),
             "plain_then_empty_op": lambda: (dqgen.dequantize_per_group(q, scale, zp, GROUP),
                                             nothing(q, scale, zp, GROUP))}
    with _threads(1), LoadMeter() as load:
        times = interleaved(calls, repeat=repeat, warmup=5, burst=4)
    med = {k: _median_us(v) for k, v in times.items()}
    return {"shape": list(shape), "group": GROUP, "threads": 1,
            "foreign_cpus": load.foreign,
            **{f"{k}_us": v for k, v in med.items()},
            "overhead_us": med["op"] - med["plain"],
            "overhead_inference_us": med["op_inference"] - med["plain"]}


def torch_fake_quantize():
    """Per-group fake quantize written by hand in torch, as an autograd.Function: SPEC.md's
    forward, and the straight-through ``dy * mask`` backward of
    ``torch.fake_quantize_per_channel_affine``."""

    class TorchFakeQuantize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale, zp, group_size, q_min, q_max):
            rows, cols = x.shape
            s = scale.unsqueeze(-1)
            z = zp.unsqueeze(-1).to(x.dtype)
            shifted = torch.round(torch.where(s == 0, 0, x.view(rows, -1, group_size) / s)) + z
            mask = (shifted >= q_min) & (shifted <= q_max) & (s != 0)
            ctx.save_for_backward(mask)
            return ((shifted.nan_to_num(0).clamp(q_min, q_max) - z) * s).view(rows, cols)

        @staticmethod
        def backward(ctx, dy):
            (mask,) = ctx.saved_tensors
            return (dy.view(mask.shape) * mask).view(dy.shape), None, None, None, None, None

    return TorchFakeQuantize.apply


class _threads:
    """dqgen's and torch's thread count, for the duration of a block."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.saved = (os.environ.get("DQGEN_NUM_THREADS"), torch.get_num_threads())
        os.environ["DQGEN_NUM_THREADS"] = str(self.n)
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        env, n = self.saved
        if env is None:
            os.environ.pop("DQGEN_NUM_THREADS", None)
        else:
            os.environ["DQGEN_NUM_THREADS"] = env
        torch.set_num_threads(n)


def fake_quantize(threads=(1, 2), repeat: int = 10) -> list[dict]:
    """Forward + backward milliseconds of the three fake quantizers, and the ratios."""
    import dqgen.torch as dt
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(FAKE_SHAPE, generator=gen).requires_grad_()
    dy = torch.randn(FAKE_SHAPE, generator=gen)
    scale, zp = dqgen.choose_qparams_per_group(x.detach(), GROUP, dtype="s8",
                                               q_min=Q_RANGE[0], q_max=Q_RANGE[1])
    rows, cols = FAKE_SHAPE
    channels = (scale.reshape(-1), zp.reshape(-1))
    by_hand = torch_fake_quantize()

    def step(forward):
        def call():
            y = forward()
            (dx,) = torch.autograd.grad(y, x, dy)
            return y, dx
        return call

    calls = {
        "dqgen": step(lambda: dt.fake_quantize_per_group(x, scale, zp, GROUP, *Q_RANGE)),
        "torch_expr": step(lambda: by_hand(x, scale, zp, GROUP, *Q_RANGE)),
        "torch_op": step(lambda: torch.fake_quantize_per_channel_affine(
            x.view(rows * cols // GROUP, GROUP), *channels, 0, *Q_RANGE).view(rows, cols)),
    }
    out = []
    for n in threads:
        with _threads(n):
            (y, dx), (y_ref, dx_ref) = calls["dqgen"](), calls["torch_expr"]()
            if not torch.equal(y, y_ref):
                raise SystemExit("dqgen.torch fake quantize: forward differs from torch's")
            if not torch.equal(dx != 0, dx_ref != 0):
                raise SystemExit("dqgen.torch fake quantize: gradient mask differs from torch's")
            with LoadMeter() as load:
                times = interleaved(calls, repeat=repeat, warmup=1)
        med = {k: summarize(v)["median_s"] * 1e3 for k, v in times.items()}
        out.append({"shape": list(FAKE_SHAPE), "group": GROUP, "threads": n,
                    "foreign_cpus": load.foreign,
                    **{f"{k}_ms": v for k, v in med.items()},
                    "speedup_expr": med["torch_expr"] / med["dqgen"],
                    "speedup_op": med["torch_op"] / med["dqgen"]})
    return out


def run(repeat: int = 10) -> dict | None:
    """Both parts, or None (with a note) where torch is not installed."""
    if torch is None:
        print("torch is not installed: PyTorch rows skipped", file=sys.stderr)
        return None
    return {"overhead": [overhead(OVERHEAD_SHAPE), overhead(SMALL_SHAPE)],
            "fake_quantize": fake_quantize(repeat=repeat),
            "torch": torch.__version__}


def _cpus(value) -> str:
    return "?" if value is None else f"{value:.2f}"


def table(result: dict) -> str:
    lines = [f"Per call, s8 -> f32 g{GROUP}, one thread, torch {result['torch']} (an op that "
             "does nothing: the dispatch alone; the plain function then that op: what a call "
             "between two plain calls costs them):", "",
             "| shape | plain function us | registered op us | in inference_mode us | "
             "op that does nothing us | plain then that op us | CPUs busy elsewhere |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {o['shape']} | {o['plain_us']:.1f} | {o['op_us']:.1f} "
              f"(+{o['overhead_us']:.1f}) | {o['op_inference_us']:.1f} "
              f"(+{o['overhead_inference_us']:.1f}) | {o['empty_op_us']:.1f} | "
              f"{o['plain_then_empty_op_us']:.1f} | {_cpus(o['foreign_cpus'])} |"
              for o in result["overhead"]]
    lines += ["", "| fake quantize fwd+bwd | threads | dqgen ms | torch by hand ms | "
              "torch.fake_quantize_per_channel_affine ms | speed-up (by hand / per-channel op) "
              "| CPUs busy elsewhere |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} f32 g{r['group']} | {r['threads']} | {r['dqgen_ms']:.1f} | "
              f"{r['torch_expr_ms']:.1f} | {r['torch_op_ms']:.1f} | {r['speedup_expr']:.2f}x / "
              f"{r['speedup_op']:.2f}x | {_cpus(r['foreign_cpus'])} |"
              for r in result["fake_quantize"]]
    return "\n".join(lines)


def section(result: dict) -> str:
    """The rows as a markdown section of docs/bench.md."""
    return "\n### PyTorch ops (dqgen.torch)\n\n" + table(result) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    result = run(args.repeat)
    if result is None:
        return 1
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
