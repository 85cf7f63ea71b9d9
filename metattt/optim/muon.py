"""Muon for 3-D parameter banks (single rank).

A bank (K, m, n) stacks K weight matrices of one shape; each slice is orthogonalised independently, but all K
in one batched Newton–Schulz call. The per-slice math lives in `muon_direction` / `apply_muon_update` so that
`ParallelMuon` runs exactly the same code on its shard of slices.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from metattt.optim.ns import NS5_COEFFS, zeropower_via_newtonschulz

__all__ = ["Muon", "muon_direction", "buffer_dtype", "apply_muon_update", "shape_scale", "zeropower_via_newtonschulz", "as_bank"]


def buffer_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Momentum is accumulated in at least fp32 (a bf16 buffer loses the small late-training gradients)."""
    return torch.promote_types(param_dtype, torch.float32)


def shape_scale(rows: int, cols: int) -> float:
    """max(1, rows/cols)^0.5: keeps the RMS of a tall orthogonal update comparable to a wide one."""
    return max(1.0, rows / cols) ** 0.5


def as_bank(t: torch.Tensor) -> torch.Tensor:
    """View a 2-D matrix as a bank of one; banks (K, m, n) pass through. Other ranks are rejected."""
    if t.ndim == 2:
        return t.unsqueeze(0)
    if t.ndim == 3:
        return t
    raise ValueError(f"Muon needs 2-D matrices or 3-D banks (K, out, in), got shape {tuple(t.shape)}")


def muon_direction(
    grad: torch.Tensor,
    buf: torch.Tensor,
    *,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    polar_express: bool,
    grad_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Update direction for a bank (or a shard of one) of shape (K, m, n); updates `buf` in place.

    buf <- momentum * buf + g;  u = g + momentum * buf (Nesterov) or buf;  return shape_scale * NS(u).
    `grad_scale` (e.g. the global clipping coefficient) multiplies g first. Not scale-invariant even though NS
    normalises: the scale of g relative to the buffer sets how much history the update carries.
    """
    g = grad.to(buf.dtype)
    if grad_scale is not None:
        g = g * grad_scale
    buf.mul_(momentum).add_(g)
    u = g.add(buf, alpha=momentum) if nesterov else buf
    out = zeropower_via_newtonschulz(u, steps=ns_steps, coeffs=NS5_COEFFS, polar_express=polar_express)
    return out.mul_(shape_scale(grad.size(-2), grad.size(-1)))


@torch.no_grad()
def apply_muon_update(p: torch.Tensor, update: torch.Tensor, *, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay then the step: p <- p * (1 - lr*wd) - lr * update (update cast to p's dtype)."""
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(update.reshape(p.shape).to(p.dtype), alpha=-lr)


class Muon(torch.optim.Optimizer):
    """Single-rank Muon over banks (K, m, n) or plain matrices (m, n).

    Group hyper-parameters (lr, momentum, weight_decay, ...) are read at every step, so the trainer may change
    them through `param_groups` (momentum warm-up, lr warmdown).
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
    ) -> None:
        if lr < 0:
            raise ValueError(f"Muon lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, polar_express=polar_express)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                as_bank(p)  # validate shapes early

    @torch.no_grad()
    def grad_sq_norm(self) -> torch.Tensor:
        """Σ ||grad||² over this optimizer's parameters (fp32 scalar), for global clipping."""
        total = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    s = p.grad.float().pow(2).sum()
                    total = s if total is None else total + s
        if total is None:
            return torch.zeros(())
        return total

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | float | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = as_bank(p.grad)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, dtype=buffer_dtype(p.dtype))
                update = muon_direction(
                    grad, state["momentum_buffer"], momentum=group["momentum"], nesterov=group["nesterov"],
                    ns_steps=group["ns_steps"], polar_express=group["polar_express"], grad_scale=grad_scale,
                )
                apply_muon_update(p, update, lr=group["lr"], weight_decay=group["weight_decay"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter dtype; momentum lives in at least fp32.
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "momentum_buffer" in st:
                    st["momentum_buffer"] = st["momentum_buffer"].to(buffer_dtype(p.dtype))
