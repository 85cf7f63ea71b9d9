"""``metasgd``: Meta-SGD, learned inner learning rates.

One log-rate per bank slice (i.e. per bank x layer x kind matrix) and one per other selected tensor; with
``per_row`` one per output row of every bank slice / matrix instead. The rates are ``nn.Parameter`` log-values
(``meta_parameters()``, names ``log_lr.<tensor>``), trained by the outer loop and stored in the artifact
(``ttt.metasgd.log_lr.<tensor>``); loading without them raises a clear error (``requires_meta_params``).
Inner update: theta' = theta - exp(log_lr) * g. Even with first-order (constant) g, d theta'/d log_lr =
-exp(log_lr) * g, so the outer loss gives the rates a gradient without any double backward.
At evaluation: ``epochs`` plain steps per chunk with the learned rates (times ``lr_scale``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapter import Adapter, AdapterConfig, clip_grads


@dataclass
class MetaSGDConfig(AdapterConfig):
    lr_init: float = 0.002
    per_row: bool = False
    lr_scale: float = 1.0
    epochs: int = 1
    batch_seqs: int = 32
    grad_clip: float = 0.0
    reset: str = "never"

    @property
    def lr(self) -> float:  # the base class's schedule hook: rates are multiplied by this
        return self.lr_scale

    def validate(self) -> None:
        super().validate()
        if self.lr_init <= 0:
            raise ValueError(f"metasgd lr_init must be > 0, got {self.lr_init}")


class MetaSGDAdapter(Adapter):
    name = "metasgd"
    Config = MetaSGDConfig
    requires_meta_params = True

    def _init_state(self, model: nn.Module) -> None:
        sel = self._require_bound()
        banks = {b for b, _ in sel.labels}
        self._log_lr: dict[str, nn.Parameter] = {}
        self._layout: dict[str, tuple] = {}
        init = math.log(self.cfg.lr_init)
        for n in sel.names:
            t = self._trained[n]
            idx = sel.slices[n]
            if n in banks:
                n_sl = t.shape[0] if idx is None else len(idx)
                shape = (n_sl, t.shape[1]) if self.cfg.per_row else (n_sl,)
            elif self.cfg.per_row and t.ndim >= 2:
                shape = (t.shape[0],)
            else:
                shape = ()
            self._log_lr[f"log_lr.{n}"] = nn.Parameter(torch.full(shape, init, device=t.device, dtype=torch.float32))
            self._layout[n] = (n in banks, idx, t.shape)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        self._require_bound()
        return dict(self._log_lr)

    def rate(self, name: str) -> Tensor:
        """Learning rate tensor broadcastable against parameter ``name`` (0 on unselected bank slices)."""
        is_bank, idx, shape = self._layout[name]
        r = self._log_lr[f"log_lr.{name}"].exp()
        if is_bank:
            if idx is not None:
                full = torch.zeros((shape[0], *r.shape[1:]), device=r.device, dtype=r.dtype)
                r = full.index_copy(0, torch.tensor(idx, device=r.device), r)
            return r.view(*r.shape, *([1] * (len(shape) - r.ndim)))
        if r.ndim == 1:
            return r.view(shape[0], *([1] * (len(shape) - 1)))
        return r

    def rates_summary(self) -> dict[str, float]:
        return {n: float(p.detach().exp().mean()) for n, p in self._log_lr.items()}

    def selection_report(self) -> str:
        n_meta = sum(p.numel() for p in self._log_lr.values())
        return super().selection_report() + f"\nmeta-parameters (log-rates): {n_meta:,}"

    def _update(self, model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Tensor:
        loss, grads = self._grad(model, x, y)
        grads = clip_grads(grads, self.cfg.grad_clip)
        with torch.no_grad():
            for n, p in self._cur.items():
                p.sub_(lr * self.rate(n).to(p.dtype) * grads[n].to(p.dtype))
        return loss

    def _inner_step(self, model, base, state, x, y, k, create_graph, attn, backend):  # noqa: ANN001
        grads = self._inner_grads(model, base, state, x, y, create_graph, attn, backend)
        return {n: state[n] - self.rate(n).to(state[n].dtype) * grads[n] for n in state}
