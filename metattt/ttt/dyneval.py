"""``dyneval``: Krause-style dynamic evaluation with RMS-normalised steps and decay to the trained weights.

Update per mini-batch: theta <- theta - lr * clamp(g / (rms + eps), +-max_update) + decay * (theta_0 - theta)
(decay toward the trained weights theta_0; applied as a lerp so decay=1 lands exactly on theta_0).
``rms`` is the per-parameter (or per-slice, ``granularity="slice"``) root-mean-square of gradients, from
``collect_stats(model, batches)`` on training data, or loaded from artifact extras (``ttt.dyneval.rms.<name>``),
or - with ``auto_stats`` - collected from the first adapted (already-scored, hence legal) chunk.
Per-parameter stats are as large as the selection: prefer "slice" granularity for the artifact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .adapter import Adapter, AdapterConfig, autocast_for, grad_context


@dataclass
class DynEvalConfig(AdapterConfig):
    lr: float = 1e-4
    decay: float = 0.001
    eps: float = 1e-5
    max_update: float = 5.0
    granularity: str = "param"
    auto_stats: bool = True
    epochs: int = 1
    batch_seqs: int = 32
    schedule: str = "constant"
    reset: str = "never"

    def validate(self) -> None:
        super().validate()
        if self.granularity not in ("param", "slice"):
            raise ValueError(f"dyneval granularity must be 'param' or 'slice', got {self.granularity!r}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"dyneval decay must be in [0, 1], got {self.decay}")


class DynEvalAdapter(Adapter):
    name = "dyneval"
    Config = DynEvalConfig

    def _init_state(self, model: nn.Module) -> None:
        self._rms: dict[str, Tensor] | None = None

    def _reduce_stat(self, ms: Tensor) -> Tensor:
        if self.cfg.granularity == "param" or ms.ndim == 0:
            return ms
        return ms.flatten(1).mean(1).view(ms.shape[0], *([1] * (ms.ndim - 1))) if ms.ndim >= 2 else ms.mean()

    def collect_stats(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """RMS of mini-batch gradients at the trained weights, over ``batches`` of (x, y)."""
        self._require_bound()
        acc: dict[str, Tensor] = {}
        n = 0
        with grad_context():
            for x, y in batches:
                with autocast_for(x):
                    _, g = self._grad(model, x, y, self._trained)
                for k, v in g.items():
                    sq = v.to(torch.promote_types(v.dtype, torch.float32)).square()
                    acc[k] = acc[k] + sq if k in acc else sq
                n += 1
        if n == 0:
            raise ValueError("dyneval.collect_stats got no batches")
        self._rms = {k: self._reduce_stat(v / n).sqrt() for k, v in acc.items()}
        return dict(self._rms)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self._rms is None else {f"rms.{k}": v.detach().clone() for k, v in self._rms.items()}

    def load_state_dict(self, sd: Mapping[str, Tensor], strict: bool = True) -> None:
        sel = self._require_bound()
        if not sd:
            return
        want = {f"rms.{n}" for n in sel.names}
        missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
        if strict and (missing or unexpected):
            raise KeyError(f"dyneval stats mismatch: missing {missing}, unexpected {unexpected}")
        dev = {n: self._trained[n].device for n in sel.names}
        self._rms = {k[4:]: v.to(device=dev[k[4:]], dtype=torch.promote_types(self._trained[k[4:]].dtype, torch.float32))
                     for k, v in sd.items() if k in want}

    def _update(self, model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Tensor:
        if self._rms is None:
            if not self.cfg.auto_stats:
                raise RuntimeError("dyneval has no gradient statistics: call collect_stats(model, batches), load "
                                   "them from the artifact extras, or set auto_stats=true")
            self.collect_stats(model, [(x, y)])
        loss, grads = self._grad(model, x, y)
        c = self.cfg
        with torch.no_grad():
            for n, p in self._cur.items():
                u = (grads[n].to(self._rms[n].dtype) / (self._rms[n] + c.eps)).clamp_(-c.max_update, c.max_update)
                if c.decay:
                    p.lerp_(self._trained[n], c.decay)
                p.sub_(lr * u.to(p.dtype))
        return loss

    def _inner_step(self, model, base, state, x, y, k, create_graph, attn, backend):  # noqa: ANN001
        if self._rms is None:
            raise RuntimeError("dyneval inner loop needs gradient statistics (collect_stats first)")
        grads = self._inner_grads(model, base, state, x, y, create_graph, attn, backend)
        c = self.cfg
        out = {}
        for n in state:
            u = (grads[n] / (self._rms[n].to(grads[n].dtype) + c.eps)).clamp(-c.max_update, c.max_update)
            out[n] = torch.lerp(state[n], base[n], c.decay) - c.lr * u
        return out
