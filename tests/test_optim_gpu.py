"""CUDA checks of metattt.optim: bf16 Newton–Schulz, and the NCCL ParallelMuon path (2 GPUs) against
single-process Muon on the global batch. Skipped without CUDA."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metattt.optim import Muon, OptimConfig, ParallelMuon, build_optimizers, zeropower_via_newtonschulz

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

V, D, L, KV, H, B, T = 64, 64, 3, 32, 192, 8, 32


@needs_cuda
def test_ns_bf16_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(4, 256, 768, device="cuda", generator=g)
    for pe, lo, hi in ((False, 0.6, 1.3), (True, 0.75, 1.25)):
        Z = zeropower_via_newtonschulz(G, polar_express=pe)
        assert Z.dtype == torch.bfloat16 and Z.shape == G.shape
        s = torch.linalg.svdvals(Z.double())
        assert lo < s.min() and s.max() < hi, (pe, s.min().item(), s.max().item())
    fp32 = zeropower_via_newtonschulz(G, dtype=torch.float32)
    rel = (zeropower_via_newtonschulz(G).float() - fp32).norm() / fp32.norm()
    assert rel < 0.05, rel.item()


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Parameter(torch.randn(V, D) * 0.5)
        self.qo_bank = nn.Parameter(torch.randn(2 * L, D, D) / D**0.5)
        self.kv_bank = nn.Parameter(torch.randn(2 * L, KV, D) / D**0.5)
        self.mlp_up_bank = nn.Parameter(torch.randn(L, H, D) / D**0.5)
        self.mlp_down_bank = nn.Parameter(torch.randn(L, D, H) / H**0.5)
        self.mlp_scale = nn.Parameter(torch.ones(L, D))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb[tokens]
        steps = torch.arange(1, tokens.size(1) + 1, device=x.device, dtype=x.dtype)[:, None]
        for i in range(L):
            mix = torch.cumsum(torch.tanh(x @ self.kv_bank[i].T) * (x @ self.kv_bank[L + i].T), dim=1) / steps
            x = x + (torch.cat([mix, mix], -1) * torch.tanh(x @ self.qo_bank[i].T)) @ self.qo_bank[L + i].T
            x = x + self.mlp_scale[i] * (torch.relu(x @ self.mlp_up_bank[i].T).square() @ self.mlp_down_bank[i].T)
        return nn.functional.cross_entropy((x @ self.tok_emb.T).reshape(-1, V), targets.reshape(-1))


def _batch(step: int, device):
    g = torch.Generator().manual_seed(step)
    t = torch.randint(0, V, (B, T + 1), generator=g).to(device)
    return t[:, :-1], t[:, 1:]


def _train(rank: int, world: int, device, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = _Toy().to(device)
    opts = build_optimizers(model, OptimConfig(grad_clip=0.1), distributed=world > 1)
    assert isinstance(opts.muon, ParallelMuon) == (world > 1)
    per = B // world
    for s in range(steps):
        x, y = _batch(s, device)
        model(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
        opts.launch_reduce_scatter()
        opts.step()
    return {n: p.detach().cpu() for n, p in model.named_parameters()}


def _nccl_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save(_train(rank, 2, torch.device("cuda", rank)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_parallel_muon_nccl_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_nccl_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    ref = _train(0, 1, torch.device("cuda", 0))
    torch.manual_seed(0)
    init = {n: p.detach() for n, p in _Toy().named_parameters()}
    for n, p in ref.items():
        assert torch.equal(ranks[0][n], ranks[1][n]), f"ranks disagree on {n}"
        moved = (p - init[n]).abs().max().item()
        diff = (ranks[0][n] - p).abs().max().item()
        # bf16 wire format vs fp32 grads, both with bf16 NS: agreement well below the step size
        assert diff < 0.1 * moved + 1e-6, (n, diff, moved)


@needs_cuda
def test_muon_cuda_close_to_cpu():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(6, 64, 192, generator=g)
    grads = [torch.randn(6, 64, 192, generator=g) for _ in range(2)]
    out = []
    for dev in ("cpu", "cuda"):
        p = nn.Parameter(p0.clone().to(dev))
        opt = Muon([p], lr=0.05, momentum=0.95, weight_decay=0.04)
        for gr in grads:
            p.grad = gr.to(dev)
            opt.step()
        out.append(p.detach().cpu())
    moved = (out[0] - p0).abs().max()
    assert (out[0] - out[1]).abs().max() < 0.1 * moved
