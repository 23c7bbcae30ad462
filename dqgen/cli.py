"""The ``dqgen`` command line: demo, emit, aot (build), list, verify, convert, cache."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import targets
from .layouts import kinds
from .version import __version__


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the option it was given)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _demo(args: argparse.Namespace) -> int:
    """Quantize a real-sized weight, JIT-build the dequantize kernel and check it."""
    import ml_dtypes

    from . import cache, dequantize_per_group, plans, quantize_per_group, reference
    from .api import choose_qparams_per_group
    from .errors import InvalidProblemError
    from .ir import DequantizePerGroupDescriptor

    rows, cols, group = args.rows, args.cols, args.group_size
    if cols % group:
        raise InvalidProblemError(f"--cols {cols} is not a multiple of --group-size {group}")
    # bytes a value takes: the f32 weight, its s8 q, the bf16 result, an f32 temporary
    need = rows * cols * (4 + 2 + 1 + 4)
    try:
        rng = np.random.default_rng(0)
        weight = rng.standard_normal((rows, cols), dtype=np.float32)
    except (MemoryError, ValueError):  # ValueError: more bytes than numpy can index
        raise InvalidProblemError(f"--rows {rows} --cols {cols} needs about "
                                  f"{need / 2**30:.1f} GiB of memory") from None
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

# The selection flags each format op's kernels take (besides --float, --target, --arch
# and --filter), as its kind in layouts/ names them; a flag an op does not take is refused.
EMIT_FORMAT_FLAGS = {op: keys for kind in kinds() for op, keys in kind.aot_keys.items()}
_FORMAT_FLAG_KEYS = ("int", "group_size", "bits", "checkpoint_format", "act_order", "scale",
                     "v1_zeros", "ggml_type", "q_min", "q_max", "block", "fp8", "weight",
                     "compute")
# A request's fields and knobs, and the flag that chooses each (for "name one kernel").
_CHOOSING_FLAGS = (("int_dtype", "--int"), ("float_dtype", "--float"),
                   ("group_size", "--group-size"), ("bits", "--bits"),
                   ("checkpoint_format", "--checkpoint-format"), ("act_order", "--act-order"),
                   ("scale_dtype", "--scale"), ("v1_zeros", "--v1-zeros"),
                   ("qtype", "--ggml-type"), ("q_min", "--q-min"), ("q_max", "--q-max"),
                   ("block_rows", "--block"), ("block_cols", "--block"), ("fp8", "--fp8"),
                   ("op", "--filter"))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _target_text(args: argparse.Namespace) -> str:
    return args.target if args.arch is None else f"{args.target}:{args.arch}"


def _family_spec(args: argparse.Namespace):
    """The descriptor and KernelSpec of one of the family's four ops."""
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
    extra = [_flag(k) for k in _FORMAT_FLAG_KEYS
             if k not in ("int", "group_size") and getattr(args, k) is not None]
    if extra or args.filter:
        raise InvalidProblemError(f"{args.op} takes no {(extra or ['--filter'])[0]} (a "
                                  "checkpoint format's knob)")
    for key in ("float", "group_size"):
        if getattr(args, key) is None:
            raise InvalidProblemError(f"{args.op} needs {_flag(key)}")
    desc = make_descriptor(args.op, args.int, args.float, args.group_size)
    target, arch = parse_target(_target_text(args))
    return desc, lower(desc, target, arch)


def _one_kernel(op: str, requests: list):
    """The single request a format op's emit flags name, or an error saying which flags
    tell the candidates apart."""
    from .errors import InvalidProblemError
    if len(requests) == 1:
        return requests[0]
    if not requests:
        raise InvalidProblemError(f"--filter matches none of the {op} kernels these flags name")

    def values(field):  # an act-order kernel's group size (0) is any group size
        return {getattr(r, field) if hasattr(r, field) else dict(r.knobs).get(field)
                for r in requests if not (field == "group_size" and r.group_size == 0)}
    choosing = [flag for field, flag in _CHOOSING_FLAGS if len(values(field)) > 1]
    choosing = [f"--filter (e.g. --filter {requests[0].uri})" if flag == "--filter" else flag
                for flag in choosing or ["--filter"]]
    uris = ", ".join(r.uri for r in requests[:6]) + (", ..." if len(requests) > 6 else "")
    raise InvalidProblemError(f"emit prints one kernel, and these {op} flags name "
                              f"{len(requests)} ({uris}): choose with "
                              f"{' and '.join(choosing)}")


def _format_spec(args: argparse.Namespace):
    """The descriptor and KernelSpec of the one format kernel the flags name, found as
    ``dqgen aot`` enumerates (same knobs, same per-op defaults)."""
    from .errors import InvalidProblemError
    from .aot_selection import expand

    takes = EMIT_FORMAT_FLAGS[args.op]
    refused = [_flag(k) for k in _FORMAT_FLAG_KEYS if getattr(args, k) is not None
               and k not in takes]
    if refused:
        raise InvalidProblemError(f"{args.op} takes no {refused[0]}; its kernels' flags: "
                                  f"{', '.join(_flag(k) for k in ('float',) + takes)}")
    selection = {k: getattr(args, k) for k in ("float",) + takes if getattr(args, k) is not None}
    selection.update(op=args.op, target=_target_text(args))
    if args.filter:
        selection["filter"] = args.filter
    request = _one_kernel(args.op, expand(selection))
    return request.descriptor(), request.spec()


def _emit_spec(args: argparse.Namespace):
    """The descriptor and KernelSpec the emit flags name (validated like any request)."""
    from .aot_selection import FORMAT_OPS
    return _format_spec(args) if args.op in FORMAT_OPS else _family_spec(args)


# KernelSpec fields only one target's schedule fills and reads (each target's own set:
# ``Backend.schedule_knobs``). ``emit --ir`` prints a kernel's own target's.
C_ONLY_KNOBS = targets.backend("c").schedule_knobs
CUDA_ONLY_KNOBS = targets.backend("cuda").schedule_knobs


def target_knobs(spec) -> dict:
    """``spec.to_json()`` without the other targets' schedule knobs."""
    other = set().union(*(targets.backend(name).schedule_knobs for name in targets.names()
                          if name != spec.target))
    return {k: v for k, v in spec.to_json().items() if k not in other}


def _emit(args: argparse.Namespace) -> int:
    """Print (or write) a kernel's exact source, its IR levels, or its PTX."""
    import json

    from .errors import InvalidProblemError
    from .jit import render_source

    desc, spec = _emit_spec(args)
    if args.ir:
        text = (f"# descriptor (verified; its sizes are runtime arguments)\n"
                f"{spec.descriptor}\nuri: {desc.uri}\n\n"
                f"# KernelSpec ({spec.target}, {spec.arch}: this target's knobs)\n"
                f"{json.dumps(target_knobs(spec), indent=2)}\n")
    elif args.ptx:
        if "ptx" not in targets.backend(spec.target).binary_kinds:
            raise InvalidProblemError("--ptx needs --target cuda")
        from .build import nvrtc
        art = nvrtc.compile_cuda(render_source(spec).text, name=spec.uri, arch=spec.arch)
        text = art.ptx.decode()
    else:
        text = render_source(spec).text
    if args.out:
        _write_atomically(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """``path`` holds all of ``text`` or is left as it was (temp file + rename)."""
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    from .runtime.cpu import usable_cpus
    if args.jobs > usable_cpus():  # each job is a compiler process: more only wait
        print(f"dqgen aot: --jobs {args.jobs} lowered to {usable_cpus()}, the CPUs this "
              "process may use", file=sys.stderr)
        args.jobs = usable_cpus()
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
        if args.check_hashes:
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
        if args.check_hashes:
            problems = b.check_hashes()
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
    failed = ran = total = 0
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
        ran += len(outcomes) - counts[verify.SKIPPED]
        total += len(outcomes)
    if not ran:  # a gate that checked nothing must not pass
        what = f"all {total} kernels were skipped" if total else "there are no kernels"
        print(f"dqgen: error: nothing was verified: {what} (run it where they can run: "
              "this CPU's ISA, a CUDA GPU)", file=sys.stderr)
        return 1
    return 1 if failed else 0


# --- cache ---------------------------------------------------------------------------

def _cache_info(args: argparse.Namespace) -> int:
    """Print the cache directory, its entry count and size."""
    from . import cache
    info = cache.info()
    print(f"dir      {info['dir']}" + ("" if info["exists"] else " (does not exist yet)"))
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
                   + (" [default: s8,u8; packed: u4,s4; floatzp: u4,u8]" if many else
                      " (dequantize, quantize, packed, floatzp)"), **kw)
    p.add_argument("--float", metavar="DTYPE",
                   help="float dtype: f32, f64, f16 or bf16" + plural
                   + (" [default: all four; gptq, awq, floatzp, hqq: f16,bf16; ggml: "
                      "f32,f16,bf16]" if many else ""), **kw)
    p.add_argument("--group-size", metavar="N", type=str if many else int,
                   help="group size" + plural + " [default: 128; hqq: 64]", **kw)


def _add_format_flags(p: argparse.ArgumentParser, *, many: bool) -> None:
    """The checkpoint formats' knobs: lists for aot (comma-separated or repeated), one
    value each for emit; the defaults are the same."""
    from .aot import ggml_types
    from .ir import GPTQ_V1_ZEROS
    kw = {"action": "append"} if many else {}
    p.add_argument("--bits", metavar="N",
                   help="GPTQ bits: 2, 4, 8; HQQ bits: 8, 4, 3, 2, 1 [default: 4]", **kw)
    p.add_argument("--checkpoint-format", metavar="NAME",
                   help="GPTQ: gptq (v1) or gptq_v2 [default: gptq]", **kw)
    p.add_argument("--act-order", metavar="yes|no" + ("|both" if many else ""),
                   help="GPTQ kernels reading g_idx (yes), in row order (no) [default: both]",
                   **kw)
    p.add_argument("--scale", metavar="DTYPE", help="GPTQ/AWQ scales' dtype [default: f16]; "
                   "FP8's [default: f32]; bnb4's absmax: f32, or u8 with double quantization "
                   "[default: both]", **kw)
    p.add_argument("--v1-zeros", metavar="RULE",
                   help=f"GPTQ v1 zero points: {', '.join(GPTQ_V1_ZEROS)} (see dqgen convert "
                   f"--help) [default: {GPTQ_V1_ZEROS[0]}]", **kw)
    p.add_argument("--ggml-type", metavar="TYPE",
                   help=f"GGML block types: {', '.join(ggml_types())} [default: every one "
                   "this dqgen builds]", **kw)
    p.add_argument("--q-min", metavar="N", help="floatzp: the smallest q of the range whose "
                   "midpoint is subtracted [default: the int dtype's]", **kw)
    p.add_argument("--q-max", metavar="N", help="floatzp: the largest q of that range "
                   "[default: the int dtype's]", **kw)
    p.add_argument("--block", metavar="RxC", help="FP8: the rows x columns a scale covers "
                   "(0: the whole axis; 1x0 is one scale a row) [default: 128x128]", **kw)
    p.add_argument("--fp8", metavar="NAME", help="FP8 encoding: e4m3 (float8_e4m3fn) or e5m2 "
                   "[default: e4m3]", **kw)
    p.add_argument("--weight", metavar="OP", help="linear: the weight's format, as its op "
                   "(ggml, dequantize, packed, fp8) with that op's flags; --float is x's "
                   "dtype [default: ggml]", **kw)
    p.add_argument("--compute", metavar="f32|int8" + ("|both" if many else ""),
                   help="linear: f32 products, or int8 (x quantized a block of 32; GGML "
                   "weights, the forward product) [default: f32]", **kw)


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
    demo.add_argument("--rows", type=_positive, default=4096, metavar="N",
                      help="rows of the weight [default: 4096]")
    demo.add_argument("--cols", type=_positive, default=4096, metavar="N",
                      help="columns of the weight, a multiple of --group-size [default: 4096]")
    demo.add_argument("--group-size", type=_positive, default=128, metavar="N",
                      help="values that share a scale and zero point, along a row "
                      "[default: 128]")
    demo.add_argument("--repeat", type=_positive, default=20, metavar="N",
                      help="timed runs; the best is reported [default: 20]")
    demo.set_defaults(func=_demo)

    emit = sub.add_parser(
        "emit", help="print a kernel's exact source, its IR (--ir) or its PTX (--ptx)",
        description="Print the exact source dqgen compiles for one kernel (the same text as "
        "plan.source()), or with --ir the verified descriptor and its KernelSpec (the "
        "target's knobs), or with --ptx the PTX NVRTC makes of a CUDA kernel. The family's "
        "ops take --int (dequantize, quantize), --float and --group-size; a checkpoint "
        "format takes the knobs dqgen aot takes for it, with the same defaults, and must "
        "name one kernel (e.g. emit gptq --float f16 --act-order no --v1-zeros autogptq; "
        "emit ggml --ggml-type Q4_K --float f32; emit packed --int u4 --float f16 "
        "--group-size 32 --filter 'dequant_*').")
    emit.add_argument("op", choices=list(ALL_OPS), help="the op")
    _add_kernel_flags(emit, many=False)
    _add_format_flags(emit, many=False)
    emit.add_argument("--filter", metavar="GLOB", action="append",
                      help="keep the kernel whose URI matches GLOB (e.g. packed: "
                      "'dequant_*' or 'quant_*')")
    emit.add_argument("--target", choices=targets.names(), default="c", help="[default: c]")
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
                     "bits, checkpoint_format, act_order, scale, v1_zeros, ggml_type, q_min, "
                     "q_max, filter (and [[kernels]] tables of the same keys)")
    aot.add_argument("--op", action="append", metavar="OP",
                     help=f"ops: {', '.join(ALL_OPS)} (comma-separated or repeated) "
                     f"[default: the family's {len(OPS)}]")
    _add_kernel_flags(aot, many=True)
    _add_format_flags(aot, many=True)
    aot.add_argument("--target", action="append", metavar="TARGET",
                     help="c (this machine's ISA), c:ISA, cuda (sm_90) or cuda:sm_XX "
                     "(comma-separated or repeated) [default: c]")
    aot.add_argument("--filter", action="append", metavar="GLOB",
                     help="keep kernels whose URI (e.g. dequant_pg_s8_bf16_g128) matches "
                     "any GLOB")
    aot.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                     help="parallel builds, at most the CPU count [default: CPU count]")
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
    lst.add_argument("--check-hashes", "--verify", dest="check_hashes", action="store_true",
                     help="check every bundle file against its recorded sha256 (exit 1 on "
                     "a mismatch; --verify is its older name)")
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
        description=convert.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except KeyboardInterrupt:
        print("dqgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
