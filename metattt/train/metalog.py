"""The meta-objective's curve and the learned meta-parameters, as a run records them (issue 31).

Why: "meta-training changed nothing" means little unless the meta-objective itself moved. Every meta step writes
one ``{"kind": "meta", "step": S, "meta/L_post": ..., "meta/L_pre": ...}`` record to metrics.jsonl: L_post is the
outer split's loss after the inner loop (the meta-objective), L_pre the same loss before it (when the step knows
it: free on a same-batch split, else ``--meta.log-pre``), averaged over the step's meta micro-batches of rank 0.
The values stay tensors until the trainer's next log (no host sync per step). At the end, ``meta_param_summary``
says what the meta-parameters converged to (MetaSGD's learning rates; doclora's A init), for summary.json.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

MAX_LISTED = 64  # rates of a tensor listed value by value up to this many (per-slice rates of a small model)


class MetaLog:
    """Buffers per-meta-step statistics between the trainer's log records."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._count = 0
        self._done: list[tuple[int, dict[str, Tensor]]] = []

    def add(self, stats: Mapping[str, Tensor]) -> None:
        """One meta micro-batch's statistics."""
        for k, v in stats.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._count += 1

    def end_step(self, step: int) -> None:
        """Close the meta step that made the run's ``step``-th update (no-op if it had no meta micro-batch)."""
        if self._count:
            self._done.append((step, {k: v / self._count for k, v in self._sums.items()}))
        self._sums, self._count = {}, 0

    def flush(self) -> list[dict[str, Any]]:
        out = [{"kind": "meta", "step": s, **{k: float(v) for k, v in st.items()}} for s, st in self._done]
        self._done = []
        return out


def meta_param_summary(adapter: Any) -> dict[str, Any]:
    """Per meta-parameter tensor: learned rates (``log_lr.*``: exp of the values, with the init) or, for other
    tensors (doclora's A0), their size; values listed when there are at most ``MAX_LISTED``."""
    out: dict[str, Any] = {}
    init = getattr(getattr(adapter, "cfg", None), "lr_init", None)
    for name, p in adapter.meta_parameters().items():
        v = p.detach().float().cpu()
        if name.startswith("log_lr."):
            r = v.exp().flatten()
            row: dict[str, Any] = {"kind": "rate", "shape": list(v.shape), "init": init,
                                   "mean": float(r.mean()), "min": float(r.min()), "max": float(r.max()),
                                   "geomean": float(math.exp(float(v.mean())))}
            if r.numel() <= MAX_LISTED:
                row["values"] = [float(x) for x in r]
        else:
            row = {"kind": "tensor", "shape": list(v.shape), "rms": float(v.square().mean().sqrt()),
                   "norm": float(torch.linalg.vector_norm(v))}
        out[name] = row
    return out
