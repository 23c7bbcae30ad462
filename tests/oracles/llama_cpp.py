"""GGML types llama.cpp added after gguf-py 0.19 (which cannot dequantize them, and does
not name Q2_0), computed as llama.cpp's dequantize_row_q1_0 / _q2_0 do: written from that
C's semantics and checked against it (tests/formats/ggml/test_formats_gguf_types.py::
test_llama_cpp_itself, with GGML_BASE_LIB set)."""

from __future__ import annotations

import numpy as np

# (values, bytes) a block, from llama.cpp's ggml-common.h.
NEWER_THAN_GGUF_PY = {"Q1_0": (128, 18), "Q2_0": (64, 18)}


def llama_cpp_rows(data: np.ndarray, qtype: str) -> np.ndarray:
    """f32 values of ``data`` (``[..., n * 18]`` bytes): the block's f16 d widened, then bit
    (j % 8) of byte j / 8 picking d or -d (Q1_0), or (the 2-bit field at bit 2 (j % 4) of
    byte j / 4, minus 1) times d (Q2_0)."""
    rows = np.ascontiguousarray(data).reshape(-1, 18)
    d = rows[:, :2].copy().view(np.float16).astype(np.float32)
    qs = rows[:, 2:]
    if qtype == "Q1_0":
        bits = ((qs[:, :, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(len(rows), 128)
        y = np.where(bits == 1, d, -d)
    else:
        q = ((qs[:, :, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3).reshape(len(rows), 64)
        with np.errstate(all="ignore"):
            y = (q.astype(np.float32) - 1) * d
    return y.reshape(*data.shape[:-1], -1)
