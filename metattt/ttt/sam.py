"""``sam``: sharpness-aware test-time steps.

Each update: g = grad L(theta); e = rho * g / ||g|| (global norm over the selection; a constant at first order,
differentiated in the exact second-order inner loop);
g' = grad L(theta + e); step from theta with g' (momentum / clip / cosine schedule as in ``sgd``).
Why: TTT on a few thousand tokens overfits sharp directions; SAM prefers flat ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapter import clip_grads, global_norm
from .sgd import SGDAdapter, SGDConfig


@dataclass
class SAMConfig(SGDConfig):
    """The SGD recipe's knobs plus the perturbation radius rho."""

    rho: float = 0.05


def _perturb(params: dict[str, Tensor], grads: dict[str, Tensor], rho: float) -> dict[str, Tensor]:
    """theta + rho * g / ||g||; differentiable through g when g carries a graph (exact second order)."""
    scale = rho / (global_norm(grads) + 1e-12)
    return {n: params[n] + grads[n] * scale.to(grads[n].dtype) for n in params}


class SAMAdapter(SGDAdapter):
    name = "sam"
    Config = SAMConfig

    def _update(self, model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Tensor:
        loss, g = self._grad(model, x, y)
        with torch.no_grad():
            perturbed = _perturb(self._cur, g, self.cfg.rho)
        _, g2 = self._grad(model, x, y, perturbed)
        self._apply(clip_grads(g2, self.cfg.grad_clip), lr)
        return loss

    def _inner_step(self, model, base, state, x, y, k, create_graph, attn, backend):  # noqa: ANN001
        g = self._inner_grads(model, base, state, x, y, create_graph, attn, backend)
        perturbed = _perturb(state, g, self.cfg.rho)
        g2 = self._inner_grads(model, base, perturbed, x, y, create_graph, attn, backend)
        return {n: state[n] - self.cfg.lr * g2[n] for n in state}
