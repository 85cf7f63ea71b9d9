"""GPU-only model checks: the forced SDPA kernels and the compiled fast path agree with the reference paths."""
from __future__ import annotations

import pytest
import torch

from metattt.model import BankedGPT, Runtime, pg_2026_03_23

pytestmark = pytest.mark.gpu


def _model(seed: int = 0) -> BankedGPT:
    torch.manual_seed(seed)
    model = BankedGPT(pg_2026_03_23()).cuda()
    with torch.no_grad():  # output-side banks are zero at init; give every path something to carry
        for name, p in model.named_parameters():
            if "bank" in name:
                p.normal_(0.0, 0.03)
    return model


@pytest.mark.parametrize("backend", ["sdpa-flash", "sdpa-cudnn", "sdpa-repeat"])
def test_forced_sdpa_kernels_match_math(backend):
    model = _model()
    tok = torch.randint(0, 1024, (2, 257), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(tok[:, :-1], tok[:, 1:], reduction="none", attn="math")
        got = model(tok[:, :-1], tok[:, 1:], reduction="none", attn=backend)
    assert (got - ref).abs().mean() < 2e-2 * ref.mean()


def test_compiled_fast_path_matches_eager_reference():
    """bf16 residual + fused QKV + compile_core (the training fast path) vs the eager fp32-residual model."""
    model = _model(1)
    tok = torch.randint(0, 1024, (4, 513), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(tok[:, :-1], tok[:, 1:])
        g_ref = torch.autograd.grad(ref, [model.qo_bank, model.mlp_up_bank, model.ve_scales])
        model.runtime = Runtime(residual_dtype="bfloat16", fused_qkv=True)
        model.compile_core()
        got = model(tok[:, :-1], tok[:, 1:])
        g_got = torch.autograd.grad(got, [model.qo_bank, model.mlp_up_bank, model.ve_scales])
    assert abs(got.item() - ref.item()) < 1e-2 * ref.item()
    for a, b in zip(g_got, g_ref):
        cos = torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0)
        assert cos > 0.98, cos


@pytest.mark.parametrize("backend", ["sdpa-flash", "sdpa-cudnn"])
def test_half_only_backend_in_float32_runs_as_sdpa(backend):
    """The audit re-runs record-numerics evaluations (SDPA flash forced) in float32: that stopped an H100 run with
    "No available kernel" before half-only backends gave way to SDPA's choice for float32 inputs."""
    model = _model()
    tok = torch.randint(0, 1024, (2, 129), device="cuda")
    ref = model(tok[:, :-1], tok[:, 1:], reduction="none", attn="math")
    got = model(tok[:, :-1], tok[:, 1:], reduction="none", attn=backend)
    assert (got - ref).abs().max() < 1e-3
