"""``lora``: rank-r test-time adapters on bank slices.

For every selected bank slice W (out, in): W' = W + scale * B @ A with A (r, in) random (std ``init_std`` or
in**-0.5, fixed seed so all ranks agree) and B (out, r) zero, so the adapter is the identity at init and after
every ``reset()``. Only bank slices can carry LoRA: a selection that names other tensors is an error. The
trainables are the factors ``A.<bank>`` (n_slices, r, in) and ``B.<bank>`` (n_slices, out, r); Adam on them by
default (``optimizer="sgd"``: plain steps); ``reset`` defaults to "doc" (the evaluator resets per document).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from . import rules
from .adapter import Adapter, AdapterConfig, Tensors


@dataclass
class LoRAConfig(AdapterConfig):
    rank: int = 4
    scale: float = 1.0
    lr: float = 0.003
    optimizer: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.999
    epochs: int = 1
    batch_seqs: int = 32
    grad_clip: float = 1.0
    schedule: str = "constant"
    init_std: float = 0.0
    seed: int = 0
    reset: str = "doc"

    def validate(self) -> None:
        super().validate()
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"lora optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


class LoRAAdapter(Adapter):
    name = "lora"
    Config = LoRAConfig
    cfg: LoRAConfig  # Adapter.__init__ checks it is a Config
    default_selection = "banks"

    def setup(self, model: nn.Module) -> None:
        sel = self._require_bound()
        banks = {b for b, _ in sel.labels}
        others = [n for n in sel.names if n not in banks]
        if others:
            raise ValueError(f"lora adapts bank slices only; selection {sel.spec!r} also names {others} "
                             f"(use e.g. 'banks', 'banks[q,v]:layers>=5')")
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self._A0: Tensors = {}
        self._idx: dict[str, Tensor | None] = {}
        for n in sel.names:
            w = self._trained[n]
            idx = sel.slices[n]
            n_sl = w.shape[0] if idx is None else len(idx)
            std = self.cfg.init_std or w.shape[2] ** -0.5
            a0 = torch.randn(n_sl, self.cfg.rank, w.shape[2], generator=gen) * std
            self._A0[n] = a0.to(device=w.device, dtype=w.dtype)
            self._idx[n] = None if idx is None else torch.tensor(idx, device=w.device)

    def trainables(self, base: Mapping[str, Tensor]) -> Tensors:
        out = {}
        for n, a in self._A0.items():
            out[f"A.{n}"] = a
            out[f"B.{n}"] = torch.zeros(a.shape[0], base[n].shape[1], a.shape[1], device=a.device, dtype=a.dtype)
        return out

    def materialize(self, base: Mapping[str, Tensor], trainables: Mapping[str, Tensor]) -> Tensors:
        out = {}
        for n in self._A0:
            delta = self.cfg.scale * torch.bmm(trainables[f"B.{n}"], trainables[f"A.{n}"])
            idx = self._idx[n]
            out[n] = base[n] + delta if idx is None else base[n].index_add(0, idx, delta.to(base[n].dtype))
        return out

    def mask(self, grads: Tensors) -> Tensors:
        return grads  # the factors exist only on selected slices

    def rule(self) -> rules.Transform:
        c = self.cfg
        lr = rules.Schedule(c.lr, c.schedule)
        last = rules.scale_by_schedule(lr) if c.optimizer == "sgd" else rules.scale_by_adam(lr, c.beta1, c.beta2)
        return rules.chain(rules.clip_by_global_norm(c.grad_clip), last)

    @property
    def adapted_count(self) -> int:
        self._require_bound()
        return sum(t.numel() for t in self._cur.values())

    def selection_report(self) -> str:
        return (super().selection_report() + f"\nLoRA rank {self.cfg.rank}: {self.adapted_count:,} adapter "
                f"scalars on the slices above")
