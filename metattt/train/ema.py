"""Exponential moving average of the weights (fp32 shadow), the weights the artifact is made from."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One fused multi-tensor lerp per step (a launch per parameter costs more than the math here)."""
        names = [n for n, _ in model.named_parameters()]
        params = [p.detach().float() for _, p in model.named_parameters()]
        torch._foreach_lerp_([self.shadow[n] for n in names], params, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, d: dict) -> None:
        self.decay = d["decay"]
        self.shadow = {n: t.clone() for n, t in d["shadow"].items()}
