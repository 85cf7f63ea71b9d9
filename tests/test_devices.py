"""The one gradient all-reduce and the any-rank flag of devices.DistCtx, on 2 gloo processes, as the trainer's meta
average uses them."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metattt.devices import DistCtx
from metattt.train.dist import DistInfo


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from metattt.train.loop import _average_grads

        ctx = DistCtx.current()
        a, count, scalar = ctx.reduce_sum([torch.full((2, 3), rank + 1.0), torch.tensor([3.0 + rank], dtype=torch.float64),
                                           torch.tensor(0.5 * rank)])
        p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.tensor([1.0, 2.0]) * (rank + 1)  # q has no gradient on any rank: zeros
        _average_grads(torch.optim.SGD([p, q], lr=0.1), DistInfo(rank, rank, world, torch.device("cpu")))
        torch.save({"a": a, "count": count, "scalar": scalar, "p": p.grad, "q": q.grad,
                    "any": [ctx.any(rank == 1, torch.device("cpu")), ctx.any(False, torch.device("cpu"))]},
                   os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_reduce_sum_any_and_the_meta_gradient_average_over_two_ranks() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="fork")
        for r in (0, 1):
            got = torch.load(os.path.join(tmp, f"r{r}.pt"))
            assert torch.equal(got["a"], torch.full((2, 3), 3.0)) and got["a"].dtype == torch.float32
            assert got["count"].tolist() == [7.0] and got["scalar"].shape == () and float(got["scalar"]) == 0.5
            assert torch.equal(got["p"], torch.tensor([1.5, 3.0])) and torch.equal(got["q"], torch.zeros(3))
            assert got["any"] == [True, False]


def test_one_rank_is_the_identity_without_a_collective() -> None:
    ctx = DistCtx()
    g = torch.arange(6, dtype=torch.bfloat16).view(2, 3)
    (s,) = ctx.reduce_sum([g])
    assert s.dtype == torch.float32 and torch.equal(s, g.float()) and ctx.reduce_sum([]) == []
    assert ctx.any(True, torch.device("cpu")) and not ctx.any(False, torch.device("cpu"))
