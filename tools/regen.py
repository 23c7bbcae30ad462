#!/usr/bin/env python3
"""Regenerate ``generated/``: the canonical emitted sources of the default kernel set.

``generated/`` is committed so that a template or schedule change that alters emitted
code shows up in review as a plain diff. This script only renders (no compiler, no GPU).

    python tools/regen.py           # rewrite generated/ (changed, missing and extra files)
    python tools/regen.py --check   # exit 1 and list every file that differs

The default set: dequantize for s8/u8 x f32/f64/f16/bf16 at group sizes 32, 64 and 128;
quantize, dequantize-backward and quantize-backward for the same dtypes at group size
128. Each kernel is emitted as C for the ``generic`` ISA, as C for ``avx2`` where the
avx2 schedule differs from generic's (elsewhere the two sources differ only in the ISA
named in the header comment), and as CUDA for sm_90.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's dqgen and templates, installed or not

try:
    import ml_dtypes  # noqa: F401  (a dependency of dqgen: is this interpreter set up?)
except ImportError:
    # Run by an interpreter without the project's dependencies (a bare python3): use the
    # checkout's virtual environment, as the README sets it up, when there is one.
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.is_file() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    raise

from dqgen import aot, render  # noqa: E402
from dqgen.lower import lower  # noqa: E402

DEFAULT_DIR = ROOT / "generated"
INT_DTYPES = ("s8", "u8")
FLOAT_DTYPES = ("f32", "f64", "f16", "bf16")
DEQUANTIZE_GROUP_SIZES = (32, 64, 128)
OTHER_OPS_GROUP_SIZE = 128
C_BASE_ISA = "generic"
C_SIMD_ISA = "avx2"
CUDA_ARCH = "sm_90"
CUDA_TEMPLATE = Path("cuda") / "kernel.cu.j2"


def default_set() -> list:
    """The descriptors of the default kernel set, in URI order."""
    sel = [{"op": "dequantize", "int": INT_DTYPES, "float": FLOAT_DTYPES,
            "group_size": DEQUANTIZE_GROUP_SIZES, "target": f"c:{C_BASE_ISA}"},
           {"op": ["quantize", "dequantize-backward", "quantize-backward"],
            "int": INT_DTYPES, "float": FLOAT_DTYPES, "group_size": OTHER_OPS_GROUP_SIZE,
            "target": f"c:{C_BASE_ISA}"}]
    return [r.descriptor() for r in aot.enumerate_kernels(sel)]


def _schedule(spec) -> object:
    """The spec with its ISA name blanked: equal schedules render equal code."""
    return dataclasses.replace(spec, arch="")


def expected_files(with_cuda: bool) -> dict[str, str]:
    """Relative path -> exact text of every file ``generated/`` should hold."""
    files: dict[str, str] = {}
    rows = []
    for desc in default_set():
        base = lower(desc, "c", C_BASE_ISA)
        simd = lower(desc, "c", C_SIMD_ISA)
        paths = {C_BASE_ISA: f"c/{C_BASE_ISA}/{desc.uri}.c"}
        files[paths[C_BASE_ISA]] = render.render(base).text
        if _schedule(simd) != _schedule(base):
            paths[C_SIMD_ISA] = f"c/{C_SIMD_ISA}/{desc.uri}.c"
            files[paths[C_SIMD_ISA]] = render.render(simd).text
        if with_cuda:
            paths[CUDA_ARCH] = f"cuda/{CUDA_ARCH}/{desc.uri}.cu"
            files[paths[CUDA_ARCH]] = render.render(lower(desc, "cuda", CUDA_ARCH)).text
        rows.append((desc, paths))
    files["README.md"] = _index(rows, with_cuda)
    return files


def _index(rows: list, with_cuda: bool) -> str:
    """``generated/README.md``: what is here and why, and a table of every kernel."""
    columns = [C_BASE_ISA, C_SIMD_ISA] + ([CUDA_ARCH] if with_cuda else [])
    heads = [f"c/{C_BASE_ISA}", f"c/{C_SIMD_ISA}"] + ([f"cuda/{CUDA_ARCH}"] if with_cuda else [])
    n_files = sum(len(paths) for _, paths in rows)
    lines = [
        "# generated/: the canonical emitted kernel sources",
        "",
        "Written by `python tools/regen.py` from `templates/` and `dqgen/layouts/`; do not",
        "edit by hand. CI runs `python tools/regen.py --check`, which fails on any byte",
        "difference, so a change that alters emitted code shows up here as a diff in review.",
        "These are exactly the texts `dqgen emit` prints and `plan.source()` returns.",
        "",
        f"{len(rows)} kernels, {n_files} sources:",
        "",
        f"- dequantize for {'/'.join(INT_DTYPES)} x {'/'.join(FLOAT_DTYPES)} at group sizes "
        f"{', '.join(map(str, DEQUANTIZE_GROUP_SIZES))};",
        f"  quantize, dequantize-backward and quantize-backward at group size "
        f"{OTHER_OPS_GROUP_SIZE}.",
        f"- `c/{C_BASE_ISA}/`: every kernel as C for the baseline x86-64 ISA.",
        f"- `c/{C_SIMD_ISA}/`: only kernels whose {C_SIMD_ISA} schedule differs from the "
        f"{C_BASE_ISA} one;",
        f"  for the others the {C_SIMD_ISA} source is the {C_BASE_ISA} one with the ISA name",
        "  changed in its header comment.",
    ]
    if with_cuda:
        lines.append(f"- `cuda/{CUDA_ARCH}/`: every kernel as CUDA C++ for {CUDA_ARCH}.")
    else:
        lines.append(f"- No CUDA sources: templates/{CUDA_TEMPLATE.as_posix()} did not exist "
                     "when this was generated.")
    lines += ["", "| kernel | op | int | float | group | " + " | ".join(heads) + " |",
              "|---|---|---|---|---|" + "---|" * len(heads)]
    for desc, paths in rows:
        int_dtype = desc.int_type.value if desc.int_type is not None else "-"
        cells = [f"[{Path(paths[c]).suffix[1:]}]({paths[c]})" if c in paths else "-"
                 for c in columns]
        lines.append(f"| {desc.uri} | {aot.OP_NAMES[desc.op]} | {int_dtype} | "
                     f"{desc.float_dtype.value} | {desc.group_size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def diff(directory: Path, files: dict[str, str]) -> list[tuple[str, str]]:
    """(status, path) for every file that is missing, extra or changed, sorted by path."""
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} \
        if directory.is_dir() else set()
    out = [("extra", p) for p in present - files.keys()]
    for rel, text in files.items():
        if rel not in present:
            out.append(("missing", rel))
        elif (directory / rel).read_bytes() != text.encode():
            out.append(("changed", rel))
    return sorted(out, key=lambda item: item[1])


def write(directory: Path, files: dict[str, str], problems: list[tuple[str, str]]) -> None:
    """Bring ``directory`` in line: write missing/changed files, delete extra ones."""
    for status, rel in problems:
        path = directory / rel
        if status == "extra":
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[rel].encode())
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 listing every file that differs")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help="the directory to write or check [default: generated/]")
    args = parser.parse_args(argv)

    with_cuda = (render.TEMPLATE_DIR / CUDA_TEMPLATE).is_file()
    if not with_cuda:
        print(f"regen: templates/{CUDA_TEMPLATE.as_posix()} does not exist; skipping CUDA "
              "sources", file=sys.stderr)
    files = expected_files(with_cuda)
    problems = diff(args.dir, files)
    if args.check:
        for status, rel in problems:
            print(f"{status:>8}  {args.dir / rel}")
        if problems:
            print(f"regen: {len(problems)} file(s) in {args.dir} differ from what the templates "
                  "emit; run `python tools/regen.py` and commit the result", file=sys.stderr)
            return 1
        print(f"regen: {args.dir} is up to date ({len(files)} files)")
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    write(args.dir, files, problems)
    print(f"regen: {len(problems)} file(s) updated in {args.dir} ({len(files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
