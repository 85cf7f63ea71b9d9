"""``fomaml``: first-order MAML, a preset of the ``sgd`` rule (plain constant-lr steps, no momentum, no clip).

Meta-training (``metattt.ttt.meta.meta_loss``, order="first"): the sgd step from the current weights on the
inner split, then the outer loss at the adapted weights; its gradient at the adapted point reaches the base
weights through the identity (the inner gradients are constants). order="second" differentiates the same steps
exactly (full MAML). Evaluation runs the very same steps, ``epochs`` passes over each chunk's scored rows.
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
