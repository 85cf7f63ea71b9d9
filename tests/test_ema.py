"""EMA of the weights: the fp32 shadow follows shadow <- d*shadow + (1-d)*param exactly."""
from __future__ import annotations

import torch

from metattt.model import BankedGPT, tiny_synthetic
from metattt.train.ema import EMA


def test_ema_update_and_copy_to():
    torch.manual_seed(0)
    model = BankedGPT(tiny_synthetic())
    ema = EMA(model, 0.9)
    want = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for n, p in model.named_parameters():
            want[n] = 0.9 * want[n] + 0.1 * p.detach().double()
    for n, t in ema.shadow.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.double(), want[n], rtol=1e-5, atol=1e-6)
    ema.copy_to(model)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ema.shadow[n])
