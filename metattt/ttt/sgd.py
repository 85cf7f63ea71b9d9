"""``sgd``: the public record's legal score-first TTT recipe, and the rule fomaml / reptile / sam build on.

SGD lr 0.002, momentum 0.9, 3 epochs over each chunk's already-scored sequences in mini-batches, cosine lr over
chunks (lr * 0.5 * (1 + cos(pi * progress))), global grad-norm clip 1.0, weights carried across chunks
(reset="never"), on a parameter selection (default: all). Meta-training runs this same update by default: 3 epochs
with momentum and clip, at progress 0 (metattt/ttt/meta.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .adapter import Adapter, AdapterConfig, Tensors, clip_grads, lr_at


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

    def step_size(self, progress: float) -> float:
        return lr_at(self.lr, self.schedule, progress)


def sgd_step(params: Tensors, mom: Tensors | None, grads: Tensors, lr: float, momentum: float,
             nesterov: bool) -> tuple[Tensors, Tensors | None]:
    """theta - lr * d with d = g, or the momentum buffer b = momentum * b + g (nesterov: g + momentum * b)."""
    if not momentum:
        return {n: p - lr * grads[n].to(p.dtype) for n, p in params.items()}, None
    new_mom = {n: momentum * mom[n] + grads[n].to(p.dtype) for n, p in params.items()}
    d = {n: grads[n].to(p.dtype) + momentum * new_mom[n] for n, p in params.items()} if nesterov else new_mom
    return {n: p - lr * d[n] for n, p in params.items()}, new_mom


class SGDAdapter(Adapter):
    """Momentum SGD on the selected tensors, clipped, on a cosine schedule over chunks."""

    name = "sgd"
    Config = SGDConfig

    def init(self, trainables: Tensors) -> dict[str, Any]:
        if not self.cfg.momentum:
            return {}
        return {f"mom.{n}": torch.zeros_like(t) for n, t in trainables.items()}

    def step(self, trainables: Tensors, state: dict[str, Any], grads: Tensors,
             progress: float) -> tuple[Tensors, dict[str, Any]]:
        c = self.cfg
        grads = clip_grads(grads, c.grad_clip)
        mom = {n: state[f"mom.{n}"] for n in trainables} if c.momentum else None
        new, mom = sgd_step(trainables, mom, grads, lr_at(c.lr, c.schedule, progress), c.momentum, c.nesterov)
        return new, ({f"mom.{n}": m for n, m in mom.items()} if mom is not None else state)

