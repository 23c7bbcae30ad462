"""Upgrades: anything that can change a kernel's binary changes its cache key, so a stale
binary is never loaded after an upgrade of a template, of dqgen, of the compiler (even
one rewritten with the same size and mtime, or hidden behind a launcher) or of the flags,
or on another ISA.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import dqgen
from dqgen import cache, jit, render
from dqgen.build import cc
from dqgen.lower import lower
import test_reliability_support as support
from test_reliability_support import reset_process_state

isolated = support.isolated  # the fixture, shared

DESC = dqgen.DequantizePerGroupDescriptor(4, 256, 64, "bf16", "s8")
ISA = "avx2"
TOOLCHAIN = cc.Toolchain(("gcc",), "gcc|/usr/bin/gcc-12|1000|1|gcc (Debian 12.2.0-14) 12.2.0")


def key(source=None, toolchain=TOOLCHAIN, isa=ISA) -> str:
    source = source or render.render(lower(DESC, "c", isa))
    return jit.cpu_cache_key(source, toolchain, isa)


@pytest.fixture
def template_copy(tmp_path, monkeypatch):
    """A private copy of the templates that ``render`` uses for this test."""
    copy = tmp_path / "templates"
    shutil.copytree(render.TEMPLATE_DIR, copy)
    monkeypatch.setattr(render, "TEMPLATE_DIR", copy)

    render.reload_templates()
    yield copy
    monkeypatch.undo()
    render.reload_templates()


def _c_templates() -> list[str]:
    return sorted(p.relative_to(render.TEMPLATE_DIR).as_posix()
                  for p in render.TEMPLATE_DIR.rglob("*.j2")
                  if p.parent == render.TEMPLATE_DIR or p.parent.name == "c")


def test_key_is_deterministic():
    assert key() == key()
    assert key() == key(render.render(lower(DESC, "c", ISA)))


@pytest.mark.parametrize("name", _c_templates())
def test_any_template_change_changes_the_key(template_copy, name):
    before_source = render.render(lower(DESC, "c", ISA))
    before = key(before_source)
    with open(template_copy / name, "a") as fh:
        fh.write("{# an edit that renders to nothing #}\n")
    render.reload_templates()
    after_source = render.render(lower(DESC, "c", ISA))
    assert after_source.text == before_source.text  # the rendered C did not change...
    assert key(before_source) != before            # ...but the key did
    assert key(after_source) != before


def test_cuda_template_change_keeps_the_c_key(template_copy):
    before = key()
    for path in (template_copy / "cuda").glob("*.j2"):
        with open(path, "a") as fh:
            fh.write("{# cuda only #}\n")
    render.reload_templates()
    assert key() == before, "a CUDA template edit should not rebuild C kernels"


def test_dqgen_version_changes_the_key_and_the_entry_dir(monkeypatch):
    source = render.render(lower(DESC, "c", ISA))
    before, before_dir = key(source), cache.entry_dir("c-avx2", "ab" * 32)
    monkeypatch.setattr(jit, "__version__", "99.0.0")
    monkeypatch.setattr(cache, "__version__", "99.0.0")
    assert key(source) != before
    assert cache.entry_dir("c-avx2", "ab" * 32) != before_dir


def test_compiler_identity_changes_the_key():
    upgraded = cc.Toolchain(TOOLCHAIN.command, TOOLCHAIN.identity.replace("12.2.0", "12.3.0"))
    assert key(toolchain=upgraded) != key()


def _fake_compiler(path: Path, version: str) -> None:
    path.write_text(f"#!/bin/sh\necho 'fakecc {version}'\n")
    path.chmod(0o755)


def test_compiler_rewritten_with_same_size_and_mtime_is_reprobed(isolated, tmp_path, monkeypatch):
    fake = tmp_path / "fakecc"
    _fake_compiler(fake, "1.0")
    monkeypatch.setenv("CC", str(fake))
    first = jit._persisted_toolchain()
    assert first.identity.endswith("fakecc 1.0")
    st = fake.stat()
    time.sleep(0.05)  # file timestamps are coarse: let the rewrite's ctime differ
    _fake_compiler(fake, "2.0")  # same size...
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and mtime, as some packagers do
    assert fake.stat().st_size == st.st_size and fake.stat().st_mtime_ns == st.st_mtime_ns
    second = jit._persisted_toolchain()
    assert second.identity.endswith("fakecc 2.0")
    assert key(toolchain=second) != key(toolchain=first)
    # A new process (empty in-process memo) reads the persisted probe and agrees.
    reset_process_state(monkeypatch)
    assert jit._persisted_toolchain().identity == second.identity


def test_compiler_behind_a_launcher_is_fingerprinted(isolated, tmp_path, monkeypatch):
    launcher = tmp_path / "launcher"
    launcher.write_text('#!/bin/sh\nexec "$@"\n')
    launcher.chmod(0o755)
    fake = tmp_path / "fakecc"
    _fake_compiler(fake, "1.0")
    monkeypatch.setenv("CC", f"{launcher} {fake}")  # like CC="ccache gcc"
    first = jit._persisted_toolchain()
    _fake_compiler(fake, "1.0.1")  # the compiler behind the launcher is upgraded
    reset_process_state(monkeypatch)  # a later process
    second = jit._persisted_toolchain()
    assert second.identity.endswith("fakecc 1.0.1")
    assert key(toolchain=second) != key(toolchain=first)


def test_flags_change_the_key(monkeypatch):
    before = key()
    with_cc_args = cc.Toolchain(("gcc", "-O1"), TOOLCHAIN.identity.replace("gcc|", "gcc -O1|", 1))
    assert key(toolchain=with_cc_args) != before
    monkeypatch.setattr(cc, "BASE_FLAGS", cc.BASE_FLAGS + ("-fno-tree-vectorize",))
    assert key() != before


def test_real_cc_arguments_change_the_identity(isolated, monkeypatch):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not on PATH")
    monkeypatch.setenv("CC", "gcc")
    plain = jit._persisted_toolchain()
    monkeypatch.setenv("CC", "gcc -O1")
    assert jit._persisted_toolchain().identity != plain.identity


def test_isa_changes_the_key():
    source = render.render(lower(DESC, "c", ISA))
    generic = jit.cpu_cache_key(source, TOOLCHAIN, "generic")
    assert generic != jit.cpu_cache_key(source, TOOLCHAIN, "avx2")
    assert key(isa="generic") != key(isa="avx2")
    assert TOOLCHAIN.flags("generic") != TOOLCHAIN.flags("avx2")
