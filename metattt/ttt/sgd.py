"""The sgd family: ``sgd`` (the public record's legal score-first TTT recipe) and its presets ``fomaml``,
``reptile`` and ``sam``, all one rule (:func:`metattt.ttt.rules.sgd`: clip, momentum, scheduled step size).

``sgd``: lr 0.002, momentum 0.9, 3 epochs over each chunk's already-scored sequences in mini-batches, cosine lr
over chunks (lr * 0.5 * (1 + cos(pi * progress))), global grad-norm clip 1.0, weights carried across chunks
(reset="never"), on a parameter selection (default: all). Meta-training runs this same update by default: 3
epochs with momentum and clip, at progress 0 (metattt/ttt/meta.py says why).

``fomaml``: first-order MAML's defaults (plain constant-lr steps, no momentum, no clip). Meta-training
(order="first"): the step from the current weights on the inner split, then the outer loss at the adapted
weights, whose gradient reaches the base weights through the identity; order="second" differentiates the same
steps exactly (full MAML). Evaluation runs the very same steps, ``epochs`` passes over each chunk's rows.

``reptile``: fomaml's steps with Reptile as the trainer's meta-objective (chosen by its :class:`ReptileConfig`,
which carries ``epsilon``): theta_k = ``epochs`` passes of the step over the batch (the evaluated update;
``MetaConfig.inner_steps`` overrides it, as for every adapter), then the surrogate loss whose gradient is
``epsilon * (theta - theta_k)`` (``metattt.ttt.meta.reptile_loss``); plain SGD with lr 1 on it is exactly
theta <- theta + epsilon * (theta_k - theta). ``epochs`` defaults to 3 (with one plain step theta - theta_1 is
just lr times the batch gradient).

``sam``: sharpness-aware steps. g = grad L(theta); e = rho * g / ||g|| (global norm over the selection; a
constant at first order, differentiated in the exact second-order inner loop); g' = grad L(theta + e); the sgd
step from theta with g'. Why: TTT on a few thousand tokens overfits sharp directions; SAM prefers flat ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from . import rules
from .adapter import Adapter, AdapterConfig, GradAt, Tensors


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
    cfg: SGDConfig  # Adapter.__init__ checks it is a Config

    def rule(self) -> rules.Transform:
        c = self.cfg
        return rules.sgd(rules.Schedule(c.lr, c.schedule), c.momentum, c.nesterov, c.grad_clip)


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
    cfg: FOMAMLConfig


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
    cfg: ReptileConfig


@dataclass
class SAMConfig(SGDConfig):
    """The SGD recipe's knobs plus the perturbation radius rho."""

    rho: float = 0.05


class SAMAdapter(SGDAdapter):
    name = "sam"
    Config = SAMConfig
    cfg: SAMConfig

    def direction(self, trainables: Mapping[str, Tensor], grad_at: GradAt) -> tuple[Tensor, Tensors]:
        loss, g = grad_at(trainables)
        scale = self.cfg.rho / (rules.global_norm(g) + 1e-12)
        _, g2 = grad_at({n: t + g[n] * scale.to(g[n].dtype) for n, t in trainables.items()})
        return loss, g2
