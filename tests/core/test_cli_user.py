"""The command line as a new user meets it: demo's sizes, cache info that only looks,
emit for every op aot builds (the same source the JIT compiles), emit --ir of a CUDA
kernel, and a GPTQ kernel with AutoGPTQ's zero rule built ahead of time from the command
a missing kernel names."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dqgen import aot, bundle, cli, jit, plans
from dqgen import errors as dqgen_errors
from dqgen.formats import pack
from dqgen.ir import (AwqDequantizeDescriptor, DequantizeFloatZeroDescriptor,
                      DequantizePerGroupDescriptor, GgmlDequantizeDescriptor,
                      GptqDequantizeDescriptor, HqqDequantizeDescriptor)
from dqgen.lower import lower
from dqgen.spec import KernelSpec
from oracles import checkpoints as oracle


def run(capsys, *argv):
    """``dqgen ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help, usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def _no_bundles_leak():
    yield
    bundle.unload_all()


def forget_loaded_kernels(monkeypatch):
    """Kernels this process loaded earlier are not looked up again (as in a new process)."""
    monkeypatch.setattr(jit, "_memo", {})
    monkeypatch.setattr(plans, "_plan_memo", {})


# --- demo ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--rows", "0"], "argument --rows: 0 must be at least 1"),
    (["--rows", "-5"], "argument --rows: -5 must be at least 1"),
    (["--cols", "0"], "argument --cols: 0 must be at least 1"),
    (["--repeat", "0"], "argument --repeat: 0 must be at least 1"),
    (["--group-size", "0"], "argument --group-size: 0 must be at least 1"),
    (["--rows", "two"], "argument --rows: 'two' is not a whole number"),
    (["--rows", "2", "--cols", "100", "--group-size", "64"],
     "--cols 100 is not a multiple of --group-size 64"),
    (["--rows", str(10**9), "--cols", str(10**9)], "needs about"),
])
def test_demo_sizes_are_checked_in_the_users_terms(capsys, argv, message):
    status, out, err = run(capsys, "demo", *argv)
    assert status == 2 and out == "" and message in err and "Traceback" not in err


def test_demo_options_say_what_they_do(capsys):
    status, out, _ = run(capsys, "demo", "--help")
    assert status == 0
    for option, words in [("--rows", "rows of the weight"), ("--cols", "columns"),
                          ("--group-size", "share a scale"), ("--repeat", "timed runs")]:
        line = next(line for line in out.splitlines() if line.strip().startswith(option))
        assert words in line + out.split(line, 1)[1].split("--", 1)[0], option


# --- cache info ------------------------------------------------------------------------

def test_cache_info_creates_nothing(capsys, tmp_path, monkeypatch):
    root = tmp_path / "not-yet" / "cache"
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(root))
    status, out, _ = run(capsys, "cache", "info")
    assert status == 0 and not (tmp_path / "not-yet").exists()
    assert f"dir      {root} (does not exist yet)" in out and "entries  0" in out


# --- emit: every op aot builds ---------------------------------------------------------

# (emit arguments, a descriptor of the kernel they name): the C ones are the kernels
# test_aot_formats builds for the generic ISA, reused through the cache
FORMAT_KERNELS = [
    (["gptq", "--float", "f16", "--act-order", "no"], GptqDequantizeDescriptor(256, 64, 128)),
    (["gptq", "--float", "f16", "--act-order", "yes", "--v1-zeros", "autogptq"],
     GptqDequantizeDescriptor(64, 64, 32, act_order=True, v1_zeros="autogptq")),
    (["awq", "--float", "bf16"], AwqDequantizeDescriptor(256, 64, 128, float_dtype="bf16")),
    (["ggml", "--ggml-type", "Q4_0", "--float", "f32"], GgmlDequantizeDescriptor(2, "Q4_0")),
    (["packed", "--int", "u4", "--float", "f16", "--group-size", "32", "--filter", "dequant_*"],
     DequantizePerGroupDescriptor(2, 64, 32, "f16", "u4")),
    (["floatzp", "--int", "u4", "--float", "bf16", "--group-size", "32"],
     DequantizeFloatZeroDescriptor(2, 64, 32, "bf16", "u4")),
    (["hqq", "--bits", "3", "--float", "f16"], HqqDequantizeDescriptor(4, 64, 64, "f16", 3, 24)),
    (["floatzp", "--int", "u4", "--float", "f16", "--group-size", "32", "--q-min", "0",
      "--q-max", "14"], DequantizeFloatZeroDescriptor(2, 64, 32, "f16", "u4", 0, 14)),
]


@pytest.mark.parametrize("argv, desc", FORMAT_KERNELS, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_emit_prints_the_format_kernel_the_jit_compiles(capsys, argv, desc):
    """The text emit prints is the source the JIT builds (and so compiles) for the
    descriptor a format's plain function makes."""
    status, out, err = run(capsys, "emit", *argv, "--arch", "generic")
    assert status == 0, err
    kernel = jit.get_kernel(desc, "c", "generic")
    assert out == kernel.source.text and f"dqgen_{desc.uri}(" in out


@pytest.mark.parametrize("argv, desc", FORMAT_KERNELS, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_emit_prints_the_format_kernels_cuda_source(capsys, argv, desc):
    status, out, err = run(capsys, "emit", *argv, "--target", "cuda", "--arch", "sm_80")
    assert status == 0, err
    assert out == jit.render_source(lower(desc, "cuda", "sm_80")).text and "sm_80" in out


@pytest.mark.parametrize("argv, message", [
    (["awq", "--float", "f16", "--bits", "4"], "awq takes no --bits"),
    (["ggml", "--ggml-type", "Q4_0", "--float", "f32", "--group-size", "32"],
     "ggml takes no --group-size"),
    (["dequantize", "--int", "s8", "--float", "f16", "--group-size", "32", "--v1-zeros",
      "autogptq"], "dequantize takes no --v1-zeros"),
    (["gptq", "--float", "f16"], "name 2 (dequant_gptq4_v1_f16_f16_g128, "
     "dequant_gptq4_v1_f16_f16_gidx): choose with --act-order"),
    (["ggml", "--float", "f32"], "choose with --ggml-type"),
    (["hqq"], "choose with --float"),
    (["packed", "--int", "u4", "--float", "f16", "--group-size", "32"],
     "choose with --filter (e.g. --filter dequant_pg_u4_f16_g32)"),
    (["gptq", "--float", "f16", "--act-order", "no", "--filter", "awq*"], "--filter matches none"),
    (["gptq", "--float", "f16", "--act-order", "no", "--v1-zeros", "vllm"],
     "v1_zeros 'vllm' is not one of gptqmodel, autogptq, exllama"),
    (["ggml", "--ggml-type", "Q9_9", "--float", "f32"], "Q9_9"),
])
def test_emit_format_errors_name_the_flags(capsys, argv, message):
    status, out, err = run(capsys, "emit", *argv)
    assert status == 2 and out == "" and err.startswith("dqgen: error: ") and message in err


def test_emit_ir_of_a_cuda_kernel_prints_the_cuda_schedule(capsys):
    status, out, _ = run(capsys, "emit", "dequantize", "--int", "s8", "--float", "bf16",
                         "--group-size", "128", "--target", "cuda", "--ir")
    assert status == 0
    knobs = json.loads(out.split("# KernelSpec", 1)[1].split("\n", 1)[1])
    assert knobs["target"] == "cuda" and knobs["threads_per_block"] > 0
    assert "vector_streams" in knobs and "grid_waves" in knobs
    x86 = [k for k in knobs if k.startswith(("vec_", "simd_", "register_", "streaming_"))
           or k in ("parallel_min_elements", "int_widen", "tail_mask", "half_path")]
    assert x86 == []


def test_each_targets_knobs_are_kernel_spec_fields():
    fields = {f.name for f in dataclasses.fields(KernelSpec)}
    assert cli.C_ONLY_KNOBS <= fields and cli.CUDA_ONLY_KNOBS <= fields
    assert not cli.C_ONLY_KNOBS & cli.CUDA_ONLY_KNOBS


# --- aot: AutoGPTQ's and exllama's v1 rules ----------------------------------------------

def test_aot_builds_every_v1_rule(capsys, tmp_path):
    status, out, err = run(capsys, "aot", "--op", "gptq", "--float", "f16", "--act-order", "no",
                           "--v1-zeros", "gptqmodel,autogptq", "--v1-zeros", "exllama",
                           "--checkpoint-format", "gptq,gptq_v2", "--target", "c:generic",
                           "-o", str(tmp_path / "b"), "--dry-run")
    assert status == 0, err
    assert [line.split("\t")[0] for line in out.splitlines()] == [
        "dequant_gptq4_v1_autogptq_f16_f16_g128", "dequant_gptq4_v1_exllama_f16_f16_g128",
        "dequant_gptq4_v1_f16_f16_g128", "dequant_gptq4_v2_f16_f16_g128"]
    manifest = tmp_path / "m.toml"
    manifest.write_text('op = "gptq"\nfloat = "f16"\nact_order = "yes"\nv1_zeros = "exllama"\n')
    assert [r.uri for r in aot.enumerate_kernels(aot.read_manifest(manifest)[0])] == [
        "dequant_gptq4_v1_exllama_f16_f16_gidx"]


@pytest.mark.parametrize("desc, flags", [
    (GptqDequantizeDescriptor(64, 32, 16, v1_zeros="autogptq"), "--v1-zeros autogptq"),
    (GptqDequantizeDescriptor(64, 32, 16, act_order=True, v1_zeros="exllama"),
     "--act-order yes --scale f16 --v1-zeros exllama"),
    (DequantizeFloatZeroDescriptor(2, 64, 32, "f16", "u4", q_min=0, q_max=7),
     "--q-min 0 --q-max 7"),
])
def test_every_missing_format_kernel_names_the_command_that_builds_it(monkeypatch, tmp_path,
                                                                       desc, flags):
    """JIT off, nothing cached: the error's dqgen aot command selects exactly this kernel."""
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DQGEN_DISABLE_JIT", "1")
    monkeypatch.delenv("DQGEN_BUNDLE", raising=False)
    forget_loaded_kernels(monkeypatch)
    with pytest.raises(dqgen_errors.MissingKernelError, match=desc.uri) as info:
        jit.get_kernel(desc, "c", "generic")
    hint = str(info.value).split("Build it ahead of time with: ")[1]
    assert flags in hint
    args = hint.split()[2:-2]  # drop "dqgen aot" and "-o BUNDLE"
    selection = {k[2:].replace("-", "_"): v for k, v in zip(args[0::2], args[1::2])}
    assert [r.descriptor().key() for r in aot.expand(selection)] == [
        aot.request_of(desc, "c", "generic").descriptor().key()]


def test_convert_without_jit_names_the_aot_command_for_autogptqs_rule(capsys, tmp_path,
                                                                        monkeypatch):
    """JIT off, nothing cached: convert --v1-zeros autogptq fails naming the dqgen aot
    command; that command builds a bundle with which the same convert succeeds."""
    st = pytest.importorskip("safetensors.numpy", reason="checkpoints are safetensors")
    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, (64, 32))
    zeros = rng.integers(1, 16, (2, 32))
    qweight, qzeros = pack.pack_gptq(q, zeros, 4, "gptq", v1_zeros="autogptq")
    scales = (rng.random((2, 32)) + 0.5).astype(np.float16)
    src = tmp_path / "gptq.safetensors"
    st.save_file({"layer.qweight": qweight, "layer.qzeros": qzeros, "layer.scales": scales},
                 str(src))
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DQGEN_DISABLE_JIT", "1")
    monkeypatch.delenv("DQGEN_BUNDLE", raising=False)
    forget_loaded_kernels(monkeypatch)
    convert = ["convert", str(src), str(tmp_path / "out.safetensors"), "--quiet",
               "--format", "gptq", "--group-size", "32", "--v1-zeros", "autogptq"]
    status, _, err = run(capsys, *convert)
    assert status == 2 and "dequant_gptq4_v1_autogptq_f16_f16_g32" in err, err
    hint = err.split("Build it ahead of time with: ")[1].strip()
    assert hint.startswith("dqgen aot --op gptq") and "--v1-zeros autogptq" in hint
    assert not (tmp_path / "out.safetensors").exists()

    monkeypatch.delenv("DQGEN_DISABLE_JIT")
    argv = hint.split()[1:-1] + [str(tmp_path / "bundle"), "--quiet"]
    assert run(capsys, *argv)[0] == 0
    monkeypatch.setenv("DQGEN_DISABLE_JIT", "1")
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("DQGEN_BUNDLE", str(tmp_path / "bundle"))
    forget_loaded_kernels(monkeypatch)
    status, _, err = run(capsys, *convert)
    assert status == 0, err
    got = st.load_file(str(tmp_path / "out.safetensors"))["layer.weight"]
    want = oracle.gptq_dequantize(qweight, qzeros, scales, None, 4, "gptq", np.float16, 32,
                                  "autogptq")
    assert np.array_equal(got.view(np.uint16), np.ascontiguousarray(want.T).view(np.uint16))


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    parser = cli.build_parser()
    args = parser.parse_args(["cache", "info"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args, interrupted))
    assert cli.main(["cache", "info"]) == 130
    err = capsys.readouterr().err
    assert err == "dqgen: interrupted\n"


class _Fixed:
    """A parser that hands back ``args`` whose command raises."""

    def __init__(self, parser, args, func):
        self.parser, self.args = parser, args
        self.args.func = func

    def parse_args(self, argv):
        return self.args


def test_aot_jobs_are_bounded_by_the_cpus(tmp_path, capsys):
    out = tmp_path / "bundle"
    status = cli.main(["aot", "--op", "dequantize", "--int", "s8", "--float", "f32",
                       "--group-size", "128", "-j", "100000", "-o", str(out), "-q"])
    assert status == 0 and (out / "manifest.json").is_file()
    assert "--jobs 100000 lowered to" in capsys.readouterr().err
