"""Environment: the compiler dqgen finds (or does not), and compilers that misbehave.

No compiler gives an error naming the fix; ``CC`` is honoured; a compiler that crashes
or hangs is reported with its output, and a hang is cut off after
``DQGEN_COMPILE_TIMEOUT`` seconds with the compiler's whole process group killed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import dqgen
import test_reliability_support as support
from test_reliability_support import CompilerWrapper, check_here, entries, leftovers, needs_cc

isolated = support.isolated  # the fixture, shared

pytestmark = needs_cc



def test_no_compiler_on_path_names_the_fix(isolated, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(dqgen.UnsupportedError) as info:
        check_here()
    message = str(info.value)
    assert "no C compiler" in message and "CC" in message and "install" in message
    assert "DQGEN_BUNDLE" in message


@pytest.mark.parametrize("value, match", [
    ("/nonexistent/bin/cc", "not on PATH"),
    ('gcc "-O2', "cannot be parsed"),
])
def test_bad_cc_is_a_clear_error(isolated, monkeypatch, value, match):
    monkeypatch.setenv("CC", value)
    with pytest.raises(dqgen.UnsupportedError, match=match):
        check_here()


def test_cc_is_honoured(isolated, tmp_path, monkeypatch):
    cc = CompilerWrapper(tmp_path / "bin")
    monkeypatch.setenv("CC", f"{cc.path} -DDQGEN_TEST_MARKER=1")
    plan, ok = check_here()
    assert ok and cc.compiles == 1 and cc.probes == 1
    assert plan._kernel.spec.entry  # built with the wrapper...
    meta = json.loads((plan._kernel.entry_dir / "meta.json").read_text())
    assert meta["command"][:2] == [str(cc.path), "-DDQGEN_TEST_MARKER=1"]  # ...and its args


CRASH = """
echo "cc1: internal compiler error: Segmentation fault (simulated)" >&2
kill -SEGV $$
"""


def test_crashing_compiler_is_reported_with_its_log(isolated, tmp_path, monkeypatch):
    cc = CompilerWrapper(tmp_path / "bin", before=CRASH)
    monkeypatch.setenv("CC", str(cc.path))
    with pytest.raises(dqgen.CompileError) as info:
        check_here()
    err = info.value
    assert "SIGSEGV" in str(err) and "internal compiler error" in str(err)
    dump = err.dump()
    assert str(cc.path) in dump and "--- source ---" in dump and " 1 | /*" in dump
    assert entries(isolated) == [] and leftovers(isolated) == []


# The wrapper prints, then waits on a child of its own: killing only the wrapper would
# leave that child running (and holding the output pipe) after the timeout.
HANG = """
echo "compiling, slowly" >&2
sleep 60 &
echo $! > "$FLAG_DIR/pid"
wait
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def test_hanging_compiler_times_out_with_its_log(isolated, tmp_path, monkeypatch):
    cc = CompilerWrapper(tmp_path / "bin", before=HANG)
    monkeypatch.setenv("CC", str(cc.path))
    monkeypatch.setenv("DQGEN_COMPILE_TIMEOUT", "1")
    start = time.monotonic()
    with pytest.raises(dqgen.CompileError, match="DQGEN_COMPILE_TIMEOUT") as info:
        check_here()
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"the timeout took {elapsed:.1f} s"
    assert "compiling, slowly" in info.value.log
    grandchild = int((cc.flags / "pid").read_text())
    deadline = time.monotonic() + 5
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild), "the compiler's children must be killed with it"
    assert entries(isolated) == [] and leftovers(isolated) == []


def test_hanging_version_probe_times_out(isolated, tmp_path, monkeypatch):
    cc = CompilerWrapper(tmp_path / "bin", version_before="sleep 60")
    monkeypatch.setenv("CC", str(cc.path))
    monkeypatch.setenv("DQGEN_COMPILE_TIMEOUT", "0.5")
    start = time.monotonic()
    with pytest.raises(dqgen.CompileError, match="--version did not finish"):
        check_here()
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan", "inf"])
def test_bad_compile_timeout_is_a_clear_error(isolated, monkeypatch, value):
    monkeypatch.setenv("DQGEN_COMPILE_TIMEOUT", value)
    with pytest.raises(dqgen.DqgenError, match="DQGEN_COMPILE_TIMEOUT"):
        check_here()


def test_bad_lock_timeout_is_a_clear_error(isolated, monkeypatch):
    monkeypatch.setenv("DQGEN_LOCK_TIMEOUT", "forever")
    with pytest.raises(dqgen.DqgenError, match="DQGEN_LOCK_TIMEOUT"):
        check_here()
