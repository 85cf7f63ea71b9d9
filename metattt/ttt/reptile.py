"""``reptile``: the sgd rule (fomaml's plain-step preset) with Reptile as the trainer's meta-objective.

Meta-training (the trainer picks Reptile's objective for a :class:`ReptileConfig`, whose ``epsilon`` it
needs): theta_k = ``epochs`` passes of the sgd step over the batch (the
evaluated update; ``MetaConfig.inner_steps`` overrides it, as for every adapter), then the surrogate loss whose
gradient is ``epsilon * (theta - theta_k)`` (``metattt.ttt.meta.reptile_loss``); the trainer's optimiser applies
it (plain SGD with lr 1 is exactly theta <- theta + epsilon * (theta_k - theta)). At evaluation it is the same
sgd step, ``epochs`` passes per chunk: the adaptation Reptile meta-trains for. ``epochs`` defaults to 3 (Reptile
needs k > 1 steps: with one plain step theta - theta_1 is just lr times the batch gradient); it replaces the
former ``steps`` knob, a second pass count that the evaluator never ran.
"""
from __future__ import annotations

from dataclasses import dataclass

from .fomaml import FOMAMLAdapter, FOMAMLConfig


@dataclass
class ReptileConfig(FOMAMLConfig):
    """fomaml's plain constant-lr steps, 3 passes, plus Reptile's interpolation epsilon."""

    epochs: int = 3
    epsilon: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"reptile epsilon must be in (0, 1], got {self.epsilon}")


class ReptileAdapter(FOMAMLAdapter):
    name = "reptile"
    Config = ReptileConfig
