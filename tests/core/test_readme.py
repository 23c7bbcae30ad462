"""Every ```python block of README.md runs verbatim, in order, in one namespace.

A snippet may use names an earlier one defined (``w``, ``q``, ``scale``, ...). The rest
come from the preamble below, which is what the README's text says they are:

- ``qweight, qzeros, scales, g_idx``: one act-order GPTQ layer (4 bits, groups of 128),
  ``awq_qweight, awq_qzeros, awq_scales``: one AutoAWQ GEMM layer, both as torch tensors
  (as ``safetensors.torch`` loads them), made with ``dqgen.formats.pack``'s quantizers;
- ``block_bytes``: uint8 rows of whole Q4_K blocks (finite scales);
- the GGUF snippet's ``"model-Q4_K_M.gguf"`` is replaced by the path of a small file
  written with gguf-py (only the path changes), holding ``blk.0.attn_q.weight``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the README's last snippet uses dqgen.torch")
gguf = pytest.importorskip("gguf", reason="the GGUF snippet reads a file gguf-py writes")

from dqgen.formats import ggml, pack  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
GGUF_NAME = '"model-Q4_K_M.gguf"'


def snippets() -> list[str]:
    """The ```python blocks of README.md, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def q4_k_blocks(rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[rows, blocks * 144]`` Q4_K bytes: random fields, finite positive d/dmin."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, blocks * ggml.block_bytes("Q4_K")), dtype=np.uint8)
    per_block = data.reshape(rows * blocks, -1)
    halves = rng.uniform(0.001, 0.1, (rows * blocks, 2)).astype(np.float16)
    per_block[:, :4] = halves.view(np.uint8)
    return data


def write_gguf(path: Path, q4_k: np.ndarray) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("readme")
    writer.add_tensor("blk.0.attn_q.weight", q4_k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def preamble(tmp_path: Path) -> dict:
    """The names the README's text describes and no snippet defines."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 128)).astype(np.float32)
    g = pack.quantize_gptq(weight, 128, bits=4, perm=rng.permutation(256))
    a = pack.quantize_awq(weight, 128)
    names = {k: torch.from_numpy(v) for k, v in g.items()}
    names.update({f"awq_{k}": torch.from_numpy(v) for k, v in a.items()})
    names["block_bytes"] = q4_k_blocks(2, 2)
    write_gguf(tmp_path / "model.gguf", names["block_bytes"])
    return names


def test_readme_has_its_snippets():
    """The extraction finds the blocks this test is about (a renamed fence would skip one)."""
    found = snippets()
    assert len(found) == 6, [s.splitlines()[0] for s in found]
    assert sum(GGUF_NAME in s for s in found) == 1


def _family(ns) -> None:
    """The 4-bit lines choose qparams for u4: every value comes back within half a step
    (u8 qparams saturated about 98% of the nibbles at 15)."""
    assert ns["q4"].dtype == np.uint8 and ns["q4"].shape == (1024, 2048)
    half_step = np.repeat(ns["scale4"], 128, axis=1) / 2
    assert np.all(np.abs(ns["w4"] - ns["w"]) <= half_step * (1 + 1e-6))


def _formats(ns) -> None:
    assert ns["w16"].shape == (256, 128) and ns["w16"].dtype == torch.float16
    assert ns["y"].shape == (2, 512) and np.isfinite(ns["y"]).all()


def _gguf(ns) -> None:
    assert ns["w"].shape == (2, 512) and ns["name"] == "blk.0.attn_norm.weight"


def _float_zero(ns) -> None:
    """torchao's float zero points (u4, groups of 128) on the weight the GGUF snippet read
    (bf16): packed, and back within one step."""
    w = ns["w"].astype(np.float32)
    assert ns["q"].shape == (2, 256) and ns["w2"].dtype == ns["w"].dtype
    step = np.repeat(ns["scale"].astype(np.float32), 128, axis=1)
    assert np.all(np.abs(ns["w2"].astype(np.float32) - w) <= step)


def _torch(ns) -> None:
    """f32 math and result from bf16 scales: ``(q - zp) * f32(bf16(scale))``."""
    assert ns["w_fq"].shape == (256, 512) and ns["w16"].dtype == torch.float16
    q, zp, scale = ns["q"], ns["zp"], ns["scale"].bfloat16().float()
    diff = (q.to(torch.int64) - zp.repeat_interleave(128, -1)).float()
    assert ns["w32"].dtype == torch.float32
    assert torch.equal(ns["w32"], diff * scale.repeat_interleave(128, -1))


def _linear(ns) -> None:
    """x @ W.T of the Q4_K weight the formats snippet dequantized, and the GPTQ layer as a
    module: shapes, dtypes, and the values of the weights they say they hold."""
    assert ns["y"].shape == (4, 2) and ns["y"].dtype == torch.bfloat16
    assert ns["out"].shape == (3, 128) and ns["layer"].in_features == 256
    w = ns["wq"].dequantize("f32")
    assert np.array_equal(w, ggml.dequantize(ns["block_bytes"], "Q4_K", dtype="f32").reshape(2, 512))


CHECKS = [_family, _formats, _gguf, _float_zero, _torch, _linear]


def test_readme_snippets_run_verbatim(tmp_path):
    """Each block as written (the GGUF path only substituted), then what it claims."""
    namespace = {"__name__": "readme"}
    namespace.update(preamble(tmp_path))
    found = snippets()
    assert len(found) == len(CHECKS)
    for i, (code, check) in enumerate(zip(found, CHECKS)):
        code = code.replace(GGUF_NAME, repr(str(tmp_path / "model.gguf")))
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        check(namespace)
