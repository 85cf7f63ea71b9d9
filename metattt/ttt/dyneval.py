"""``dyneval``: Krause-style dynamic evaluation with RMS-normalised steps and decay to the trained weights.

Step per mini-batch: theta <- lerp(theta, theta_0, decay) - lr * clamp(g / (rms + eps), +-max_update), with
theta_0 the weights the update started from (the trained weights in evaluation; the lerp makes decay=1 land
exactly on theta_0). ``rms`` is the per-parameter (or per-slice, ``granularity="slice"``) root-mean-square of
gradients, a buffer of the module (``rms.<name>``; artifact extras ``ttt.dyneval.rms.<name>``): from
``collect_stats(model, batches)`` on training data, loaded from the artifact, or - with ``auto_stats`` -
collected from the first adapted (already-scored, hence legal) chunk. Per-parameter stats are as large as the
selection: prefer "slice" granularity for the artifact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..devices import DistCtx, autocast_for
from . import rules
from .adapter import Adapter, AdapterConfig, Tensors, grad_context, register_nested


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
    cfg: DynEvalConfig  # Adapter.__init__ checks it is a Config

    @property
    def has_stats(self) -> bool:
        return "rms" in self._modules

    def _reduce_stat(self, ms: Tensor) -> Tensor:
        if self.cfg.granularity == "param" or ms.ndim == 0:
            return ms
        return ms.flatten(1).mean(1).view(ms.shape[0], *([1] * (ms.ndim - 1))) if ms.ndim >= 2 else ms.mean()

    def _set_stats(self, rms: Mapping[str, Tensor]) -> None:
        for n, v in rms.items():
            dt = torch.promote_types(self._trained[n].dtype, torch.float32)
            register_nested(self, f"rms.{n}", v.detach().to(device=self._trained[n].device, dtype=dt), buffer=True)

    def collect_stats(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                      autocast: bool = True) -> Tensors:
        """RMS of mini-batch gradients at the trained weights, over ``batches`` of (x, y)."""
        self._require_bound()
        acc: Tensors = {}
        n = 0
        ctx = DistCtx.current()
        with grad_context():
            for x, y in batches:
                rows = ctx.share(x.size(0))
                grad_at = self._grad_at(model, self._trained, x[rows], y[rows], second=False, attn=None,
                                        backend="autograd", over_ranks=True)
                with autocast_for(x.device, autocast):
                    _, g = grad_at(self._trained)
                for k, v in g.items():
                    sq = v.to(torch.promote_types(v.dtype, torch.float32)).square()
                    acc[k] = acc[k] + sq if k in acc else sq
                n += 1
        if n == 0:
            raise ValueError("dyneval.collect_stats got no batches")
        rms = {k: self._reduce_stat(v / n).sqrt() for k, v in acc.items()}
        self._set_stats(rms)
        return rms

    def load_state_dict(self, sd: Mapping[str, Tensor], strict: bool = True, assign: bool = False):  # noqa: ANN201
        """Adopt ``rms.<name>`` statistics (none given: keep collecting them as configured)."""
        sel = self._require_bound()
        if not sd:
            return None
        want = {f"rms.{n}" for n in sel.names}
        missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
        if strict and (missing or unexpected):
            raise KeyError(f"dyneval stats mismatch: missing {missing}, unexpected {unexpected}")
        self._set_stats({k[4:]: v for k, v in sd.items() if k in want})
        return None

    def prepare(self, model: nn.Module, x: Tensor, y: Tensor, autocast: bool) -> None:
        if not self.has_stats:
            if not self.cfg.auto_stats:
                raise RuntimeError("dyneval has no gradient statistics: call collect_stats(model, batches), load "
                                   "them from the artifact extras, or set auto_stats=true")
            self.collect_stats(model, [(x, y)], autocast=autocast)

    def rule(self) -> rules.Transform:
        c = self.cfg
        return rules.chain(rules.scale_by_rms(lambda n: self.get_buffer(f"rms.{n}"), c.eps, c.max_update),
                           rules.scale_by_schedule(rules.Schedule(c.lr, c.schedule)))

    def init(self, trainables: Mapping[str, Tensor]) -> dict[str, Any]:
        return {**self.rule().init(trainables), **{f"anchor.{n}": t.clone() for n, t in trainables.items()}}

    def step(self, trainables: Tensors, state: dict[str, Any], grads: Tensors,
             active: Tensor | None = None) -> tuple[Tensors, dict[str, Any]]:
        """The rule's update from the weights decayed toward the anchor: ``lerp(theta, theta_0, decay) - u``."""
        if active is not None:
            raise ValueError("dyneval has no per-document rows to mask (active=)")
        if not self.has_stats:
            raise RuntimeError("dyneval needs gradient statistics (collect_stats, artifact extras or auto_stats)")
        u, changed = self.rule().update(grads, state, trainables)
        new = {n: torch.lerp(p, state[f"anchor.{n}"], self.cfg.decay) - u[n] for n, p in trainables.items()}
        return new, {**state, **changed}
