"""``dqgen verify``: every kernel of a bundle or of the cache against the oracle, each
reported (ok / mismatch with the first differing index / could not run / skipped), and
the exit status non-zero on any failure, for damaged bundles above all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dqgen import aot, bundle, cli, isa, jit, verify
from dqgen.build import cc
from dqgen.ir import DequantizePerGroupDescriptor

SELECTIONS = [
    {"op": ["dequantize", "quantize", "dequantize-backward", "quantize-backward"], "int": "s8",
     "float": "f32", "group_size": [64, 128], "target": "c:generic"},
    {"op": "dequantize", "int": "u8", "float": "bf16", "group_size": 128, "target": "c:generic"},
    {"op": "gptq", "float": "f16", "act_order": "both", "target": "c:generic"},
    {"op": "awq", "float": "bf16", "target": "c:generic"},
    {"op": "ggml", "ggml_type": ["Q4_0", "Q8_0"], "float": "f32", "target": "c:generic"},
    {"op": "packed", "int": "u4", "float": "f16", "group_size": 32, "target": "c:generic"},
    {"op": "floatzp", "int": "u4", "float": "bf16", "group_size": 32, "target": "c:generic"},
    {"op": "hqq", "bits": [4, 3], "float": "bf16", "group_size": 32, "target": "c:generic"},
]
pytestmark = pytest.mark.skipif("generic" not in isa.supported_isas(), reason="x86 only")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "bundle"
    path, _ = aot.build_bundle(aot.enumerate_kernels(SELECTIONS), out, jobs=2)
    return path


def _copy(path: Path, dest: Path) -> Path:
    shutil.copytree(path, dest)
    return dest


def _rehash(copy: Path, uri: str, kind: str = "so") -> None:
    """Record the current sha256 of ``uri``'s file ``kind`` ("so" or "source")."""
    manifest = json.loads((copy / bundle.MANIFEST).read_text())
    for k in manifest["kernels"]:
        if k["uri"] == uri:
            rec = k["source"] if kind == "source" else k["binaries"][kind]
            rec["sha256"] = bundle.sha256_bytes((copy / rec["path"]).read_bytes())
    (copy / bundle.MANIFEST).write_text(json.dumps(manifest))


def _by_uri(outcomes) -> dict:
    return {o.label.split(" ")[0]: o for o in outcomes}


def test_every_kernel_of_a_good_bundle_is_ok(built, capsys):
    outcomes = verify.verify_bundle(bundle.Bundle.open(built))
    assert len(outcomes) == len(aot.enumerate_kernels(SELECTIONS))
    skipped = [o for o in outcomes if o.status == verify.SKIPPED]
    assert all("gguf" in o.detail for o in skipped)  # only a missing GGML oracle
    assert all(o.status == verify.OK for o in outcomes if o not in skipped), \
        [str(o) for o in outcomes]
    assert cli.main(["verify", str(built)]) == 0
    out = capsys.readouterr().out
    assert "dequant_gptq4_v1_f16_f16_gidx (c:generic): 64x64 bit-exact" in out
    assert "dequant_hqq3_bf16_g32 (c:generic): 3x64 bit-exact" in out
    assert f"{len(outcomes) - len(skipped)} ok, 0 mismatch, 0 could not run" in out


def test_a_binary_that_computes_something_else_is_a_mismatch(built, tmp_path, capsys):
    """The group-64 kernel renamed as the group-128 one, hashes fixed up: it loads and
    runs, and the report names the first element that differs and both values."""
    copy = _copy(built, tmp_path / "wrong")
    spec = aot.expand({"op": "dequantize", "int": "s8", "float": "f32", "group_size": 64,
                       "target": "c:generic"})[0].spec()
    text = jit.render_source(spec).text.replace("dqgen_dequant_pg_s8_f32_g64",
                                                "dqgen_dequant_pg_s8_f32_g128")
    (tmp_path / "k.c").write_text(text)
    toolchain = cc.toolchain()
    cc.compile_shared(toolchain, tmp_path / "k.c", tmp_path / "k.so", "generic")
    so = copy / "c-generic" / "dequant_pg_s8_f32_g128.so"
    so.write_bytes((tmp_path / "k.so").read_bytes())
    _rehash(copy, "dequant_pg_s8_f32_g128")
    outcome = _by_uri(verify.verify_bundle(bundle.Bundle.open(copy)))["dequant_pg_s8_f32_g128"]
    assert outcome.status == verify.MISMATCH and outcome.failed
    assert "values differ; first at [0, 64]: kernel" in outcome.detail, outcome.detail
    assert cli.main(["verify", "-q", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "mismatch" in out and "dequant_pg_s8_f32_g128" in out
    assert "dequant_pg_s8_f32_g64 " not in out  # -q: only what is not ok


def test_another_kernels_binary_cannot_run(built, tmp_path):
    """A binary copied over from another kernel (hash fixed up) lacks the entry point."""
    copy = _copy(built, tmp_path / "swapped")
    d = copy / "c-generic"
    (d / "dequant_awq4_f16_bf16_g128.so").write_bytes(
        (d / "dequant_ggml_q4_0_f32.so").read_bytes())
    _rehash(copy, "dequant_awq4_f16_bf16_g128")
    outcome = _by_uri(verify.verify_bundle(bundle.Bundle.open(copy)))["dequant_awq4_f16_bf16_g128"]
    assert outcome.status == verify.FAILED and "dqgen_dequant_awq4_f16_bf16_g128" in outcome.detail


def test_damaged_files_and_edited_sources_are_reported(built, tmp_path):
    copy = _copy(built, tmp_path / "damaged")
    so = copy / "c-generic" / "quant_pg_s8_f32_g64.so"
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0x10
    so.write_bytes(bytes(data))  # hash not fixed up: never loaded
    source = copy / "c-generic" / "dequant_pg_u4_f16_g32.c"
    source.write_text(source.read_text().replace("y = F(", "y = G(", 1))
    _rehash(copy, "dequant_pg_u4_f16_g32", "source")
    outcomes = _by_uri(verify.verify_bundle(bundle.Bundle.open(copy)))
    assert "does not match the sha256" in outcomes["quant_pg_s8_f32_g64"].detail
    assert outcomes["quant_pg_s8_f32_g64"].status == verify.FAILED
    assert outcomes["dequant_pg_u4_f16_g32"].status == verify.FAILED
    assert "stale" in outcomes["dequant_pg_u4_f16_g32"].detail
    assert sum(o.failed for o in outcomes.values()) == 2
    assert cli.main(["verify", str(copy)]) == 1


def test_verifying_nothing_fails_the_gate(built, monkeypatch, capsys):
    """Every kernel skipped (a CPU without the bundle's ISA, CUDA without a GPU): exit 1
    and one line saying nothing was verified, not a pass."""
    from dqgen.targets import c as c_target
    monkeypatch.setattr(c_target, "supported_isas", lambda: ())  # the C target's answer
    assert cli.main(["verify", "-q", str(built)]) == 1
    captured = capsys.readouterr()
    assert f"0 ok, 0 mismatch, 0 could not run, {len(aot.enumerate_kernels(SELECTIONS))} " \
        "skipped" in captured.out
    (line,) = captured.err.splitlines()
    assert line.startswith("dqgen: error: nothing was verified: all ") and "skipped" in line


def test_a_kernel_without_a_descriptor_record_is_skipped(built, tmp_path):
    copy = _copy(built, tmp_path / "old")
    manifest = json.loads((copy / bundle.MANIFEST).read_text())
    del manifest["kernels"][0]["descriptor"]
    (copy / bundle.MANIFEST).write_text(json.dumps(manifest))
    first = verify.verify_bundle(bundle.Bundle.open(copy))[0]
    assert first.status == verify.SKIPPED and "no descriptor recorded" in first.detail


def test_the_cache_is_verified_entry_by_entry(fresh_cache, monkeypatch, capsys):
    monkeypatch.setattr(jit, "_memo", {})
    descs = [DequantizePerGroupDescriptor(2, 64, 32, "f32", "s8"),
             DequantizePerGroupDescriptor(2, 64, 32, "f16", "u4")]
    kernels = [jit.get_kernel(d, "c", "generic") for d in descs]
    outcomes = verify.verify_cache()
    assert [o.status for o in outcomes] == [verify.OK, verify.OK], [str(o) for o in outcomes]
    assert cli.main(["verify", "--cache"]) == 0
    so = kernels[0].entry_dir / "kernel.so"
    # The entry no longer matches its meta.json. The damaged file replaces the loaded one
    # (a new inode): rewriting a mapped library in place crashes this process at exit.
    damaged = so.with_name("kernel.so.damaged")
    damaged.write_bytes(so.read_bytes() + b"\x00")
    os.replace(damaged, so)
    outcomes = verify.verify_cache()
    assert sorted(o.status for o in outcomes) == sorted([verify.FAILED, verify.OK])
    assert any("damaged" in o.detail for o in outcomes)
    assert cli.main(["verify", "--cache"]) == 1
    capsys.readouterr()


def test_oracle_differences_are_found_in_special_values():
    """The comparison sees sign of zero and NaN payload-agnostic equality right."""
    a = np.array([0.0, np.nan, 1.0], np.float32)
    assert verify.first_difference(a, np.array([0.0, -np.nan, 1.0], np.float32)) == ""
    diff = verify.first_difference(a, np.array([-0.0, np.nan, 1.0], np.float32))
    assert diff.startswith("1 of 3 values differ; first at [0]")


def test_verify_needs_something_to_verify(monkeypatch, capsys):
    monkeypatch.delenv("DQGEN_BUNDLE", raising=False)
    assert cli.main(["verify"]) == 2
    assert "DQGEN_BUNDLE is not set" in capsys.readouterr().err


def test_small_groups_get_rows_long_enough_for_their_vector_steps(tmp_path):
    """HQQ's axis=0 kernel (groups of one value) takes eight groups a vector step: the
    problem verify gives it has 32 values a row, so that step runs and is checked."""
    if "avx2" not in isa.supported_isas():
        pytest.skip("the vector step is AVX2 code")
    requests = aot.expand({"op": "hqq", "bits": 4, "float": "f16", "group_size": 1,
                           "target": "c:avx2"})
    path, _ = aot.build_bundle(requests, tmp_path / "bundle")
    (outcome,) = verify.verify_bundle(bundle.Bundle.open(path))
    assert outcome.status == verify.OK and "3x32 bit-exact" in outcome.detail, str(outcome)
