"""What ``dqgen aot`` enumerates (dqgen/aot_selection.py, re-exported by dqgen.aot): flags
and manifests expand to a deduplicated, sorted product of kernel requests, with defaults
and filters, and a bad selection or manifest is refused naming the bad part."""

from __future__ import annotations

import json
import textwrap

import pytest

from dqgen import aot
from dqgen.errors import DqgenError, InvalidProblemError
from dqgen.isa import host_isa

HOST = host_isa()


def test_expand_is_a_deduplicated_sorted_product():
    reqs = aot.expand({"op": ["dequantize", "dequantize-backward"], "int": "s8,u8",
                       "float": ["f16", "bf16"], "group_size": [64, "128"],
                       "target": ["c:generic", "cuda:sm_90"]})
    # dequantize: 2 ints x 2 floats x 2 groups; backward has no int: 2 x 2; x 2 targets.
    assert len(reqs) == (8 + 4) * 2
    assert reqs == sorted(reqs)
    assert {r.target + ":" + r.arch for r in reqs} == {"c:generic", "cuda:sm_90"}
    assert all(r.int_dtype is None for r in reqs if r.op == "dequantize-backward")


def test_expand_defaults_and_filters():
    reqs = aot.expand({"filter": "quant_pg_[su]8_*"})  # all ops, s8/u8, 4 floats, g128, host c
    assert {r.uri for r in reqs} == {f"quant_pg_{i}_{f}_g128" for i in ("s8", "u8")
                                     for f in ("f32", "f64", "f16", "bf16")}
    assert {r.arch for r in reqs} == {HOST}
    narrowed = aot.narrow(reqs, ["*_bf16_*", "*_f64_*"])
    assert {r.float_dtype for r in narrowed} == {"bf16", "f64"}


@pytest.mark.parametrize("selection, message", [
    ({"op": "transpose"}, "op 'transpose'"),
    ({"float": "f8"}, "f8"),
    ({"group_size": 0}, "group_size"),
    ({"target": "metal"}, "target 'metal'"),
    ({"target": "cuda:sm90"}, "sm90"),
    ({"target": "c:avx9"}, "avx9"),
    ({"dtypes": "s8"}, "unknown selection key"),
])
def test_bad_selections_are_named(selection, message):
    with pytest.raises(DqgenError, match=message):
        aot.expand(selection)


def test_manifest_toml_and_json_select_the_same_kernels(tmp_path):
    toml = tmp_path / "kernels.toml"
    toml.write_text(textwrap.dedent("""\
        filter = ["dequant_pg_*"]
        op = ["dequantize", "quantize"]
        int = "s8"
        float = ["f16", "bf16"]
        group_size = [64, 128]
        target = "c:generic"

        [[kernels]]
        op = "dequantize-backward"
        float = "f32"
        group_size = 32
        target = ["c:avx2", "cuda:sm_90"]
        """))
    js = tmp_path / "kernels.json"
    js.write_text(json.dumps({
        "filter": ["dequant_pg_*"], "op": ["dequantize", "quantize"], "int": "s8",
        "float": ["f16", "bf16"], "group_size": [64, 128], "target": "c:generic",
        "kernels": [{"op": "dequantize-backward", "float": "f32", "group_size": 32,
                     "target": ["c:avx2", "cuda:sm_90"]}]}))
    results = []
    for path in (toml, js):
        selections, filters = aot.read_manifest(path)
        results.append(aot.narrow(aot.enumerate_kernels(selections), filters))
    assert results[0] == results[1]
    uris = [r.uri for r in results[0]]
    assert "quant_pg_s8_f16_g64" not in uris  # the top-level filter removed quantize
    assert uris.count("dequant_pg_bwd_f32_g32") == 2
    assert len(results[0]) == 4 + 2


@pytest.mark.parametrize("text, message", [
    ("op = [", "not valid TOML"),
    ("", "selects no kernels"),
    ("kernels = 3", "list of tables"),
    ("colour = 'red'", "unknown selection key"),
])
def test_bad_manifests_are_named(tmp_path, text, message):
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(InvalidProblemError, match=message):
        aot.enumerate_kernels(aot.read_manifest(path)[0])
