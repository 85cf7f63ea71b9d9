"""FP8 bank GEMMs (``metattt.kernels.fp8``, ``Runtime(fp8=True)``) on the CPU: ``torch._scaled_mm`` runs there too.

Error bounds. Round-to-nearest into a format with p mantissa bits changes each element by at most u = 2^-(p+1)
of its magnitude: u = 1/16 for e4m3 (p=3), 1/8 for e5m2 (p=2); per-tensor scaling to amax keeps the operands
of these tests out of the subnormal range. For a product of two independently rounded zero-mean operands the
rounding errors are uncorrelated, so the relative Frobenius error of the product is at most about
sqrt(u_a² + u_b²): 0.088 for the forward (e4m3 x e4m3) and 0.140 for both gradients (e5m2 dY with an e4m3
operand). Measured values are about 40% of that (uniform rounding errors have rms u/√3, less where a value sits
high in its binade), so the bounds have margin without being loose enough to hide a wrong scale (a scale off by
one factor of two would put every element at 100% error)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metattt.kernels import fp8
from metattt.model import BankedGPT, Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tiny import tiny_config  # noqa: E402

FWD_BOUND = math.hypot(2 ** -4, 2 ** -4)  # e4m3 x e4m3
BWD_BOUND = math.hypot(2 ** -3, 2 ** -4)  # e5m2 dY x e4m3 W or X


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def _case(seed: int = 0, shape: tuple[int, ...] = (2, 64, 128), n: int = 96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_()
    w = (torch.randn(n, shape[-1], generator=g) * 0.05).requires_grad_()  # a different scale than x: per-tensor scales
    dy = torch.randn(*shape[:-1], n, generator=g) * 3.0
    return x, w, dy


def test_fp8_linear_matches_float64_within_fp8_precision():
    x, w, dy = _case()
    y = fp8.fp8_linear(x, w)
    y.backward(dy)
    xd, wd, gd = x.detach().double(), w.detach().double(), dy.double()
    ref_y = xd @ wd.T
    ref_dx = gd @ wd
    ref_dw = gd.reshape(-1, gd.size(-1)).T @ xd.reshape(-1, xd.size(-1))
    assert y.shape == (2, 64, 96) and y.dtype == x.dtype
    assert x.grad is not None and w.grad is not None and x.grad.dtype == w.grad.dtype == torch.float32
    errs = _rel(y, ref_y), _rel(x.grad, ref_dx), _rel(w.grad, ref_dw)
    assert errs[0] < FWD_BOUND and errs[1] < BWD_BOUND and errs[2] < BWD_BOUND, errs
    # (c) the FP8 path really ran: plain fp32 F.linear would be exact to ~1e-7 here, fp8 is not
    assert min(errs) > 1e-3, errs
    assert _rel(F.linear(x, w), ref_y) < 1e-5  # the reference itself is right


def test_fp8_linear_calls_scaled_mm(monkeypatch):
    """One ``_scaled_mm`` forward and two backward; a silent fall-back to F.linear would call it zero times."""
    calls: list[tuple[torch.dtype, torch.dtype]] = []
    real = torch._scaled_mm

    def counting(a, b, *args, **kw):
        calls.append((a.dtype, b.dtype))
        assert a.stride(-1) == 1 and b.stride(0) == 1, "first operand row-major, second column-major"
        return real(a, b, *args, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    x, w, dy = _case(1)
    fp8.fp8_linear(x, w).backward(dy)
    assert calls == [(fp8.E4M3, fp8.E4M3), (fp8.E5M2, fp8.E4M3), (fp8.E5M2, fp8.E4M3)]


def test_fp8_linear_autocast_dtypes():
    """Under bf16 autocast the output is bf16 (as F.linear's); fp32 inputs and weights get fp32 gradients."""
    x, w, dy = _case(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8.fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert x.grad is not None and w.grad is not None
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert _rel(y, x.detach().double() @ w.detach().double().T) < FWD_BOUND + 2 ** -8  # plus bf16 output rounding


def test_fp8_linear_zero_input_is_finite():
    x = torch.zeros(32, 64, requires_grad=True)
    w = torch.randn(16, 64, requires_grad=True)
    y = fp8.fp8_linear(x, w)
    y.backward(torch.randn_like(y))
    assert torch.equal(y, torch.zeros_like(y))
    assert x.grad is not None and w.grad is not None
    assert torch.isfinite(x.grad).all() and torch.equal(w.grad, torch.zeros_like(w))


def test_fp8_linear_falls_back_for_unsupported_shapes():
    x = torch.randn(3, 5, 64)  # M = 15: not a multiple of 16
    w = torch.randn(32, 64)
    assert fp8.unsupported_reason(x, w) is not None and fp8.unsupported_reason(x[:2, :4].repeat(1, 2, 1), w) is None
    with pytest.warns(UserWarning, match="multiples of 16"):
        y = fp8.fp8_linear(x, w)
    assert torch.equal(y, F.linear(x, w))


def _randomize(model: BankedGPT) -> BankedGPT:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("fused_qkv", [True, False])
def test_tiny_model_fp8_loss_close_and_grads_finite(fused_qkv):
    cfg = tiny_config()  # model_dim 32, head_dim 16, kv_dim 16, mlp hidden 64: all multiples of 16
    model = _randomize(BankedGPT(cfg, Runtime(fused_qkv=fused_qkv)))
    tok = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))  # M = 64
    ref = model(tok[:, :-1], tok[:, 1:])
    model.runtime = Runtime(fused_qkv=fused_qkv, fp8=True)
    loss = model(tok[:, :-1], tok[:, 1:])
    assert abs(loss.item() - ref.item()) < 0.03 * ref.item(), (loss.item(), ref.item())
    assert loss.item() != ref.item()  # the bank GEMMs did change
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.dtype == p.dtype, name


def test_model_fp8_counts_bank_gemms_only(monkeypatch):
    """fp8 routes exactly the 4 bank GEMMs per layer (fused QKV, out, up, down), not embeddings, head or LoRA terms;
    ``attn="math"`` (the twice-differentiable path) keeps plain GEMMs."""
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = tiny_config()
    model = _randomize(BankedGPT(cfg, Runtime(fp8=True)))
    tok = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    d, r = cfg.model_dim, 4
    lora = {f"{k}.0": (torch.randn(2, r, d, generator=g), torch.randn(2, n, r, generator=g) * 0.1)
            for k, n in (("q", d), ("out", d), ("mlp", d))}
    with torch.no_grad():
        model(tok[:, :-1], tok[:, 1:])
        assert len(calls) == 4 * cfg.num_layers
        calls.clear()
        plain = model(tok[:, :-1], tok[:, 1:])
        with_lora = model(tok[:, :-1], tok[:, 1:], lora=lora)
        assert len(calls) == 2 * 4 * cfg.num_layers and with_lora.item() != plain.item()
        calls.clear()
        model(tok[:, :-1], tok[:, 1:], attn="math")
        assert calls == []


def test_fp8_off_is_the_default():
    assert Runtime().fp8 is False


def test_throughput_variant_token():
    import train_throughput as tt

    assert tt.parse_variant("compile+fp8")["fp8"] and tt.parse_variant("compile+fp8")["compile"]
    assert not tt.parse_variant("compile+bf16")["fp8"]


def test_trainer_flag():
    """``--runtime.fp8`` comes from the Runtime field (the CLI is generated from the config) and survives config.json."""
    from metattt.train.cli import parse_config
    from metattt.train.config import TrainConfig

    cfg = parse_config(["--runtime.fp8", "on", "--runtime.residual-dtype", "bfloat16"])
    assert cfg.runtime.fp8 and cfg.runtime.residual_dtype == "bfloat16"
    assert TrainConfig.from_dict(cfg.to_dict()).runtime == cfg.runtime
    assert not parse_config([]).runtime.fp8
