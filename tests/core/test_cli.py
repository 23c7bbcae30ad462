"""The command line: emit, aot/build, list, cache, --version, help and error reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dqgen
from dqgen import __version__, aot, bundle, cache, cli
from dqgen.isa import host_isa
from dqgen.jit import CacheEntry, render_source
from dqgen.lower import lower

HOST = host_isa()
ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    """``dqgen ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_version(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"dqgen {__version__}"


@pytest.mark.parametrize("command", [[], ["demo"], ["emit"], ["aot"], ["build"], ["list"],
                                     ["cache"], ["cache", "info"], ["cache", "clear"]])
def test_every_command_has_help(capsys, command):
    status, out, _ = run(capsys, *command, "--help")
    assert status == 0 and out.startswith("usage: dqgen")
    # a description beyond the usage line and the generic options
    assert len([line for line in out.splitlines() if line.strip()]) > 3


def test_console_script_runs(tmp_path):
    """The installed entry point works as a separate process and reports errors with
    exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "dqgen.cli", "emit", "dequantize", "--int",
                           "s8", "--float", "f8", "--group-size", "128"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("dqgen: error: ") and "f8" in proc.stderr


# --- emit ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, desc, plan_type", [
    (["dequantize", "--int", "s8", "--float", "bf16", "--group-size", "128"],
     dqgen.DequantizePerGroupDescriptor(2, 256, 128, "bf16", "s8"), dqgen.DequantizePerGroupPlan),
    (["quantize", "--int", "u8", "--float", "f16", "--group-size", "64"],
     dqgen.QuantizePerGroupDescriptor(2, 128, 64, "f16", "u8"), dqgen.QuantizePerGroupPlan),
])
def test_emit_prints_exactly_what_the_plan_runs(capsys, tmp_path, argv, desc, plan_type):
    status, out, _ = run(capsys, "emit", *argv)
    plan = plan_type.select(desc)
    assert status == 0 and out == plan.source()
    target = tmp_path / "kernel.c"
    status, out, _ = run(capsys, "emit", *argv, "--out", str(target))
    assert status == 0 and out == ""
    assert target.read_bytes() == plan.source().encode()


def test_emit_arch_and_backward_ops(capsys):
    status, out, _ = run(capsys, "emit", "quantize-backward", "--float", "f64",
                         "--group-size", "32", "--arch", "generic")
    desc = aot.make_descriptor("quantize-backward", None, "f64", 32)
    assert status == 0 and out == render_source(lower(desc, "c", "generic")).text
    assert "target:     c (generic)" in out and "dqgen_quant_pg_bwd_f64_g32(" in out


def test_emit_ir_shows_the_descriptor_and_the_kernel_spec(capsys):
    status, out, _ = run(capsys, "emit", "dequantize", "--int", "u8", "--float", "f16",
                         "--group-size", "64", "--ir")
    assert status == 0
    head, spec_json = out.split("# KernelSpec", 1)
    assert "DequantizePerGroupDescriptor(group_size=64, float_dtype=f16, int_dtype=u8)" in head
    assert "uri: dequant_pg_u8_f16_g64" in head
    spec = lower(aot.make_descriptor("dequantize", "u8", "f16", 64), "c", HOST)
    knobs = json.loads(spec_json.split("\n", 1)[1])
    # the C schedule's knobs, none of the CUDA launch's
    assert knobs == {k: v for k, v in spec.to_json().items() if k not in cli.CUDA_ONLY_KNOBS}
    assert "simd_blocks" in knobs and "threads_per_block" not in knobs


def test_emit_cuda_source_and_ptx(capsys):
    argv = ["emit", "dequantize", "--int", "s8", "--float", "bf16", "--group-size", "128",
            "--target", "cuda"]
    spec = lower(aot.make_descriptor("dequantize", "s8", "bf16", 128), "cuda", "sm_90")
    try:
        expected = render_source(spec).text
    except dqgen.UnsupportedError:
        pytest.skip("no CUDA template in this checkout")
    status, out, _ = run(capsys, *argv)
    assert status == 0 and out == expected and "sm_90" in out
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    # NVRTC runs in a child process: a compile leaves this test process untouched.
    proc = subprocess.run([sys.executable, "-m", "dqgen.cli", *argv, "--arch", "sm_80", "--ptx"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ".target sm_80" in proc.stdout
    assert ".entry dqgen_dequant_pg_s8_bf16_g128" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["dequantize", "--float", "f32", "--group-size", "128"], "needs --int"),
    (["dequantize-backward", "--int", "s8", "--float", "f32", "--group-size", "128"],
     "takes no --int"),
    (["dequantize", "--int", "s9", "--float", "f32", "--group-size", "128"], "int_dtype='s9'"),
    (["dequantize", "--int", "s8", "--float", "f32", "--group-size", "0"], "group_size=0"),
    (["dequantize", "--int", "s8", "--float", "f32", "--group-size", "8", "--ptx"],
     "--ptx needs --target cuda"),
    (["dequantize", "--int", "s8", "--float", "f32", "--group-size", "8", "--arch", "avx9"],
     "avx9"),
    (["dequantize", "--int", "s8", "--float", "f32", "--group-size", "8", "--target", "cuda",
      "--arch", "sm_9"], "sm_9"),
])
def test_emit_errors_are_reported_with_status_2(capsys, argv, message):
    status, out, err = run(capsys, "emit", *argv)
    assert status == 2 and out == ""
    assert err.startswith("dqgen: error: ") and message in err


def test_usage_errors_exit_2(capsys):
    status, _, err = run(capsys, "emit", "transpose", "--float", "f32", "--group-size", "8")
    assert status == 2 and "invalid choice" in err


# --- aot / build ---------------------------------------------------------------------

def test_aot_builds_a_bundle_and_list_shows_it(capsys, tmp_path):
    out_dir = tmp_path / "bundle"
    status, out, err = run(capsys, "build", "--op", "dequantize-backward", "--float", "f32",
                           "--group-size", "32", "--target", "c:generic", "-j", "1",
                           "-o", str(out_dir))
    assert status == 0, err
    assert f"wrote bundle {out_dir}: 1 kernel" in out
    assert "1/1 dequant_pg_bwd_f32_g32 (c:generic)" in err  # progress
    status, out, _ = run(capsys, "list", str(out_dir), "--check-hashes")
    assert status == 0
    assert "dequant_pg_bwd_f32_g32" in out and "c:generic" in out
    assert "every file matches its sha256" in out
    so = out_dir / "c-generic" / "dequant_pg_bwd_f32_g32.so"
    so.write_bytes(so.read_bytes() + b"\0")
    status, out, _ = run(capsys, "list", str(out_dir / "manifest.json"), "--verify")
    assert status == 1 and "FAILED" in out and str(so) in out


def test_aot_dry_run_lists_the_product(capsys, tmp_path):
    status, out, _ = run(capsys, "aot", "--op", "dequantize,quantize", "--int", "s8",
                         "--int", "u8", "--float", "bf16", "--group-size", "64,128",
                         "--target", "c:generic,cuda:sm_90", "--filter", "dequant_*",
                         "--dry-run", "-o", str(tmp_path / "unused"))
    lines = out.splitlines()
    assert status == 0 and len(lines) == 2 * 2 * 2
    assert all(line.startswith("dequant_pg_") for line in lines)
    assert "dequant_pg_u8_bf16_g64\tcuda:sm_90" in lines
    assert not (tmp_path / "unused").exists()


def test_aot_from_a_manifest_file(capsys, tmp_path):
    manifest = tmp_path / "kernels.toml"
    manifest.write_text('op = "dequantize"\nint = ["s8"]\nfloat = ["f16", "f32"]\n'
                        'group_size = 32\ntarget = "c:generic"\n')
    status, out, _ = run(capsys, "aot", "-m", str(manifest), "--filter", "*f16*", "--dry-run",
                         "-o", str(tmp_path / "b"))
    assert status == 0 and out == "dequant_pg_s8_f16_g32\tc:generic\n"
    status, out, _ = run(capsys, "list", str(manifest))
    assert status == 0 and "2 kernels" in out and "dequant_pg_s8_f32_g32" in out


@pytest.mark.parametrize("extra, message", [
    (["--manifest", "m.toml", "--op", "quantize"], "either --manifest or selection flags"),
    (["--target", "opencl"], "target 'opencl'"),
    (["--filter", "nothing_*"], "matches no kernel"),
    (["--jobs", "0", "--op", "quantize"], "--jobs=0"),
    (["--manifest", "missing.toml"], "cannot be read"),
])
def test_aot_errors(capsys, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text('op = "dequantize"\n')
    status, _, err = run(capsys, "aot", *extra, "-o", str(tmp_path / "b"))
    assert status == 2 and err.startswith("dqgen: error: ") and message in err


# --- list ----------------------------------------------------------------------------

def _fake_bundle(tmp_path: Path) -> Path:
    """A bundle written from a hand-made cache entry: no compiler needed."""
    entry_dir = tmp_path / "entry"
    entry_dir.mkdir()
    (entry_dir / "kernel.so").write_bytes(b"\x7fELF not really")
    spec = lower(aot.make_descriptor("dequantize", "s8", "f32", 64), "c", "generic")
    entry = CacheEntry(spec, render_source(spec), "k" * 64, entry_dir, True, {"so": "kernel.so"},
                       {"compiler": "test", "flags": []})
    return bundle.write_bundle(tmp_path / "bundle", [bundle.BundleItem("dequantize", entry)],
                               __version__)


def test_list_without_path_uses_dqgen_bundle(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DQGEN_BUNDLE", raising=False)
    status, _, err = run(capsys, "list")
    assert status == 2 and "DQGEN_BUNDLE is not set" in err
    path = _fake_bundle(tmp_path)
    monkeypatch.setenv("DQGEN_BUNDLE", str(path))
    status, out, _ = run(capsys, "list")
    assert status == 0 and "dequant_pg_s8_f32_g64" in out and f"bundle {path}" in out


def test_list_errors(capsys, tmp_path):
    status, _, err = run(capsys, "list", str(tmp_path / "nowhere"))
    assert status == 2 and "does not exist" in err
    status, _, err = run(capsys, "list", str(tmp_path))
    assert status == 2 and "not a dqgen bundle" in err


# --- cache ---------------------------------------------------------------------------

def test_cache_info_and_clear(capsys, fresh_cache):
    entry = cache.entry_dir("c-generic", "ab" * 32)
    entry.mkdir(parents=True)
    (entry / "kernel.so").write_bytes(b"x" * 1000)
    (entry / "meta.json").write_text("{}")
    status, out, _ = run(capsys, "cache", "info")
    assert status == 0
    assert f"dir      {cache.cache_root()}" in out and "entries  1" in out
    assert "bytes)" in out
    status, out, _ = run(capsys, "cache", "clear")
    assert status == 0 and out.startswith("removed 1 cache entries")
    assert not entry.exists()
    status, out, _ = run(capsys, "cache", "info")
    assert "entries  0" in out


def test_cache_needs_an_action(capsys):
    status, _, err = run(capsys, "cache")
    assert status == 2 and "required" in err


def test_demo_is_still_wired(capsys):
    """``demo`` (the README's main job) keeps its flags; run small to stay quick."""
    status, out, _ = run(capsys, "demo", "--rows", "8", "--cols", "256", "--repeat", "1")
    assert status == 0 and "bit-exact   yes" in out and os.path.isabs(out.split("cache root  ")[1].strip())
