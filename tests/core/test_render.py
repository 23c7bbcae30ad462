"""Rendering (dqgen/render.py + templates/): deterministic text, an honest header, and
only the code a kernel uses. Nothing here runs a kernel; a few sources are syntax-checked
with the warnings turned into errors."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import jinja2
import pytest

import dqgen
from dqgen import __version__
from dqgen.build import cc
from dqgen.ir import DType, Op
from dqgen.isa import ISA_LEVELS, march_flags
from dqgen.layouts.per_group import FORMULAS
from dqgen.lower import lower
from dqgen.render import environment, render

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Rendering needs no CPU support: every level renders on any x86 machine.
ISAS = ("avx2", "generic") if platform.machine().lower() in ("x86_64", "amd64") else ("generic",)
GROUP_SIZES = (1, 3, 12, 128)
F16_HELPERS = ("load_f16", "store_f16", "load_block_f16", "store_block_f16", "load8_f16",
               "store8_f16", "_mm256_cvtph_ps", "_mm256_cvtps_ph")
BF16_HELPERS = ("load_bf16", "store_bf16", "load_block_bf16", "store_block_bf16")
INTRINSICS = ("immintrin.h", "_mm256_", "_mm_", "__m256", "__m128")


def family(gs=128, outer=4):
    """One descriptor per (op, dtypes) of the family at group size ``gs``."""
    out = []
    for f in ("f32", "f64", "f16", "bf16"):
        for i in ("s8", "u8"):
            out.append(dqgen.DequantizePerGroupDescriptor(outer, gs * 2, gs, f, i))
            out.append(dqgen.QuantizePerGroupDescriptor(outer, gs * 2, gs, f, i))
        out.append(dqgen.DequantizePerGroupBackwardDescriptor(outer, gs * 2, gs, f))
        out.append(dqgen.QuantizePerGroupBackwardDescriptor(outer, gs * 2, gs, f, -8, 7))
    return out


def _src(desc, isa):
    return render(lower(desc, "c", isa)).text


def _sources():
    """uri/isa -> sha256 of the rendered source, for every kernel of the family."""
    out = {}
    for gs in GROUP_SIZES:
        for desc in family(gs):
            for isa in ISAS:
                out[f"{desc.uri}/{isa}"] = render(lower(desc, "c", isa)).sha256
    return out


def _defined_functions(src: str) -> list[str]:
    src = re.sub(r"__attribute__\(\(\w+\)\)\s*", "", src)
    return re.findall(r"^static[^(;=]*?\b(\w+)\s*\(", src, re.M)


def test_environment_is_strict():
    env = environment()
    assert env.undefined is jinja2.StrictUndefined
    assert env.keep_trailing_newline and not env.autoescape


def test_a_missing_template_variable_is_an_error():
    spec = lower(dqgen.DequantizePerGroupDescriptor(1, 8, 8, "f32", "s8"), "c", "generic")
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    fields.pop("group_size")
    Partial = type("Partial", (), {**fields, "param": spec.param})  # noqa: N806
    with pytest.raises(jinja2.UndefinedError):
        environment().get_template("c/kernel.c.j2").render(spec=Partial(), version=__version__)


def test_same_descriptor_same_bytes():
    for desc in family(32):
        for isa in ISAS:
            a = render(lower(desc, "c", isa))
            b = render(lower(dataclasses.replace(desc, outer=desc.outer + 3), "c", isa))
            assert a.text == b.text and a.sha256 == b.sha256
            assert a.text.endswith("\n") and "\r" not in a.text


def test_rendering_is_identical_in_a_fresh_process():
    here = _sources()
    script = ("import sys, json; sys.path[:0] = ['tests', 'tests/core']; from test_render import _sources; "
              "print(json.dumps(_sources()))")
    env = dict(os.environ, PYTHONHASHSEED="4242")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == here


def test_sources_differ_where_kernels_differ():
    hashes = _sources()
    assert len(set(hashes.values())) == len(hashes)


@pytest.mark.parametrize("isa", ISAS)
def test_header_names_descriptor_version_and_formula(isa):
    for desc in family(128):
        src = _src(desc, isa)
        header = src.split("*/", 1)[0]
        assert header.startswith("/*")
        assert f"dqgen_{desc.uri}" in header
        assert f"dqgen {__version__}" in header
        assert type(desc).__name__ in header
        assert f"group_size={desc.group_size}" in header
        assert f"float_dtype={desc.float_dtype.value}" in header
        if getattr(desc, "int_dtype", None) is not None:
            assert f"int_dtype={desc.int_dtype.value}" in header
        assert FORMULAS[desc.op] in header
        assert isa in header
        compute = "f64" if desc.float_dtype is DType.F64 else "f32"
        assert f"C = {compute}" in header
        assert "#define GROUP_SIZE 128" in src
        assert re.search(rf"^void dqgen_{desc.uri}\(", src, re.M)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("gs", GROUP_SIZES)
def test_no_code_for_other_dtypes_or_isas(isa, gs):
    """An f32 kernel has no f16/bf16 helpers, an f16 one no bf16 helpers and vice versa,
    a generic kernel no intrinsics, an f64 kernel no single-precision rounding."""
    for desc in family(gs):
        src = _src(desc, isa)
        f = desc.float_dtype
        if f is not DType.F16:
            assert not any(h in src for h in F16_HELPERS), (desc.uri, isa)
        if f is not DType.BF16:
            assert not any(h in src for h in BF16_HELPERS), (desc.uri, isa)
        if isa == "generic":
            assert not any(h in src for h in INTRINSICS), (desc.uri, isa)
        if f is DType.F64:
            assert "rintf" not in src
        if getattr(desc, "int_dtype", None) is DType.S8:
            assert "uint8_t *" not in src
        if getattr(desc, "int_dtype", None) is DType.U8:
            assert "int8_t *" not in src.replace("uint8_t *", "")
        if desc.op in (Op.DEQUANTIZE_BACKWARD,):
            assert "zero_point" not in src.split("*/", 1)[1], (desc.uri, isa)


def test_every_helper_a_kernel_defines_is_called():
    unused = []
    for gs in GROUP_SIZES:
        for desc in family(gs):
            for isa in ISAS:
                src = _src(desc, isa)
                for name in _defined_functions(src):
                    if len(re.findall(rf"\b{name}\b", src)) < 2:
                        unused.append(f"{desc.uri}/{isa}: {name}")
    assert not unused, "\n".join(unused)


def test_templates_see_only_validated_values():
    """A hostile ISA or target string never reaches a template: lowering refuses it."""
    desc = dqgen.DequantizePerGroupDescriptor(1, 8, 8, "f32", "s8")
    for arch in ("avx2 */ system(\"x\"); /*", "generic\n#include <evil.h>"):
        with pytest.raises(dqgen.UnsupportedError):
            lower(desc, "c", arch)
    spec = lower(desc, "c", "generic")
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        assert isinstance(value, (int, str, bool, tuple, enum.Enum, type(None))), f.name


def test_build_flags_keep_ieee_semantics():
    tc = cc.Toolchain(command=("gcc",), identity="gcc")
    for isa in ISA_LEVELS:
        flags = tc.flags(isa)
        assert not any("fast-math" in f or f in ("-Ofast", "-ffinite-math-only",
                                                 "-funsafe-math-optimizations") for f in flags)
        assert "-ffp-contract=off" in flags
        assert "-fPIC" in flags and "-shared" in flags and "-fopenmp" in flags


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the syntax check")
@pytest.mark.parametrize("float_name", ["f16", "bf16", "f64"])
@pytest.mark.parametrize("gs", [12, 32])
def test_generated_c_is_warning_free(float_name, gs, tmp_path):
    """-Wall -Wextra -Wshadow -Wconversion -Werror, syntax only (no code generation), for
    every x86 level: AVX-512 kernels are checked here even on machines that cannot run
    them. Groups of 12 have a remainder; groups of 32 take the batched fused path."""
    isas = ISA_LEVELS if ISAS[0] == "avx2" else ("generic",)
    for isa in isas:
        for desc in family(gs):
            if desc.float_dtype.value != float_name or getattr(desc, "int_dtype", DType.S8) is DType.U8:
                continue
            path = tmp_path / f"{desc.uri}-{isa}.c"
            path.write_text(_src(desc, isa))
            proc = subprocess.run(["gcc", "-fsyntax-only", "-std=c11", "-fopenmp", "-Wall", "-Wextra",
                                   "-Wshadow", "-Wconversion", "-Werror", *march_flags(isa), str(path)],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{desc.uri} ({isa}):\n{proc.stderr}"
