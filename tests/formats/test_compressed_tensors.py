"""compressed-tensors' integer formats (llm-compressor checkpoints): pack-quantized 1- to
8-bit (symmetric or with packed zero points; group, channel and tensor scales; act-order
g_idx) and int-/naive-quantized int8, bit for bit with the library's own compressors'
decompress (act-order: the library's unpacking and dequantize, sorted by g_idx as its
0.18 decompress did)."""

from __future__ import annotations

import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError
from dqgen.formats import compressed_tensors as ct
from formats_util import assert_bits_equal, random_f16

torch = pytest.importorskip("torch")
ctc = pytest.importorskip("compressed_tensors.compressors",
                          reason="compressed-tensors (the oracle) is not installed")
from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: E402
    pack_to_int32, unpack_from_int32)
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def compressed(compressor, w, bits, symmetric, strategy, group):
    """``w`` compressed by the library, its scheme, and the library's decompression."""
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    n, k = w.shape
    if strategy == "group":
        grouped = w.float().reshape(n, k // group, group)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
    elif strategy == "channel":
        lo, hi = w.float().amin(-1, keepdim=True), w.float().amax(-1, keepdim=True)
    else:
        lo, hi = w.float().amin().reshape(1), w.float().amax().reshape(1)
    scale, zero = calculate_qparams(lo, hi, args)
    state = compressor.compress({"weight": w, "weight_scale": scale.to(w.dtype),
                                 "weight_zero_point": zero}, scheme)
    return state, compressor.decompress(dict(state), scheme)["weight"]


def same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("strategy,group", [("group", 128), ("group", 32), ("channel", None)])
def test_pack_quantized_matches_the_library(bits, symmetric, strategy, group, dtype):
    torch.manual_seed(bits + 7 * symmetric)
    w = torch.randn(48, 256, dtype=dtype)
    state, want = compressed(ctc.PackedQuantizationCompressor, w, bits, symmetric, strategy,
                             group)
    got = ct.dequantize_packed(state["weight_packed"], state["weight_scale"],
                               state["weight_shape"], state.get("weight_zero_point"), bits)
    same(got, want)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("strategy,group,k", [("group", 16, 80), ("channel", None, 101),
                                              ("tensor", None, 37)])
def test_every_width_matches_the_library(bits, symmetric, strategy, group, k):
    """Every width the library packs; rows that end mid-word (80 values) or mid-byte (101,
    37: odd K at 4 bits too), 40 zero points a column ending mid-word, an asymmetric
    tensor's zero point left unpacked (int8)."""
    torch.manual_seed(bits + 3 * symmetric)
    w = torch.randn(40, k, dtype=torch.bfloat16)
    state, want = compressed(ctc.PackedQuantizationCompressor, w, bits, symmetric, strategy,
                             group)
    got = ct.dequantize_packed(state["weight_packed"], state["weight_scale"],
                               state["weight_shape"], state.get("weight_zero_point"), bits)
    same(got, want)


def act_order_layer(bits, symmetric, n, k, group, dtype, seed):
    """Random stored values, zero points, scales and a g_idx (each group's columns
    scattered over K), packed by the library; and the library's dequantize of them sorted
    by g_idx and put back, as ``_process_group`` did when decompress passed g_idx (up to
    compressed-tensors 0.18)."""
    rng = np.random.default_rng(seed)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.from_numpy(rng.integers(lo, hi, (n, k), dtype=np.int8))
    z = torch.from_numpy(rng.integers(lo, hi, (n, k // group), dtype=np.int8))
    scale = torch.from_numpy(random_f16(rng, (n, k // group), extreme=False)
                             .astype(np.float32)).to(dtype)
    g_idx = torch.from_numpy(rng.permutation(np.arange(k) // group).astype(np.int32))
    packed = pack_to_int32(q, bits)
    packed_z = None if symmetric else pack_to_int32(z, bits, packed_dim=0)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                            group_size=group)
    perm = torch.argsort(g_idx)
    unpacked_z = None if symmetric else unpack_from_int32(packed_z, bits, z.shape, packed_dim=0)
    sorted_w = dequantize(unpack_from_int32(packed, bits, q.shape).index_select(-1, perm),
                          scale, unpacked_z, args)
    return (packed, scale, packed_z, g_idx), sorted_w.index_select(-1, torch.argsort(perm))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_act_order_matches_the_library(bits, symmetric, dtype):
    (packed, scale, packed_z, g_idx), want = act_order_layer(bits, symmetric, 40, 80, 16,
                                                             dtype, bits)
    got = ct.dequantize_packed(packed, scale, (40, 80), packed_z, bits, weight_g_idx=g_idx)
    same(got, want)


def test_act_order_out_numpy_and_column_order():
    """``out`` is written in column order; a g_idx in column order, or holding -1 (never
    filled in: the library reads column order), gives what no g_idx gives."""
    (packed, scale, packed_z, g_idx), want = act_order_layer(3, False, 24, 64, 16,
                                                             torch.float16, 1)
    out = np.empty((24, 64), np.float16)
    got = ct.dequantize_packed(packed.numpy(), scale.numpy(), (24, 64), packed_z.numpy(), 3,
                               out=out, weight_g_idx=g_idx.numpy())
    assert got is out
    assert_bits_equal(out, want.numpy())
    plain = ct.dequantize_packed(packed, scale, (24, 64), packed_z, 3)
    in_order = torch.arange(64, dtype=torch.int32) // 16
    unfilled = torch.full((64,), -1, dtype=torch.int32)
    for g in (in_order, unfilled):
        same(ct.dequantize_packed(packed, scale, (24, 64), packed_z, 3, weight_g_idx=g), plain)


def test_act_order_bad_g_idx():
    (packed, scale, packed_z, g_idx), _ = act_order_layer(5, True, 8, 32, 16, torch.float32, 2)
    uneven = torch.arange(32, dtype=torch.int32) % 2    # 16 each, but 0 1 0 1 ...
    uneven[:2] = 0                                      # 17 in group 0
    with pytest.raises(InvalidProblemError, match="weight_g_idx puts 17 columns in group 0; "
                       "every group holds K / groups = 16"):
        ct.dequantize_packed(packed, scale, (8, 32), None, 5, weight_g_idx=uneven)
    with pytest.raises(InvalidProblemError, match=r"weight_g_idx\[0\]=2 is out of range"):
        ct.dequantize_packed(packed, scale, (8, 32), None, 5,
                             weight_g_idx=torch.full((32,), 2, dtype=torch.int32))
    with pytest.raises(InvalidProblemError, match=r"weight_g_idx has dtype int32 and shape "
                       r"\(31,\)"):
        ct.dequantize_packed(packed, scale, (8, 32), None, 5, weight_g_idx=g_idx[:31])


def older_layout(q, bits):
    """compressed-tensors' packing before 0.18: ``32 // bits`` values a word, the top
    ``32 % bits`` bits zero."""
    per_word = 32 // bits
    n, k = q.shape
    stored = (q.numpy().astype(np.int64) + (1 << (bits - 1)))
    stored = np.pad(stored, ((0, 0), (0, -k % per_word))).reshape(n, -1, per_word)
    shifts = np.arange(per_word, dtype=np.int64) * bits
    return torch.from_numpy((stored << shifts).sum(-1).astype(np.uint32).view(np.int32))


def test_the_older_padded_layout_is_refused_by_name():
    q = torch.zeros(4, 128, dtype=torch.int8)
    packed = older_layout(q, 3)                    # 13 words a row, not 12
    assert packed.shape == (4, 13)
    with pytest.raises(UnsupportedError, match="3-bit values 10 to a word, the layout "
                       "compressed-tensors wrote before 0.18"):
        ct.dequantize_packed(packed, torch.ones(4, 1), (4, 128), None, 3)


def test_pack_quantized_special_scales_and_every_value():
    """Scales with NaN, infinities, subnormals and both zeros, every 4-bit value and zero
    point: the library's dequantize of the library's unpacking."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    rng = np.random.default_rng(3)
    n, k, group = 40, 128, 32
    q = torch.from_numpy(rng.integers(-8, 8, (n, k), dtype=np.int8))
    z = torch.from_numpy(rng.integers(-8, 8, (n, k // group), dtype=np.int8))
    scale = torch.from_numpy(random_f16(rng, (n, k // group)).astype(np.float32)).half()
    packed, packed_z = pack_to_int32(q, 4), pack_to_int32(z, 4, packed_dim=0)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                            group_size=group)
    want = dequantize(unpack_from_int32(packed, 4, torch.Size((n, k))), scale,
                      unpack_from_int32(packed_z, 4, torch.Size((n, k // group)), packed_dim=0),
                      args)
    got = ct.dequantize_packed(packed, scale, [n, k], packed_z, 4)
    assert_bits_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("compressor", ["IntQuantizationCompressor", "NaiveQuantizationCompressor"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("strategy,group", [("channel", None), ("group", 64), ("tensor", None)])
def test_int8_matches_the_library(compressor, symmetric, strategy, group):
    torch.manual_seed(11)
    w = torch.randn(32, 128, dtype=torch.bfloat16)
    state, want = compressed(getattr(ctc, compressor), w, 8, symmetric, strategy, group)
    same(ct.dequantize_int8(state["weight"], state["weight_scale"],
                            state.get("weight_zero_point")), want)


def test_numpy_in_numpy_out_and_out():
    torch.manual_seed(5)
    state, want = compressed(ctc.PackedQuantizationCompressor, torch.randn(16, 64), 4, True,
                             "group", 32)
    out = np.empty((16, 64), np.float32)
    got = ct.dequantize_packed(state["weight_packed"].numpy(), state["weight_scale"].numpy(),
                               (16, 64), None, 4, out=out)
    assert got is out and np.array_equal(out, want.numpy())


def test_bad_inputs():
    torch.manual_seed(6)
    state, _ = compressed(ctc.PackedQuantizationCompressor, torch.randn(16, 64), 4, True,
                          "group", 32)
    packed, scale = state["weight_packed"], state["weight_scale"]
    with pytest.raises(UnsupportedError, match="num_bits=9"):
        ct.dequantize_packed(packed, scale, (16, 64), None, 9)
    with pytest.raises(InvalidProblemError, match=r"weight_packed has dtype int32 and shape "
                       r"\(16, 8\); expected int32 \[16, 16\]"):
        ct.dequantize_packed(packed, scale, (16, 128), None, 4)
    with pytest.raises(InvalidProblemError, match=r"weight_scale has shape \(16, 3\)"):
        ct.dequantize_packed(packed, scale[:, :1].repeat(1, 3), (16, 64), None, 4)
    with pytest.raises(InvalidProblemError, match="weight_shape"):
        ct.dequantize_packed(packed, scale, "16x64", None, 4)
    with pytest.raises(InvalidProblemError, match="int-quantized weights are int8"):
        ct.dequantize_int8(torch.zeros(4, 8), torch.ones(4, 1))


def _save_checkpoint(path, tensors, config):
    """``tensors`` in two shards with an index, and ``config.json``."""
    import json
    st = pytest.importorskip("safetensors.torch")
    path.mkdir()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        file = f"model-0000{i}-of-00002.safetensors"
        st.save_file({n: tensors[n].contiguous() for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))


def _ct_checkpoint(path):
    """A small llm-compressor-style checkpoint: config groups of 4-bit asymmetric groups,
    8-bit symmetric channels, 3-bit asymmetric act-order groups, 5-bit symmetric channels,
    7-bit asymmetric groups, an FP8 block layer (float-quantized), an int8 layer, an
    ignored float layer; each layer compressed by the library (the act-order one packed by
    it), two shards."""
    torch.manual_seed(21)
    tensors, want = {}, {}
    specs = {"model.layers.0.self_attn.q_proj": (ctc.PackedQuantizationCompressor, 4, False, "group", 32),
             "model.layers.0.mlp.up_proj": (ctc.PackedQuantizationCompressor, 8, True, "channel", None),
             "model.layers.0.self_attn.v_proj": (ctc.PackedQuantizationCompressor, 5, True, "channel", None),
             "model.layers.0.mlp.gate_proj": (ctc.PackedQuantizationCompressor, 7, False, "group", 32),
             "model.layers.0.mlp.down_proj": (ctc.IntQuantizationCompressor, 8, False, "channel", None)}
    for name, (compressor, bits, sym, strategy, group) in specs.items():
        state, weight = compressed(compressor, torch.randn(64, 128, dtype=torch.bfloat16), bits,
                                   sym, strategy, group)
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
        want[f"{name}.weight"] = weight
    (packed, scale, packed_z, g_idx), weight = act_order_layer(3, False, 64, 128, 32,
                                                               torch.bfloat16, 8)
    k_proj = "model.layers.0.self_attn.k_proj"
    tensors.update({f"{k_proj}.weight_packed": packed, f"{k_proj}.weight_scale": scale,
                    f"{k_proj}.weight_zero_point": packed_z, f"{k_proj}.weight_g_idx": g_idx,
                    f"{k_proj}.weight_shape": torch.tensor([64, 128])})
    want[f"{k_proj}.weight"] = weight
    fp8_w = torch.randn(200, 300).to(torch.float8_e4m3fn)
    fp8_s = torch.rand(2, 3) * 0.01
    tensors["model.layers.0.self_attn.o_proj.weight"] = fp8_w
    tensors["model.layers.0.self_attn.o_proj.weight_scale"] = fp8_s
    rows, cols = torch.arange(200) // 128, torch.arange(300) // 128
    want["model.layers.0.self_attn.o_proj.weight"] = (
        fp8_w.to(torch.float32) * fp8_s[rows][:, cols]).to(torch.bfloat16)
    tensors["lm_head.weight"] = torch.randn(8, 64, dtype=torch.bfloat16)

    def packed_group(targets, bits, symmetric, strategy, **more):
        return {"targets": targets, "format": "pack-quantized",
                "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                            "strategy": strategy, **more}}
    config = {"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "mixed-precision", "ignore": ["lm_head"],
        "version": "0.18.0",
        "config_groups": {
            "group_0": packed_group(["re:.*q_proj"], 4, False, "group", group_size=32),
            "group_1": packed_group(["re:.*up_proj"], 8, True, "channel"),
            "group_2": {"targets": ["re:.*down_proj"], "format": "int-quantized",
                        "weights": {"num_bits": 8, "type": "int", "symmetric": False,
                                    "strategy": "channel"}},
            "group_3": {"targets": ["re:.*o_proj"], "format": "float-quantized",
                        "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                    "block_structure": [128, 128]}},
            "group_4": packed_group(["re:.*k_proj"], 3, False, "group", group_size=32,
                                    actorder="group"),
            "group_5": packed_group(["re:.*v_proj"], 5, True, "channel"),
            "group_6": packed_group(["re:.*gate_proj"], 7, False, "group", group_size=32)}}}
    _save_checkpoint(path, tensors, config)
    return tensors, want


def test_convert_reads_a_mixed_checkpoint_with_no_flags(tmp_path):
    """Layers of four formats in one checkpoint (pack-quantized of 3, 4, 5, 7 and 8 bits,
    one act-order), each as the library decompresses it (the FP8 one as DeepSeek's
    formula), the ignored layer copied, the quantization config dropped."""
    import json
    from dqgen import cli
    st = pytest.importorskip("safetensors.torch")
    tensors, want = _ct_checkpoint(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["convert", str(tmp_path / "in"), str(out), "--dtype", "bf16", "--quiet"]) == 0
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        got.update(st.load_file(str(shard)))
    for name, weight in want.items():
        assert_bits_equal(got[name].view(torch.int16).numpy(), weight.view(torch.int16).numpy())
    assert torch.equal(got["lm_head.weight"], tensors["lm_head.weight"])
    assert not [n for n in got if "weight_scale" in n or "weight_packed" in n or
                "weight_zero_point" in n or "weight_shape" in n or "weight_g_idx" in n]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config


def test_convert_refuses_unknown_formats(tmp_path, capsys):
    import json
    from dqgen import cli
    st = pytest.importorskip("safetensors.torch")
    _ct_checkpoint(tmp_path / "in")
    config_path = tmp_path / "in" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "marlin-24"
    config_path.write_text(json.dumps(config))
    assert cli.main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "compressed-tensors format 'marlin-24'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_widths_packed_before_0_18(tmp_path, capsys):
    """A config naming compressed-tensors 0.17 (3-bit values 10 to a word then) is refused
    for its 3-, 5- and 7-bit layers, before anything is written."""
    import json
    from dqgen import cli
    _ct_checkpoint(tmp_path / "in")
    config_path = tmp_path / "in" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["version"] = "0.17.1"
    config_path.write_text(json.dumps(config))
    assert cli.main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "from compressed-tensors 0.17 (the config's version), which packs" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _one_layer_checkpoint(path, k, bits, config_bits):
    """A symmetric channel layer of ``bits`` and ``K = k`` whose config groups name
    ``config_bits``; the library's decompression of it."""
    torch.manual_seed(k + bits)
    state, want = compressed(ctc.PackedQuantizationCompressor,
                             torch.randn(8, k, dtype=torch.bfloat16), bits, True, "channel",
                             None)
    tensors = {f"model.layers.0.mlp.up_proj.{n}": v for n, v in state.items()}
    tensors["lm_head.weight"] = torch.randn(4, 8, dtype=torch.bfloat16)
    groups = {f"group_{b}": {"targets": [f"re:.*proj_{b}"], "format": "pack-quantized",
                             "weights": {"num_bits": b, "type": "int", "symmetric": True,
                                         "strategy": "channel"}} for b in config_bits}
    _save_checkpoint(path, tensors, {"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": groups}})
    return want


def test_convert_takes_a_short_rows_width_from_the_config(tmp_path, capsys):
    """16 values in 2 words are 3- or 4-bit: the config's num_bits says which, or the
    layer is refused where it names both."""
    from dqgen import cli
    st = pytest.importorskip("safetensors.torch")
    want = _one_layer_checkpoint(tmp_path / "in", 16, 3, [3, 8])
    assert cli.main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--dtype", "bf16",
                     "--quiet"]) == 0
    got = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(st.load_file(str(shard)))
    same(got["model.layers.0.mlp.up_proj.weight"], want)
    _one_layer_checkpoint(tmp_path / "in2", 16, 3, [3, 4])
    assert cli.main(["convert", str(tmp_path / "in2"), str(tmp_path / "out2"), "--quiet"]) == 2
    assert "has 2 words a row for K=16, which fits 3/4-bit values alike" in \
        capsys.readouterr().err
    _one_layer_checkpoint(tmp_path / "in3", 16, 3, [5])
    assert cli.main(["convert", str(tmp_path / "in3"), str(tmp_path / "out3"), "--quiet"]) == 2
    assert "3/4-bit values, but" in capsys.readouterr().err
