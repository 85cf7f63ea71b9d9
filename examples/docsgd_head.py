"""A per-document plug-in adapter: plain SGD on per-document LoRA factors of the LM head (docs/adapters.md).

Why: the smallest per-document update that is not doclora. Every document of a batch gets its own rank-r head
correction and steps with plain SGD, which keeps no moments (no per-document optimiser state). It reuses
doclora's factors, per-row forward and chunk batches (a subclass) and brings its own rule and ``step``: out of
place, the documents that do not train this chunk keep their factors. Use it without editing metattt:

    python evaluators/legal_ttt.py ARTIFACT --adapter-module examples/docsgd_head.py --protocols docttt:docsgd@lr=0.05
    python experiments/meta_ttt.py --adapter-module examples/docsgd_head.py --meta.adapter docsgd \\
        --meta.split seq-half

(Meta-training it learns the shared A init, ``init=meta``, as doclora's does.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from metattt.ttt import rules
from metattt.ttt.doclora import DocLoRA, DocLoRAConfig


@dataclass
class DocSGDConfig(DocLoRAConfig):
    rank: int = 4
    lr: float = 0.05
    targets: str = "head"


class DocSGDHead(DocLoRA):
    name = "docsgd"
    Config = DocSGDConfig

    def rule(self) -> rules.Transform:
        return rules.sgd(rules.Schedule(self.cfg.lr))

    def init(self, trainables: Mapping[str, Tensor]) -> dict[str, Any]:
        return self.rule().init(trainables)

    def step(self, trainables: dict[str, Tensor], state: dict[str, Any], grads: dict[str, Tensor],
             active: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``trainables - updates`` for the first R rows that ``grads`` cover where ``active`` (R,) holds; the
        other rows unchanged."""
        rows = next(iter(grads.values())).shape[0]
        head = {k: v[:rows] for k, v in trainables.items()}
        updates, changed = self.rule().update(grads, state, head)
        out = {}
        for k, v in trainables.items():
            u = updates[k]
            if active is not None:
                on = active.to(u.device, torch.bool).view(-1, *[1] * (u.dim() - 1))
                u = torch.where(on, u, torch.zeros_like(u))
            out[k] = torch.cat([head[k] - u, v[rows:]]) if rows < v.shape[0] else head[k] - u
        return out, {**state, **changed}
