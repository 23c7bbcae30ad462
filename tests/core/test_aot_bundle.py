"""Ahead-of-time builds and bundles (dqgen/aot.py, dqgen/bundle.py): determinism, loading
with JIT off in a second process, hash checks on load, the C header and the C example
(what a selection enumerates: test_aot_selection.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from dqgen import isa

from dqgen import aot, bundle, cache, jit
from dqgen.errors import CompileError, DqgenError, MissingKernelError, UnsupportedError
from dqgen.bundle import BundleError
from dqgen.ir import DequantizePerGroupBackwardDescriptor, DequantizePerGroupDescriptor
from dqgen.isa import host_isa, supported_isas

ROOT = Path(__file__).resolve().parents[2]
HOST = host_isa()

# A small, varied bundle: two ops with a storage dtype, f16/bf16/f32 conversions, one
# kernel built for the generic ISA only, and the kernel the C example links.
SELECTIONS = [
    {"op": "dequantize", "int": "s8", "float": ["bf16", "f32"], "group_size": 128},
    {"op": "quantize", "int": "u8", "float": "f16", "group_size": 64},
    {"op": "dequantize-backward", "float": "f32", "group_size": 32, "target": "c:generic"},
]


@pytest.fixture(autouse=True)
def _no_bundles_leak():
    """Tests that load bundles in this process forget them afterwards."""
    yield
    bundle.unload_all()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The bundle of SELECTIONS, built once (through the session cache)."""
    out = tmp_path_factory.mktemp("aot") / "bundle"
    requests = aot.enumerate_kernels(SELECTIONS)
    path, results = aot.build_bundle(requests, out, jobs=1)
    return path, requests, results


# --- the bundle ----------------------------------------------------------------------

def test_bundle_layout_and_manifest(built):
    path, requests, results = built
    manifest = json.loads((path / bundle.MANIFEST).read_text())
    assert manifest["format"] == "dqgen-bundle" and manifest["dqgen_version"]
    kernels = manifest["kernels"]
    assert [(k["uri"], k["target"], k["arch"]) for k in kernels] == \
        [(r.uri, r.target, r.arch) for r in requests]
    text = (path / bundle.MANIFEST).read_text()
    assert str(path) not in text and str(cache.cache_root()) not in text  # no local paths
    for k, result in zip(kernels, results):
        assert k["cache_key"] == result.entry.key
        assert k["signature"] == bundle.c_prototype(result.entry.spec)
        source = (path / k["source"]["path"]).read_text()
        assert source == result.entry.source.text
        assert bundle.sha256_bytes(source.encode()) == k["source"]["sha256"]
        so = path / k["binaries"]["so"]["path"]
        assert so.read_bytes() == (result.entry.entry_dir / "kernel.so").read_bytes()
        assert bundle.sha256_bytes(so.read_bytes()) == k["binaries"]["so"]["sha256"]
        assert k["toolchain"]["flags"] and k["toolchain"]["compiler"]
    assert bundle.Bundle.open(path).check_hashes() == []


def test_rebuild_in_a_fresh_cache_is_byte_identical(built, tmp_path, monkeypatch):
    """Same requests, empty cache, parallel workers: same sources and manifest.json
    (whose binary hashes show gcc's output is byte-identical too)."""
    path, requests, _ = built
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(tmp_path / "cache"))
    again, results = aot.build_bundle(requests, tmp_path / "again", jobs=2)
    assert all(r.entry.built for r in results)  # really rebuilt, not copied from a cache

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}
    first, second = files(path), files(again)
    assert first.keys() == second.keys()
    for name in first:
        if not name.endswith(".so"):
            assert first[name] == second[name], name
    assert (path / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()


def test_rebuild_replaces_a_bundle_but_never_other_directories(built, tmp_path):
    path, requests, results = built
    target = tmp_path / "out"
    shutil.copytree(path, target)
    (target / "stale.txt").write_text("from an older bundle")
    aot.build_bundle(requests[:1], target, jobs=1)
    assert not (target / "stale.txt").exists()
    assert len(json.loads((target / "manifest.json").read_text())["kernels"]) == 1
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a dqgen bundle"):
        aot.build_bundle(requests[:1], precious, jobs=1)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_header_declares_what_the_sources_define(built, tmp_path):
    """Each kernel source compiles with the bundle header included first: a prototype
    that disagreed with the definition would be a 'conflicting types' error."""
    path, _, results = built
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    header = (path / bundle.HEADER).read_text()
    for r in results:
        assert bundle.c_prototype(r.entry.spec) in header
        unit = tmp_path / f"{r.request.uri}_{r.request.arch}.c"
        unit.write_text(f'#include "{bundle.HEADER}"\n' + r.entry.source.text)
        proc = subprocess.run([cc, "-fsyntax-only", "-Werror", "-fopenmp", "-std=c11",
                               *isa.march_flags(r.request.arch),
                               f"-I{path}", str(unit)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


# --- using a bundle ------------------------------------------------------------------

SECOND_PROCESS = textwrap.dedent("""\
    import numpy as np, ml_dtypes, dqgen
    from dqgen import cache, reference
    from dqgen.jit import get_kernel

    rng = np.random.default_rng(7)
    def bits(a):
        return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(f"u{a.dtype.itemsize}")
    def same(a, b):
        nan = np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))
        return np.array_equal(bits(a)[~nan], bits(b)[~nan])

    special = np.array([0.0, -0.0, 1e-45, np.inf, -np.inf, np.nan, 3.4e38], np.float32)
    # dequantize s8 -> bf16 and -> f32, group 128
    for f in (ml_dtypes.bfloat16, np.float32):
        q = rng.integers(-128, 128, (5, 384)).astype(np.int8)
        s = rng.choice(np.concatenate([special, rng.standard_normal(20, np.float32)]), (5, 3)).astype(f)
        zp = rng.integers(-300, 300, (5, 3)).astype(np.int32)
        y = dqgen.dequantize_per_group(q, s, zp, 128)
        assert same(y, reference.dequantize_per_group(q, s, zp, 128)), f
    # quantize f16 -> u8, group 64
    x = (rng.standard_normal((4, 256)) * 50).astype(np.float16)
    s = rng.uniform(0.1, 2, (4, 4)).astype(np.float16)
    s[0, 0] = 0
    zp = rng.integers(0, 256, (4, 4)).astype(np.int32)
    qq = dqgen.quantize_per_group(x, s, zp, 64, dtype="u8")
    assert np.array_equal(qq, reference.quantize_per_group(x, s, zp, 64, np.uint8, 0, 255))
    # dequantize backward f32, group 32: bundled for generic only, used for any ISA
    dy = rng.standard_normal((3, 96)).astype(np.float32)
    s = rng.standard_normal((3, 3)).astype(np.float32)
    assert same(dqgen.dequantize_per_group_backward(dy, s, 32),
                reference.dequantize_per_group_backward(dy, s, 32))

    for d in (dqgen.DequantizePerGroupDescriptor(1, 128, 128, "bf16", "s8"),
              dqgen.DequantizePerGroupBackwardDescriptor(1, 32, 32, "f32")):
        plan = type(d).__name__.replace("Descriptor", "Plan")
        k = getattr(dqgen, plan).select(d)._kernel
        assert k.origin == "bundle", (d, k.origin)
    try:
        get_kernel(dqgen.DequantizePerGroupDescriptor(1, 64, 64, "f64", "u8"), "c", "generic")
        raise SystemExit("a kernel missing from the bundle did not raise")
    except dqgen.MissingKernelError as exc:
        assert "dequant_pg_u8_f64_g64" in str(exc) and "DQGEN_DISABLE_JIT" in str(exc), exc
    assert cache.info()["entries"] == 0, cache.info()
    print("BUNDLE-OK")
    """)


def test_second_process_runs_from_the_bundle_with_jit_disabled(built, tmp_path):
    """An empty cache, no compiler and JIT disabled: every kernel comes from the bundle,
    bit-exact against the reference; a kernel not in it is a MissingKernelError."""
    path, _, _ = built
    env = {**os.environ, "DQGEN_CACHE_DIR": str(tmp_path / "empty-cache"),
           "DQGEN_DISABLE_JIT": "1", "DQGEN_BUNDLE": os.pathsep + str(path),
           "CC": str(tmp_path / "no-such-compiler")}
    proc = subprocess.run([sys.executable, "-c", SECOND_PROCESS], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "BUNDLE-OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """JIT off, an empty cache and no memoised kernels: only a bundle can answer."""
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DQGEN_DISABLE_JIT", "1")
    monkeypatch.delenv("DQGEN_BUNDLE", raising=False)
    monkeypatch.setattr(jit, "_memo", {})
    return tmp_path


def _copy(path: Path, dest: Path) -> Path:
    shutil.copytree(path, dest)
    return dest


def test_tampered_binary_is_refused_and_never_loaded(built, isolated, monkeypatch):
    path, _, _ = built
    copy = _copy(path, isolated / "tampered")
    so = copy / f"c-{HOST}" / "dequant_pg_s8_bf16_g128.so"
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0x01
    so.write_bytes(bytes(data))
    monkeypatch.setenv("DQGEN_BUNDLE", str(copy))
    desc = DequantizePerGroupDescriptor(2, 256, 128, "bf16", "s8")
    with pytest.raises(BundleError, match="dequant_pg_s8_bf16_g128.so") as info:
        jit.get_kernel(desc, "c", HOST)
    assert "sha256" in str(info.value) and "refusing to load" in str(info.value)
    maps = Path("/proc/self/maps")
    assert not maps.exists() or str(so) not in maps.read_text()
    assert isinstance(info.value, DqgenError)
    problems = bundle.Bundle.open(copy).check_hashes()
    assert len(problems) == 1 and str(so) in problems[0]


def test_truncated_binary_is_refused(built, isolated):
    path, _, _ = built
    copy = _copy(path, isolated / "truncated")
    so = copy / f"c-{HOST}" / "dequant_pg_s8_f32_g128.so"
    so.write_bytes(so.read_bytes()[:100])
    bundle.load_bundle(copy)
    with pytest.raises(BundleError, match="does not match the sha256"):
        jit.get_kernel(DequantizePerGroupDescriptor(1, 128, 128, "f32", "s8"), "c", HOST)


def test_load_bundle_serves_kernels_and_reports_its_origin(built, isolated):
    path, _, _ = built
    loaded = bundle.load_bundle(path)
    assert ("dequant_pg_s8_f32_g128", "c", HOST) in loaded.kernels
    kernel = jit.get_kernel(DequantizePerGroupDescriptor(1, 128, 128, "f32", "s8"), "c", HOST)
    assert kernel.origin == "bundle" and kernel.entry_dir == path / f"c-{HOST}"
    assert kernel.key == loaded.get("dequant_pg_s8_f32_g128", "c", HOST).cache_key


@pytest.mark.skipif("avx2" not in supported_isas(), reason="needs an AVX2 CPU")
def test_a_generic_kernel_serves_a_better_isa(built, isolated):
    path, _, _ = built
    bundle.load_bundle(path)
    kernel = jit.get_kernel(DequantizePerGroupBackwardDescriptor(1, 32, 32, "f32"), "c", "avx2")
    assert kernel.origin == "bundle" and kernel.spec.arch == "generic"


def test_stale_bundle_kernel_is_skipped_with_a_warning(built, isolated):
    """A bundle kernel whose source is not what this dqgen emits is not used."""
    path, _, _ = built
    copy = _copy(path, isolated / "stale")
    manifest = json.loads((copy / "manifest.json").read_text())
    for k in manifest["kernels"]:
        k["source"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle.load_bundle(copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MissingKernelError, match="dequant_pg_s8_f32_g128"):
            jit.get_kernel(DequantizePerGroupDescriptor(1, 128, 128, "f32", "s8"), "c", HOST)
    assert any("differs from what this dqgen emits" in str(w.message) for w in caught)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(format="zip"), "not a dqgen bundle manifest"),
    (lambda m: m.update(format_version=99), "format_version"),
    (lambda m: m["kernels"][0]["binaries"]["so"].update(path="../../etc/x.so"), "leaves the bundle"),
    (lambda m: m["kernels"][0].pop("cache_key"), "lacks cache_key"),
])
def test_malformed_manifests_are_refused(built, tmp_path, mutate, message):
    path, _, _ = built
    copy = _copy(path, tmp_path / "bad")
    manifest = json.loads((copy / "manifest.json").read_text())
    mutate(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        bundle.load_bundle(copy)


def test_bad_bundle_paths_are_named(tmp_path, monkeypatch):
    with pytest.raises(BundleError, match="does not exist"):
        bundle.load_bundle(tmp_path / "missing")
    with pytest.raises(BundleError, match="no manifest.json"):
        bundle.load_bundle(tmp_path)
    monkeypatch.setenv("DQGEN_BUNDLE", str(tmp_path / "missing"))
    with pytest.raises(BundleError, match="DQGEN_BUNDLE"):
        bundle.active_bundles()


def test_world_writable_bundle_is_refused(built, isolated):
    path, _, _ = built
    copy = _copy(path, isolated / "open")
    os.chmod(copy / f"c-{HOST}", 0o777)
    bundle.load_bundle(copy)
    with pytest.raises(BundleError, match="writable by every user"):
        jit.get_kernel(DequantizePerGroupDescriptor(1, 128, 128, "f32", "s8"), "c", HOST)


def test_jit_disabled_still_accepts_a_cache_hit(built, isolated, monkeypatch):
    """With JIT off, a valid cache entry is used; nothing is compiled."""
    _, _, results = built
    hit = next(r for r in results if r.request.uri == "dequant_pg_s8_f32_g128")
    # <root>/<version>/<target>/<key[:2]>/<key>: back to the session cache that built it
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(hit.entry.entry_dir.parents[3]))
    kernel = jit.get_kernel(DequantizePerGroupDescriptor(1, 128, 128, "f32", "s8"), "c", HOST)
    assert kernel.origin == "cache" and kernel.entry_dir == hit.entry.entry_dir


def test_cuda_target_without_runtime_pieces_is_unsupported(monkeypatch):
    """A missing CUDA template reads as UnsupportedError, not a Jinja traceback."""
    import jinja2

    def missing(spec):
        raise jinja2.TemplateNotFound("cuda/kernel.cu.j2")
    monkeypatch.setattr(jit, "render", missing)
    spec = aot.KernelRequest("dequant_pg_s8_f32_g128", "cuda", "sm_90", "dequantize", "s8",
                             "f32", 128).spec()
    with pytest.raises(UnsupportedError, match="cuda/kernel.cu.j2"):
        jit.render_source(spec)


# --- the C example -------------------------------------------------------------------

def test_c_example_links_the_bundle_and_dequantizes(built, tmp_path):
    path, _, _ = built
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("needs make and a C compiler")
    program = tmp_path / "dequantize_bundle"
    build = subprocess.run(["make", "-s", "-C", str(ROOT / "examples"), f"BUNDLE={path}",
                            f"OUT={program}", f"ISA={HOST}"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok: 1536 values dequantized bit-exactly"), run.stdout


# --- CUDA kernels in a bundle (NVRTC builds them; no GPU needed to load the record) ---

def test_cuda_kernels_are_bundled_and_hash_checked(isolated, monkeypatch):
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    request = aot.expand({"op": "dequantize", "int": "u8", "float": ["f16", "f32"],
                          "group_size": 64, "target": "cuda:sm_90"})
    try:
        jit.render_source(request[0].spec())
    except UnsupportedError as exc:
        pytest.skip(f"no CUDA target in this checkout: {exc}")
    monkeypatch.delenv("DQGEN_DISABLE_JIT")  # building needs JIT; loading below does not
    # Two kernels, two workers: NVRTC runs in worker processes, never in this one.
    path, _ = aot.build_bundle(request, isolated / "cuda-bundle", jobs=2)
    record = bundle.Bundle.open(path).get("dequant_pg_u8_f16_g64", "cuda", "sm_90")
    assert set(record.binaries) == {"ptx", "cubin"}
    assert (path / record.source["path"]).suffix == ".cu"
    assert b".target sm_90" in (path / record.binaries["ptx"]["path"]).read_bytes()
    assert (path / record.binaries["cubin"]["path"]).read_bytes()[:4] == b"\x7fELF"
    assert "dqgen_dequant_pg_u8_f16_g64" not in (path / bundle.HEADER).read_text()  # C only

    monkeypatch.setenv("DQGEN_DISABLE_JIT", "1")
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(isolated / "empty"))
    desc = DequantizePerGroupDescriptor(1, 64, 64, "f16", "u8")
    bundle.load_bundle(path)
    kernel = jit.get_kernel(desc, "cuda", "sm_90")
    assert kernel.origin == "bundle" and kernel.key == record.cache_key
    assert kernel.asm["cubin"][:4] == b"\x7fELF" and "ptx" not in kernel.asm
    monkeypatch.setattr(jit, "_memo", {})
    cubin = path / record.binaries["cubin"]["path"]
    cubin.write_bytes(cubin.read_bytes()[:-1] + b"\x01")
    bundle.load_bundle(path)
    with pytest.raises(BundleError, match=str(cubin)):
        jit.get_kernel(desc, "cuda", "sm_90")


def test_build_failures_keep_their_type_and_name_the_kernel(isolated):
    """JIT disabled and nothing cached: each kernel fails with MissingKernelError; two
    failures are summarised in one error listing both."""
    requests = aot.expand({"op": "dequantize-backward", "float": ["f32", "f64"],
                           "group_size": 16, "target": "c:generic"})
    with pytest.raises(MissingKernelError, match="dequant_pg_bwd_f32_g16 .c:generic."):
        aot.build(requests[:1])
    with pytest.raises(DqgenError, match="2 of 2 kernels failed") as info:
        aot.build(requests, jobs=2)
    assert "dequant_pg_bwd_f64_g16" in str(info.value)


def test_compile_errors_carry_the_log_and_source(isolated, monkeypatch):
    monkeypatch.delenv("DQGEN_DISABLE_JIT")
    fake = isolated / "fakecc"  # answers --version, fails every compile
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fakecc 1.0"; exit 0; }\n'
                    'echo "kernel.c:1: error: no compiling today" >&2; exit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    request = aot.expand({"op": "dequantize-backward", "float": "f32", "group_size": 16,
                          "target": "c:generic"})
    with pytest.raises(CompileError) as info:
        aot.build(request)
    assert "dequant_pg_bwd_f32_g16" in str(info.value)
    assert "dqgen_dequant_pg_bwd_f32_g16" in info.value.source and info.value.command
    assert "no compiling today" in info.value.log and "no compiling today" in str(info.value)
