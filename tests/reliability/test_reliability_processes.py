"""Processes: fork, and the life of a loaded shared object.

- libgomp's thread pool does not survive ``fork``: a child that enters a parallel region
  waits forever. Children forked (multiprocessing's fork start method) after a parallel
  kernel ran must neither hang nor go wrong, even on problems big enough to go parallel.
- A lock held by another thread at fork time (a build in progress) must not hang a child.
- A cache entry is never rewritten in place (a rebuild gives the binary a new inode, so
  a process that has the old one mapped keeps working) and kernels are never unloaded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os

from dqgen import cache, jit, plans
import test_reliability_support as support
from test_reliability_support import (CHECK, CompilerWrapper, check_here, child_env, needs_cc,
                                      run_child)

isolated = support.isolated  # the fixture, shared

pytestmark = needs_cc

# Parent: run a kernel on 2 threads (creating libgomp's pool), then fork children that
# run big problems (parallel-sized) through the same plan, a new plan asking for 2
# threads, and a second kernel. Each child reports bit-exactness and its thread count.
FORK_AFTER_PARALLEL = CHECK + """
import json, multiprocessing as mp, os
import dqgen
BIG = dict(outer=64, axis=8192, group=128)  # 2**19 elements: over the parallel threshold
two = dqgen.PlanPreference(num_threads=2)
plan, ok = check(**BIG, preference=two)
parent_threads = len(os.listdir("/proc/self/task"))

def child(conn):
    results = [check(**BIG, preference=two)[1], check(**BIG, seed=1)[1],
               check(**BIG, float_dtype="bf16", preference=two)[1]]
    conn.send((results, len(os.listdir("/proc/self/task"))))

ctx = mp.get_context("fork")
report = {"parent_ok": ok, "parent_threads": parent_threads, "children": []}
for _ in range(2):
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(send,))
    proc.start()
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        report["children"].append("hung")
    else:
        report["children"].append(receive.recv() if receive.poll() else f"exit {proc.exitcode}")
print(json.dumps(report))
"""


def test_children_forked_after_a_parallel_kernel_do_not_hang(tmp_path):
    env = child_env(tmp_path / "cache", DQGEN_NUM_THREADS="2")
    report = json.loads(run_child(FORK_AFTER_PARALLEL, env, timeout=120).stdout.splitlines()[-1])
    assert report["parent_ok"]
    assert report["parent_threads"] >= 2, "the parent should have run a parallel region"
    for child in report["children"]:
        assert child != "hung", "a forked child hung in OpenMP"
        results, threads = child
        assert results == [True, True, True]
        assert threads == 1, "a forked child must not start OpenMP threads"


# A thread is building (holding the per-kernel lock) when the process forks; the child
# asks for the same kernel. The wrapper flags the build start, then sleeps.
FORK_DURING_BUILD = CHECK + """
import json, multiprocessing as mp, os, sys, threading, time
from pathlib import Path
started = Path(sys.argv[1])
builder = threading.Thread(target=check)
builder.start()
while not started.exists():
    time.sleep(0.01)

def child(conn):
    conn.send(check()[1])

ctx = mp.get_context("fork")
receive, send = ctx.Pipe(duplex=False)
proc = ctx.Process(target=child, args=(send,))
proc.start()
proc.join(30)
hung = proc.is_alive()
if hung:
    proc.kill()
builder.join()
print(json.dumps({"hung": hung, "ok": receive.recv() if not hung and receive.poll() else None}))
"""


def test_fork_while_a_thread_builds_does_not_hang_the_child(tmp_path):
    cc = CompilerWrapper(tmp_path / "bin", before='touch "$FLAG_DIR/started"; sleep 1')
    report = run_child(FORK_DURING_BUILD, child_env(tmp_path / "cache", cc),
                       str(cc.flags / "started"), timeout=120).stdout.splitlines()[-1]
    result = json.loads(report)
    assert not result["hung"], "the child waited forever on a lock copied in the held state"
    assert result["ok"] is True
    assert cc.compiles == 1


def _mapped(path) -> list[str]:
    with open("/proc/self/maps") as fh:
        return [line for line in fh if str(path) in line]


def test_rebuild_never_rewrites_a_loaded_binary_in_place(isolated, tmp_path, monkeypatch):
    cc = CompilerWrapper(tmp_path / "bin")
    monkeypatch.setenv("CC", str(cc.path))
    plan, ok = check_here()
    assert ok
    so = plan._kernel.entry_dir / "kernel.so"
    inode = so.stat().st_ino
    fd = os.open(so, os.O_RDONLY)
    try:
        loaded_bytes = os.pread(fd, so.stat().st_size, 0)
        (so.parent / cache.META).write_text("{")  # damage: another process must rebuild
        out = run_child(CHECK + "plan, ok = check(); print(ok, plan._kernel.compiled)\n",
                        child_env(isolated, cc)).stdout
        assert out.split() == ["True", "True"]
        assert so.stat().st_ino != inode, "the rebuild must move a new file in, not rewrite"
        assert os.pread(fd, len(loaded_bytes) + 1, 0) == loaded_bytes  # old inode untouched
    finally:
        os.close(fd)
    assert any(str(inode) in line.split() for line in _mapped(so))
    plan2, ok2 = check_here(seed=3)  # the loaded kernel still runs, and is right
    assert ok2 and plan2._kernel is plan._kernel
    assert hashlib.sha256(so.read_bytes()).hexdigest() == json.loads(
        (so.parent / cache.META).read_text())["files"]["kernel.so"]


def test_kernels_are_never_unloaded(isolated, monkeypatch):
    plan, ok = check_here(group=32)
    so = plan._kernel.entry_dir / "kernel.so"
    assert _mapped(so)
    del plan
    jit._memo.clear()  # this test's own memos (see ``isolated``): drop every reference
    plans._plan_memo.clear()
    gc.collect()
    assert _mapped(so), "the shared object was unloaded when its last user went away"
