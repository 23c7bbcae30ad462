"""Helpers shared by the reliability tests (no tests of its own).

- ``CompilerWrapper``: a ``CC`` shell script that logs every call (so a test can count
  compilations and version probes) and can misbehave on request before running the
  real compiler: sleep, hang, crash, or be killed.
- ``run_child`` / ``start_child``: run Python code in a fresh interpreter, the only
  honest way to test what a new process finds in the cache.
- ``CHECK``: child-side code that selects a kernel, runs it and compares it bit for bit
  with ``dqgen.reference``.
- ``isolated``: a fixture giving this process an empty cache and empty in-process memos.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dqgen import cache, jit, plans

ROOT = Path(__file__).resolve().parents[2]
REAL_CC = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
needs_cc = pytest.mark.skipif(REAL_CC is None, reason="no C compiler on PATH")


class CompilerWrapper:
    """A logging ``CC``. ``before`` is shell code run before the real compiler is exec'd
    for a compilation (not for ``--version``); ``$FLAG_DIR`` holds one-shot flag files."""

    def __init__(self, directory: Path, before: str = "", name: str = "cc-wrapper",
                 version_before: str = "") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / name
        self.log = directory / f"{name}.log"
        self.flags = directory / f"{name}.flags"
        self.flags.mkdir(exist_ok=True)
        self.path.write_text("\n".join([
            "#!/bin/sh",
            f"FLAG_DIR='{self.flags}'",
            'case " $* " in',
            '*" --version "*)',
            f"echo \"version $$\" >> '{self.log}'",
            version_before,
            ";;",
            "*)",
            f"echo \"compile $$\" >> '{self.log}'",
            before,
            ";;",
            "esac",
            f"exec '{REAL_CC}' \"$@\"",
            ""]))
        self.path.chmod(0o755)

    def calls(self, kind: str) -> int:
        if not self.log.exists():
            return 0
        return sum(1 for line in self.log.read_text().splitlines() if line.startswith(kind))

    @property
    def compiles(self) -> int:
        return self.calls("compile")

    @property
    def probes(self) -> int:
        return self.calls("version")

    def arm(self, flag: str) -> None:
        """Create a one-shot flag file the ``before`` code may test and remove."""
        (self.flags / flag).touch()


def child_env(cache_dir: Path | None, cc: CompilerWrapper | str | None = None,
              **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DQGEN_BUNDLE", "DQGEN_DISABLE_JIT", "DQGEN_ISA", "DQGEN_NUM_THREADS")}
    if cache_dir is not None:
        env["DQGEN_CACHE_DIR"] = str(cache_dir)
    if cc is not None:
        env["CC"] = str(cc.path if isinstance(cc, CompilerWrapper) else cc)
    env["PYTHONWARNINGS"] = "always::RuntimeWarning"
    env.update(extra)
    return env


def start_child(code: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_child(code: str, env: dict[str, str], *args: str, timeout: float = 60,
              check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed with status {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


# Child-side: select a dequantize kernel and compare it bit for bit with the reference.
CHECK = textwrap.dedent("""\
    import numpy as np, dqgen
    from dqgen import reference

    def check(outer=8, axis=256, group=64, float_dtype="f32", seed=0, preference=None):
        desc = dqgen.DequantizePerGroupDescriptor(outer, axis, group, float_dtype, "u8")
        plan = dqgen.DequantizePerGroupPlan.select(desc, preference=preference)
        rng = np.random.default_rng(seed)
        q = rng.integers(0, 256, (outer, axis), dtype=np.uint8)
        s = rng.standard_normal((outer, axis // group)).astype(desc.float_dtype.np_dtype)
        z = rng.integers(-300, 300, (outer, axis // group)).astype(np.int32)
        y = np.empty((outer, axis), desc.float_dtype.np_dtype)
        plan.run(dqgen.DequantizePerGroupArgs(q, s, z, y))
        ref = reference.dequantize_per_group(q, s, z, group)
        return plan, y.tobytes() == ref.tobytes()
    """)


def check_here(**kw):
    """Run ``CHECK``'s ``check`` in this process; return ``(plan, bit_exact)``."""
    namespace: dict = {}
    exec(CHECK, namespace)
    return namespace["check"](**kw)


def leftovers(root: Path) -> list[str]:
    """Temporary files or build dirs under ``root``: hidden names and ``*-build-*``."""
    found = []
    for path in root.rglob("*"):
        if path.name.startswith(".") or "-build-" in path.name:
            found.append(str(path.relative_to(root)))
    return sorted(found)


def entries(root: Path) -> list[Path]:
    """Committed entry dirs (those holding a ``meta.json``) under ``root``."""
    return sorted(p.parent for p in root.glob(f"*/*/??/*/{cache.META}"))


def reset_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget every kernel, plan, cache root and probe this process has memoised."""
    for module, name, value in ((jit, "_memo", {}), (jit, "_key_locks", {}),
                                (plans, "_plan_memo", {}), (cache, "_root", None),
                                (cache, "_root_env", None), (cache, "_fallback", None),
                                (cache, "_memo_values", {})):
        monkeypatch.setattr(module, name, value, raising=False)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty private cache for this test and no memoised kernels, plans or probes."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(path))
    for name in ("DQGEN_BUNDLE", "DQGEN_DISABLE_JIT", "DQGEN_ISA", "DQGEN_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    reset_process_state(monkeypatch)
    return path
