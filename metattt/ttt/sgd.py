"""``sgd``: the public record's legal score-first TTT recipe, and the rule fomaml / reptile / sam build on.

SGD lr 0.002, momentum 0.9, 3 epochs over each chunk's already-scored sequences in mini-batches, cosine lr over
chunks (lr * 0.5 * (1 + cos(pi * progress))), global grad-norm clip 1.0, weights carried across chunks
(reset="never"), on a parameter selection (default: all). Meta-training runs this same update by default: 3 epochs
with momentum and clip, at progress 0 (metattt/ttt/meta.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import rules
from .adapter import Adapter, AdapterConfig


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
    """Momentum SGD on the selected tensors, clipped, on a cosine schedule over chunks."""

    name = "sgd"
    Config = SGDConfig

    def rule(self) -> rules.Transform:
        c = self.cfg
        return rules.sgd(rules.Schedule(c.lr, c.schedule), c.momentum, c.nesterov, c.grad_clip)
