"""``dqgen convert``: small checkpoints built with dqgen's own quantizer, written with the
safetensors package, converted, read back with it and checked against the oracles."""

from __future__ import annotations

import argparse
import json
import struct

import ml_dtypes
import numpy as np
import pytest

from dqgen import DqgenError, InvalidProblemError
from dqgen.formats import convert, pack
from formats_util import assert_bits_equal
from oracles import checkpoints as oracle

st = pytest.importorskip("safetensors.numpy", reason="convert tests need safetensors")


def run_convert(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return convert.run(parser.parse_args(list(argv)))


def other_tensors(rng) -> dict[str, np.ndarray]:
    return {"model.embed_tokens.weight": rng.standard_normal((10, 8)).astype(np.float32),
            "model.norm.weight": rng.standard_normal(8).astype(ml_dtypes.bfloat16),
            "model.layers.0.self_attn.q_proj.bias": np.arange(48, dtype=np.float16),
            "model.step": np.array([7], dtype=np.int64)}


def gptq_checkpoint(path, rng, bits, fmt, metadata=None, act_order=True):
    tensors, weights = other_tensors(rng), {}
    for name, (k, n) in {"model.layers.0.self_attn.q_proj": (64, 48),
                         "model.layers.0.mlp.down_proj": (128, 32)}.items():
        w = rng.standard_normal((k, n)).astype(np.float32)
        layer = pack.quantize_gptq(w, 32, bits, perm=rng.permutation(k) if act_order else None,
                                   checkpoint_format=fmt)
        if not act_order:
            del layer["g_idx"]
        tensors.update({f"{name}.{part}": arr for part, arr in layer.items()})
        weights[name] = layer
    st.save_file(tensors, str(path), metadata=metadata)
    return tensors, weights


@pytest.mark.parametrize("bits,fmt,dtype,act_order", [(4, "gptq", "f16", True),
                                                      (8, "gptq_v2", "bf16", False),
                                                      (2, "gptq", "f32", True)])
def test_convert_gptq(tmp_path, capsys, bits, fmt, dtype, act_order):
    rng = np.random.default_rng(bits)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    metadata = {"format": "pt", **({"checkpoint_format": fmt} if fmt != "gptq" else {})}
    tensors, layers = gptq_checkpoint(src, rng, bits, fmt, metadata, act_order)
    assert run_convert(str(src), str(dst), "--format", "gptq", "--dtype", dtype) == 0
    assert "2/2 layers" in capsys.readouterr().err
    out = st.load_file(str(dst))
    np_dtype = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "f32": np.float32}[dtype]
    for name, layer in layers.items():
        want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                      layer.get("g_idx"), bits, fmt, np.dtype(np_dtype), 32)
        assert_bits_equal(out[f"{name}.weight"], np.ascontiguousarray(want.T))
        assert not any(k.startswith(name + ".q") or k.endswith(("scales", "g_idx")) for k in out)
    for name, arr in other_tensors(np.random.default_rng(0)).items():
        assert out[name].dtype == tensors[name].dtype
        assert np.array_equal(out[name].view(np.uint8), tensors[name].view(np.uint8))
    blob = dst.read_bytes()
    header = json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])
    assert header["__metadata__"] == metadata


def test_convert_awq(tmp_path):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    layer = pack.quantize_awq(w, 16)
    tensors = {f"lm.proj.{k}": v for k, v in layer.items()}
    tensors["lm.proj.bias"] = np.ones(32, np.float32)
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file(tensors, str(src))
    assert run_convert(str(src), str(dst), "--format", "awq", "--dtype", "f32", "--quiet") == 0
    out = st.load_file(str(dst))
    assert sorted(out) == ["lm.proj.bias", "lm.proj.weight"]
    want = oracle.awq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"], 16, np.float32)
    assert_bits_equal(out["lm.proj.weight"], np.ascontiguousarray(want.T))
    assert np.abs(out["lm.proj.weight"].T - w).max() < 0.5


def corrupt_files(tmp_path, good: bytes) -> dict[str, bytes]:
    length = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    bad_offsets = dict(header)
    bad_offsets[name] = dict(header[name], data_offsets=[0, 10**9])
    text = json.dumps(bad_offsets).encode()
    return {
        "too short": good[:5],
        "header length beyond the file": struct.pack("<Q", 10**12) + good[8:],
        "not JSON": struct.pack("<Q", length) + b"{" * length + good[8 + length:],
        "offsets outside the data": struct.pack("<Q", len(text)) + text + good[8 + length:],
        "truncated data": good[:-7],
    }


def test_corrupt_header_is_a_clear_error(tmp_path):
    src = tmp_path / "good.safetensors"
    gptq_checkpoint(src, np.random.default_rng(1), 4, "gptq")
    for why, blob in corrupt_files(tmp_path, src.read_bytes()).items():
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(InvalidProblemError, match="not a valid safetensors file"):
            run_convert(str(bad), str(tmp_path / "out.safetensors"), "--format", "gptq")
        assert not (tmp_path / "out.safetensors").exists(), why
    with pytest.raises(InvalidProblemError, match="cannot read"):
        run_convert(str(tmp_path / "missing.safetensors"), str(tmp_path / "o"), "--format", "gptq")


def test_bad_checkpoints(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "in.safetensors"
    layer = pack.quantize_gptq(rng.standard_normal((32, 16)).astype(np.float32), 16)
    st.save_file({"p.qweight": layer["qweight"], "p.qzeros": layer["qzeros"]}, str(src))
    with pytest.raises(InvalidProblemError, match="layer p has qweight, qzeros but no scales"):
        run_convert(str(src), str(tmp_path / "o.safetensors"), "--format", "gptq")
    st.save_file({"x": np.zeros(3, np.float32)}, str(src))
    with pytest.raises(InvalidProblemError, match="no quantized layers"):
        run_convert(str(src), str(tmp_path / "o.safetensors"), "--format", "awq")
    st.save_file({f"p.{k}": v for k, v in layer.items()}, str(src))
    with pytest.raises(InvalidProblemError, match="AWQ checkpoints do not"):
        run_convert(str(src), str(tmp_path / "o.safetensors"), "--format", "awq")
    with pytest.raises(InvalidProblemError, match="must differ"):
        run_convert(str(src), str(src), "--format", "gptq")
    bad = dict(layer, g_idx=np.full(32, 5, np.int32))
    st.save_file({f"p.{k}": v for k, v in bad.items()}, str(src))
    with pytest.raises(InvalidProblemError, match=r"g_idx\[0\]=5 is out of range"):
        run_convert(str(src), str(tmp_path / "o.safetensors"), "--format", "gptq")
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_subcommand(tmp_path, capsys):
    from dqgen import cli
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "convert" not in sub.choices:
        pytest.skip("the dqgen CLI has no convert subcommand wired yet")
    src = tmp_path / "in.safetensors"
    gptq_checkpoint(src, np.random.default_rng(3), 4, "gptq")
    assert cli.main(["convert", str(src), str(tmp_path / "o.safetensors"), "--format", "gptq"]) == 0
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    assert cli.main(["convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "p"),
                     "--format", "gptq"]) != 0
    assert "not a valid safetensors file" in capsys.readouterr().err
