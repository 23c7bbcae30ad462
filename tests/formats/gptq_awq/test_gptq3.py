"""GPTQ 3 bits: 32 values of a column in three int32 words, value j at bit 3 j of the three
read as one little-endian integer (values 10 and 21 straddle two words), qzeros likewise
along N. Bit for bit with GPTQModel's own packer, v1 export and load and
``dequantize_weight``, and with AutoGPTQ's packer and torch dequant, on every C ISA of
this machine and in CUDA (NVRTC + host emulation); through ``dqgen aot``/``verify``/
``convert`` and the fused linear's repack."""

from __future__ import annotations

import ast
import json
import shutil
from functools import lru_cache

import numpy as np
import pytest

from dqgen import InvalidProblemError, PlanPreference, bundle, cli, reference, verify
from dqgen.formats import gptq
from dqgen.formats.plan import FormatPlan
from dqgen.formats.weight import linear
from dqgen.formats.weight_repack import checkpoint_weights, gptq_weight
from dqgen.ir import GptqDequantizeDescriptor
from formats_util import assert_bits_equal, random_f16
from oracles import peers
from strategies import ISAS

torch = pytest.importorskip("torch", reason="the peers' packers and dequant are torch code")

# K and N: whole runs of three words (the packers take multiples of 32); 160 is also a
# multiple of the 10 values that ``32 // bits`` counts a word
K, N, GROUP = 160, 160, 32


# --- the peers' own code -----------------------------------------------------------------

def _exec(defs, path, namespace: dict) -> dict:
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


@lru_cache(maxsize=None)
def gptqmodel_3bit():
    """``(export_v1, load_v1, dequantize)``: GPTQModel's ``convert_gptq_v2_to_v1_format_module``
    (its v1 export) and ``convert_gptq_v1_to_v2_format_module`` (its load), which for 3 bits
    call ``model_dequant._revert_gptq_v1_qzeros_correction`` / ``_correct_gptq_v1_qzeros``,
    as functions of int32 torch qzeros; and ``PackableQuantLinear.dequantize_weight`` of
    v2 ``(qweight, qzeros, scales, g_idx)`` -> the f16 ``[K, N]`` weight."""
    root = peers._package_dir("gptqmodel")
    planar = peers._load(root / "utils" / "planar_packing.py", "peer_gptqmodel_planar_packing")
    dequant = root / "utils" / "model_dequant.py"
    shifts = _exec(peers._functions(dequant, {
        "unpack_cols", "pack_cols", "_require_int32_words_for_3bit", "_unpack_cols_3bit",
        "_pack_cols_3bit", "_shift_gptq_qzeros", "_correct_gptq_v1_qzeros",
        "_revert_gptq_v1_qzeros_correction"}), dequant, {
        "torch": torch, "PLANAR_BITS": planar.PLANAR_BITS,
        "planar_unpack_cols": planar.planar_unpack_cols,
        "planar_pack_cols": planar.planar_pack_cols})

    class Module(torch.nn.Module):
        def __init__(self, **buffers):
            super().__init__()
            self.bits, self.planar, self.pack_dtype = 3, False, torch.int32
            self.pack_dtype_bits, self.maxq, self.enable_wf_unsqueeze = 32, 7, True
            for name, value in buffers.items():
                self.register_buffer(name, value.clone())
            if "g_idx" in buffers:
                self.in_features = buffers["g_idx"].numel()

        def qzero_format(self, format=None):
            self.format = format

        def _wf_device(self):
            return torch.device("cpu")

    class Once:
        def once(self, *args, **kwargs):
            pass

    class QuantizeConfig:
        def __init__(self, bits):
            self.bits, self.pack_dtype = bits, torch.int32

    model = root / "utils" / "model.py"
    conversions = _exec(peers._functions(model, {"convert_gptq_v2_to_v1_format_module",
                                                 "convert_gptq_v1_to_v2_format_module"}), model,
                        {"torch": torch, "nn": torch.nn, "BaseQuantLinear": Module,
                         "QuantizeConfig": QuantizeConfig, "log": type("Log", (), {"info": Once()}),
                         "_correct_gptq_v1_qzeros": shifts["_correct_gptq_v1_qzeros"],
                         "_revert_gptq_v1_qzeros_correction":
                             shifts["_revert_gptq_v1_qzeros_correction"]})
    qlinear = root / "nn_modules" / "qlinear" / "__init__.py"
    helpers = _exec(peers._functions(qlinear, {"_torch_right_shift", "_torch_left_shift",
                                               "_torch_shift_factor"}), qlinear, {"t": torch})
    methods = _exec(peers._functions(qlinear, {"dequantize_weight", "_init_wf_unsqueeze_buffers",
                                               "_dequantize_from_codes"}, "PackableQuantLinear"),
                    qlinear, {"t": torch, **helpers})
    for name in ("dequantize_weight", "_init_wf_unsqueeze_buffers", "_dequantize_from_codes"):
        setattr(Module, name, methods[name])

    def export_v1(qzeros):
        module = Module(qzeros=qzeros)
        conversions["convert_gptq_v2_to_v1_format_module"](module, QuantizeConfig(3))
        return module.qzeros

    def load_v1(qzeros):
        module = Module(qzeros=qzeros)
        conversions["convert_gptq_v1_to_v2_format_module"](module, 3, torch.int32)
        return module.qzeros

    def dequantize(qweight, qzeros, scales, g_idx):
        module = Module(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)
        with torch.no_grad():
            return module.dequantize_weight().numpy()
    return export_v1, load_v1, dequantize


def minmax(w, group: int, zero_zero: bool = True):
    """Min/max 3-bit scales and zero points ``[N, groups]`` of ``w [N, K]``; the first
    groups all positive (a zero point of 0) when ``zero_zero``, and a wide group (7)."""
    if zero_zero:
        w[:4, :group] = w[:4, :group].abs() + 0.01
        w[4:8, :group] = -w[4:8, :group].abs() - 0.01
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = torch.clamp(g.amin(-1), max=0), torch.clamp(g.amax(-1), min=0)
    scale = ((hi - lo) / 7).to(torch.float16).to(torch.float32)
    return scale, torch.clamp(torch.round(-lo / scale), 0, 7)


def gptqmodel_layer(seed: int, act_order: bool, k: int = K, n: int = N):
    """GPTQModel's pack of a random ``nn.Linear(k, n)``: v2 words, torch tensors."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(k, n, bias=False)
    scale, zero = minmax(layer.weight.data, GROUP)
    g_idx = torch.arange(k, dtype=torch.int32) // GROUP
    if act_order:
        g_idx = g_idx[torch.randperm(k)]
    qweight, qzeros, scales, g_idx = peers.gptqmodel_pack()(layer, scale, zero, g_idx, 3)
    return qweight, qzeros, scales, g_idx


def stored_fields(qzeros: np.ndarray) -> np.ndarray:
    """Every 3-bit field of qzeros words, read by hand (straddling ones included)."""
    words = qzeros.view(np.uint32).astype(object)
    out = []
    for row in words:
        for run in range(len(row) // 3):
            value = int(row[3 * run]) | int(row[3 * run + 1]) << 32 | int(row[3 * run + 2]) << 64
            out += [(value >> (3 * j)) & 7 for j in range(32)]
    return np.array(out)


def as_np(*tensors):
    return [t.numpy() for t in tensors]


# --- gptq.dequantize against the peers -----------------------------------------------------

@pytest.mark.parametrize("act_order", [False, True])
def test_gptqmodel_pack_v2_and_v1(act_order):
    """GPTQModel's pack (v2) and its v1 export read as GPTQModel loads and dequantizes them
    (f16), zero points of 0 and 7 included; v1 and v2 are the same weight."""
    export_v1, load_v1, dequantize = gptqmodel_3bit()
    qweight, v2, scales, g_idx = gptqmodel_layer(1 + act_order, act_order)
    v1 = export_v1(v2)
    fields = stored_fields(v1.numpy())
    assert (fields == 7).any() and (stored_fields(v2.numpy()) == 0).any()  # zero points of 0
    want = dequantize(qweight, v2, scales, g_idx)
    assert_bits_equal(dequantize(qweight, load_v1(v1), scales, g_idx), want)
    qw, z1, z2, sc, gi = as_np(qweight, v1, v2, scales, g_idx)
    assert_bits_equal(gptq.dequantize(qw, z2, sc, g_idx=gi, bits=3,
                                      checkpoint_format="gptq_v2"), want)
    assert_bits_equal(gptq.dequantize(qw, z1, sc, g_idx=gi, bits=3), want)


def random_v1_zeros(rng, groups: int, cols: int) -> np.ndarray:
    """qzeros words about a third of whose fields are 7 (the v1 rules differ there)."""
    fields = rng.integers(0, 8, size=(groups, cols // 32, 32))
    fields[rng.random(fields.shape) < 0.3] = 7
    value = (fields.astype(object) << (3 * np.arange(32))).sum(axis=-1)
    words = np.array([[(int(v) >> (32 * i)) & 0xFFFFFFFF for v in row for i in range(3)]
                      for row in value], dtype=np.uint32)
    return words.view(np.int32)


def test_each_v1_rule_is_its_tools_reading():
    """Random qzeros, stored 7s in a third of the fields: GPTQModel's load (field + 1
    modulo 8) is the default; AutoGPTQ's torch dequant adds 1 without the modulo for 3
    bits, as exllama's rule does, so a stored 7 reads 8 there and 0 in GPTQModel's."""
    _, load_v1, dequantize = gptqmodel_3bit()
    rng = np.random.default_rng(3)
    qweight, _, scales, g_idx = gptqmodel_layer(3, act_order=False)
    qw, sc, gi = as_np(qweight, scales, g_idx)
    qzeros = random_v1_zeros(rng, K // GROUP, N)
    want = dequantize(qweight, load_v1(torch.from_numpy(qzeros)), scales, g_idx)
    assert_bits_equal(gptq.dequantize(qw, qzeros, sc, g_idx=gi, bits=3), want)
    auto = peers.autogptq_quant_linear()(3, GROUP, K, N, False)
    for name, arr in (("qweight", qw), ("qzeros", qzeros), ("scales", sc)):
        getattr(auto, name).copy_(torch.from_numpy(arr))
    autogptq = peers.autogptq_weight(auto).numpy()
    assert_bits_equal(gptq.dequantize(qw, qzeros, sc, bits=3, v1_zeros="autogptq"), autogptq)
    assert_bits_equal(gptq.dequantize(qw, qzeros, sc, bits=3, v1_zeros="exllama"), autogptq)
    assert not np.array_equal(autogptq.view(np.uint16), want.view(np.uint16))


def test_autogptq_pack_and_dequant():
    """AutoGPTQ's own pack (z - 1 a field: a zero point of 0 spills ones into the fields
    above) read with the rule of its loader, equal to its own torch dequant."""
    torch.manual_seed(4)
    layer = torch.nn.Linear(K, N, bias=False).half()   # AutoGPTQ's scales take its dtype
    w = layer.weight.data.float()
    scale, zero = minmax(w, GROUP)
    layer.weight.data = w.half()
    auto = peers.autogptq_quant_linear()(3, GROUP, K, N, False)
    auto.pack(layer, scale, zero, torch.arange(K, dtype=torch.int32) // GROUP)
    assert (stored_fields(auto.qzeros.numpy()) == 7).any()   # a zero point of 0, spilled
    want = peers.autogptq_weight(auto).numpy()
    got = gptq.dequantize(*as_np(auto.qweight, auto.qzeros, auto.scales), bits=3,
                          v1_zeros="autogptq")
    assert_bits_equal(got, want)


def naive(qweight, qzeros, scales, g_idx, add: int, mask: int, out) -> np.ndarray:
    """W = F(C(q - z) C(s)), each value and zero point read bit by bit from the stream."""
    def stream(words, i):   # value i of a column's words
        return sum(((int(words[(3 * i + b) // 32]) >> ((3 * i + b) % 32)) & 1) << b
                   for b in range(3))
    qw, qz = qweight.view(np.uint32), qzeros.view(np.uint32)
    q = np.array([[stream(qw[:, n], k) for n in range(qw.shape[1])]
                  for k in range(qw.shape[0] * 32 // 3)])
    z = np.array([[(stream(row, n) + add) & mask for n in range(scales.shape[1])] for row in qz])
    c = np.float64 if np.dtype(out) == np.float64 else np.float32
    with np.errstate(all="ignore"):
        return ((q - z[g_idx]).astype(c) * scales[g_idx].astype(c)).astype(out)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    """Each C ISA of this machine, act-order with extreme f16 scales into f32."""
    rng = np.random.default_rng(5)
    qweight = rng.integers(-(1 << 31), 1 << 31, size=(K * 3 // 32, N)).astype(np.int32)
    qzeros = random_v1_zeros(rng, K // GROUP, N)
    scales = random_f16(rng, (K // GROUP, N))
    g_idx = (rng.permutation(K) // GROUP).astype(np.int32)
    desc = GptqDequantizeDescriptor(K, N, GROUP, 3, "f32", "f16", "gptq", True, "exllama")
    y = np.zeros((K, N), np.float32)
    FormatPlan.select(desc, preference=PlanPreference(isa=isa)).run(
        dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, y=y))
    assert_bits_equal(y, naive(qweight, qzeros, scales, g_idx, 1, 0xFFFFFFFF, np.float32))


# --- CUDA: NVRTC and the host emulation -------------------------------------------------

@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ runs the emulation")
@pytest.mark.parametrize("kw", [dict(act_order=True, float_dtype="f16"),
                                dict(checkpoint_format="gptq_v2", float_dtype="bf16")],
                         ids=["v1-act-f16", "v2-bf16"])
def test_cuda_emulated(kw, tmp_path):
    from dqgen.lower import lower
    from dqgen.render import render
    from test_formats_cuda import run_emulated
    nvrtc = pytest.importorskip("dqgen.build.nvrtc")
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed (pip install dqgen[cuda])")
    desc = GptqDequantizeDescriptor(K, N, GROUP, bits=3, **kw)
    art = nvrtc.compile_cuda(render(lower(desc, "cuda", "sm_90")).text, name=desc.uri,
                             arch="sm_90")
    assert desc.uri.encode() in art.ptx
    rng = np.random.default_rng(6)
    qweight = rng.integers(-(1 << 31), 1 << 31, size=(K * 3 // 32, N)).astype(np.int32)
    qzeros = random_v1_zeros(rng, K // GROUP, N)
    scales = random_f16(rng, (K // GROUP, N))
    g_idx = (rng.permutation(K) // GROUP).astype(np.int32) if desc.act_order else \
        (np.arange(K) // GROUP).astype(np.int32)
    y = np.zeros((K, N), desc.float_dtype.np_dtype)
    arrays = [qweight, qzeros, scales] + ([g_idx] if desc.act_order else []) + [y]
    run_emulated(desc, arrays, [K, N], y.size, tmp_path)
    v1 = desc.checkpoint_format == "gptq"
    assert_bits_equal(y, naive(qweight, qzeros, scales, g_idx, int(v1), 7 if v1 else 0xFFFFFFFF,
                               y.dtype))


# --- dqgen aot, verify, convert -------------------------------------------------------------

def test_aot_and_verify(tmp_path, capsys):
    """``dqgen aot --op gptq --bits 3`` builds the kernels; ``dqgen verify`` checks them
    against the layout's oracle."""
    out = tmp_path / "bundle"
    assert cli.main(["aot", "--op", "gptq", "--bits", "3", "--float", "f16", "--group-size",
                     "32", "--target", "c:generic", "-o", str(out)]) == 0
    uris = [k["uri"] for k in json.loads((out / bundle.MANIFEST).read_text())["kernels"]]
    assert uris == ["dequant_gptq3_v1_f16_f16_g32", "dequant_gptq3_v1_f16_f16_gidx"]
    outcomes = verify.verify_bundle(bundle.Bundle.open(out))
    assert [o.status for o in outcomes] == [verify.OK, verify.OK], [str(o) for o in outcomes]
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 0
    assert "dequant_gptq3_v1_f16_f16_gidx (c:generic): 160x160 bit-exact" in capsys.readouterr().out


def test_convert_gptqmodel_directory(tmp_path):
    """A GPTQModel v1 checkpoint (its export) converts as GPTQModel loads it: bits from the
    config, or (config without bits) from the words a qzeros row holds; and the fused
    linear's reader takes the same layers."""
    from test_checkpoint_dirs import (check_output, extra_tensors, run_convert, split,
                                      write_checkpoint)
    export_v1, load_v1, dequantize = gptqmodel_3bit()
    tensors, want = extra_tensors(), {}
    for i, prefix in enumerate(("model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj")):
        qweight, v2, scales, g_idx = gptqmodel_layer(10 + i, act_order=True, k=K * (i + 1))
        v1 = export_v1(v2)
        tensors.update({f"{prefix}.qweight": qweight.numpy(), f"{prefix}.qzeros": v1.numpy(),
                        f"{prefix}.scales": scales.numpy(), f"{prefix}.g_idx": g_idx.numpy()})
        want[prefix] = np.ascontiguousarray(dequantize(qweight, load_v1(v1), scales, g_idx).T)
    config = {"quant_method": "gptq", "bits": 3, "group_size": GROUP, "desc_act": True,
              "sym": False, "checkpoint_format": "gptq", "meta": {"quantizer": ["gptqmodel:7.7.0"]}}
    src = tmp_path / "gptqmodel"
    write_checkpoint(src, tensors, split(tensors), config)
    assert run_convert(str(src), str(tmp_path / "out"), "--quiet") == 0
    check_output(tmp_path / "out", want, extra_tensors())
    for prefix, (weight, _) in checkpoint_weights(src).items():
        assert_bits_equal(weight.dequantize("f16"), want[prefix])
    del config["bits"]
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "quantization_config": config}))
    assert run_convert(str(src), str(tmp_path / "out2"), "--quiet") == 0
    check_output(tmp_path / "out2", want, extra_tensors())


# --- the fused linear ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,rule,act_order", [("gptq", "gptqmodel", False),
                                                ("gptq", "exllama", True),
                                                ("gptq_v2", "gptqmodel", True)])
def test_fused_linear_repack(fmt, rule, act_order):
    """``gptq_weight(bits=3)`` (u8 values) dequantizes to the transpose of
    ``gptq.dequantize``'s f32 weight bit for bit, and ``linear`` equals
    ``reference.linear`` on it (act-order: x in the stored column order)."""
    rng = np.random.default_rng(7 + act_order)
    qweight = rng.integers(-(1 << 31), 1 << 31, size=(K * 3 // 32, N)).astype(np.int32)
    layer = dict(qweight=qweight, qzeros=random_v1_zeros(rng, K // GROUP, N),
                 scales=(rng.random((K // GROUP, N)) * 0.02).astype(np.float16))
    if act_order:
        layer["g_idx"] = (rng.permutation(K) // GROUP).astype(np.int32)
    kwargs = dict(bits=3, checkpoint_format=fmt, v1_zeros=rule)
    weight = gptq_weight(**layer, **kwargs)
    assert weight.descriptor.int_dtype.value == "u8" and weight.shape == (N, K)
    want = np.ascontiguousarray(gptq.dequantize(**layer, **kwargs, dtype="f32").T)
    assert_bits_equal(weight.dequantize("f32"), want)
    order = weight.column_order
    assert (order is not None) == act_order
    stored = want if order is None else np.ascontiguousarray(want[:, order])
    for m in (1, 5):
        x = rng.standard_normal((m, K)).astype(np.float32)
        xs = x if order is None else np.ascontiguousarray(x[:, order])
        assert_bits_equal(linear(x, weight), reference.linear(xs, stored, None, np.float32))


# --- errors ----------------------------------------------------------------------------------

def test_shapes_that_are_no_3bit_layer():
    rng = np.random.default_rng(8)
    scales = np.ones((1, N), np.float16)
    qzeros = random_v1_zeros(rng, 1, N)
    with pytest.raises(InvalidProblemError, match="bits=3 is not supported for a qweight of "
                       "16 rows: 3-bit GPTQ packs 32 values of K in 3 int32 words"):
        gptq.dequantize(np.zeros((16, N), np.int32), qzeros, scales, bits=3)
    with pytest.raises(InvalidProblemError, match="bits=3 is not supported for a qweight of 16"):
        gptq_weight(np.zeros((16, N), np.int32), qzeros, scales, bits=3)
    with pytest.raises(InvalidProblemError, match=r"cols \(N\)=170 is not a multiple of 32"):
        gptq.dequantize(np.zeros((15, 170), np.int32), np.zeros((1, 15), np.int32),
                        np.ones((1, 170), np.float16), bits=3)
    with pytest.raises(InvalidProblemError,
                       match=r"qzeros has shape \(1, 16\), expected \(1, 15\)"):
        gptq.dequantize(np.zeros((15, N), np.int32), np.zeros((1, 16), np.int32), scales, bits=3)
    with pytest.raises(InvalidProblemError, match="N=170 .* is not a multiple of 32, the 3-bit "
                       "zero points 3 int32 qzeros words hold"):
        gptq_weight(np.zeros((15, 170), np.int32), np.zeros((1, 15), np.int32),
                    np.ones((1, 170), np.float16), bits=3)


# --- with the descriptor's check of whole runs (ir.py) and pack_gptq's 3 bits (pack.py) ---

def test_smallest_layer_32_by_32():
    """K = N = 32: one run of three words each way (a multiple of 32, not of 10)."""
    export_v1, load_v1, dequantize = gptqmodel_3bit()
    qweight, v2, scales, g_idx = gptqmodel_layer(20, act_order=True, k=32, n=32)
    v1 = export_v1(v2)
    want = dequantize(qweight, v2, scales, g_idx)
    qw, z1, sc, gi = as_np(qweight, v1, scales, g_idx)
    assert_bits_equal(gptq.dequantize(qw, z1, sc, g_idx=gi, bits=3), want)
    weight = gptq_weight(qw, z1, sc, g_idx=gi, bits=3)
    assert_bits_equal(weight.dequantize("f16"), np.ascontiguousarray(want.T))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_pack_gptq_is_gptqmodels_pack(fmt):
    """pack_gptq(bits=3) = GPTQModel's pack (v2) and its v1 export, zero points of 0 too."""
    from dqgen.formats import pack
    export_v1, _, _ = gptqmodel_3bit()
    rng = np.random.default_rng(21)
    q = rng.integers(0, 8, size=(64, 64))
    zeros = rng.choice([0, 7, 3], size=(2, 64))
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64, bias=False)
    scale = torch.ones(64, 2)
    layer.weight.data = torch.from_numpy((q.T - np.repeat(zeros.T, 32, axis=1)).astype(np.float32))
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    qweight, v2, _, _ = peers.gptqmodel_pack()(layer, scale, torch.from_numpy(zeros.T.astype(np.float32)), g_idx, 3)
    got_w, got_z = pack.pack_gptq(q, zeros, 3, fmt)
    assert np.array_equal(got_w, qweight.numpy())
    assert np.array_equal(got_z, (export_v1(v2) if fmt == "gptq" else v2).numpy())
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    layer3 = pack.quantize_gptq(w, 32, 3, perm=np.random.default_rng(3).permutation(64),
                                checkpoint_format=fmt)
    got = gptq.dequantize(**layer3, bits=3, checkpoint_format=fmt, dtype="f32")
    step = layer3["scales"].astype(np.float32)[layer3["g_idx"]]
    assert np.all(np.abs(got - w) <= step * 0.5 + 1e-3)


def test_torch_op_fake_shape():
    from dqgen import torch as dqgen_torch  # noqa: F401  (registers the ops)
    from torch._subclasses.fake_tensor import FakeTensorMode
    qweight, v2, scales, g_idx = gptqmodel_layer(22, act_order=False, k=64, n=32)
    with FakeTensorMode() as mode:
        fake = torch.ops.dqgen.gptq_dequantize(mode.from_tensor(qweight), mode.from_tensor(v2),
                                               mode.from_tensor(scales), bits=3,
                                               checkpoint_format="gptq_v2")
    assert tuple(fake.shape) == (64, 32)
