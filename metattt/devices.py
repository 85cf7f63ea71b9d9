"""Where a computation runs: the process group and device of an entry point, this process's rank share of a
batch, the one gradient all-reduce, and the autocast choice.

One home for all of them (the evaluator, the adapters and the trainer used to carry their own copies): both entry
points call ``setup``; every rank holds the same rows and takes the contiguous share ``row_share`` gives it; on
CUDA the speed path is bf16 autocast, on CPU nothing (exact tests).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistCtx:
    """Rank and world size of this process (world 1 when torch.distributed is not initialised)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "DistCtx":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> slice:
        """This rank's rows of ``n`` (see :func:`row_share`)."""
        a, b = row_share(n, self.world, self.rank)
        return slice(a, b)

    def reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over the ranks, as float32, in one collective: the one gradient all-reduce (the
        adapters' token-weighted mean, the docttt phases' full-model step, the meta-trainer's average).
        Integer counts carried along stay exact below 2**24. One rank: float32 copies, no collective."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        if self.active:
            dist.all_reduce(flat)
        return [v.view_as(t) for v, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any (a collective: every rank must call it)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


@dataclass(frozen=True)
class DistInfo:
    """What an entry point's ``setup`` found: ranks from torchrun's environment and this process's device."""

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
    """Initialise the process group when launched by torchrun (NCCL on CUDA, gloo on CPU) and pick the device:
    "auto" is CUDA when there is one; a CUDA device without an index is this process's local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, local, world, dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def row_share(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous share ``[a, b)`` of ``n`` items for ``rank`` (the first ranks take the remainder)."""
    base, extra = divmod(n, world)
    a = rank * base + min(rank, extra)
    return a, a + base + (1 if rank < extra else 0)


def autocast_for(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; nothing on CPU."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
