"""Build the optimizer set for a banked model and run the ordered per-step sequence.

Routing: parameters named `*_bank` → Muon (`ParallelMuon` when distributed); embedding tables (`*_emb`) →
AdamW at `embed_lr`; an untied `lm_head` → AdamW at `head_lr`; everything else (per-block vectors, gates,
skip weights, small projections, scalars) → AdamW at `scalar_lr`.

Distributed training does NOT use DDP: `Optimizers.step` owns gradient reduction (bank grads are
reduce-scattered by ParallelMuon, the rest all-reduced here), so the model must not be DDP-wrapped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from torch import nn

from metattt.optim.muon import Muon
from metattt.optim.parallel_muon import ParallelMuon, dist_info

__all__ = ["OptimConfig", "Optimizers", "build_optimizers", "route_parameters"]


@dataclass
class OptimConfig:
    """Optimizer hyper-parameters (defaults: the pg-2026-03-23 record)."""

    matrix_lr: float = 0.025
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_wd: float = 0.04
    nesterov: bool = True
    ns_steps: int = 5
    polar_express: bool = False
    embed_lr: float = 0.035      # tok_emb (tied with the output head) and the other embedding tables
    head_lr: float = 0.008       # untied lm_head only
    scalar_lr: float = 0.025
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    adam_wd: float = 0.04
    grad_clip: float = 0.3       # global L2 norm of the averaged gradient; 0 = off
    bucket_mb: float = 32.0      # replicated-gradient all-reduce bucket size

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        for name in ("matrix_lr", "embed_lr", "head_lr", "scalar_lr", "muon_wd", "adam_wd", "grad_clip",
                     "adam_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("muon_momentum", "muon_momentum_warmup_start"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"OptimConfig.adam_betas must be two values in [0, 1), got {self.adam_betas}")
        if self.ns_steps < 1:
            raise ValueError(f"OptimConfig.ns_steps must be >= 1, got {self.ns_steps}")
        if self.muon_momentum_warmup_steps < 0:
            raise ValueError("OptimConfig.muon_momentum_warmup_steps must be >= 0")
        if self.bucket_mb <= 0:
            raise ValueError(f"OptimConfig.bucket_mb must be > 0, got {self.bucket_mb}")

    def muon_momentum_at(self, step: int) -> float:
        """Linear warm-up from muon_momentum_warmup_start to muon_momentum over the warm-up steps."""
        if self.muon_momentum_warmup_steps == 0:
            return self.muon_momentum
        frac = min(max(step, 0) / self.muon_momentum_warmup_steps, 1.0)
        return (1.0 - frac) * self.muon_momentum_warmup_start + frac * self.muon_momentum

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OptimConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown OptimConfig fields: {sorted(unknown)}")
        return cls(**d)


def _kind(name: str) -> str:
    leaf = name[: -len(".weight")] if name.endswith(".weight") else name
    leaf = leaf.rsplit(".", 1)[-1]
    if leaf.endswith("_bank"):
        return "bank"
    if leaf.endswith("_emb"):
        return "embed"
    if leaf == "lm_head":
        return "head"
    return "scalar"


def route_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable named parameters split into bank / embed / head / scalar (see module docstring)."""
    routes: dict[str, list[tuple[str, nn.Parameter]]] = {"bank": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            routes[_kind(name)].append((name, p))
    if not routes["bank"]:
        raise ValueError("build_optimizers: model has no trainable parameter named '*_bank' (Muon needs banks)")
    for name, p in routes["bank"]:
        if p.ndim != 3:
            raise ValueError(f"bank parameter {name} must be 3-D (K, out, in), got shape {tuple(p.shape)}")
    return routes


@dataclass
class Optimizers:
    """Muon (+ sharding) and the AdamW optimizers of one model, stepped in the right order (`step`)."""

    muon: Muon
    adams: list[torch.optim.Optimizer]
    cfg: OptimConfig
    replicated: list[nn.Parameter] = field(repr=False)
    process_group: object = None
    world_size: int = 1

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.muon, *self.adams]

    def set_lr_scale(self, scale: float) -> None:
        """lr = base_lr * scale for every group (warmdown/warmup multiplier)."""
        for opt in self.all():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale

    def set_muon_momentum(self, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"muon momentum must be in [0, 1), got {momentum}")
        for g in self.muon.param_groups:
            g["momentum"] = momentum

    def zero_grad(self) -> None:
        for opt in self.all():
            opt.zero_grad(set_to_none=True)

    def launch_reduce_scatter(self) -> None:
        """Optional early start of the bank reduce-scatters (call right after backward to overlap more)."""
        if self.world_size > 1:
            self.muon.launch_reduce_scatter()  # type: ignore[attr-defined]

    @torch.no_grad()
    def step(self) -> dict[str, torch.Tensor]:
        """reduce-scatter banks → all-reduce replicated grads → clip → AdamW → Muon → zero_grad.

        Returns {"grad_norm": tensor} (norm of the averaged gradient before clipping) when clipping is on.
        Collective for world > 1: every rank must call it.
        """
        self.launch_reduce_scatter()
        if self.world_size > 1:
            _allreduce_mean(self.replicated, self.world_size, self.process_group, self.cfg.bucket_mb)
        stats: dict[str, torch.Tensor] = {}
        grad_scale = None
        if self.cfg.grad_clip > 0:
            sq = self.muon.grad_sq_norm()
            for p in self.replicated:
                if p.grad is not None:
                    sq = sq.to(p.grad.device) + p.grad.float().pow(2).sum()
            norm = sq.sqrt()
            grad_scale = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            for p in self.replicated:
                if p.grad is not None:
                    p.grad.mul_(grad_scale.to(p.grad.device, p.grad.dtype))
            stats["grad_norm"] = norm
        for opt in self.adams:
            opt.step()
        self.muon.step(grad_scale=grad_scale)
        self.zero_grad()
        return stats

    def state_dict(self) -> dict:
        """Full (unsharded) state; collective for world > 1 (ParallelMuon gathers its momentum shards)."""
        return {"muon": self.muon.state_dict(), "adams": [a.state_dict() for a in self.adams]}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd.get("adams", [])) != len(self.adams):
            raise ValueError(f"optimizer state has {len(sd.get('adams', []))} AdamW states, "
                             f"this model needs {len(self.adams)}")
        self.muon.load_state_dict(sd["muon"])
        for a, s in zip(self.adams, sd["adams"]):
            a.load_state_dict(s)


def _allreduce_mean(params: list[nn.Parameter], world: int, group, bucket_mb: float) -> None:
    """Average grads over ranks in flat buckets (all launched async, then waited). Missing grads → zeros so
    every rank issues identical collectives."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    cap = int(bucket_mb * 2**20)
    buckets: list[list[torch.Tensor]] = []
    keyed: dict[tuple, list[torch.Tensor]] = {}
    sizes: dict[tuple, int] = {}
    for p in params:
        g = p.grad
        key = (g.device, g.dtype)
        if key not in keyed or sizes[key] + g.numel() * g.element_size() > cap and keyed[key]:
            keyed[key] = []
            sizes[key] = 0
            buckets.append(keyed[key])
        keyed[key].append(g)
        sizes[key] += g.numel() * g.element_size()
    pending = []
    for grads in buckets:
        flat = torch.cat([g.reshape(-1) for g in grads])
        pending.append((grads, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)))
    for grads, flat, work in pending:
        work.wait()
        flat.div_(world)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def build_optimizers(model: nn.Module, cfg: OptimConfig | None = None, distributed: bool | None = None,
                     process_group=None) -> Optimizers:
    """Muon/ParallelMuon for the banks + AdamW for the rest. `distributed=None` → auto (torch.distributed
    initialised with world > 1); world size 1 always gives plain `Muon` and no collectives."""
    cfg = cfg or OptimConfig()
    world, _, _ = dist_info(process_group)
    if distributed is None:
        distributed = world > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("build_optimizers(distributed=True) needs torch.distributed to be initialised")
    world = world if distributed else 1
    routes = route_parameters(model)

    banks = [p for _, p in routes["bank"]]
    muon_kwargs = dict(lr=cfg.matrix_lr, momentum=cfg.muon_momentum_warmup_start if cfg.muon_momentum_warmup_steps
                       else cfg.muon_momentum, nesterov=cfg.nesterov, weight_decay=cfg.muon_wd,
                       ns_steps=cfg.ns_steps, polar_express=cfg.polar_express)
    muon_groups = [{"params": banks, "base_lr": cfg.matrix_lr, "name": "banks"}]
    if world > 1:
        muon: Muon = ParallelMuon(muon_groups, process_group=process_group, **muon_kwargs)  # type: ignore[arg-type]
    else:
        muon = Muon(muon_groups, **muon_kwargs)  # type: ignore[arg-type]

    adams: list[torch.optim.Optimizer] = []
    replicated: list[nn.Parameter] = []
    for kind, lr in (("embed", cfg.embed_lr), ("head", cfg.head_lr), ("scalar", cfg.scalar_lr)):
        params = [p for _, p in routes[kind]]
        if not params:
            continue
        replicated += params
        fused = all(p.is_cuda for p in params) or None
        adams.append(torch.optim.AdamW([{"params": params, "lr": lr, "base_lr": lr, "name": kind}],
                                       betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.adam_wd,
                                       fused=fused))
    return Optimizers(muon=muon, adams=adams, cfg=cfg, replicated=replicated, process_group=process_group,
                      world_size=world)

