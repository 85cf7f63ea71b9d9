"""The trainer's rank agreements (a mean of a metric, one stop/checkpoint decision). Set-up and teardown are the
evaluator's too: metattt.devices. Why explicit: the trainer is DDP-free (Parallel Muon owns bank gradients)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..devices import DistInfo, setup, teardown

__all__ = ["DistInfo", "setup", "teardown", "all_reduce_mean", "agree"]


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def agree(stop: bool, due: bool, signum: int, info: DistInfo) -> tuple[bool, bool, int]:
    """One collective per step: rank 0 decides the wallclock ``stop`` and a time-based checkpoint ``due`` (so every
    rank leaves, or saves, at the same step); a signal received by any rank (``signum`` > 0) counts for all."""
    if not info.distributed:
        return stop, due, signum
    own = info.rank == 0
    t = torch.tensor([int(stop and own), int(due and own), int(signum)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    a, b, c = t.tolist()
    return bool(a), bool(b), int(c)
