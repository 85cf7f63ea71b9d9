"""``metasgd``: Meta-SGD, learned inner learning rates.

One log-rate per bank slice (i.e. per bank x layer x kind matrix) and one per other selected tensor; with
``per_row`` one per output row of every bank slice / matrix instead. The rates are ``nn.Parameter`` log-values
of the module (``meta_parameters()``, names ``log_lr.<tensor>``), trained by the outer loop and stored in the
artifact (``ttt.metasgd.log_lr.<tensor>``); loading without them raises a clear error (``requires_meta_params``).
Step: theta' = theta - lr_scale * exp(log_lr) * g (g clipped when ``grad_clip``). Even with first-order
(constant) g, d theta'/d log_lr = -lr_scale * exp(log_lr) * g, so the outer loss gives the rates a gradient
without any double backward. Evaluation: ``epochs`` passes of the same step per chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import rules
from .adapter import Adapter, AdapterConfig, register_nested


@dataclass
class MetaSGDConfig(AdapterConfig):
    lr_init: float = 0.002
    per_row: bool = False
    lr_scale: float = 1.0
    epochs: int = 1
    batch_seqs: int = 32
    grad_clip: float = 0.0
    reset: str = "never"

    def validate(self) -> None:
        super().validate()
        if self.lr_init <= 0:
            raise ValueError(f"metasgd lr_init must be > 0, got {self.lr_init}")


class MetaSGDAdapter(Adapter):
    name = "metasgd"
    Config = MetaSGDConfig
    cfg: MetaSGDConfig  # Adapter.__init__ checks it is a Config
    requires_meta_params = True

    def setup(self, model: nn.Module) -> None:
        sel = self._require_bound()
        banks = {b for b, _ in sel.labels}
        self._layout: dict[str, tuple] = {}
        init = math.log(self.cfg.lr_init)
        for n in sel.names:
            t = self._trained[n]
            idx = sel.slices[n]
            shape: tuple[int, ...]
            if n in banks:
                n_sl = t.shape[0] if idx is None else len(idx)
                shape = (n_sl, t.shape[1]) if self.cfg.per_row else (n_sl,)
            elif self.cfg.per_row and t.ndim >= 2:
                shape = (t.shape[0],)
            else:
                shape = ()
            register_nested(self, f"log_lr.{n}", torch.full(shape, init, device=t.device, dtype=torch.float32))
            self._layout[n] = (n in banks, None if idx is None else torch.tensor(idx, device=t.device), t.shape)

    def rate(self, name: str) -> Tensor:
        """Learning rate tensor broadcastable against parameter ``name`` (0 on unselected bank slices)."""
        is_bank, idx, shape = self._layout[name]
        r = self.get_parameter(f"log_lr.{name}").exp()
        if is_bank:
            if idx is not None:
                r = torch.zeros((shape[0], *r.shape[1:]), device=r.device, dtype=r.dtype).index_copy(0, idx, r)
            return r.view(*r.shape, *([1] * (len(shape) - r.ndim)))
        if r.ndim == 1:
            return r.view(shape[0], *([1] * (len(shape) - 1)))
        return r

    def selection_report(self) -> str:
        n_meta = sum(p.numel() for p in self.parameters())
        return super().selection_report() + f"\nmeta-parameters (log-rates): {n_meta:,}"

    def rule(self) -> rules.Transform:
        c = self.cfg
        return rules.chain(rules.clip_by_global_norm(c.grad_clip), rules.scale_by_rates(self.rate, c.lr_scale))
