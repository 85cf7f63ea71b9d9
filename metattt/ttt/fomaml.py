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

from .adapter import AdapterConfig
from .sgd import SGDAdapter


@dataclass
class FOMAMLConfig(AdapterConfig):
    lr: float = 0.01
    momentum: float = 0.0
    epochs: int = 1
    batch_seqs: int = 32
    grad_clip: float = 0.0
    schedule: str = "constant"
    nesterov: bool = False
    reset: str = "never"


class FOMAMLAdapter(SGDAdapter):
    name = "fomaml"
    Config = FOMAMLConfig
