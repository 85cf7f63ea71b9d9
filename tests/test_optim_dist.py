"""Two-process gloo test: ParallelMuon + Optimizers.step on half batches == single-process Muon on the
global batch (banks with first dim 3, not divisible by world 2, exercise the padding path)."""

from __future__ import annotations

import copy
import io
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metattt.optim import OptimConfig, ParallelMuon, build_optimizers

WORLD = 2
GLOBAL_B, T, V, L = 8, 6, 16, 3  # L=3 → mlp banks have 3 slices (padded to 4), qo/kv banks 6
STEPS = 3
CLIPS = (0.0, 0.05)


class ToyBanked(nn.Module):
    def __init__(self, d: int = 8, kv: int = 4, h: int = 12) -> None:
        super().__init__()
        self.tok_emb = nn.Parameter(torch.randn(V, d) * 0.5)
        self.qo_bank = nn.Parameter(torch.randn(2 * L, d, d) / d**0.5)
        self.kv_bank = nn.Parameter(torch.randn(2 * L, kv, d) / d**0.5)
        self.mlp_up_bank = nn.Parameter(torch.randn(L, h, d) / d**0.5)
        self.mlp_down_bank = nn.Parameter(torch.randn(L, d, h) / h**0.5)
        self.mlp_scale = nn.Parameter(torch.ones(L, d))
        self.skip_weights = nn.Parameter(torch.ones(1, d))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb[tokens]
        steps = torch.arange(1, tokens.size(1) + 1, dtype=x.dtype)[:, None]
        for i in range(L):
            k = torch.tanh(x @ self.kv_bank[i].T)
            mix = torch.cumsum(k * (x @ self.kv_bank[L + i].T), dim=1) / steps
            y = torch.cat([mix, mix], dim=-1) * torch.tanh(x @ self.qo_bank[i].T)
            x = x + y @ self.qo_bank[L + i].T
            x = x + self.mlp_scale[i] * (torch.relu(x @ self.mlp_up_bank[i].T).square() @ self.mlp_down_bank[i].T)
        logits = (x * self.skip_weights) @ self.tok_emb.T
        return nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


def _global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    t = torch.randint(0, V, (GLOBAL_B, T + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def _cfg(clip: float) -> OptimConfig:
    return OptimConfig(grad_clip=clip, muon_momentum_warmup_steps=2)


def _run(model: nn.Module, opts, rank: int, world: int, steps: range) -> list[float]:
    """Train on this rank's contiguous slice of each global batch, with the trainer's schedule calls."""
    cfg = opts.cfg
    norms = []
    per = GLOBAL_B // world
    for s in steps:
        x, y = _global_batch(s)
        opts.set_muon_momentum(cfg.muon_momentum_at(s))
        opts.set_lr_scale(1.0 if s < 2 else 0.5)
        model(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
        opts.launch_reduce_scatter()
        stats = opts.step()
        norms.append(float(stats["grad_norm"]) if "grad_norm" in stats else float("nan"))
    return norms


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for clip in CLIPS:
            torch.manual_seed(0)
            model = ToyBanked()
            opts = build_optimizers(model, _cfg(clip), distributed=True)
            assert isinstance(opts.muon, ParallelMuon) and opts.world_size == WORLD
            norms = _run(model, opts, rank, WORLD, range(STEPS))
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            local_shapes = sorted(tuple(st["momentum_buffer"].shape) for st in opts.muon.state.values())
            # collective: full (gathered) momentum buffers. Round-trip through bytes as a checkpoint would:
            # torch optimizers' state_dict() returns references, so an in-memory load would alias AdamW state.
            sd = opts.state_dict()
            buf = io.BytesIO()
            torch.save(sd, buf)
            buf.seek(0)
            # Resume: a copy loaded from the gathered state (re-sharded on load) takes the identical next step.
            model2 = copy.deepcopy(model)
            opts2 = build_optimizers(model2, _cfg(clip), distributed=True)
            opts2.load_state_dict(torch.load(buf))
            _run(model, opts, rank, WORLD, range(STEPS, STEPS + 1))
            _run(model2, opts2, rank, WORLD, range(STEPS, STEPS + 1))
            resume_equal = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
            torch.save({"params": params, "norms": norms, "muon_state": sd["muon"]["state"],
                        "local_shapes": local_shapes, "resume_equal": resume_equal},
                       os.path.join(out_dir, f"rank{rank}_clip{clip}.pt"))
    finally:
        dist.destroy_process_group()


def _start_method() -> str:
    """fork saves ~4 s of torch re-import on 2 cores, but is unsafe once CUDA (and its autograd threads) is
    initialised in this process (e.g. GPU tests ran first): then spawn."""
    if os.environ.get("METATTT_TEST_SPAWN") or torch.cuda.is_initialized() or sys.platform != "linux":
        return "spawn"
    return "fork"


def _reference(clip: float, steps: int):
    torch.manual_seed(0)
    model = ToyBanked()
    opts = build_optimizers(model, _cfg(clip), distributed=False)
    norms = _run(model, opts, 0, 1, range(steps))
    return model, opts, norms


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_parallel_muon_two_ranks_matches_single_process():
    # References first: also warms torch's lazy optimizer imports (~2 s) so forked workers inherit them.
    refs = {}
    for clip in CLIPS:
        model, opts, norms = _reference(clip, STEPS)
        refs[clip] = ({n: p.detach() for n, p in model.named_parameters()}, opts.state_dict()["muon"]["state"], norms)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True,
                           start_method=_start_method())
        results = {(r, c): torch.load(os.path.join(tmp, f"rank{r}_clip{c}.pt")) for r in range(WORLD) for c in CLIPS}

    for clip in CLIPS:
        ref_params, ref_state, ref_norms = refs[clip]
        for r in range(WORLD):
            res = results[(r, clip)]
            tag = f"rank {r} clip {clip}"
            # local momentum is only the shard: (ceil(K/2), m, n); K=3 banks are padded to 4 → 2 slices
            assert res["local_shapes"] == [(2, 8, 12), (2, 12, 8), (3, 4, 8), (3, 8, 8)], res["local_shapes"]
            for n, p in res["params"].items():
                torch.testing.assert_close(p, ref_params[n], atol=1e-5, rtol=0, msg=f"{tag} {n}")
            # gathered momentum has single-rank Muon's format and values
            assert sorted(res["muon_state"]) == sorted(ref_state)
            for idx, st in ref_state.items():
                torch.testing.assert_close(res["muon_state"][idx]["momentum_buffer"], st["momentum_buffer"],
                                           atol=1e-5, rtol=1e-5, msg=f"{tag} momentum {idx}")
            assert res["resume_equal"], f"{tag}: optimizer resumed from the gathered state diverged"
            if clip > 0:
                assert all(n > clip for n in res["norms"]), res["norms"]  # clipping was active every step
                torch.testing.assert_close(torch.tensor(res["norms"]), torch.tensor(ref_norms), atol=1e-6, rtol=1e-5)
    # clipping changed the trajectory, so the clipped comparison is not a copy of the unclipped one
    assert not torch.allclose(refs[0.0][0]["qo_bank"], refs[0.05][0]["qo_bank"], atol=1e-4)
