"""A plug-in adapter in its own file: sign-SGD on the norm / gain tensors (the worked example of docs/adapters.md).

Why sign-SGD on the gains: a few thousand control scalars per model, so a test-time update is cheap and hard to
overfit, and the step size is the same for every scalar however the gradients are scaled. Use it without
editing metattt:

    python evaluators/legal_ttt.py ARTIFACT --adapter-module examples/signsgd_norms.py --protocols sliding,ttt:signsgd
    python experiments/meta_ttt.py --adapter-module examples/signsgd_norms.py --meta.adapter signsgd:lr=0.002

(Meta-training it at first order moves the base weights toward a point where sign steps help; the sign has no
useful second derivative, so order="second" adds nothing here.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metattt.ttt import Adapter, AdapterConfig, rules


@dataclass
class SignSGDConfig(AdapterConfig):
    lr: float = 0.001  # every selected scalar moves by exactly lr per step
    epochs: int = 1
    batch_seqs: int = 32
    schedule: str = "cosine"  # over the evaluator's chunks (progress); meta-training steps at progress 0
    momentum: float = 0.0  # sign of a momentum buffer (signum) when > 0


#: a transform of its own: the sign of each incoming update
SIGN = rules.per_tensor(lambda name, update, param: torch.sign(update))


class SignSGDNorms(Adapter):
    name = "signsgd"
    Config = SignSGDConfig
    default_selection = "norms"

    def rule(self) -> rules.Transform:
        c = self.cfg
        return rules.chain(rules.trace(c.momentum), SIGN, rules.scale_by_schedule(rules.Schedule(c.lr, c.schedule)))
