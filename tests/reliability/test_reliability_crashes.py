"""Crashes and damage: a build killed at any point, or a cache entry damaged after the
fact, is never trusted; the next call rebuilds it (with a warning when damage is found)
and gets a correct kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import dqgen
from dqgen import cache
import test_reliability_support as support
from test_reliability_support import (CHECK, REAL_CC, CompilerWrapper, check_here, child_env,
                                      entries, leftovers, needs_cc, reset_process_state, run_child,
                                      start_child)

isolated = support.isolated  # the fixture, shared

pytestmark = needs_cc

# Shell code for the wrapper: on the "die" flag, write half an output file, then SIGKILL
# itself; on the "hang" flag, say so and sleep (the test kills the Python process).
MISBEHAVE = """
if [ -e "$FLAG_DIR/die" ]; then
    rm -f "$FLAG_DIR/die"
    prev=""; for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
    printf '\\177ELF partial' > "$out"
    kill -9 $$
fi
if [ -e "$FLAG_DIR/hang" ]; then
    touch "$FLAG_DIR/started"
    sleep 60
fi
"""



def test_compiler_killed_midway_leaves_nothing_trusted(isolated, tmp_path, monkeypatch):
    cc = CompilerWrapper(tmp_path / "bin", before=MISBEHAVE)
    monkeypatch.setenv("CC", str(cc.path))
    cc.arm("die")
    with pytest.raises(dqgen.CompileError, match="SIGKILL") as info:
        check_here()
    assert "-o" in " ".join(info.value.command)
    assert entries(isolated) == [] and leftovers(isolated) == []
    plan, ok = check_here()
    assert ok and plan._kernel.compiled
    assert cc.compiles == 2


def test_python_killed_during_build_next_process_rebuilds(tmp_path):
    cc = CompilerWrapper(tmp_path / "bin", before=MISBEHAVE)
    cache_dir = tmp_path / "cache"
    env = child_env(cache_dir, cc)
    cc.arm("hang")
    victim = start_child(CHECK + "check()\n", env)
    deadline = time.monotonic() + 60
    while not (cc.flags / "started").exists():
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
        time.sleep(0.01)
    victim.kill()  # SIGKILL while its compiler runs
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    (cc.flags / "hang").unlink()
    compiler_pid = int(cc.log.read_text().split()[-1])
    os.killpg(compiler_pid, signal.SIGKILL)  # the orphaned compiler, in its own group
    assert entries(cache_dir) == []
    assert leftovers(cache_dir), "the killed build should have left its temp dir behind"
    out = run_child(CHECK + "plan, ok = check(); print(ok, plan._kernel.compiled)\n", env).stdout
    assert out.split() == ["True", "True"]
    assert cc.compiles == 2
    assert leftovers(cache_dir) == [], "the next builder should remove the dead build's files"


# Kill the building process just before its n-th move into the entry: kernel.c, kernel.so,
# meta.json (the commit). ``damaged`` first commits an entry and garbles its meta.json, so
# the killed process was rebuilding over old files.
KILLER = CHECK + """
import os, signal, sys
from pathlib import Path
n, count, real_replace = int(sys.argv[1]), [0], os.replace
def replace(src, dst, **kw):
    if Path(dst).name in ("kernel.c", "kernel.so", "meta.json"):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, **kw)
os.replace = replace
check()
"""


@pytest.mark.parametrize("step, damaged", [(1, False), (2, False), (3, False), (2, True)],
                         ids=["before-source", "before-binary", "before-commit",
                              "rebuilding-before-binary"])
def test_kill_at_each_commit_step(isolated, tmp_path, monkeypatch, step, damaged):
    cc = CompilerWrapper(tmp_path / "bin")
    monkeypatch.setenv("CC", str(cc.path))
    env = child_env(isolated, cc)
    if damaged:
        run_child(CHECK + "check()\n", env)
        (meta,) = [e / cache.META for e in entries(isolated)]
        meta.write_text("{")
    proc = run_child(KILLER, env, str(step), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert entries(isolated) == [], "a killed build must not leave a committed entry"
    compiles = cc.compiles
    plan, ok = check_here()
    assert ok and plan._kernel.compiled, "the next call must rebuild"
    assert cc.compiles == compiles + 1
    assert leftovers(isolated) == []


# Damage done to a committed entry after the fact. "foreign" swaps in a valid shared
# object exporting the same entry point that writes wrong values: loading it would
# silently give wrong answers, so only the recorded hash can catch it.
FOREIGN_C = """
#include <stdint.h>
void ENTRY(const void *q, const void *s, const void *z, float *y, int64_t outer,
           int64_t axis, int32_t num_threads)
{
    for (int64_t i = 0; i < outer * axis; ++i)
        y[i] = 42.0f;
}
"""


def _truncate(entry: Path) -> None:
    so = entry / "kernel.so"
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])


def _flip_byte(entry: Path) -> None:
    so = entry / "kernel.so"
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0x01
    so.write_bytes(bytes(data))


def _foreign(entry: Path) -> None:
    meta = json.loads((entry / cache.META).read_text())
    src = entry.parent / "foreign.c"
    src.write_text(FOREIGN_C.replace("ENTRY", meta["entry"]))
    subprocess.run([REAL_CC, "-shared", "-fPIC", "-O1", "-o", str(entry / "kernel.so"), str(src)],
                   check=True)
    src.unlink()


def _garble_meta(entry: Path) -> None:
    (entry / cache.META).write_text("{\"cache_format\": 1, \"files\": ")


def _meta_without_files(entry: Path) -> None:
    meta = json.loads((entry / cache.META).read_text())
    meta["files"] = {}
    (entry / cache.META).write_text(json.dumps(meta))


def _meta_without_binary(entry: Path) -> None:
    meta = json.loads((entry / cache.META).read_text())
    del meta["files"]["kernel.so"]
    (entry / cache.META).write_text(json.dumps(meta))


def _remove_binary(entry: Path) -> None:
    (entry / "kernel.so").unlink()


DAMAGE = {"truncated": _truncate, "bit-flip": _flip_byte, "foreign-binary": _foreign,
          "garbled-meta": _garble_meta, "meta-lists-nothing": _meta_without_files,
          "binary-unrecorded": _meta_without_binary, "binary-missing": _remove_binary}


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A cache holding one committed kernel, built by another process."""
    base = tmp_path_factory.mktemp("built")
    cc = CompilerWrapper(base / "bin")
    run_child(CHECK + "check()\n", child_env(base / "cache", cc))
    return base / "cache", cc


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_is_detected_and_rebuilt(built_cache, tmp_path, monkeypatch, damage):
    source, cc = built_cache
    cache_dir = tmp_path / "cache"
    shutil.copytree(source, cache_dir)
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("CC", str(cc.path))
    reset_process_state(monkeypatch)
    (entry,) = entries(cache_dir)
    DAMAGE[damage](entry)
    compiles = cc.compiles
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        plan, ok = check_here()
    assert ok, "a damaged binary was loaded"
    assert plan._kernel.compiled and cc.compiles == compiles + 1
    assert cache.check_entry(entry) is not None
