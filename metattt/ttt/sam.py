"""``sam``: sharpness-aware test-time steps.

Each update: g = grad L(theta); e = rho * g / ||g|| (global norm over the selection; a constant at first order,
differentiated in the exact second-order inner loop); g' = grad L(theta + e); the ``sgd`` step from theta with
g' (momentum / clip / cosine schedule). Why: TTT on a few thousand tokens overfits sharp directions; SAM prefers
flat ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from .adapter import GradAt, Tensors
from .rules import global_norm
from .sgd import SGDAdapter, SGDConfig


@dataclass
class SAMConfig(SGDConfig):
    """The SGD recipe's knobs plus the perturbation radius rho."""

    rho: float = 0.05


class SAMAdapter(SGDAdapter):
    name = "sam"
    Config = SAMConfig

    def direction(self, trainables: Mapping[str, Tensor], grad_at: GradAt) -> tuple[Tensor, Tensors]:
        loss, g = grad_at(trainables)
        scale = self.cfg.rho / (global_norm(g) + 1e-12)
        _, g2 = grad_at({n: t + g[n] * scale.to(g[n].dtype) for n, t in trainables.items()})
        return loss, g2
