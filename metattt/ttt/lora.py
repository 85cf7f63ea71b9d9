"""``lora``: rank-r test-time adapters on bank slices.

For every selected bank slice W (out, in): W' = W + scale * B @ A with A (r, in) random (std ``init_std`` or
in**-0.5, fixed seed so all ranks agree) and B (out, r) zero, so the adapter is the identity at init and after
every ``reset()``. Only bank slices can carry LoRA: a selection that names other tensors is an error. Adam on
(A, B) by default; ``reset`` defaults to "doc" (the evaluator resets per document). ``params()`` materialises
the adapted banks (selected slices only differ from the trained ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from .adapter import Adapter, AdapterConfig, clip_grads


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
    default_selection = "banks"

    def _init_state(self, model: nn.Module) -> None:
        sel = self._require_bound()
        banks = {b for b, _ in sel.labels}
        others = [n for n in sel.names if n not in banks]
        if others:
            raise ValueError(f"lora adapts bank slices only; selection {sel.spec!r} also names {others} "
                             f"(use e.g. 'banks', 'banks[q,v]:layers>=5')")
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self._A0: dict[str, Tensor] = {}
        self._idx: dict[str, Tensor | None] = {}
        r = self.cfg.rank
        for n in sel.names:
            w = self._trained[n]
            idx = sel.slices[n]
            n_sl = w.shape[0] if idx is None else len(idx)
            std = self.cfg.init_std or w.shape[2] ** -0.5
            self._A0[n] = (torch.randn(n_sl, r, w.shape[2], generator=gen) * std).to(device=w.device, dtype=w.dtype)
            self._idx[n] = None if idx is None else torch.tensor(idx, device=w.device)
        self._cur = {}

    def reset(self) -> None:
        self._require_bound()
        with torch.inference_mode(False), torch.no_grad():
            self._lora = {}
            for n, a in self._A0.items():
                w = self._trained[n]
                self._lora[f"A.{n}"] = a.clone()
                self._lora[f"B.{n}"] = torch.zeros(a.shape[0], w.shape[1], a.shape[1], device=w.device, dtype=w.dtype)
            self._adam: dict[str, tuple[Tensor, Tensor]] = {}
            self._t = 0

    def _delta_banks(self, weights: Mapping[str, Tensor], lora: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n in self._A0:
            delta = self.cfg.scale * torch.bmm(lora[f"B.{n}"], lora[f"A.{n}"])
            idx = self._idx[n]
            out[n] = weights[n] + delta if idx is None else weights[n].index_add(0, idx, delta.to(weights[n].dtype))
        return out

    def params(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return self._delta_banks(self._trained, self._lora)

    @property
    def adapted_count(self) -> int:
        return sum(t.numel() for t in self._lora.values())

    def selection_report(self) -> str:
        return (super().selection_report() + f"\nLoRA rank {self.cfg.rank}: {self.adapted_count:,} adapter "
                f"scalars on the slices above")

    def _trainable(self) -> dict[str, Tensor]:
        return self._lora

    def _materialize(self, trainable: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._delta_banks(self._trained, trainable)

    def _mask(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        return grads

    def _update(self, model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Tensor:
        loss, grads = self._grad(model, x, y)
        grads = clip_grads(grads, self.cfg.grad_clip)
        c = self.cfg
        with torch.no_grad():
            self._t += 1
            for n, p in self._lora.items():
                g = grads[n].to(p.dtype)
                if c.optimizer == "sgd":
                    p.add_(g, alpha=-lr)
                    continue
                m, v = self._adam.get(n, (torch.zeros_like(p), torch.zeros_like(p)))
                m.mul_(c.beta1).add_(g, alpha=1 - c.beta1)
                v.mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
                self._adam[n] = (m, v)
                mhat = m / (1 - c.beta1 ** self._t)
                vhat = v / (1 - c.beta2 ** self._t)
                p.addcdiv_(mhat, vhat.sqrt().add_(1e-8), value=-lr)
        return loss

    # functional inner loop: plain SGD on (A, B) from A0 / zero, adapted banks = base + scale * B @ A
    def _inner_init(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, a in self._A0.items():
            out[f"A.{n}"] = a
            out[f"B.{n}"] = torch.zeros(a.shape[0], base[n].shape[1], a.shape[1], device=a.device, dtype=a.dtype)
        return out

    def _inner_materialize(self, base: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._delta_banks(base, state)

    def _inner_mask(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        return grads

    def _inner_step(self, model, base, state, x, y, k, create_graph, attn, backend):  # noqa: ANN001
        grads = self._inner_grads(model, base, state, x, y, create_graph, attn, backend)
        return {n: state[n] - self.cfg.lr * grads[n] for n in state}
