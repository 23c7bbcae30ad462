"""``dqgen convert --shards I/N``: a checkpoint converted in N slices, by separate
processes at the same time into one OUT (as a Slurm array or Ray tasks on a shared
filesystem do), equals one whole run byte for byte, whatever order the slices run in,
whatever an earlier conversion left in OUT; the index and config appear only once every
slice is done; bad values give one line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from dqgen import cli
from dqgen.formats import pack
from test_reliability_support import ROOT, child_env

st = pytest.importorskip("safetensors.numpy", reason="checkpoints are written with safetensors")

INDEX = "model.safetensors.index.json"


def write_shards(path: Path, shards: list[dict], config: dict) -> None:
    """``shards`` as ``model-0000i-of-0000n.safetensors``, their index, config.json and
    two side files."""
    path.mkdir()
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        st.save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(dict(
        {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float16"}, **config)))
    (path / "tokenizer.json").write_text('{"model": "test"}')
    (path / "generation_config.json").write_text('{"do_sample": true}')


def gptq_checkpoint(path: Path) -> Path:
    """Four shards of small GPTQ layers (one layer's scales in the shard after its
    qweight), norms and an embedding."""
    rng = np.random.default_rng(3)
    shards: list[dict] = [{} for _ in range(4)]
    shards[0]["model.embed_tokens.weight"] = rng.standard_normal((16, 64)).astype(np.float16)
    for i in range(6):
        layer = pack.quantize_gptq(rng.standard_normal((64, 32 * (1 + i % 2))).astype(
            np.float32), 32, 4)
        del layer["g_idx"]
        for part, value in layer.items():
            where = 1 if (i == 1 and part == "scales") else min(i // 2 + (i == 5), 3)
            shards[where][f"model.layers.{i}.mlp.up_proj.{part}"] = value
        shards[min(i // 2, 3)][f"model.layers.{i}.norm.weight"] = np.full(64, i, np.float16)
    return _checked(path, shards, {"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}})


def fp8_checkpoint(path: Path) -> Path:
    """Three shards of DeepSeek-style FP8 weights with [32, 32] block scales (shapes
    not multiples of the block) and activation scales."""
    rng = np.random.default_rng(4)
    shards: list[dict] = [{} for _ in range(3)]
    for i, (n, k) in enumerate([(64, 48), (40, 64), (96, 32), (33, 70), (64, 64)]):
        prefix = f"model.layers.{i}.self_attn.o_proj"
        codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes: the comparison is of bytes anyway
        shard = shards[i % 3]
        shard[f"{prefix}.weight"] = codes.view(ml_dtypes.float8_e4m3fn)
        shard[f"{prefix}.weight_scale_inv"] = rng.uniform(
            1e-3, 1e-1, (-(-n // 32), -(-k // 32))).astype(np.float32)
        shard[f"{prefix}.input_scale"] = np.array([0.5], np.float32)
    return _checked(path, shards, {"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]}})


def _checked(path: Path, shards: list[dict], config: dict) -> Path:
    assert all(shards)
    write_shards(path, shards, config)
    return path


def convert(*argv) -> int:
    return cli.main(["convert", *map(str, argv)])


def files(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` (hidden ones too) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def start_slice(src: Path, dst: Path, part: str, *flags: str) -> subprocess.Popen:
    code = "import sys; from dqgen import cli; sys.exit(cli.main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "convert", str(src), str(dst),
                             "--shards", part, "-j", "1", *flags], cwd=ROOT,
                            env=child_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


CHECKPOINTS = {"gptq": (gptq_checkpoint, ()), "fp8": (fp8_checkpoint, ("--dtype", "bf16")),
               "fp8-resharded": (fp8_checkpoint, ("--max-shard-size", "12KB"))}


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_three_concurrent_slices_equal_one_run(tmp_path, kind):
    """Three processes, started together, each converting a slice into one OUT that an
    earlier conversion (other shards, another dtype) left a checkpoint in; the result is
    one whole run's files, byte for byte, and nothing else."""
    make, flags = CHECKPOINTS[kind]
    src = make(tmp_path / "in")
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    assert convert(src, whole, "--quiet", *flags) == 0  # builds the kernels the slices load
    assert convert(src, sliced, "--quiet", "--max-shard-size", "7KB", "--dtype", "f32") == 0
    earlier = set(files(sliced))
    assert len(earlier) > len(files(whole))
    procs = [start_slice(src, sliced, f"{i}/3", *flags) for i in (1, 2, 3)]
    results = [proc.communicate(timeout=300) + (proc.returncode,) for proc in procs]
    for out, err, status in results:
        assert status == 0, err
    said = "".join(out for out, _, _ in results)
    assert said.count("all 3 slices done") == 1, said
    assert files(sliced) == files(whole)
    index = json.loads((whole / INDEX).read_text())
    assert len(set(index["weight_map"].values())) >= 3


def test_slices_one_at_a_time_and_again(tmp_path, capsys):
    """Slices 3 then 1: their shards in place, no index or config yet (a loader finds no
    checkpoint naming a shard not written); slice 1 again changes nothing; slice 2
    completes it."""
    src = gptq_checkpoint(tmp_path / "in")
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    assert convert(src, whole, "--quiet") == 0
    capsys.readouterr()
    assert convert(src, sliced, "--shards", "3/3") == 0
    out = capsys.readouterr().out
    assert "slice 3/3: 2 of 4 shards" in out and "slices 1, 2 of 3 not done yet" in out
    assert convert(src, sliced, "--shards", "1/3", "--quiet") == 0
    partial = {n for n in files(sliced) if not n.startswith(".")}
    assert partial == {"model-00001-of-00004.safetensors", "model-00003-of-00004.safetensors",
                       "model-00004-of-00004.safetensors"}
    assert convert(src, sliced, "--shards", "1/3", "--quiet") == 0
    assert {n for n in files(sliced) if not n.startswith(".")} == partial
    capsys.readouterr()
    assert convert(src, sliced, "--shards", "2/3") == 0
    assert "all 3 slices done: index and config written" in capsys.readouterr().out
    assert files(sliced) == files(whole)


def test_more_slices_than_shards(tmp_path, capsys):
    """Six slices of four shards: two slices have nothing to write (one of them first,
    leaving only the slice ledger in OUT, which the next slice does not refuse)."""
    src = gptq_checkpoint(tmp_path / "in")
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    assert convert(src, whole, "--quiet") == 0
    assert convert(src, sliced, "--shards", "1/6", "--quiet") == 0
    assert [n for n in files(sliced) if not n.startswith(".")] == []
    for i in (4, 2, 6, 5):
        assert convert(src, sliced, "--shards", f"{i}/6", "--quiet") == 0
    assert not (sliced / INDEX).exists()
    assert convert(src, sliced, "--shards", "3/6", "--quiet") == 0
    assert files(sliced) == files(whole)


def test_slices_of_another_conversion_do_not_count(tmp_path, capsys):
    """Slices 1 and 2 converting to bf16, slice 3 to f16: not one conversion, so no
    index; slices 1 and 2 to f16 then finish it as one f16 run."""
    src = gptq_checkpoint(tmp_path / "in")
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    assert convert(src, whole, "--quiet") == 0
    for i in (1, 2):
        assert convert(src, sliced, "--shards", f"{i}/3", "--dtype", "bf16", "--quiet") == 0
    capsys.readouterr()
    assert convert(src, sliced, "--shards", "3/3", "--dtype", "f16") == 0
    assert "slices 1, 2 of 3 not done yet" in capsys.readouterr().out
    assert not (sliced / INDEX).exists()
    for i in (1, 2):
        assert convert(src, sliced, "--shards", f"{i}/3", "--quiet") == 0
    assert files(sliced) == files(whole)


def test_a_whole_run_removes_an_unfinished_slice_ledger(tmp_path):
    src = gptq_checkpoint(tmp_path / "in")
    out = tmp_path / "out"
    assert convert(src, out, "--shards", "1/3", "--quiet") == 0
    assert [n for n in files(out) if n.startswith(".")] == [".model.safetensors.dqgen-slices"]
    assert convert(src, out, "--quiet") == 0
    assert [n for n in files(out) if n.startswith(".")] == []


def test_a_file_in_sliced(tmp_path):
    """A lone .safetensors IN with --max-shard-size: its output shards are sliced, and
    the index beside OUT is written by the last slice."""
    src = gptq_checkpoint(tmp_path / "in")
    single = tmp_path / "single.safetensors"
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(st.load_file(str(shard)))
    st.save_file(tensors, str(single))
    (tmp_path / "whole").mkdir()
    (tmp_path / "sliced").mkdir()
    flags = ("--quiet", "--max-shard-size", "10KB")
    assert convert(single, tmp_path / "whole" / "w.safetensors", *flags) == 0
    for i in (2, 1):
        assert convert(single, tmp_path / "sliced" / "w.safetensors", *flags,
                       "--shards", f"{i}/2") == 0
    assert files(tmp_path / "sliced") == files(tmp_path / "whole")
    assert "w.safetensors.index.json" in files(tmp_path / "whole")


@pytest.mark.parametrize("value, message", [
    ("0/3", "--shards 0/3: I=0 must be 1 to 3 (slices are counted from 1"),
    ("4/3", "--shards 4/3: I=4 must be 1 to 3"),
    ("1/0", "--shards 1/0: N=0 must be at least 1"),
    ("a/b", "--shards 'a/b' is not I/N, slice I of N counted from 1"),
    ("3", "--shards '3' is not I/N"),
    ("-1/3", "--shards '-1/3' is not I/N"),
])
def test_bad_slices_give_one_line(tmp_path, capsys, value, message):
    src = gptq_checkpoint(tmp_path / "in")
    capsys.readouterr()
    assert cli.main(["convert", str(src), str(tmp_path / "out"), f"--shards={value}"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"dqgen: error: {captured.err[len('dqgen: error: '):]}"
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert not (tmp_path / "out").exists()


def test_gguf_is_not_sliced(tmp_path, capsys):
    assert convert(tmp_path / "m.gguf", tmp_path / "out", "--shards", "1/2") == 2
    assert capsys.readouterr().err == ("dqgen: error: --shards splits a safetensors "
                                       "checkpoint's shards; a .gguf file converts in one run\n")
