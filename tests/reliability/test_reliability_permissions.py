"""Permissions: the cache holds code this process loads, so it must be private.

Created 0700 all the way down; a directory others can write to, or that another user
owns, is refused (the default location is replaced by a private one, with a warning);
a cache that cannot be written is still read, and kernels missing from it are built in
a private temporary directory, which is said once.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import platformdirs
import pytest

import dqgen
from dqgen import cache
import test_reliability_support as support
from test_reliability_support import (CHECK, CompilerWrapper, check_here, child_env, needs_cc,
                                      run_child)

isolated = support.isolated  # the fixture, shared

pytestmark = needs_cc
NOBODY = 65534



def test_cache_is_created_private_all_the_way_down(isolated):
    assert not isolated.exists()
    plan, ok = check_here()
    assert ok
    for path in [isolated, *isolated.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, f"{path} has mode {mode:o}"
        else:
            assert not mode & (stat.S_IWGRP | stat.S_IWOTH), f"{path} has mode {mode:o}"
        assert path.lstat().st_uid == os.getuid()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720])
def test_dir_writable_by_others_is_refused(isolated, tmp_path, monkeypatch, mode):
    cc = CompilerWrapper(tmp_path / "bin")
    monkeypatch.setenv("CC", str(cc.path))
    isolated.mkdir()
    isolated.chmod(mode)
    with pytest.raises(dqgen.CacheError, match="writable by group or others") as info:
        check_here()
    assert str(isolated) in str(info.value) and "DQGEN_CACHE_DIR" in str(info.value)
    assert cc.compiles == 0 and list(isolated.iterdir()) == []


def test_dir_owned_by_another_user_is_refused(isolated, tmp_path, monkeypatch):
    cc = CompilerWrapper(tmp_path / "bin")
    monkeypatch.setenv("CC", str(cc.path))
    if os.geteuid() == 0:
        isolated.mkdir(mode=0o700)
        os.chown(isolated, NOBODY, NOBODY)
        foreign = isolated
    else:
        foreign = Path("/")  # owned by root, not by this user
        monkeypatch.setenv("DQGEN_CACHE_DIR", str(foreign))
    with pytest.raises(dqgen.CacheError, match="owned by uid"):
        check_here()
    assert cc.compiles == 0


def test_cache_dir_that_is_a_file_is_refused(isolated):
    isolated.write_text("not a directory")
    with pytest.raises(dqgen.CacheError, match="not a directory"):
        check_here()


def test_unsafe_default_location_is_replaced_with_a_private_one(isolated, tmp_path, monkeypatch):
    unsafe = tmp_path / "shared-cache"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    monkeypatch.delenv("DQGEN_CACHE_DIR")
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda *a, **k: str(unsafe))
    with pytest.warns(RuntimeWarning, match="private temporary"):
        root = cache.cache_root()
    assert root != unsafe and stat.S_IMODE(root.stat().st_mode) == 0o700
    plan, ok = check_here()
    assert ok and plan._kernel.entry_dir.is_relative_to(root)
    assert list(unsafe.iterdir()) == [], "nothing may be written to the unsafe directory"


# Runs as a user that cannot write the cache: as root, drops to nobody after a warm-up
# build in a scratch cache has imported everything (the interpreter lives under /root).
UNWRITABLE = CHECK + """
import json, os, sys, warnings
from dqgen import cache, jit, plans
ro_dir, warm_dir = sys.argv[1], sys.argv[2]
if os.geteuid() == 0:
    os.environ["DQGEN_CACHE_DIR"] = warm_dir
    check(group=8)
    os.setgid(65534)
    os.setuid(65534)
    jit._memo.clear(); plans._plan_memo.clear(); cache._memo_values.clear()
os.environ["DQGEN_CACHE_DIR"] = ro_dir
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    results = [check(group=g) for g in (64, 128, 16)]
print(json.dumps({
    "ok": [ok for _, ok in results],
    "compiled": [p._kernel.compiled for p, _ in results],
    "dirs": [str(p._kernel.entry_dir) for p, _ in results],
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
}))
"""


def _make_tree_readonly(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode & ~0o222)


def test_unwritable_cache_is_read_and_builds_go_to_a_private_temp_dir():
    base = Path(tempfile.mkdtemp(prefix="dqgen-ro-test-"))
    base.chmod(0o755)  # traversable by the unprivileged child
    try:
        cache_dir, warm_dir = base / "cache", base / "warm"
        env = child_env(None)
        env.pop("CC", None)
        # An entry for group 64 is built while the cache is still writable.
        run_child(CHECK + "check(group=64)\n", child_env(cache_dir))
        if os.geteuid() == 0:
            for path in [cache_dir, *cache_dir.rglob("*")]:
                os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        before = sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*"))
        _make_tree_readonly(cache_dir)
        out = run_child(UNWRITABLE, env, str(cache_dir), str(warm_dir)).stdout
        result = json.loads(out.splitlines()[-1])
        assert result["ok"] == [True, True, True]
        assert result["compiled"] == [False, True, True], "the existing entry is read, not rebuilt"
        assert Path(result["dirs"][0]).is_relative_to(cache_dir)
        temp_dirs = {Path(d).parents[3] for d in result["dirs"][1:]}
        assert len(temp_dirs) == 1 and not temp_dirs.pop().is_relative_to(cache_dir)
        assert len(result["warnings"]) == 1, result["warnings"]
        assert "not writable" in result["warnings"][0]
        after = sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*"))
        assert after == before, "nothing may be written to the unwritable cache"
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)
