"""torchrun / single-process set-up. Why explicit: the trainer is DDP-free (Parallel Muon owns bank gradients)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import DistCtx


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ctx(self) -> DistCtx:
        return DistCtx(self.rank, self.world_size)


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, local, world, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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
