"""Sharded Muon: each rank orthogonalises only its slice range of every bank.

Per step, for every bank (largest first):
  reduce-scatter(grad, padded along dim 0 to a multiple of world) → this rank's averaged shard (k, m, n)
  → Nesterov momentum on the shard (buffer kept only for the shard) → batched NS on the shard
  → all-gather of the update → p ← p(1 − lr·wd) − lr·update.
The collectives are asynchronous: reduce-scatters are launched right after backward
(`launch_reduce_scatter`) and overlap the replicated-gradient all-reduce and the AdamW steps; during `step` the
all-gather of bank i overlaps the NS of bank i+1, and bank i's update is applied only then.

The math is `muon_direction` / `apply_muon_update` from `muon.py`, i.e. exactly single-rank Muon applied to a
subset of slices, so sharded and unsharded runs agree up to float summation order.

Gloo (CPU tests) has no reduce-scatter; `_reduce_scatter_sum` falls back to all-reduce + slice and
`_all_gather` to list all-gather + cat, with identical results. The NCCL path uses the tensor collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from metattt.optim.muon import Muon, apply_muon_update, as_bank, buffer_dtype, muon_direction
from metattt.optim.ns import default_ns_dtype

__all__ = ["ParallelMuon", "dist_info", "shard_size"]


def dist_info(process_group=None) -> tuple[int, int, str | None]:
    """(world_size, rank, backend) of `process_group` (default group), or (1, 0, None) when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return (dist.get_world_size(process_group), dist.get_rank(process_group),
                str(dist.get_backend(process_group)).lower())
    return 1, 0, None


def shard_size(num_slices: int, world_size: int) -> int:
    """Slices per rank after padding the bank's first dim up to a multiple of world_size."""
    return -(-num_slices // world_size)


class _Pending:
    """An in-flight collective and the post-processing that turns its buffers into the result (run once)."""

    def __init__(self, work, finish: Callable[[], torch.Tensor]) -> None:
        self._work, self._finish, self._result = work, finish, None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = self._finish()
        return self._result


def _reduce_scatter_sum(full: torch.Tensor, rank: int, world: int, group, gloo: bool) -> _Pending:
    """Async Σ_ranks full, keep rows [rank*s, (rank+1)*s) where s = full.size(0) / world."""
    s = full.size(0) // world
    if gloo:
        work = dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group, async_op=True)
        return _Pending(work, lambda: full[rank * s:(rank + 1) * s])
    out = full.new_empty((s, *full.shape[1:]))
    work = dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return _Pending(work, lambda: out)


def _all_gather(shard: torch.Tensor, world: int, group, gloo: bool) -> _Pending:
    """Async concatenation along dim 0 of every rank's `shard` (rank order)."""
    shard = shard.contiguous()
    if gloo:
        parts = [torch.empty_like(shard) for _ in range(world)]
        work = dist.all_gather(parts, shard, group=group, async_op=True)
        return _Pending(work, lambda: torch.cat(parts, dim=0))
    out = shard.new_empty((world * shard.size(0), *shard.shape[1:]))
    work = dist.all_gather_into_tensor(out, shard, group=group, async_op=True)
    return _Pending(work, lambda: out)


@dataclass
class _Bank:
    param: torch.Tensor
    num_slices: int  # K (unpadded)
    shard: int       # s: slices per rank


class ParallelMuon(Muon):
    """Muon with the NS work sharded over ranks (see module docstring). Same constructor as `Muon`, plus
    `process_group` (default: the default group, if torch.distributed is initialised) and `comm_dtype`
    (gradient/update wire format; default bf16 on CUDA, fp32 elsewhere). With world size 1 it is `Muon`.

    Usage per step: backward → `launch_reduce_scatter()` → (replicated grads, AdamW) → `step()`.
    `grad_sq_norm()` (collective) gives the squared norm of the *averaged* bank gradients for clipping.
    `state_dict()` is collective for world > 1 and returns FULL momentum buffers (identical format to `Muon`,
    so checkpoints move freely between world sizes); `load_state_dict` keeps this rank's shard of them.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        polar_express: bool = False,
        *,
        process_group=None,
        comm_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         ns_steps=ns_steps, polar_express=polar_express)
        self.process_group = process_group
        self.world_size, self.rank, backend = dist_info(process_group)
        self._gloo = backend == "gloo"
        self._comm_dtype = comm_dtype
        banks = [
            _Bank(p, as_bank(p).size(0), shard_size(as_bank(p).size(0), self.world_size))
            for g in self.param_groups for p in g["params"]
        ]
        # Largest first: its reduce-scatter is launched first and so is ready first, and its long NS hides
        # the smaller banks' collectives.
        self._banks = sorted(banks, key=lambda b: -b.param.numel())
        self._pending: dict[int, _Pending] | None = None
        self._shards: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ collectives
    def _wire_dtype(self, p: torch.Tensor) -> torch.dtype:
        return self._comm_dtype or default_ns_dtype(p.device)

    @torch.no_grad()
    def launch_reduce_scatter(self) -> None:
        """Start the async averaged reduce-scatter of every bank gradient (idempotent within a step).
        Missing grads count as zeros so every rank issues the same collectives."""
        if self.world_size == 1 or self._pending is not None:
            return
        self._pending, self._shards = {}, {}
        for i, b in enumerate(self._banks):
            p = b.param
            g = as_bank(p.grad) if p.grad is not None else None
            full = torch.zeros((b.shard * self.world_size, *as_bank(p).shape[1:]),
                               dtype=self._wire_dtype(p), device=p.device)
            if g is not None:
                full[: b.num_slices].copy_(g)
            self._pending[i] = _reduce_scatter_sum(full, self.rank, self.world_size, self.process_group, self._gloo)

    def _shard_grad(self, i: int) -> torch.Tensor:
        """This rank's averaged gradient shard of bank i, (s, m, n) in the momentum dtype."""
        if i not in self._shards:
            assert self._pending is not None
            b = self._banks[i]
            raw = self._pending[i].wait()
            self._shards[i] = raw.to(buffer_dtype(b.param.dtype)).div_(self.world_size)
        return self._shards[i]

    @torch.no_grad()
    def grad_sq_norm(self) -> torch.Tensor:
        """Σ ||averaged bank grad||² over all banks (collective for world > 1: shards are disjoint, so the
        all-reduced sum of local shard norms is the full norm, identical on every rank)."""
        if self.world_size == 1:
            return super().grad_sq_norm()
        self.launch_reduce_scatter()
        dev = self._banks[0].param.device if self._banks else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=dev)
        for i in range(len(self._banks)):
            total += self._shard_grad(i).float().pow(2).sum()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.process_group)
        return total

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | float | None = None):  # type: ignore[override]
        if self.world_size == 1:
            return super().step(closure, grad_scale=grad_scale)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.launch_reduce_scatter()
        # Group dicts are looked up per step: load_state_dict replaces them, and the trainer edits them.
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        previous: tuple[_Bank, dict, _Pending] | None = None
        for i, b in enumerate(self._banks):
            shard = self._shard_grad(i)
            state = self.state[b.param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(shard)
            g = group_of[id(b.param)]
            update = muon_direction(shard, state["momentum_buffer"], momentum=g["momentum"],
                                    nesterov=g["nesterov"], ns_steps=g["ns_steps"],
                                    polar_express=g["polar_express"], grad_scale=grad_scale)
            gathered = _all_gather(update.to(self._wire_dtype(b.param)), self.world_size,
                                   self.process_group, self._gloo)
            if previous is not None:
                self._apply(*previous)
            previous = (b, g, gathered)
        if previous is not None:
            self._apply(*previous)
        self._pending, self._shards = None, {}
        return loss

    @staticmethod
    def _apply(b: _Bank, group: dict, gathered: _Pending) -> None:
        full = gathered.wait()[: b.num_slices]
        apply_muon_update(b.param, full, lr=group["lr"], weight_decay=group["weight_decay"])

    # ------------------------------------------------------------------ checkpointing
    def _bank_of(self, p: torch.Tensor) -> _Bank:
        for b in self._banks:
            if b.param is p:
                return b
        raise KeyError("parameter is not managed by this ParallelMuon")

    def _ordered_params(self) -> list[torch.Tensor]:
        """Parameters in the index order torch uses in state_dict()."""
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def state_dict(self) -> dict:  # type: ignore[override]
        sd = super().state_dict()
        if self.world_size == 1:
            return sd
        state = dict(sd["state"])
        for idx, p in enumerate(self._ordered_params()):  # same order on every rank → matching collectives
            if idx not in state or "momentum_buffer" not in state[idx]:
                continue
            b = self._bank_of(p)
            buf = state[idx]["momentum_buffer"]
            full = _all_gather(buf, self.world_size, self.process_group, self._gloo).wait()[: b.num_slices]
            state[idx] = {**state[idx], "momentum_buffer": full.clone()}
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        if self.world_size > 1:
            state = dict(state_dict["state"])
            for idx, p in enumerate(self._ordered_params()):
                if idx not in state or "momentum_buffer" not in state[idx]:
                    continue
                b = self._bank_of(p)
                full = state[idx]["momentum_buffer"]
                if full.size(0) != b.num_slices:
                    raise ValueError(f"momentum buffer {idx} has {full.size(0)} slices, bank has {b.num_slices}")
                lo, hi = self.rank * b.shard, (self.rank + 1) * b.shard
                shard = full.new_zeros((b.shard, *full.shape[1:]))
                if lo < b.num_slices:
                    shard[: min(hi, b.num_slices) - lo].copy_(full[lo:hi])
                state[idx] = {**state[idx], "momentum_buffer": shard}
            state_dict = {**state_dict, "state": state}
        super().load_state_dict(state_dict)
