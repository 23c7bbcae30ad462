"""What ``dqgen convert`` leaves behind: nothing after a failure, a kill or Ctrl-C (a
later run removes a killed run's partial files, never a live one's), no stale shards of
an earlier conversion, nothing mixed into an unrelated directory; errors name the path
the user gave, never a temporary file. Kills and interrupts happen in a child process."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dqgen import cli
from dqgen.formats import pack
from test_reliability_support import ROOT, child_env

st = pytest.importorskip("safetensors.numpy", reason="checkpoints are written with safetensors")

LAYERS = 3


def checkpoint(path: Path, group_size: int = 32) -> Path:
    """A directory checkpoint: three small GPTQ layers, a config naming ``group_size``
    (the data is packed with groups of 32), a tokenizer file."""
    path.mkdir()
    rng = np.random.default_rng(1)
    tensors = {"model.norm.weight": np.ones(64, np.float16)}
    for i in range(LAYERS):
        layer = pack.quantize_gptq(rng.standard_normal((64, 64)).astype(np.float32), 32, 4)
        del layer["g_idx"]
        tensors.update({f"model.layers.{i}.q_proj.{k}": v for k, v in layer.items()})
    st.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": group_size}}))
    (path / "tokenizer.json").write_text("{}")
    return path


def convert(*argv) -> int:
    return cli.main(["convert", *map(str, argv), "--quiet"])


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def hidden(directory: Path) -> list[str]:
    return [n for n in names(directory) if n.startswith(".")]


@pytest.fixture
def ckpt(tmp_path):
    return checkpoint(tmp_path / "ckpt")


# --- a child process killed or interrupted mid-write ---------------------------------

BLOCKING = """
import sys, time, pathlib
from dqgen import cli
from dqgen.formats import ggml, safetensors_io
src, dst, marker = sys.argv[1:4]

def block():
    pathlib.Path(marker).touch()
    time.sleep(600)

real_put = safetensors_io.Writer.put
def put(self, name, data):
    real_put(self, name, data)
    block()
safetensors_io.Writer.put = put

real_dequantize = ggml.dequantize
calls = []
def dequantize(*a, **k):
    calls.append(1)
    if len(calls) == 2:  # the first tensor is with the writer thread
        block()
    return real_dequantize(*a, **k)
ggml.dequantize = dequantize
sys.exit(cli.main(["convert", src, dst, "--quiet"]))
"""


def start_blocked(src, dst, marker: Path) -> subprocess.Popen:
    """A convert child stopped in the middle of writing (once ``marker`` exists)."""
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING, str(src), str(dst), str(marker)],
                            cwd=ROOT, env=child_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the child did not start writing:\n{proc.communicate()}")
        time.sleep(0.05)
    return proc


def test_a_killed_run_s_partials_are_removed_by_the_next(tmp_path, ckpt):
    out = tmp_path / "out"
    for _ in range(2):  # they used to pile up, one a run
        proc = start_blocked(ckpt, out, tmp_path / "marker")
        proc.kill()
        proc.communicate()
        (tmp_path / "marker").unlink()
        assert len(hidden(out)) == 1
    assert convert(ckpt, out) == 0
    assert names(out) == ["config.json", "model.safetensors", "tokenizer.json"]


HOLDER = """
import sys, time
from dqgen.formats.safetensors_io import Partial
partial = Partial(sys.argv[1])
partial.write(b"x" * 100)
partial.close()  # complete, not yet committed: still locked
print(partial.tmp.name, flush=True)
time.sleep(600)
"""


def test_another_run_s_live_partial_is_left_alone(tmp_path, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / "model.safetensors")],
                              cwd=ROOT, env=child_env(None), stdout=subprocess.PIPE, text=True)
    try:
        live = holder.stdout.readline().strip()
        assert live.startswith(".model.safetensors.") and live.endswith(".partial")
        assert convert(ckpt, out) == 0
        assert hidden(out) == [live] and (out / live).stat().st_size == 100
    finally:
        holder.kill()
        holder.communicate()
    assert convert(ckpt, out) == 0  # its writer is gone now: removed
    assert hidden(out) == []


@pytest.mark.parametrize("kind", ["checkpoint", "gguf"])
def test_ctrl_c_prints_one_line_and_leaves_nothing(tmp_path, ckpt, kind):
    if kind == "gguf":
        pytest.importorskip("gguf", reason="GGUF files are written with llama.cpp's gguf")
        from test_gguf_file import _small
        src = _small(tmp_path)
    else:
        src = ckpt
    out = tmp_path / "new" / "out"
    proc = start_blocked(src, out if kind == "checkpoint" else out / "o.safetensors",
                         tmp_path / "marker")
    assert hidden(out)  # a partial file is being written
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert stderr.strip() == "dqgen: interrupted"
    assert not (tmp_path / "new").exists()


# --- earlier outputs, unrelated directories, failures --------------------------------

def test_reconverting_removes_the_earlier_shards(tmp_path, ckpt):
    out = tmp_path / "out"
    assert convert(ckpt, out, "--max-shard-size", "10KB") == 0
    shards = [n for n in names(out) if n.startswith("model-")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in names(out)
    assert convert(ckpt, out) == 0
    assert names(out) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert convert(ckpt, out, "--max-shard-size", "20KB") == 0  # and the other way round
    again = names(out)
    assert "model.safetensors" not in again and "model.safetensors.index.json" in again
    listed = set(json.loads((out / "model.safetensors.index.json").read_text())
                 ["weight_map"].values())
    assert sorted(listed) == [n for n in again if n.startswith("model-")]


def test_reconverting_a_file_removes_its_earlier_shards(tmp_path, ckpt):
    out = tmp_path / "o"
    out.mkdir()
    dst = out / "w.safetensors"
    assert convert(ckpt / "model.safetensors", dst, "--max-shard-size", "10KB") == 0
    assert "w.safetensors.index.json" in names(out) and len(names(out)) >= 4
    (out / "keep.txt").write_text("mine")
    assert convert(ckpt / "model.safetensors", dst) == 0
    assert names(out) == ["keep.txt", "w.safetensors"]


def test_a_failure_leaves_no_directory(tmp_path, capsys):
    """A config saying group_size 64 over group-32 data fails in the first layer, after
    the output directory was made: the directories it made are gone again."""
    src = checkpoint(tmp_path / "bad", group_size=64)
    assert convert(src, tmp_path / "new" / "deep" / "out") == 2
    assert "group_size=64" in capsys.readouterr().err
    assert names(tmp_path) == ["bad"]
    existing = tmp_path / "existing"
    existing.mkdir()
    assert convert(src, existing / "out") == 2
    assert names(existing) == []


def test_an_unrelated_directory_is_refused_unless_forced(tmp_path, ckpt, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "important.txt").write_text("keep")
    capsys.readouterr()
    assert convert(ckpt, out) == 2
    err = capsys.readouterr().err
    assert f"OUT {out} is not empty (important.txt)" in err and "--force" in err
    assert names(out) == ["important.txt"]
    assert convert(ckpt, out, "--force") == 0
    assert names(out) == ["config.json", "important.txt", "model.safetensors", "tokenizer.json"]
    assert convert(ckpt, out) == 0  # now a checkpoint: converting again replaces it


def test_an_unrelated_directory_is_refused_for_gguf(tmp_path, capsys):
    pytest.importorskip("gguf", reason="GGUF files are written with llama.cpp's gguf")
    from test_gguf_file import _small
    src = _small(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "important.txt").write_text("keep")
    assert convert(src, str(out) + os.sep) == 2
    assert "is not empty (important.txt)" in capsys.readouterr().err
    assert names(out) == ["important.txt"]


# --- write errors name the user's path -----------------------------------------------

def _denied_mkstemp(*args, dir=None, prefix="", **kw):
    raise PermissionError(errno.EACCES, "Permission denied",
                          os.path.join(dir or ".", f"{prefix}x1y2z3.partial"))


class _FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, fh) -> None:
        self._fh = fh

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.mark.parametrize("fault", ["denied", "full"])
def test_write_errors_name_the_output(tmp_path, ckpt, capsys, monkeypatch, fault):
    dst = tmp_path / "out.safetensors"
    if fault == "denied":
        monkeypatch.setattr(tempfile, "mkstemp", _denied_mkstemp)
        why = "Permission denied"
    else:
        real = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FullDisk(real(*a, **k)))
        why = "No space left on device"
    assert convert(ckpt / "model.safetensors", dst) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err == f"dqgen: error: cannot write {dst}: {why}\n"
    assert names(tmp_path) == ["ckpt"]


def test_bundle_write_errors_name_the_bundle(tmp_path, monkeypatch):
    from dqgen import bundle
    real = os.chmod

    def denied(path, mode, **kw):
        if ".tmp-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, mode, **kw)

    monkeypatch.setattr(os, "chmod", denied)
    out = tmp_path / "bundle"
    with pytest.raises(bundle.BundleError) as info:
        bundle.write_bundle(out, [], "0")
    assert str(info.value) == f"cannot write bundle {out}: Permission denied"
    assert names(tmp_path) == []


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    text = capsys.readouterr().out
    assert "Dequantize a quantized checkpoint" in text and "--force" in text
    for internal in ("``", "checkpoint.py", "gguf_convert", "convert IN OUT``"):
        assert internal not in text, internal
    assert max(map(len, textwrap.dedent(text).splitlines())) <= 80
