"""Real checkpoint layouts (FORMATS.md): GPTQ, AWQ, GGML blocks, float zero points, and
a checkpoint converter. Each is a layout in the descriptor IR run by the same compiler
(lower -> render -> build -> cache), not a separate pipeline."""
