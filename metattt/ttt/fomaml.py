"""``fomaml``: first-order MAML.

Meta-training (``metattt.ttt.meta.meta_loss`` with order="first"): k plain SGD steps of size ``lr`` (alpha)
from the current weights on the inner split, then the outer loss at the adapted weights; its gradient at the
adapted point is applied to the base weights (the inner gradients are constants, so d(adapted)/d(base) = I).
With order="second" the same inner loop is differentiated exactly (full MAML).
Evaluation: plain SGD steps (no momentum, constant lr), ``epochs`` passes over each chunk's scored rows;
``reset`` configurable (default "never": continuous, like the public recipe).
"""
from __future__ import annotations

from dataclasses import dataclass

from .sgd import SGDAdapter, SGDConfig


@dataclass
class FOMAMLConfig(SGDConfig):
    """SGD's knobs with MAML's defaults: plain constant-lr steps."""

    lr: float = 0.01
    momentum: float = 0.0
    epochs: int = 1
    grad_clip: float = 0.0
    schedule: str = "constant"


class FOMAMLAdapter(SGDAdapter):
    name = "fomaml"
    Config = FOMAMLConfig
