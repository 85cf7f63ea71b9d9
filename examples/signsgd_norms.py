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
from typing import Any

import torch

from metattt.ttt import Adapter, AdapterConfig, lr_at


@dataclass
class SignSGDConfig(AdapterConfig):
    lr: float = 0.001  # every selected scalar moves by exactly lr per step
    epochs: int = 1
    batch_seqs: int = 32
    schedule: str = "cosine"  # over the evaluator's chunks (progress); meta-training steps at progress 0
    momentum: float = 0.0  # sign of a momentum buffer (signum) when > 0

    def step_size(self, progress: float) -> float:
        return lr_at(self.lr, self.schedule, progress)


class SignSGDNorms(Adapter):
    name = "signsgd"
    Config = SignSGDConfig
    default_selection = "norms"

    def init(self, trainables: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {n: torch.zeros_like(t) for n, t in trainables.items()} if self.cfg.momentum else {}

    def step(self, trainables, state, grads, progress):  # noqa: ANN001, ANN201
        lr = lr_at(self.cfg.lr, self.cfg.schedule, progress)
        if self.cfg.momentum:
            state = {n: self.cfg.momentum * state[n] + grads[n] for n in trainables}
            grads = state
        return {n: p - lr * torch.sign(grads[n]).to(p.dtype) for n, p in trainables.items()}, state
