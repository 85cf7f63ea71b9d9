"""``lora``: rank-r test-time adapters on bank slices.

For every selected bank slice W (out, in): W' = W + scale * B @ A with A (r, in) random (std ``init_std`` or
in**-0.5, fixed seed so all ranks agree) and B (out, r) zero, so the adapter is the identity at init and after
every ``reset()``. Only bank slices can carry LoRA: a selection that names other tensors is an error. The
trainables are the factors ``A.<bank>`` (n_slices, r, in) and ``B.<bank>`` (n_slices, out, r); Adam on them by
default (``optimizer="sgd"``: plain steps); ``reset`` defaults to "doc" (the evaluator resets per document).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .adapter import Adapter, AdapterConfig, Tensors, clip_grads, lr_at


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

    def step_size(self, progress: float) -> float:
        return lr_at(self.lr, self.schedule, progress)

    def validate(self) -> None:
        super().validate()
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"lora optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


class LoRAAdapter(Adapter):
    name = "lora"
    Config = LoRAConfig
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

    def init(self, trainables: Tensors) -> dict[str, Any]:
        if self.cfg.optimizer == "sgd":
            return {}
        zeros = {n: torch.zeros_like(t) for n, t in trainables.items()}
        return {"t": 0, **{f"m.{n}": z for n, z in zeros.items()}, **{f"v.{n}": z.clone() for n, z in zeros.items()}}

    def step(self, trainables: Tensors, state: dict[str, Any], grads: Tensors,
             progress: float) -> tuple[Tensors, dict[str, Any]]:
        c = self.cfg
        lr = lr_at(c.lr, c.schedule, progress)
        grads = {n: g.to(trainables[n].dtype) for n, g in clip_grads(grads, c.grad_clip).items()}
        if c.optimizer == "sgd":
            return {n: p - lr * grads[n] for n, p in trainables.items()}, state
        t = state["t"] + 1
        new_state: dict[str, Any] = {"t": t}
        new = {}
        for n, p in trainables.items():
            g = grads[n]
            m = c.beta1 * state[f"m.{n}"] + (1 - c.beta1) * g
            v = c.beta2 * state[f"v.{n}"] + (1 - c.beta2) * g * g
            new_state[f"m.{n}"], new_state[f"v.{n}"] = m, v
            mhat, vhat = m / (1 - c.beta1 ** t), v / (1 - c.beta2 ** t)
            # clamp: sqrt has an infinite derivative at 0 (B starts at 0, so A's first gradient is 0); the
            # clamp changes no value that survives the + 1e-8 and keeps the second-order graph finite
            new[n] = p - lr * mhat / (vhat.clamp_min(1e-30).sqrt() + 1e-8)
        return new, new_state

    @property
    def adapted_count(self) -> int:
        self._require_bound()
        return sum(t.numel() for t in self._cur.values())

    def selection_report(self) -> str:
        return (super().selection_report() + f"\nLoRA rank {self.cfg.rank}: {self.adapted_count:,} adapter "
                f"scalars on the slices above")
