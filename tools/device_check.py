#!/usr/bin/env python3
"""The GPU check in one command, for a machine with one NVIDIA GPU and nothing prepared.

    tools/device_check.sh [OUTDIR]          (OUTDIR defaults to $OUT, else ./device-check)

1. Environment: a venv (``$DQGEN_DEVICE_VENV``, default /tmp/dqgen-device-venv) that sees
   the system's packages, so a CUDA build of torch and CuPy already installed are used
   (where python3 is a venv itself, as on GPU images, that one); dqgen from this checkout
   with its ``cuda`` and ``gguf`` extras, pytest and hypothesis. The ``test`` extra is not
   installed: it pins the CPU build of torch, which would hide a CUDA one.
   Offline, what is missing comes from a folder of wheels (``$DQGEN_WHEELS``, default
   ``.device-wheels`` in the checkout; ``--prepare-wheels`` fills it on a machine with a
   package index), and dqgen runs from the checkout itself.
2. Every CUDA test: NVRTC builds and the host emulation (tests/cuda/test_cuda_*.py,
   test_packed_cuda.py, test_formats_cuda.py), and the kernels on the device
   (tests/cuda/test_cuda_gpu.py: every op, dtype pair and layout bit-exact against the
   reference, torch CUDA tensors and CuPy arrays where installed, streams, misaligned
   and non-contiguous views, more than 2^31 elements where memory allows).
3. ``tools/bench.py --device cuda``: every dequantize kernel's effective GB/s against a
   device-to-device copy of the same bytes (target >= 85%) and torch eager
   ``(q - zp) * scale`` (target >= 3x); each checkpoint format's dequantize; the fused
   linear (tools/bench_cuda.py ``run_linear``) at M = 1, 8, 64 (512 for two formats):
   weight bytes a second beside a copy of them, torch.matmul on the f16 weight, and
   dequantize + matmul.

Writes ``device_check.json`` and ``device_check.txt`` (and the bench's JSON and the test
logs) into OUTDIR. Without a usable GPU it runs the compile-only and emulation parts and
a dry run of the bench's code on the CPU, says so in one line and exits 2; a failed test
or a missed target exits 1. Each step has its own time limit, under 6 minutes in all (a
step past its limit is stopped and counted as failed; its log says how far it got).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a GPU image's python may lack (KINDS.md lists what the H200 image holds: torch, CuPy,
# numpy, jinja2, ml-dtypes, cuda-bindings, NVRTC, pytest, hypothesis are there).
WHEEL_PACKAGES = ("cffi", "pycparser", "platformdirs", "filelock", "gguf")
# Modules dqgen and its CUDA tests import, and the wheel that provides each.
NEEDED = {"numpy": "numpy", "jinja2": "jinja2", "cffi": "cffi", "ml_dtypes": "ml-dtypes",
          "platformdirs": "platformdirs", "filelock": "filelock", "cuda.bindings": "cuda-bindings",
          "pytest": "pytest", "hypothesis": "hypothesis", "gguf": "gguf"}
EMULATION_TESTS = ("tests/cuda/test_cuda_kernels.py", "tests/cuda/test_cuda_infra.py",
                   "tests/cuda/test_cuda_plans.py", "tests/cuda/test_packed_cuda.py",
                   "tests/cuda/test_formats_cuda.py", "tests/cuda/test_floatzp_hqq_cuda.py",
                   "tests/formats/test_fp8.py::test_nvrtc_compiles",
                   "tests/formats/test_fp8.py::test_cuda_text_in_emulation",
                   "tests/linear/test_linear.py::test_cuda_text_in_emulation",
                   "tests/linear/test_linear.py::test_cuda_reads_every_ggml_type_in_emulation",
                   "tests/linear/test_linear.py::test_nvrtc_compiles_the_cuda_text")
# The device tests: every kernel against its oracle (tests/cuda/test_cuda_gpu.py), and torch CUDA
# tensors through the registered ops (dqgen.torch) against the same ops on the CPU.
DEVICE_TESTS = ("tests/cuda/test_cuda_gpu.py", "tests/cuda/test_arrays_cuda.py",
                "tests/torch/test_torch_ops.py::test_cuda_ops_match_cpu",
                "tests/torch/test_torch_ops.py::test_cuda_format_ops_match_cpu",
                "tests/linear/test_linear.py::test_on_a_gpu",
                "tests/linear/test_torch_linear.py::test_quant_linear_on_a_gpu")
LIMITS_S = {"emulation": 120, "device": 150, "bench": 120}  # each step's own limit
TOTAL_S = 450  # and all of them together (set-up included): under 8 minutes
_START = time.monotonic()


def _limit(step: str) -> float:
    """The step's own limit, cut to what is left of the whole check's (at least 10 s)."""
    return max(10.0, min(LIMITS_S[step], TOTAL_S - (time.monotonic() - _START)))
BENCH_SHAPES = "8192x8192,11008x4096"


def _say(text: str) -> None:
    print(f"device_check: {text}", flush=True)


# --------------------------------------------------------------------------- environment

def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _missing(python: Path) -> list[str]:
    code = ("import importlib.util as u, sys\n"
            f"names = {sorted(NEEDED)!r}\n"
            "def has(n):\n"
            "    try:\n        return u.find_spec(n) is not None\n"
            "    except ModuleNotFoundError:\n        return False\n"
            "print(' '.join(n for n in names if not has(n)))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def _pip(python: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", "--retries", "0",
                           "--timeout", "10", *args],
                          capture_output=True, text=True, timeout=timeout)


def setup_env(log: list[str]) -> tuple[Path, dict]:
    """The venv's python and the environment to run dqgen under; notes go to ``log``."""
    if sys.prefix != sys.base_prefix and "DQGEN_DEVICE_VENV" not in os.environ:
        # python3 is a venv already (a GPU image's torch lives in one): a new venv would see
        # only the base interpreter's packages, and cuda.pathfinder finds NVRTC only in
        # site.getsitepackages(), so this one is used and completed
        path = Path(sys.prefix)
        log.append(f"python3 is the venv {path}: used as it is, missing packages added to it")
    else:
        path = Path(os.environ.get("DQGEN_DEVICE_VENV", "/tmp/dqgen-device-venv"))
        if not _venv_python(path).exists():
            venv.EnvBuilder(system_site_packages=True, with_pip=True, symlinks=True).create(path)
            log.append(f"venv created at {path} (system site packages visible)")
    python = _venv_python(path)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    env.setdefault("DQGEN_CACHE_DIR", str(Path("/tmp") / "dqgen-device-cache"))
    if _missing(python):
        done = _pip(python, "install", "-e", f"{ROOT}[cuda,gguf]", "pytest", "hypothesis")
        log.append("pip install -e .[cuda,gguf] pytest hypothesis: "
                   + ("ok" if done.returncode == 0 else "failed (offline?)"))
    missing = _missing(python)
    wheels = Path(os.environ.get("DQGEN_WHEELS", ROOT / ".device-wheels"))
    if missing and wheels.is_dir():
        done = _pip(python, "install", "--no-index", "--find-links", str(wheels),
                    *sorted({NEEDED[m] for m in missing}))
        log.append(f"wheels from {wheels} for {', '.join(missing)}: "
                   + ("ok" if done.returncode == 0 else done.stderr.strip().splitlines()[-1:]))
        missing = _missing(python)
    if missing:
        log.append(f"still missing: {', '.join(missing)} (carry wheels: tools/device_check.sh "
                   "--prepare-wheels on a machine with a package index)")
    return python, env


def prepare_wheels(target: Path) -> int:
    """Download the wheels an offline GPU machine's python (3.12, x86-64 Linux) may lack."""
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_17_x86_64", "--platform",
           "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "--no-deps", "-d", str(target),
           *WHEEL_PACKAGES]
    return subprocess.run(cmd, check=False).returncode


# --------------------------------------------------------------------------- facts

def _run_text(cmd: list[str], timeout: float = 30) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


FACTS = r"""
import json, platform
facts = {"python": platform.python_version()}
try:
    from dqgen.runtime import cuda as rt
    facts["cuda_available"] = rt.cuda_available()
    facts["cuda_reason"] = "" if facts["cuda_available"] else rt.cuda_unavailable_reason()
    if facts["cuda_available"]:
        facts["arch"] = rt.device_arch(0)
        facts["multiprocessors"] = rt.multiprocessor_count(0)
except Exception as exc:
    facts["cuda_available"], facts["cuda_reason"] = False, f"dqgen's CUDA runtime: {exc!r}"
try:
    from dqgen.build import nvrtc
    facts["nvrtc"] = nvrtc.nvrtc_version() if nvrtc.nvrtc_available() else None
except Exception as exc:
    facts["nvrtc"] = f"unavailable: {exc!r}"
try:
    import torch
    facts["torch"] = torch.__version__
    facts["torch_cuda"] = torch.version.cuda
    facts["torch_sees_gpu"] = torch.cuda.is_available()
except Exception as exc:
    facts["torch"] = f"absent ({type(exc).__name__})"
try:
    import cupy
    facts["cupy"] = cupy.__version__
except Exception as exc:
    facts["cupy"] = f"absent ({type(exc).__name__})"
print(json.dumps(facts))
"""


def facts(python: Path, env: dict) -> dict:
    out: dict = {"host": platform.node(), "machine": platform.machine()}
    smi = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                     "--format=csv,noheader"]) if shutil.which("nvidia-smi") else ""
    out["nvidia_smi"] = smi or "nvidia-smi not found or no GPU"
    try:
        text = subprocess.run([str(python), "-c", FACTS], capture_output=True, text=True, env=env,
                              timeout=120, cwd=ROOT).stdout.strip().splitlines()
        out.update(json.loads(text[-1]) if text else {"cuda_available": False,
                                                        "cuda_reason": "the probe printed nothing"})
    except (subprocess.SubprocessError, json.JSONDecodeError) as exc:
        out.update(cuda_available=False, cuda_reason=f"probe failed: {exc}")
    return out


# --------------------------------------------------------------------------- steps

def run_pytest(python: Path, env: dict, files: tuple[str, ...], name: str, outdir: Path,
               limit: float) -> dict:
    """One pytest run: counts from its JUnit XML, the log in OUTDIR."""
    xml, log = outdir / f"{name}.xml", outdir / f"{name}.log"
    args = [str(python), "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "no:benchmark",
            f"--junitxml={xml}", *files]
    if _has_xdist(python, env):
        args += ["-n", str(min(8, os.cpu_count() or 1))]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=limit)
        text, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, status = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {limit:.0f} s", -1
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    counts = _junit_counts(xml)
    # pytest's own summary line (plugins may print after it)
    tail = [ln for ln in str(text).splitlines() if re.search(r"\d+ (passed|failed|error)", ln)][-1:] or [""]
    return {"files": list(files), "status": status, "seconds": round(time.monotonic() - t0, 1),
            **counts, "summary": tail[0], "log": log.name}


def _has_xdist(python: Path, env: dict) -> bool:
    probe = subprocess.run([str(python), "-c", "import xdist"], capture_output=True, env=env, timeout=60)
    return probe.returncode == 0


def _junit_counts(xml: Path) -> dict:
    try:
        import xml.etree.ElementTree as ET
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        keys = ("tests", "failures", "errors", "skipped")
        return {k: int(suite.get(k, 0)) for k in keys}
    except Exception:  # noqa: BLE001 - no XML: the run died before writing it
        return {"tests": 0, "failures": 0, "errors": 1, "skipped": 0}


BENCH_DRY = r"""
import json, sys
sys.path[:0] = ["tools"]
import bench_cuda
r = bench_cuda.run_device(shapes=((64, 1024),), floats=("f16", "bf16", "f32", "f64"), repeat=3,
                          torch_device="cpu", groups=(128,))
f = bench_cuda.run_formats("cpu", shape=(256, 1024), repeat=1)
lin = bench_cuda.run_linear("cpu", shapes=((256, 512),), formats=("Q4_K", "u4 g128"), ms=(1, 3),
                           wide=((256, 512), ("Q4_0",), (17,)), repeat=1)
print("DRYRUN " + json.dumps({"cases": sum(len(v["cases"]) for v in (r, f, lin) if v)}))
"""
# Every checkpoint format's kernel on the device, beside a copy of as many bytes.
BENCH_FORMATS = r"""
import json, sys
sys.path[:0] = ["tools"]
import bench_cuda
r = bench_cuda.run_formats("cuda")
if r is not None:
    open(sys.argv[1], "w").write(json.dumps(r, indent=1) + "\n")
"""

# The fused linear on the device, beside a copy of the weight's bytes and torch.matmul.
BENCH_LINEAR = r"""
import json, sys
sys.path[:0] = ["tools"]
import bench_cuda
r = bench_cuda.run_linear("cuda")
if r is not None:
    open(sys.argv[1], "w").write(json.dumps(r, indent=1) + "\n")
"""


def run_bench(python: Path, env: dict, outdir: Path, gpu: bool) -> dict:
    """tools/bench.py --device cuda on a GPU; else the bench's own code on the CPU, tiny."""
    t0 = time.monotonic()
    if gpu:
        cmds = [[str(python), "tools/bench.py", "--device", "cuda", "--shapes", BENCH_SHAPES,
                 "--out", str(outdir / "bench-cuda")],
                [str(python), "-c", BENCH_FORMATS, str(outdir / "bench-cuda-formats.json")],
                [str(python), "-c", BENCH_LINEAR, str(outdir / "bench-cuda-linear.json")]]
    else:
        cmds = [[str(python), "-c", BENCH_DRY]]
    text, status = "", 0
    for cmd in cmds:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=_limit("bench"))
            text, status = text + proc.stdout + proc.stderr, status or proc.returncode
        except subprocess.TimeoutExpired as exc:
            text, status = f"{text}{exc.stdout or ''}{exc.stderr or ''}\ntimed out", -1
    (outdir / "bench.log").write_text(str(text))
    result = {"status": status, "seconds": round(time.monotonic() - t0, 1), "log": "bench.log",
              "dry_run_on_cpu": not gpu}
    if not gpu:
        dry = [ln for ln in str(text).splitlines() if ln.startswith("DRYRUN ")]
        result["dry_run_cases"] = json.loads(dry[-1][7:])["cases"] if dry else 0
    saved = outdir / "bench-cuda.json"
    if gpu and saved.exists():
        data = json.loads(saved.read_text())
        result.update(device=data.get("device"), targets=data.get("targets"), json=saved.name)
        sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]  # bench_cuda imports dqgen
        from bench_cuda import format_lines, linear_lines, report_lines
        result["table"] = report_lines(data)
        formats = outdir / "bench-cuda-formats.json"
        if formats.exists():
            result["table"] += format_lines(json.loads(formats.read_text()))
        linear = outdir / "bench-cuda-linear.json"
        if linear.exists():
            result["table"] += linear_lines(json.loads(linear.read_text()))
    return result


# --------------------------------------------------------------------------- report

def text_report(rep: dict) -> str:
    f = rep["facts"]
    lines = [f"dqgen device check, {rep['date']}, {rep['seconds']:.0f} s: {rep['verdict']}",
             f"GPU: {f.get('nvidia_smi')}; dqgen arch {f.get('arch', '-')}, "
             f"{f.get('multiprocessors', '-')} SMs; NVRTC {f.get('nvrtc')}; torch {f.get('torch')} "
             f"(CUDA {f.get('torch_cuda')}, sees GPU: {f.get('torch_sees_gpu')}); CuPy {f.get('cupy')}",
             *[f"setup: {n}" for n in rep["setup"]]]
    for name, t in rep["tests"].items():
        lines.append(f"{name}: {t['tests']} tests, {t['failures']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped, {t['seconds']} s ({t['summary']})")
    b = rep["bench"]
    lines.append(f"bench: status {b['status']}, {b['seconds']} s"
                 + (f" (dry run of its code on the CPU, {b.get('dry_run_cases', 0)} cases: no figures"
                    + (")" if b.get("dry_run_cases") else "; torch absent, so nothing ran)" if b["status"] == 0
                       else f"; it failed, see {b['log']})")
                    if b["dry_run_on_cpu"] else ""))
    lines += b.get("table", [])
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--prepare-wheels"]:
        return prepare_wheels(Path(argv[1]) if len(argv) > 1 else ROOT / ".device-wheels")
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    outdir = Path(argv[0] if argv else os.environ.get("OUT") or ROOT / "device-check").resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    setup: list[str] = []
    python, env = setup_env(setup)
    fx = facts(python, env)
    gpu = bool(fx.get("cuda_available"))
    _say(f"GPU: {fx['nvidia_smi']}" if gpu else f"no usable GPU ({fx.get('cuda_reason')})")
    tests = {"emulation": run_pytest(python, env, EMULATION_TESTS, "tests-emulation", outdir,
                                     _limit("emulation"))}
    _say(f"compile-only and emulation tests: {tests['emulation']['summary']}")
    if gpu:
        tests["device"] = run_pytest(python, env, DEVICE_TESTS, "tests-device", outdir, _limit("device"))
        _say(f"device tests: {tests['device']['summary']}")
    bench = run_bench(python, env, outdir, gpu)
    _say(f"bench: status {bench['status']}")
    failed = any(t["status"] != 0 or t["failures"] or t["errors"] for t in tests.values()) or bench["status"]
    missed = [n for n, t in (bench.get("targets") or {}).items() if t["status"] != "met"]
    verdict = ("NO GPU: only the compile-only and emulation parts ran" if not gpu else
               "FAILED" if failed else f"targets missed: {', '.join(missed)}" if missed else "all passed")
    rep = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.monotonic() - t0,
           "verdict": verdict, "facts": fx, "setup": setup, "tests": tests, "bench": bench,
           "limits_s": {**LIMITS_S, "total": TOTAL_S}}
    (outdir / "device_check.json").write_text(json.dumps(rep, indent=1) + "\n")
    (outdir / "device_check.txt").write_text(text_report(rep))
    print(text_report(rep), end="")
    if not gpu:
        _say(f"NO GPU here ({fx.get('cuda_reason')}): compile-only and emulation parts "
             f"{'passed' if not failed else 'FAILED'}; the device tests and the GPU bench did not run")
        return 2
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
