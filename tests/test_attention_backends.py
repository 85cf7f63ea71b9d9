"""A half-only attention backend given float32 inputs runs as SDPA's own choice (the GPU case, where forced flash
stopped a float32 audit re-run, is in test_model_gpu.py; on the CPU forced cuDNN has no kernel at all)."""
from __future__ import annotations

import torch

from metattt.model.attention import HALF_ONLY, causal_attention


def test_half_only_backends_in_float32_match_math():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 4, 8), torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    ref = causal_attention(q, k, v, "math")
    for backend in HALF_ONLY:
        if backend == "flash":
            continue  # needs the flash-attn package
        assert torch.allclose(causal_attention(q, k, v, backend), ref, atol=1e-5), backend
