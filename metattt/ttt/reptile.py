"""``reptile``: a training-time meta-update, theta <- theta + epsilon * (theta_k - theta).

theta_k is the result of ``steps`` plain SGD steps (lr ``lr``) on a batch (``metattt.ttt.meta.reptile_update``
applies it in place; ``meta_loss`` gives the equivalent surrogate loss for the trainer's optimiser).
At evaluation it ACTS LIKE PLAIN SGD (the fomaml rule: ``epochs`` plain steps of size ``lr`` per chunk), which
is the adaptation Reptile meta-trains the initialisation for.
"""
from __future__ import annotations

from dataclasses import dataclass

from .sgd import SGDAdapter, SGDConfig


@dataclass
class ReptileConfig(SGDConfig):
    """SGD's knobs (plain constant-lr inner steps) plus Reptile's step count and interpolation epsilon."""

    lr: float = 0.01
    momentum: float = 0.0
    epochs: int = 1
    grad_clip: float = 0.0
    schedule: str = "constant"
    steps: int = 3
    epsilon: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"reptile epsilon must be in (0, 1], got {self.epsilon}")


class ReptileAdapter(SGDAdapter):
    name = "reptile"
    Config = ReptileConfig
