"""Ahead-of-time builds of the checkpoint formats' kernels: enumeration of their knobs,
the bundle's header, and a fresh process with JIT disabled that dequantizes GPTQ, AWQ and
GGML tensors from the bundle alone, bit for bit against the oracles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dqgen import aot, bundle, cli, ir, isa
from dqgen import aot_selection as selection
from dqgen.errors import DqgenError, UnsupportedError
from dqgen.ir import GgmlDequantizeDescriptor, GptqDequantizeDescriptor
from dqgen.lower import lower
from dqgen.render import render

TESTS = Path(__file__).resolve().parents[1]

# One of each kind (the fixture's builds are shared with test_verify through the cache).
SELECTIONS = [
    {"op": "gptq", "float": "f16", "act_order": "both", "target": "c:generic"},
    {"op": "awq", "float": "bf16", "target": "c:generic"},
    {"op": "ggml", "ggml_type": ["Q4_0", "Q8_0"], "float": "f32", "target": "c:generic"},
    {"op": "packed", "int": "u4", "float": "f16", "group_size": 32, "target": "c:generic"},
    {"op": "floatzp", "int": "u4", "float": "bf16", "group_size": 32, "target": "c:generic"},
    {"op": "hqq", "bits": 3, "float": "f16", "target": "c:generic"},
]
URIS = ["dequant_awq4_f16_bf16_g128", "dequant_fz_u4_bf16_g32_m8", "dequant_ggml_q4_0_f32",
        "dequant_ggml_q8_0_f32", "dequant_gptq4_v1_f16_f16_g128", "dequant_gptq4_v1_f16_f16_gidx",
        "dequant_hqq3_f16_g64", "dequant_pg_u4_f16_g32", "quant_pg_u4_f16_g32"]


@pytest.fixture(autouse=True)
def _no_bundles_leak():
    yield
    bundle.unload_all()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot-formats") / "bundle"
    requests = aot.enumerate_kernels(SELECTIONS)
    path, results = aot.build_bundle(requests, out, jobs=2)
    return path, requests, results


# --- enumeration ---------------------------------------------------------------------

def test_format_ops_enumerate_their_knobs():
    assert [r.uri for r in aot.enumerate_kernels(SELECTIONS)] == URIS
    gptq = aot.expand({"op": "gptq", "bits": "2,8", "checkpoint_format": ["gptq", "gptq_v2"],
                       "act_order": "no", "scale": "f16", "float": "f32", "group_size": [32, 64]})
    assert len(gptq) == 2 * 2 * 2
    assert {r.uri for r in gptq} >= {"dequant_gptq2_v1_f16_f32_g32", "dequant_gptq8_v2_f16_f32_g64"}
    # act-order kernels take their groups from g_idx: one kernel for every group size
    assert len(aot.expand({"op": "gptq", "act_order": "yes", "group_size": "32,64,128",
                           "float": "f16"})) == 1
    # defaults: f16 and bf16 results, 4-bit v1 with f16 scales, group 128, both walks
    assert len(aot.expand({"op": "gptq"})) == 4 and len(aot.expand({"op": "awq"})) == 2
    assert {r.int_dtype for r in aot.expand({"op": "packed"})} == {"u4", "s4"}


def test_hqq_enumerates_bits_and_serves_every_plane():
    """HQQ: f16/bf16, 4-bit in groups of 64 by default; every bit width HQQ packs; the
    plane's bit offset is a run-time argument, so one kernel (and request) serves all."""
    assert [r.uri for r in aot.expand({"op": "hqq"})] == ["dequant_hqq4_bf16_g64",
                                                          "dequant_hqq4_f16_g64"]
    reqs = aot.expand({"op": "hqq", "bits": "8,4,3,2,1", "float": "f32", "group_size": "1,64"})
    assert len(reqs) == 10 and {r.int_dtype for r in reqs} == {None}
    planes = [ir.HqqDequantizeDescriptor(4, 64, 64, "f16", 2, shift) for shift in (0, 6)]
    assert aot.request_of(planes[0], "c", "avx2") == aot.request_of(planes[1], "c", "avx2")
    with pytest.raises(UnsupportedError, match="op hqq: bits=5"):
        aot.expand({"op": "hqq", "bits": 5})
    # a missing kernel's hint builds it (3 bits: int32 words, which no --int names)
    hint = aot.command_for_record(aot.descriptor_record(
        ir.HqqDequantizeDescriptor(4, 64, 64, "bf16", 3, 24)), "c", "avx2")
    assert hint == ("dqgen aot --op hqq --float bf16 --group-size 64 --bits 3 "
                    "--target c:avx2 -o BUNDLE")


def test_ggml_types_come_from_the_registry_of_supported_types(monkeypatch):
    names = aot.ggml_types()
    assert {"Q4_0", "Q4_1", "Q5_0", "Q8_0"} <= set(names)
    for name in names:
        assert ir.parse_ggml_type(name).value == "ggml_" + name.lower()
    built = {dict(r.knobs)["qtype"] for r in aot.expand({"op": "ggml", "float": "f32"})}
    assert {"Q4_0", "Q4_1", "Q5_0", "Q8_0"} <= built <= set(names)
    # a type the registry drops is no longer built; one it adds is, without a change here
    monkeypatch.setattr(selection, "ggml_types", lambda: ("Q8_0",))
    assert [r.uri for r in aot.expand({"op": "ggml", "float": "f32"})] == ["dequant_ggml_q8_0_f32"]


@pytest.mark.parametrize("selection, message", [
    ({"op": "gguf"}, "op 'gguf' is not known"),
    ({"op": "ggml", "float": "f64"}, "op ggml: float_dtype='f64'"),
    ({"op": "ggml", "ggml_type": "Q9_9"}, "Q9_9"),
    ({"op": "packed", "int": "s8"}, "op packed: .*packed 4-bit"),
    ({"op": "gptq", "bits": 5}, "bits=5"),
    ({"op": "gptq", "act_order": "maybe"}, "act_order 'maybe'"),
    ({"op": "awq", "scale": "f8"}, "scale='f8'"),
])
def test_bad_format_selections_are_named(selection, message):
    with pytest.raises(DqgenError, match=message):
        aot.expand(selection)


def test_a_value_one_op_cannot_take_is_skipped_for_it_only():
    reqs = aot.expand({"op": ["ggml", "dequantize"], "float": ["f64", "f32"], "int": "s8",
                       "ggml_type": "Q4_0"})
    assert [r.uri for r in reqs] == ["dequant_ggml_q4_0_f32", "dequant_pg_s8_f32_g128",
                                     "dequant_pg_s8_f64_g128"]


def test_manifest_and_flags_name_the_same_format_kernels(tmp_path, capsys):
    manifest = tmp_path / "m.toml"
    manifest.write_text(textwrap.dedent("""\
        [[kernels]]
        op = "gptq"
        float = "f16"
        act_order = [false, true]
        target = "c:generic"
        [[kernels]]
        op = "ggml"
        ggml_type = ["Q4_0", "Q8_0"]
        float = "f32"
        target = "c:generic"
        """))
    assert cli.main(["aot", "-m", str(manifest), "-o", str(tmp_path / "b"), "--dry-run"]) == 0
    from_manifest = capsys.readouterr().out
    assert cli.main(["aot", "--op", "gptq", "--float", "f16", "--target", "c:generic",
                     "-o", str(tmp_path / "b"), "--dry-run"]) == 0
    assert cli.main(["aot", "--op", "ggml", "--ggml-type", "q4_0,q8_0", "--float", "f32",
                     "--target", "c:generic", "-o", str(tmp_path / "b"), "--dry-run"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == sorted(from_manifest.splitlines())
    assert len(from_manifest.splitlines()) == 4


def test_format_kernel_texts_do_not_depend_on_runtime_sizes():
    """One kernel serves every shape, so a bundle built with sizes 0 serves them all."""
    for target, arch in (("c", "generic"), ("cuda", "sm_90")):
        for a, b in [(GptqDequantizeDescriptor(64, 32, 16), GptqDequantizeDescriptor(128, 64, 16)),
                     (GptqDequantizeDescriptor(64, 32, 16, act_order=True),
                      GptqDequantizeDescriptor(256, 64, 64, act_order=True)),
                     (GgmlDequantizeDescriptor(5, "Q4_0"), GgmlDequantizeDescriptor(9, "Q4_0"))]:
            assert render(lower(a, target, arch)).text == render(lower(b, target, arch)).text


# --- the bundle ----------------------------------------------------------------------

def test_bundle_records_and_header_declare_every_format_kernel(built, tmp_path):
    path, requests, results = built
    manifest = json.loads((path / bundle.MANIFEST).read_text())
    assert [k["uri"] for k in manifest["kernels"]] == URIS
    header = (path / bundle.HEADER).read_text()
    cc = shutil.which("gcc") or shutil.which("cc")
    for k, r in zip(manifest["kernels"], results):
        assert k["signature"] in header and k["signature"] == bundle.c_prototype(r.entry.spec)
        desc = aot.descriptor_from_record(k["descriptor"])
        assert desc.uri == k["uri"] and aot.request_of(desc, "c", "generic") == r.request
        if cc:  # the prototype agrees with the definition ('conflicting types' otherwise)
            unit = tmp_path / f"{k['uri']}.c"
            unit.write_text(f'#include "{bundle.HEADER}"\n' + r.entry.source.text)
            proc = subprocess.run([cc, "-fsyntax-only", "-Werror", "-fopenmp", "-std=c11",
                                   *isa.march_flags("generic"), f"-I{path}", str(unit)],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr


FRESH_PROCESS = textwrap.dedent("""\
    import sys
    import numpy as np
    sys.path[:0] = sys.argv[1:]
    import dqgen
    from dqgen import cache
    from dqgen.formats import awq, ggml, gptq, hqq
    from dqgen.formats.plan import FormatPlan
    from formats_util import assert_bits_equal, random_f16, random_words
    from oracles import checkpoints as oracle
    from test_formats_ggml import oracle as ggml_oracle, random_blocks

    rng = np.random.default_rng(5)
    def zeros(shape, bits):  # no field at its maximum: every v1 decoding agrees
        fields = rng.integers(0, (1 << bits) - 1, (*shape, 32 // bits)).astype(np.uint64)
        words = sum(fields[..., j] << (bits * j) for j in range(32 // bits))
        return words.astype(np.uint32).view(np.int32)

    # GPTQ 4-bit, group 128, in row order and with act-order; two shapes of each
    for k, n in ((256, 64), (384, 128)):
        groups = k // 128
        qweight, qzeros = random_words(rng, (k // 8, n)), zeros((groups, n // 8), 4)
        scales = random_f16(rng, (groups, n))
        want = oracle.gptq_dequantize(qweight, qzeros, scales, None, 4, "gptq", np.float16, 128)
        assert_bits_equal(gptq.dequantize(qweight, qzeros, scales, bits=4), want)
        g_idx = (rng.permutation(k) // 128).astype(np.int32)
        want = oracle.gptq_dequantize(qweight, qzeros, scales, g_idx, 4, "gptq", np.float16)
        assert_bits_equal(gptq.dequantize(qweight, qzeros, scales, g_idx=g_idx, bits=4), want)
    # AWQ, bf16 result
    qweight, qzeros = random_words(rng, (256, 8)), random_words(rng, (2, 8))
    scales = random_f16(rng, (2, 64))
    got = awq.dequantize(qweight, qzeros, scales, dtype="bf16")
    assert_bits_equal(got, oracle.awq_dequantize(qweight, qzeros, scales, 128, got.dtype))
    # GGML Q4_0 and Q8_0 to f32
    for qtype in ("Q4_0", "Q8_0"):
        data = random_blocks(rng, qtype, (3, 4))
        assert_bits_equal(ggml.dequantize(data, qtype, dtype="f32"),
                          ggml_oracle(data, qtype, "f32"))

    # HQQ 3-bit, every plane of int32 words through the one kernel
    W_q = rng.integers(-2**31, 2**31, (2, 64), dtype=np.int64).astype(np.int32)
    scale, zero = random_f16(rng, (16, 1)), random_f16(rng, (16, 1))
    want = oracle.hqq_dequantize(oracle.unpack_hqq(W_q, 3, 16), scale, zero, np.float16)
    assert_bits_equal(hqq.dequantize(W_q, scale, zero, 3, (16, 64), 64), want.reshape(16, 64))

    from dqgen.ir import GgmlDequantizeDescriptor, GptqDequantizeDescriptor
    for desc in (GptqDequantizeDescriptor(64, 64, 32, act_order=True),
                 GgmlDequantizeDescriptor(2, "Q8_0")):
        assert FormatPlan.select(desc)._kernel.origin == "bundle"
    try:
        ggml.dequantize(random_blocks(rng, "Q5_0", (1, 2)), "Q5_0", dtype="f32")
        raise SystemExit("a kernel missing from the bundle did not raise")
    except dqgen.MissingKernelError as exc:
        text = str(exc)
        assert "dequant_ggml_q5_0_f32" in text and "dqgen aot --op ggml" in text, text
        assert "--ggml-type Q5_0" in text, text
    assert cache.info()["entries"] == 0, cache.info()
    print("FORMATS-FROM-BUNDLE-OK")
    """)


def test_fresh_process_dequantizes_checkpoint_formats_from_the_bundle_alone(built, tmp_path):
    """Empty cache, no compiler, JIT disabled: GPTQ (both walks), AWQ and GGML tensors of
    several shapes come from the bundle, bit-exact; a kernel not in it is named, with the
    ``dqgen aot`` command that builds it."""
    pytest.importorskip("gguf", reason="the gguf package is the GGML oracle")
    path, _, _ = built
    if "generic" not in isa.supported_isas():
        pytest.skip("the bundle is built for the generic ISA")
    env = {**os.environ, "DQGEN_CACHE_DIR": str(tmp_path / "empty-cache"),
           "DQGEN_DISABLE_JIT": "1", "DQGEN_BUNDLE": str(path),
           "CC": str(tmp_path / "no-such-compiler")}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(TESTS),
                           str(TESTS / "formats" / "ggml")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "FORMATS-FROM-BUNDLE-OK" in proc.stdout, \
        proc.stdout + proc.stderr


def test_missing_format_kernel_hint_names_the_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DQGEN_DISABLE_JIT", "1")
    from dqgen import jit
    monkeypatch.setattr(jit, "_memo", {})
    desc = GptqDequantizeDescriptor(64, 32, 16, bits=8, checkpoint_format="gptq_v2",
                                    float_dtype="bf16", scale_dtype="f32")
    with pytest.raises(dqgen_missing(), match="dequant_gptq8_v2_f32_bf16_g16") as info:
        jit.get_kernel(desc, "c", "generic")
    hint = str(info.value).split("Build it ahead of time with: ")[1]
    args = hint.split()[2:-2]  # drop "dqgen aot" and "-o BUNDLE"
    flags = dict(zip(args[0::2], args[1::2]))
    assert flags["--op"] == "gptq" and flags["--bits"] == "8" and flags["--scale"] == "f32"
    selection = {k[2:].replace("-", "_"): v for k, v in flags.items()}
    assert [r.uri for r in aot.expand(selection)] == [desc.uri]


def dqgen_missing():
    from dqgen.errors import MissingKernelError
    return MissingKernelError


def test_unsupported_op_name_lists_the_formats():
    with pytest.raises(UnsupportedError, match="expected one of: ") as info:
        aot.expand({"op": "exl2"})
    listed = str(info.value).split("expected one of: ")[1].split(", ")
    assert listed == list(aot.ALL_OPS)
    # the family's ops first, then each format module's in registration (import) order:
    # by module name, except fp8, which bitsandbytes imports, and so registers, first
    assert listed[:5] == list(aot.OPS) + ["packed"]
    formats = ["awq", "fp8", "bnb4", "bnb8", "floatzp", "mxfp4", "nvfp4", "ggml", "gptq",
               "hqq", "mlx"]
    assert [op for op in listed if op in formats] == formats
