"""The ``dqgen`` command line: demo, emit, aot (build), list, verify, convert, cache."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .version import __version__


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
    kernel = plan.kernel
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


# --- emit ---------------------------------------------------------------------------

def _emit_spec(args: argparse.Namespace):
    """The descriptor and KernelSpec the emit flags name (validated like any request)."""
    from .aot import make_descriptor, op_class, parse_target
    from .errors import InvalidProblemError
    from .ir import DequantizePerGroupDescriptor, QuantizePerGroupDescriptor
    from .lower import lower

    takes_int = op_class(args.op) in (DequantizePerGroupDescriptor, QuantizePerGroupDescriptor)
    if takes_int and args.int is None:
        raise InvalidProblemError(f"{args.op} needs --int (an integer storage dtype, e.g. s8)")
    if not takes_int and args.int is not None:
        raise InvalidProblemError(f"{args.op} takes no --int (it reads and writes only "
                                  "floating point)")
    desc = make_descriptor(args.op, args.int, args.float, args.group_size)
    target, arch = parse_target(args.target if args.arch is None else f"{args.target}:{args.arch}")
    return desc, lower(desc, target, arch)


def _emit(args: argparse.Namespace) -> int:
    """Print (or write) a kernel's exact source, its IR levels, or its PTX."""
    from .errors import InvalidProblemError
    from .jit import render_source
    from .lower import describe

    desc, spec = _emit_spec(args)
    if args.ir:
        text = (f"# descriptor (verified; outer and axis are runtime arguments)\n"
                f"{describe(desc)}\nuri: {desc.uri}\n\n"
                f"# KernelSpec ({spec.target}, {spec.arch})\n{spec.pretty()}\n")
    elif args.ptx:
        if spec.target != "cuda":
            raise InvalidProblemError("--ptx needs --target cuda")
        from .build import nvrtc
        art = nvrtc.compile_cuda(render_source(spec).text, name=spec.uri, arch=spec.arch)
        text = art.ptx.decode()
    else:
        text = render_source(spec).text
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


# --- aot -----------------------------------------------------------------------------

class _Progress:
    """A one-line progress bar on a terminal, one line a kernel otherwise."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int, request, data: dict) -> None:
        status = ("FAILED" if "error" in data else "built" if data["built"] else "cached")
        width = 24
        bar = "#" * (width * done // total) + "-" * (width - width * done // total)
        line = f"[{bar}] {done}/{total} {request.label} {status}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if done == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _requests(args: argparse.Namespace):
    """The kernels ``aot``/``list`` name: a manifest, or the selection flags."""
    from . import aot
    from .errors import InvalidProblemError

    flags = {key: getattr(args, key) for key in aot.SELECTION_KEYS if key != "filter"}
    if getattr(args, "manifest", None):
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v]
        if given:
            raise InvalidProblemError(f"give either --manifest or selection flags, not both "
                                      f"({', '.join(given)})")
        selections, filters = aot.read_manifest(args.manifest)
        requests = aot.narrow(aot.enumerate_kernels(selections), filters)
    else:
        requests = aot.enumerate_kernels([{k: v for k, v in flags.items() if v}])
    return aot.narrow(requests, args.filter or [])


def _aot(args: argparse.Namespace) -> int:
    """Build the selected kernels in parallel and write them as a bundle."""
    from . import aot
    from .errors import InvalidProblemError

    requests = _requests(args)
    if not requests:
        raise InvalidProblemError("nothing to build: the selection matches no kernel")
    if args.dry_run:
        for r in requests:
            print(f"{r.uri}\t{r.target}:{r.arch}")
        return 0
    if args.jobs < 1:
        raise InvalidProblemError(f"--jobs={args.jobs} must be >= 1")
    start = time.perf_counter()
    progress = None if args.quiet else _Progress(sys.stderr)
    out, results = aot.build_bundle(requests, args.out, args.jobs, progress)
    built = sum(r.entry.built for r in results)
    kernels = f"{len(results)} kernel{'s' if len(results) != 1 else ''}"
    print(f"dqgen: wrote bundle {out}: {kernels} ({built} built, "
          f"{len(results) - built} from the cache) in {time.perf_counter() - start:.1f} s")
    return 0


# --- list ----------------------------------------------------------------------------

def _is_bundle(path: Path) -> bool:
    from .bundle import MANIFEST
    if path.is_dir():
        return True
    if path.name == MANIFEST:
        try:
            import json
            return json.loads(path.read_text()).get("format") == "dqgen-bundle"
        except (OSError, ValueError, AttributeError):
            return False
    return False


def _list(args: argparse.Namespace) -> int:
    """Show what a bundle or an AOT manifest holds (no PATH: the DQGEN_BUNDLE bundles)."""
    from . import bundle
    from .errors import InvalidProblemError

    if args.path is None:
        bundles = bundle.active_bundles()
        if not bundles:
            raise InvalidProblemError("no PATH given and DQGEN_BUNDLE is not set")
    elif not Path(args.path).exists():
        raise InvalidProblemError(f"{args.path} does not exist (expected a bundle directory "
                                  "or a manifest file)")
    elif _is_bundle(Path(args.path)):
        bundles = [bundle.Bundle.open(args.path)]
    else:
        if args.verify:
            raise InvalidProblemError("--verify applies to a bundle, not to a manifest")
        from . import aot
        selections, filters = aot.read_manifest(args.path)
        requests = aot.narrow(aot.enumerate_kernels(selections), filters)
        print(f"manifest {args.path}: {len(requests)} kernels")
        for r in requests:
            print(f"  {r.uri:<32} {r.target}:{r.arch}")
        return 0
    status = 0
    for b in bundles:
        print(f"bundle {b.path} (dqgen {b.dqgen_version}): {len(b.kernels)} kernels")
        for k in b.kernels.values():
            files = ",".join(sorted(k.binaries))
            where = f"{k.target}:{k.arch}"
            print(f"  {k.uri:<32} {where:<12} {files:<10} key={k.cache_key[:16]}")
        if args.verify:
            problems = b.verify()
            for problem in problems:
                print(f"  FAILED {problem}")
            print(f"  verify: {'every file matches its sha256' if not problems else f'{len(problems)} problem(s)'}")
            status = status or (1 if problems else 0)
    return status


# --- verify --------------------------------------------------------------------------

def _verify(args: argparse.Namespace) -> int:
    """Run every kernel of the bundles (or the cache) against the oracle; exit 1 on any
    mismatch or kernel that cannot run."""
    from . import bundle, verify
    from .errors import InvalidProblemError

    if args.cache:
        if args.path:
            raise InvalidProblemError("give a bundle PATH or --cache, not both")
        from . import cache
        groups = [(f"cache {cache.version_dir()}", lambda: verify.verify_cache(args.seed))]
    else:
        bundles = [bundle.Bundle.open(p) for p in args.path] if args.path else \
            bundle.active_bundles()
        if not bundles:
            raise InvalidProblemError("no PATH given and DQGEN_BUNDLE is not set (or pass "
                                      "--cache to verify the kernel cache)")
        groups = [(f"bundle {b.path}", lambda b=b: verify.verify_bundle(b, args.seed))
                  for b in bundles]
    failed = 0
    for title, run in groups:
        outcomes = run()
        print(f"{title}: {len(outcomes)} kernels")
        for outcome in outcomes:
            if not (args.quiet and outcome.status == verify.OK):
                print(f"  {outcome}")
        bad = sum(o.failed for o in outcomes)
        counts = {s: sum(o.status == s for o in outcomes) for s in
                  (verify.OK, verify.MISMATCH, verify.FAILED, verify.SKIPPED)}
        print("  " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        failed += bad
    return 1 if failed else 0


# --- cache ---------------------------------------------------------------------------

def _cache_info(args: argparse.Namespace) -> int:
    """Print the cache directory, its entry count and size."""
    from . import cache
    info = cache.info()
    print(f"dir      {info['dir']}")
    print(f"entries  {info['entries']}")
    print(f"size     {info['bytes'] / 2**20:.1f} MiB ({info['bytes']} bytes)")
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    """Remove every cached kernel (of every dqgen version)."""
    from . import cache
    count = cache.clear()
    print(f"removed {count} cache entries from {cache.cache_root()}")
    return 0


# --- parser --------------------------------------------------------------------------

def _add_kernel_flags(p: argparse.ArgumentParser, *, many: bool) -> None:
    """Selection flags shared by emit (one value each) and aot (lists)."""
    from .ir import INT_DTYPES

    kw = {"action": "append"} if many else {}
    plural = " (comma-separated or repeated)" if many else ""
    ints = ", ".join(d.value for d in INT_DTYPES)
    p.add_argument("--int", metavar="DTYPE", help=f"integer storage dtype: {ints}" + plural
                   + (" [default: s8,u8]" if many else ""), **kw)
    p.add_argument("--float", metavar="DTYPE", required=not many,
                   help="float dtype: f32, f64, f16 or bf16" + plural
                   + (" [default: all four]" if many else ""), **kw)
    p.add_argument("--group-size", metavar="N", required=not many,
                   type=str if many else int,
                   help="group size" + plural + (" [default: 128]" if many else ""), **kw)


def _add_format_flags(p: argparse.ArgumentParser) -> None:
    """The checkpoint formats' knobs for aot (lists, comma-separated or repeated)."""
    from .aot import ggml_types
    p.add_argument("--bits", action="append", metavar="N",
                   help="GPTQ bits: 2, 4, 8; HQQ bits: 8, 4, 3, 2, 1 [default: 4]")
    p.add_argument("--checkpoint-format", action="append", metavar="NAME",
                   help="GPTQ: gptq (v1) or gptq_v2 [default: gptq]")
    p.add_argument("--act-order", action="append", metavar="yes|no|both",
                   help="GPTQ kernels reading g_idx (yes), in row order (no) [default: both]")
    p.add_argument("--scale", action="append", metavar="DTYPE",
                   help="GPTQ/AWQ scales' dtype [default: f16]")
    p.add_argument("--ggml-type", action="append", metavar="TYPE",
                   help=f"GGML block types: {', '.join(ggml_types())} [default: every one "
                   "this dqgen builds]")


def build_parser() -> argparse.ArgumentParser:
    from .aot import ALL_OPS, DEFAULT_CUDA_ARCH, OPS

    parser = argparse.ArgumentParser(
        prog="dqgen", description="dqgen generates, builds and caches bit-exact grouped "
        "(de)quantization kernels for C/OpenMP and CUDA.")
    parser.add_argument("--version", action="version", version=f"dqgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="build a kernel, dequantize a 4096x4096 s8 weight to "
                          "bf16, check it bit for bit and show timing and cache location",
                          description="Quantize a 4096x4096 f32 weight to s8, JIT-build (or "
                          "load) the s8 -> bf16 dequantize kernel, run it, check it bit for "
                          "bit against the reference and show timing and cache location.")
    demo.add_argument("--rows", type=int, default=4096)
    demo.add_argument("--cols", type=int, default=4096)
    demo.add_argument("--group-size", type=int, default=128)
    demo.add_argument("--repeat", type=int, default=20)
    demo.set_defaults(func=_demo)

    emit = sub.add_parser(
        "emit", help="print a kernel's exact source, its IR (--ir) or its PTX (--ptx)",
        description="Print the exact source dqgen compiles for one kernel (the same text as "
        "plan.source()), or with --ir the verified descriptor and its KernelSpec, or with "
        "--ptx the PTX NVRTC makes of a CUDA kernel.")
    emit.add_argument("op", choices=list(OPS), help="the op")
    _add_kernel_flags(emit, many=False)
    emit.add_argument("--target", choices=["c", "cuda"], default="c", help="[default: c]")
    emit.add_argument("--arch", help="C ISA (generic, avx2, avx512, avx512_bf16, avx512_fp16) [default: this machine's] "
                      f"or CUDA arch (sm_XX) [default: {DEFAULT_CUDA_ARCH}]")
    what = emit.add_mutually_exclusive_group()
    what.add_argument("--ir", action="store_true", help="print the descriptor and KernelSpec")
    what.add_argument("--ptx", action="store_true", help="print PTX (CUDA; needs NVRTC)")
    emit.add_argument("--out", "-o", metavar="FILE", help="write to FILE instead of stdout")
    emit.set_defaults(func=_emit)

    aot = sub.add_parser(
        "aot", aliases=["build"], help="build kernels ahead of time into a bundle",
        description="Build every kernel a manifest (TOML or JSON) or the selection flags "
        "name (ops x int dtypes x float dtypes x group sizes x the formats' knobs x "
        "targets), in parallel and through the cache, and write a bundle: sources, "
        "binaries, dqgen_kernels.h and manifest.json. A flag an op does not take is "
        "ignored for it, a value it cannot take skipped. Run with DQGEN_BUNDLE=DIR "
        "(DQGEN_DISABLE_JIT=1 to never compile); check it with dqgen verify.")
    aot.add_argument("--manifest", "-m", metavar="FILE",
                     help="TOML or JSON file with keys op, int, float, group_size, target, "
                     "bits, checkpoint_format, act_order, scale, ggml_type, filter (and "
                     "[[kernels]] tables of the same keys)")
    aot.add_argument("--op", action="append", metavar="OP",
                     help=f"ops: {', '.join(ALL_OPS)} (comma-separated or repeated) "
                     f"[default: the family's {len(OPS)}]")
    _add_kernel_flags(aot, many=True)
    _add_format_flags(aot)
    aot.add_argument("--target", action="append", metavar="TARGET",
                     help="c (this machine's ISA), c:ISA, cuda (sm_90) or cuda:sm_XX "
                     "(comma-separated or repeated) [default: c]")
    aot.add_argument("--filter", action="append", metavar="GLOB",
                     help="keep kernels whose URI (e.g. dequant_pg_s8_bf16_g128) matches "
                     "any GLOB")
    aot.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                     help="parallel builds [default: CPU count]")
    aot.add_argument("--out", "-o", metavar="DIR", required=True,
                     help="the bundle directory (an existing bundle there is replaced)")
    aot.add_argument("--dry-run", action="store_true",
                     help="list the kernels that would be built and stop")
    aot.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    aot.set_defaults(func=_aot)

    lst = sub.add_parser("list", help="show what a bundle or an AOT manifest holds",
                         description="List the kernels of a bundle directory or of an AOT "
                         "manifest file; without PATH, the bundles in DQGEN_BUNDLE.")
    lst.add_argument("path", nargs="?", metavar="PATH", help="bundle dir or manifest file")
    lst.add_argument("--verify", action="store_true",
                     help="check every bundle file against its recorded sha256 (exit 1 on "
                     "a mismatch)")
    lst.set_defaults(func=_list)

    ver = sub.add_parser(
        "verify", help="run every kernel of a bundle (or the cache) against the reference "
        "on random inputs", description="Run every kernel of the bundles at PATH (default: "
        "those in DQGEN_BUNDLE) or, with --cache, of the kernel cache, on random inputs "
        "(special values included) against dqgen.reference or the format's oracle, and "
        "report each: ok, mismatch (with the first differing index and values), could not "
        "run (damaged, stale, unloadable) or skipped (another CPU or no GPU). Exit 1 on any "
        "mismatch or kernel that cannot run.")
    ver.add_argument("path", nargs="*", metavar="PATH", help="bundle directories")
    ver.add_argument("--cache", action="store_true", help="verify the kernel cache instead")
    ver.add_argument("--seed", type=int, default=0, help="random inputs' seed [default: 0]")
    ver.add_argument("--quiet", "-q", action="store_true", help="list only kernels that "
                     "are not ok")
    ver.set_defaults(func=_verify)

    from .formats import convert
    convert_p = sub.add_parser(
        "convert", help="dequantize every GPTQ/AWQ layer of a safetensors checkpoint into "
        "plain float weights, copying other tensors unchanged, or every tensor of a .gguf file",
        description=convert.__doc__)
    convert.add_arguments(convert_p)
    convert_p.set_defaults(func=convert.run)

    cache_p = sub.add_parser("cache", help="inspect or clear the kernel cache",
                             description="Inspect or clear the on-disk kernel cache "
                             "(DQGEN_CACHE_DIR, else the user cache dir).")
    cache_sub = cache_p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    info = cache_sub.add_parser("info", help="show the cache directory, entries and size",
                                description="Show the cache directory, entries and size.")
    info.set_defaults(func=_cache_info)
    clear = cache_sub.add_parser("clear", help="remove every cached kernel",
                                 description="Remove every cached kernel of every dqgen "
                                 "version.")
    clear.set_defaults(func=_cache_clear)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import DqgenError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DqgenError as exc:
        print(f"dqgen: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dqgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
