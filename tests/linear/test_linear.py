"""The fused linear kernel (``dqgen.linear``, ``QuantizedWeight``): ``x @ W.T (+ bias)``
with W quantized and never written out, bit for bit ``reference.linear`` (SPEC.md §8) for
the family (s8/u8/u4/s4), GGML blocks and FP8 blocks, every x dtype, M in {1, 2, 3, 8, 17,
64}, K not a multiple of the lanes, on every ISA and thread count; the error against an
f64 matmul within the documented bound; dqgen verify checks a built kernel."""

from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqgen import InvalidProblemError, reference, verify
from dqgen.formats.plan import FormatPlan
from dqgen.formats.weight import QuantizedWeight, linear
from dqgen.ir import GGML_BLOCK_BYTES, GGML_BLOCK_VALUES, ggml_type_name, parse_ggml_type
from dqgen.layouts.ggml_blocks import LAYOUTS
from dqgen.jit import descriptor_record
from dqgen.layouts.linear import LinearDescriptor
from dqgen.plans import PlanPreference
from formats_util import assert_bits_equal
from strategies import ISAS

DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
MS = (1, 2, 3, 8, 17, 64)


def ggml_weight(rng, qtype, n, k):
    w = rng.standard_normal((n, k)).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    try:
        data = gguf.quants.quantize(w, t)
    except NotImplementedError:  # types gguf-py cannot write: random valid-ish blocks
        bb = gguf.GGML_QUANT_SIZES[t][1]
        data = rng.integers(0, 256, (n * k // gguf.GGML_QUANT_SIZES[t][0], bb), dtype=np.uint8)
        data[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # a finite d first
    return QuantizedWeight.ggml(data, qtype, (n, k))


def family_weight(rng, storage, n, k, g):
    packed = storage in ("u4", "s4")
    lo, hi = {"s8": (-128, 128), "u8": (0, 256), "u4": (0, 16), "s4": (-8, 8)}[storage]
    values = rng.integers(lo, hi, (n, k))
    if packed:
        v = values & 15
        q = (v[:, 0::2] | (v[:, 1::2] << 4)).astype(np.uint8)
    else:
        q = values.astype(np.int8 if storage == "s8" else np.uint8)
    scale = (rng.random((n, k // g)) * 0.02).astype(np.float32)
    zp = rng.integers(-4, 12, (n, k // g)).astype(np.int32)
    return QuantizedWeight.per_group(q, scale, zp, g, storage)


def fp8_weight(rng, n, k, block):
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C   # no NaN codes: the sums stay comparable
    sr = -(-n // block[0]) if block[0] else 1
    sc = -(-k // block[1]) if block[1] else 1
    scale = (rng.random((sr, sc)) * 0.01).astype(np.float32)
    return QuantizedWeight.fp8(codes, scale, block, fp8="e4m3")


def floatzp_weight(rng, n, k, g, float_name):
    """torchao's float zero point, packed u4: its values round to F at each step, so the
    linear decodes them in F and widens them exactly."""
    from dqgen.ir import DequantizeFloatZeroDescriptor
    f = DTYPES[float_name]
    values = rng.integers(0, 16, (n, k))
    q = (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)
    scale = (rng.random((n, k // g)) * 0.1).astype(f)
    zero = rng.standard_normal((n, k // g)).astype(f)
    return QuantizedWeight(DequantizeFloatZeroDescriptor(0, 0, g, float_name, "u4"),
                           {"q": q, "scale": scale, "zero_point": zero}, (n, k))


def expected(weight, x, bias, y_dtype):
    k = weight.shape[1]
    return reference.linear(np.asarray(x).reshape(-1, k), weight.dequantize("f32"), bias,
                            y_dtype).reshape(*np.asarray(x).shape[:-1], weight.shape[0])


WEIGHTS = {
    "q4_0": lambda rng: ggml_weight(rng, "Q4_0", 37, 256),
    "q8_0": lambda rng: ggml_weight(rng, "Q8_0", 9, 96),
    "q4_k": lambda rng: ggml_weight(rng, "Q4_K", 11, 512),
    "q6_k": lambda rng: ggml_weight(rng, "Q6_K", 10, 256),
    "iq4_xs": lambda rng: ggml_weight(rng, "IQ4_XS", 9, 256),
    "s8": lambda rng: family_weight(rng, "s8", 13, 200, 40),   # K = 200: a lane tail
    "u4": lambda rng: family_weight(rng, "u4", 21, 96, 32),
    "s4": lambda rng: family_weight(rng, "s4", 5, 36, 12),
    "fp8": lambda rng: fp8_weight(rng, 19, 37, (8, 16)),       # partial blocks both ways
    "floatzp": lambda rng: floatzp_weight(rng, 19, 96, 32, "bf16"),
    "mlx3": lambda rng: mlx_3bit_weight(rng, 9, 128),
}


def mlx_3bit_weight(rng, n, k):
    """MLX affine, 3-bit values straddling words, bf16 scales and biases (its values round
    to bf16 at each step, so the linear decodes them in bf16)."""
    from dqgen.formats.weight_readers import mlx_weight
    words = rng.integers(0, 2**32, (n, k * 3 // 32), dtype=np.uint64).astype(np.uint32)
    scales = (rng.random((n, k // 64)) * 0.1).astype(ml_dtypes.bfloat16)
    biases = rng.standard_normal((n, k // 64)).astype(ml_dtypes.bfloat16)
    return mlx_weight(words, scales, biases, 64, 3)


def test_a_16_bit_decode_is_the_formats_own_values():
    """The float zero point's weight is what floatzp.dequantize gives (F-rounded steps),
    so the linear equals the reference over those values, f16 and bf16."""
    from dqgen.formats import floatzp
    rng = np.random.default_rng(12)
    for name in ("f16", "bf16"):
        weight = floatzp_weight(rng, 7, 64, 32, name)
        arrays = weight.arrays
        own = np.asarray(floatzp.dequantize(arrays["q"], arrays["scale"], arrays["zero_point"],
                                            32, int_dtype="u4"))
        assert_bits_equal(weight.dequantize(name), own)
        x = rng.standard_normal((3, 64)).astype(np.float32)
        assert_bits_equal(linear(x, weight), reference.linear(x, own, None, np.float32))


@pytest.mark.parametrize("name", sorted(WEIGHTS))
@pytest.mark.parametrize("x_dtype", sorted(DTYPES))
def test_bit_exact_every_format_and_x_dtype(name, x_dtype):
    rng = np.random.default_rng(hash((name, x_dtype)) % 2**32)
    weight = WEIGHTS[name](rng)
    n, k = weight.shape
    bias = rng.standard_normal(n).astype(DTYPES[x_dtype])
    for m in MS:
        x = rng.standard_normal((m, k)).astype(DTYPES[x_dtype])
        got = linear(x, weight, bias if m % 2 else None)
        assert_bits_equal(got, expected(weight, x, bias if m % 2 else None, DTYPES[x_dtype]))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["q4_k", "u4", "fp8"])
def test_every_isa_gives_the_same_bits(isa, name):
    rng = np.random.default_rng(7)
    weight = WEIGHTS[name](rng)
    n, k = weight.shape
    for m in (1, 3, 17):
        x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
        desc = LinearDescriptor(weight.descriptor, m, n, k, "bf16", "f32")
        plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa))
        y = np.empty((m, n), np.float32)
        plan.run({**weight.arrays, "x": x, "y": y})
        assert_bits_equal(y, expected(weight, x, None, np.float32))


def test_threads_and_runs_give_the_same_bits():
    """Rows of W split over 1, 2 or 3 threads, and repeated runs: one result."""
    rng = np.random.default_rng(11)
    weight = ggml_weight(rng, "Q8_0", 300, 512)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    results = []
    for threads in (1, 2, 3, 2):
        desc = LinearDescriptor(weight.descriptor, 5, 300, 512)
        plan = FormatPlan.select(desc, preference=PlanPreference(num_threads=threads))
        y = np.empty((5, 300), np.float32)
        plan.run({**weight.arrays, "x": x, "y": y})
        results.append(y)
    for y in results[1:]:
        assert_bits_equal(y, results[0])
    assert_bits_equal(results[0], expected(weight, x, None, np.float32))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 20), n=st.integers(1, 40), groups=st.integers(1, 6),
       special=st.sampled_from([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3e38]))
def test_shapes_and_special_values(m, n, groups, special):
    """Any M (0 too) and N, K in groups of 12 (tails past 16 lanes), special x values:
    infinities and NaN propagate as the reference's, subnormals are kept."""
    rng = np.random.default_rng(m * 1000 + n * 10 + groups)
    weight = family_weight(rng, "s8", n, 12 * groups, 12)
    x = rng.standard_normal((m, 12 * groups)).astype(np.float32)
    if x.size:
        x.flat[rng.integers(0, x.size)] = special
    assert_bits_equal(linear(x, weight), expected(weight, x, None, np.float32))


def test_error_against_f64_within_the_documented_bound():
    """|y - sum in f64| <= gamma(ceil(K / 16) + 4) * sum |x w| (SPEC.md §8), u = 2^-24."""
    rng = np.random.default_rng(5)
    weight = ggml_weight(rng, "Q8_0", 64, 4096)
    x = rng.standard_normal((3, 4096)).astype(np.float32)
    y = linear(x, weight).astype(np.float64)
    w = weight.dequantize("f32").astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    steps = 4096 // 16 + 4
    gamma = steps * 2.0**-24 / (1 - steps * 2.0**-24)
    bound = gamma * (np.abs(x.astype(np.float64)) @ np.abs(w).T)
    err = np.abs(y - exact)
    assert (err <= bound).all()
    assert err.max() > 0   # the bound is tested on real rounding, not on exact sums


def test_reference_order_is_what_the_kernel_computes():
    """A reference summing the lanes in another order (sequentially) differs from the
    kernel somewhere: the test above would catch a kernel that did."""
    rng = np.random.default_rng(9)
    weight = ggml_weight(rng, "Q8_0", 32, 1024)
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    got = linear(x, weight)
    w = weight.dequantize("f32")
    sequential = np.zeros((4, 32), np.float32)
    for j in range(1024):
        sequential = reference.fma_f32(x[:, None, j], w[None, :, j], sequential)
    assert not np.array_equal(got, sequential)
    assert_bits_equal(got, expected(weight, x, None, np.float32))


def test_fma_is_one_rounding():
    """reference.fma_f32 rounds once: a * b + c where the product's low bits matter."""
    a = np.float32(1 + 2**-23)
    c = np.float32(-(1 + 2**-22))
    assert reference.fma_f32(a, a, c) == np.float32(2**-46)   # a*a - c exactly
    assert np.float32(a * a) + c == 0                         # two roundings lose it


def test_out_and_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    weight = ggml_weight(rng, "Q4_0", 16, 64)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = linear(x, weight, out_dtype="f32")
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (2, 16)
    out = np.empty((2, 16), np.float32)
    assert linear(x.float().numpy(), weight, out=out) is out


def test_bad_inputs_are_named():
    rng = np.random.default_rng(3)
    weight = ggml_weight(rng, "Q4_0", 16, 64)
    with pytest.raises(InvalidProblemError, match="last axis must be K=64"):
        linear(np.zeros((2, 32), np.float32), weight)
    with pytest.raises(InvalidProblemError, match="takes f32, f16 or bf16"):
        linear(np.zeros((2, 64), np.float64), weight)
    with pytest.raises(InvalidProblemError, match=r"bias has shape \(8,\)"):
        linear(np.zeros((2, 64), np.float32), weight, bias=np.zeros(8, np.float32))
    with pytest.raises(InvalidProblemError, match="QuantizedWeight"):
        linear(np.zeros((2, 64), np.float32), np.zeros((16, 64)))
    with pytest.raises(InvalidProblemError, match="not a multiple of 32"):
        QuantizedWeight.ggml(np.zeros(18, np.uint8), "Q4_0", (1, 48))
    with pytest.raises(InvalidProblemError, match="holds 18 bytes"):
        QuantizedWeight.ggml(np.zeros(18, np.uint8), "Q4_0", (2, 32))
    with pytest.raises(InvalidProblemError, match="scale has shape"):
        QuantizedWeight.per_group(np.zeros((4, 64), np.int8), np.zeros((4, 3), np.float32),
                                  np.zeros((4, 2), np.int32), 32)
    with pytest.raises(InvalidProblemError, match="takes no bias"):
        LinearDescriptor(weight.descriptor, 1, 16, 64, bias=True, transpose=True)


def test_verify_checks_a_built_linear_kernel():
    """dqgen verify rebuilds a linear kernel's descriptor (its weight nested) from the
    cache entry's record, runs it on a small problem and compares with the reference."""
    from dqgen import jit
    rng = np.random.default_rng(4)
    weight = ggml_weight(rng, "Q4_K", 4, 256)
    desc = LinearDescriptor(weight.descriptor, 1, 4, 256, "f16", "f32", bias=True)
    plan = FormatPlan.select(desc, device="cpu")
    kernel = plan._kernel
    outcome = verify.check_kernel(descriptor_record(desc), "c", kernel.spec.arch,
                                  kernel.entry_dir / "kernel.so", "linear")
    assert outcome.status == verify.OK, str(outcome)
    # the weight's decode is the dequantize kernel's, in the same source
    assert "void dqgen_dequant_ggml_q4_k_f32(" in jit.render_source(kernel.spec).text


@pytest.mark.parametrize("name", ["q4_k", "s8", "u4", "fp8", "q8_0"])
def test_transposed_product_is_the_gradient_of_x(name):
    """``transpose``: dx = dy @ W in the same documented order over n (reference.linear of
    W's transpose), across chunk boundaries of W's columns, on 1 and 2 threads."""
    rng = np.random.default_rng(13)
    weight = {"q4_k": lambda: ggml_weight(rng, "Q4_K", 37, 768),
              "q8_0": lambda: ggml_weight(rng, "Q8_0", 35, 320),
              "fp8": lambda: fp8_weight(rng, 33, 600, (128, 128))}.get(
        name, lambda: WEIGHTS[name](rng))()
    check_transposed(weight, rng, ((1, 1), (3, 2), (17, 2)))


def check_transposed(weight, rng, cases) -> None:
    """dx = dy @ W by the transposed kernel, for each (rows of dy, threads), bit for bit
    reference.linear over W's transpose."""
    n, k = weight.shape
    w = weight.dequantize("f32")
    for m, threads in cases:
        dy = rng.standard_normal((m, n)).astype(ml_dtypes.bfloat16)
        desc = LinearDescriptor(weight.descriptor, m, n, k, "bf16", "f32", transpose=True)
        plan = FormatPlan.select(desc, preference=PlanPreference(num_threads=threads))
        dx = np.empty((m, k), np.float32)
        plan.run({**weight.arrays, "x": dy, "y": dx})
        assert_bits_equal(dx, reference.linear(dy, w.T, None, np.float32))


def test_one_kernel_serves_every_shape():
    """m, n and k are run-time arguments: the source (and so the cache entry) is the same."""
    from dqgen.jit import render_source
    from dqgen.lower import lower
    weight = ggml_weight(np.random.default_rng(6), "Q8_0", 4, 64)
    texts = {render_source(lower(LinearDescriptor(weight.descriptor, m, n, k), "c",
                                 "generic")).text for m, n, k in ((1, 4, 64), (9, 300, 4096))}
    assert len(texts) == 1


def test_aot_emit_and_verify(tmp_path, capsys):
    """dqgen aot --op linear enumerates a weight's three kernels (with and without a bias,
    and x's gradient), emit prints one, verify checks the bundle against the reference."""
    import json

    from dqgen import aot, bundle, cli
    requests = aot.expand({"op": "linear", "weight": "ggml", "ggml_type": "Q4_K",
                           "float": "bf16"})
    assert [r.uri for r in requests] == [
        "linear_dequant_ggml_q4_k_f32_xbf16_ybf16", "linear_dequant_ggml_q4_k_f32_xbf16_ybf16_bias",
        "linear_t_dequant_ggml_q4_k_f32_xbf16_ybf16"]
    assert cli.main(["emit", "linear", "--weight", "dequantize", "--int", "s8", "--float",
                     "f16", "--group-size", "32", "--filter", "*_bias"]) == 0
    assert "void dqgen_linear_dequant_pg_s8_f32_g32_xf16_yf16_bias(" in capsys.readouterr().out
    out = tmp_path / "bundle"
    assert cli.main(["aot", "--op", "linear", "--weight", "fp8", "--float", "f32", "-o",
                     str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["kernels"]) == 3
    outcomes = verify.verify_bundle(bundle.Bundle.open(out))
    assert outcomes and all(o.status == verify.OK for o in outcomes), [str(o) for o in outcomes]


def test_missing_kernel_names_its_aot_command():
    from dqgen.aot_selection import command_for_record
    weight = ggml_weight(np.random.default_rng(8), "Q6_K", 2, 256)
    record = descriptor_record(LinearDescriptor(weight.descriptor, 1, 2, 256, "bf16"))
    assert command_for_record(record, "c", "avx2") == (
        "dqgen aot --op linear --weight ggml --float bf16 --ggml-type Q6_K --target c:avx2 "
        "-o BUNDLE")


@pytest.mark.parametrize("name", ["q4_k", "iq4_xs", "s4", "fp8", "floatzp", "mlx3"])
def test_cuda_text_in_emulation(name, tmp_path):
    """The CUDA kernel (one thread an output, the weight's values from the format's own
    per-element CUDA code) equals the reference bit for bit in host emulation, both
    products, with a bias."""
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    rng = np.random.default_rng(14)
    weight = WEIGHTS[name](rng)
    n, k = weight.shape
    w = weight.dequantize("f32")
    built = {}
    # M = 11, 10, 12, 1: a tile of 8 and one of 3 (rows tested), 2, 4, 1 (a loop each)
    for m, transpose, with_bias in ((11, False, True), (10, False, True), (12, False, True),
                                    (1, False, True), (2, True, False)):
        x = rng.standard_normal((m, n if transpose else k)).astype(ml_dtypes.bfloat16)
        bias = rng.standard_normal(n).astype(ml_dtypes.bfloat16) if with_bias else None
        desc = LinearDescriptor(weight.descriptor, m, n, k, "bf16", "f32", with_bias, transpose)
        y = np.zeros((m, k if transpose else n), np.float32)
        arrays = [*weight.arrays.values(), x, *([bias] if with_bias else []), y]
        built[transpose] = run_emulated(desc, arrays, [m, n, k], y.size, tmp_path / f"{transpose}",
                                        built.get(transpose))
        assert_bits_equal(y, reference.linear(x, w.T if transpose else w, bias, np.float32))


@pytest.mark.parametrize("qtype", sorted(ggml_type_name(t) for t in GGML_BLOCK_BYTES))
def test_cuda_reads_every_ggml_type_in_emulation(qtype, tmp_path):
    """The CUDA forward product of every GGML type (a block's d and m read once, then the
    lane's values in it) equals the reference bit for bit in host emulation."""
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    rng = np.random.default_rng(18)
    layout = parse_ggml_type(qtype)
    values = GGML_BLOCK_VALUES[layout]
    n, k = 5, 2 * max(values, 16)
    if qtype in gguf.GGMLQuantizationType.__members__:
        weight = ggml_weight(rng, qtype, n, k)
    else:   # a type newer than gguf-py: random blocks, d a small normal f16
        blocks = rng.integers(0, 256, (n * k // values, GGML_BLOCK_BYTES[layout]), dtype=np.uint8)
        d = LAYOUTS[layout].d
        blocks[:, d.offset:d.offset + 2] = np.array([0.01], np.float16).view(np.uint8)
        weight = QuantizedWeight.ggml(blocks.reshape(n, -1), qtype, (n, k))
    built = None
    for m in (3, 1):   # rows tested; a tile of 1
        x = rng.standard_normal((m, k)).astype(np.float16)
        desc = LinearDescriptor(weight.descriptor, m, n, k, "f16", "f32")
        y = np.zeros((m, n), np.float32)
        built = run_emulated(desc, [*weight.arrays.values(), x, y], [m, n, k], y.size, tmp_path,
                             built)
        assert_bits_equal(y, reference.linear(x, weight.dequantize("f32"), None, np.float32))


def test_nvrtc_compiles_the_cuda_text():
    from dqgen.build import nvrtc
    from dqgen.lower import lower
    from dqgen.render import render
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    rng = np.random.default_rng(15)
    for name in ("q4_k", "u4", "fp8", "floatzp", "mlx3"):
        weight = WEIGHTS[name](rng)
        for transpose in (False, True):
            desc = LinearDescriptor(weight.descriptor, 0, 0, 0, "f16", bias=not transpose,
                                    transpose=transpose)
            source = render(lower(desc, "cuda", "sm_90"))
            assert source.entry.encode() in nvrtc.compile_cuda(source.text, name=desc.uri,
                                                               arch="sm_90").ptx


def _torch_of(torch, arr):
    """A CPU torch tensor of ``arr``'s values (bf16 through its bits: numpy has no bf16)."""
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_on_a_gpu(name):
    """The CUDA plan on a device equals the reference for every weight family, x dtype, M
    and both products, with and without a bias (where a GPU is)."""
    from dqgen.runtime import cuda as cuda_runtime
    reason = cuda_runtime.cuda_unavailable_reason()
    if reason:
        pytest.skip(f"no CUDA device: {reason}")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    weight = WEIGHTS[name](rng)
    n, k = weight.shape
    w = weight.dequantize("f32")
    on_gpu = {a: _torch_of(torch, np.ascontiguousarray(v)).cuda() for a, v in weight.arrays.items()}
    for x_name, m, transpose in ((x, m, t) for x in DTYPES for m in MS for t in (False, True)):
        with_bias = not transpose and m % 2 == 1
        x = rng.standard_normal((m, n if transpose else k)).astype(DTYPES[x_name])
        bias = rng.standard_normal(n).astype(DTYPES[x_name]) if with_bias else None
        desc = LinearDescriptor(weight.descriptor, m, n, k, x_name, "f32", with_bias, transpose)
        plan = FormatPlan.select(desc, device="cuda")
        arrays = dict(on_gpu, x=_torch_of(torch, x).cuda())
        if with_bias:
            arrays["bias"] = _torch_of(torch, bias).cuda()
        arrays["y"] = torch.empty((m, k if transpose else n), device="cuda")
        plan.run(arrays)
        torch.cuda.synchronize()
        assert_bits_equal(arrays["y"].cpu().numpy(),
                          reference.linear(x, w.T if transpose else w, bias, np.float32))


def test_transposed_product_in_passes_over_x():
    """More rows of x than one pass's lane sums hold (256 a 256-column chunk): the passes
    give the one result."""
    rng = np.random.default_rng(17)
    weight = ggml_weight(rng, "Q8_0", 20, 320)
    dy = rng.standard_normal((300, 20)).astype(np.float32)
    desc = LinearDescriptor(weight.descriptor, 300, 20, 320, transpose=True)
    dx = np.empty((300, 320), np.float32)
    FormatPlan.select(desc, device="cpu").run({**weight.arrays, "x": dy, "y": dx})
    assert_bits_equal(dx, reference.linear(dy, weight.dequantize("f32").T, None, np.float32))
