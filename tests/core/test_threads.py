"""Thread counts: whatever a caller asks for (DQGEN_NUM_THREADS, PlanPreference, convert
-j), a kernel call runs on at most ``thread_limit()`` threads, and a warning says so once;
a huge count used to exhaust the process's threads (libgomp failed or crashed). The
crash cases run in a child process."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

import dqgen
from dqgen import InvalidProblemError
from dqgen.runtime import cpu
from test_reliability_support import CHECK, child_env, run_child

HUGE = "100000"
# Above the parallel threshold (1 << 15 elements), so the kernel enters OpenMP.
PARALLEL = "outer=300, axis=256, group=64, float_dtype='f16'"


def test_limit_is_a_few_threads_per_usable_cpu(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 3)
    assert cpu.thread_limit() == 3 * cpu.THREADS_PER_CPU
    assert cpu.bounded_threads(5, "x") == 5


def test_env_thread_count_above_the_limit_runs(tmp_path):
    """DQGEN_NUM_THREADS=100000 crashed the process in the kernel call (SIGSEGV)."""
    code = CHECK + f"plan, ok = check({PARALLEL})\nprint(ok, plan._threads)\n"
    proc = run_child(code, child_env(None, DQGEN_NUM_THREADS=HUGE), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok, threads = proc.stdout.split()
    assert ok == "True" and int(threads) == cpu.thread_limit()
    assert proc.stderr.count(f"DQGEN_NUM_THREADS={HUGE} is more threads than this "
                             "machine can use") == 1


def test_preference_above_the_limit_runs_and_warns_once():
    """Two plans (two kernels) with the same huge preference: both run, one warning."""
    code = CHECK + (f"pref = dqgen.PlanPreference(num_threads={HUGE})\n"
                    f"plan, ok = check({PARALLEL}, preference=pref)\n"
                    "plan2, ok2 = check(outer=300, axis=256, group=64, preference=pref)\n"
                    "print(ok, ok2, plan._threads, plan2._threads)\n")
    proc = run_child(code, child_env(None), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    limit = str(cpu.thread_limit())
    assert proc.stdout.split() == ["True", "True", limit, limit]
    assert proc.stderr.count(f"num_threads={HUGE} is more threads") == 1


def test_preference_is_bounded_in_process():
    desc = dqgen.DequantizePerGroupDescriptor(4, 64, 32, "f32", "u8")
    with pytest.warns(RuntimeWarning, match=r"num_threads=123456 is more threads than this "
                      r"machine can use \(\d+ CPUs\); running \d+"):
        plan = dqgen.DequantizePerGroupPlan.select(
            desc, preference=dqgen.PlanPreference(num_threads=123456))
    assert plan._threads == cpu.thread_limit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: a second plan does not warn again
        cpu.num_threads(123456)


@pytest.mark.parametrize("value", [2.5, "4", True])
def test_thread_count_must_be_a_whole_number(value):
    desc = dqgen.DequantizePerGroupDescriptor(4, 64, 32, "f32", "u8")
    with pytest.raises(InvalidProblemError, match="num_threads=.* whole number of threads"):
        dqgen.DequantizePerGroupPlan.select(desc,
                                            preference=dqgen.PlanPreference(num_threads=value))


CONVERT = """
import json, sys
import numpy as np
import safetensors.numpy as st
from dqgen import cli
from dqgen.formats import pack
src, dst, jobs = sys.argv[1:4]
rng = np.random.default_rng(0)
layer = pack.quantize_gptq(rng.standard_normal((512, 128)).astype(np.float32), 128, 4)
del layer["g_idx"]
st.save_file({f"l.{k}": v for k, v in layer.items()}, src)
sys.exit(cli.main(["convert", src, dst, "--quiet", "-j", jobs]))
"""


def test_convert_jobs_above_the_limit(tmp_path):
    """convert -j 100000 crashed (exit 139) and left a partial file."""
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    proc = run_child(CONVERT, child_env(None), str(src), str(dst), HUGE, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"dqgen convert: -j {HUGE} is more threads than this machine can use" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]


def test_gguf_jobs_argument_is_bounded(monkeypatch):
    """``convert_file(jobs=...)`` (the Python API) goes through the same limit."""
    from dqgen.formats import gguf_convert
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 1)
    monkeypatch.delenv("DQGEN_NUM_THREADS", raising=False)
    with pytest.warns(RuntimeWarning, match="jobs=999 is more threads"):
        with gguf_convert._num_threads(999):
            assert os.environ["DQGEN_NUM_THREADS"] == str(cpu.THREADS_PER_CPU)
    with pytest.raises(InvalidProblemError, match="jobs=0 must be >= 1"):
        with gguf_convert._num_threads(0):
            pass


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
