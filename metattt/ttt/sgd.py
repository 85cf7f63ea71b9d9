"""``sgd``: the public record's legal score-first TTT recipe.

SGD lr 0.002, momentum 0.9, 3 epochs over each chunk's already-scored sequences in mini-batches, cosine lr over
chunks (lr * 0.5 * (1 + cos(pi * progress))), global grad-norm clip 1.0, weights carried across chunks
(reset="never"), on a parameter selection (default: all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapter import Adapter, AdapterConfig, clip_grads


@dataclass
class SGDConfig(AdapterConfig):
    lr: float = 0.002
    momentum: float = 0.9
    epochs: int = 3
    batch_seqs: int = 32
    grad_clip: float = 1.0
    schedule: str = "cosine"
    nesterov: bool = False
    reset: str = "never"


class SGDAdapter(Adapter):
    """Momentum SGD on the selected tensors; the functional inner loop takes plain steps at ``cfg.lr``."""

    name = "sgd"
    Config = SGDConfig

    def _reset_optim(self) -> None:
        self._mom: dict[str, Tensor] = {}

    def _apply(self, grads: dict[str, Tensor], lr: float) -> None:
        """Momentum step in place on ``_cur`` (masked gradients keep frozen slices bit-identical)."""
        cfg = self.cfg
        mom = getattr(cfg, "momentum", 0.0)
        names = list(self._cur)
        ps = [self._cur[n] for n in names]
        gs = [grads[n].to(p.dtype) for n, p in zip(names, ps)]
        with torch.no_grad():
            if mom:
                if not self._mom:
                    self._mom = {n: g.clone() for n, g in zip(names, gs)}
                    bufs = [self._mom[n] for n in names]
                else:
                    bufs = [self._mom[n] for n in names]
                    torch._foreach_mul_(bufs, mom)
                    torch._foreach_add_(bufs, gs)
                step = torch._foreach_add(gs, bufs, alpha=mom) if getattr(cfg, "nesterov", False) else bufs
            else:
                step = gs
            torch._foreach_add_(ps, step, alpha=-lr)

    def _update(self, model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Tensor:
        loss, grads = self._grad(model, x, y)
        self._apply(clip_grads(grads, getattr(self.cfg, "grad_clip", 0.0)), lr)
        return loss

    def _inner_step(self, model, base, state, x, y, k, create_graph, attn, backend):  # noqa: ANN001
        grads = self._inner_grads(model, base, state, x, y, create_graph, attn, backend)
        return {n: state[n] - self.cfg.lr * grads[n] for n in state}
