"""Composable update rules: small ``init``/``update`` transforms chained into an adapter's step (optax style).

Why: clipping, momentum, Adam moments, learning-rate schedules and per-slice rates were written out once per
adapter; as transforms each is written once, and a rule reads as the list of what it does, e.g. the record's SGD
``chain(clip_by_global_norm(1.0), trace(0.9), scale_by_schedule(Schedule(0.002, "cosine")))``.

A transform maps ``updates`` (at first the gradients) to new updates; ``Adapter.step`` then takes
``params - updates``. A chain's state is one flat dict: per-tensor entries keyed ``"<kind>.<tensor>"``
(``mom.``, ``m.``, ``v.``: the pg-record compat mode rounds them by that tensor name), and scalars: ``progress``
(the schedule position in [0, 1], written by the adapter's driver: the chunk's place in the evaluation stream, 0
in meta-training), ``t`` (Adam's step count), ``lr`` (the step size last used, which ``adapt`` reports). Nothing
mutates a tensor in place, so a chain is differentiable (meta-training's exact second order). Each transform
computes its expression exactly as the hand-written rules did, so the adapters' numerics are unchanged bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

Tensors = dict[str, Tensor]
State = dict[str, Any]
SCHEDULES = ("constant", "cosine")


def check_progress(progress: float) -> None:
    if not 0.0 <= progress <= 1.0 + 1e-9:
        raise ValueError(f"progress must be in [0, 1], got {progress}")


@dataclass(frozen=True)
class Schedule:
    """Step size ``lr`` over ``progress`` in [0, 1]: constant, or cosine ``lr * 0.5 * (1 + cos(pi * progress))``."""

    lr: float
    kind: str = "constant"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")

    def __call__(self, progress: float) -> float:
        check_progress(progress)
        if self.kind == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr


@dataclass(frozen=True)
class Transform:
    """``update(updates, state, params) -> (updates, changed state entries)``; ``init(params) -> state entries``.
    ``sgd_lr``: when the transform is exactly plain SGD (``params - lr(progress) * grads``), its step size at
    progress 0 (a meta step's), else None: what an independent SGD implementation (the ``higher`` meta backend)
    can replay."""

    update: Callable[[Tensors, State, Mapping[str, Tensor]], "tuple[Tensors, State]"]
    init: Callable[[Mapping[str, Tensor]], State] = lambda params: {}
    sgd_lr: float | None = None


IDENTITY = Transform(lambda u, state, params: (u, {}))


def chain(*transforms: Transform) -> Transform:
    """The transforms applied in order; the state starts at ``progress`` 0 (identities are dropped)."""
    ts = tuple(t for t in transforms if t is not IDENTITY)

    def init(params: Mapping[str, Tensor]) -> State:
        state: State = {"progress": 0.0}
        for t in ts:
            state.update(t.init(params))
        return state

    def update(u: Tensors, state: State, params: Mapping[str, Tensor]) -> tuple[Tensors, State]:
        state, changed = dict(state), {}
        for t in ts:
            u, c = t.update(u, state, params)
            state.update(c)
            changed.update(c)
        return u, changed

    return Transform(update, init, ts[0].sgd_lr if len(ts) == 1 else None)


def global_norm(grads: Mapping[str, Tensor]) -> Tensor:
    """L2 norm over all tensors, in at least float32 (float64 stays float64: exact tests)."""
    gs = list(grads.values())
    dt = torch.promote_types(gs[0].dtype, torch.float32)
    norms: Sequence[Tensor]
    if all(g.dtype == gs[0].dtype and g.device == gs[0].device for g in gs):
        norms = torch._foreach_norm([g.to(dt) for g in gs] if gs[0].dtype != dt else gs)
    else:
        norms = [g.to(dt).norm() for g in gs]
    return torch.linalg.vector_norm(torch.stack([n.to(dt) for n in norms]))


def clip_by_global_norm(max_norm: float, host: bool = False) -> Transform:
    """Global-norm clip (0: none), without a host sync: the coefficient stays a tensor. ``host``: the coefficient
    ``min(1, max_norm / (norm + 1e-6))`` as a Python float (double precision, one sync a step), as the docttt
    phases have always computed it (their bits)."""
    if not max_norm or max_norm <= 0:
        return IDENTITY

    def update(u: Tensors, state: State, params: Mapping[str, Tensor]) -> tuple[Tensors, State]:
        if not u:
            return u, {}
        if host:
            c = min(1.0, max_norm / (float(global_norm(u)) + 1e-6))
            return {n: g * c for n, g in u.items()}, {}
        coef = (max_norm / (global_norm(u) + 1e-6)).clamp(max=1.0)
        return {n: g * coef.to(g.dtype) for n, g in u.items()}, {}

    return Transform(update)


def trace(decay: float, nesterov: bool = False) -> Transform:
    """Momentum buffer ``b = decay * b + g`` (state ``mom.<name>``); the update is b, or ``g + decay * b``
    (nesterov). decay 0: none."""
    if not decay:
        return IDENTITY

    def init(params: Mapping[str, Tensor]) -> State:
        return {f"mom.{n}": torch.zeros_like(p) for n, p in params.items()}

    def update(u: Tensors, state: State, params: Mapping[str, Tensor]) -> tuple[Tensors, State]:
        g = {n: v.to(params[n].dtype) for n, v in u.items()}
        mom = {n: decay * state[f"mom.{n}"] + v for n, v in g.items()}
        out = {n: v + decay * mom[n] for n, v in g.items()} if nesterov else mom
        return out, {f"mom.{n}": m for n, m in mom.items()}

    return Transform(update, init)


def scale_by_schedule(lr: Schedule) -> Transform:
    """``lr(progress) * updates``; records the step size as ``lr``."""

    def update(u: Tensors, state: State, params: Mapping[str, Tensor]) -> tuple[Tensors, State]:
        step = lr(state["progress"])
        return {n: step * v.to(params[n].dtype) for n, v in u.items()}, {"lr": step}

    return Transform(update, sgd_lr=lr(0.0))


def scale_by_adam(lr: Schedule, b1: float, b2: float, eps: float = 1e-8) -> Transform:
    """Adam with bias correction: ``lr * mhat / (sqrt(vhat) + eps)`` (state ``t``, ``m.<name>``, ``v.<name>``).
    The step size is part of the expression (``lr * mhat`` first), as the hand-written LoRA rule computed it."""

    def init(params: Mapping[str, Tensor]) -> State:
        return {"t": 0, **{f"m.{n}": torch.zeros_like(p) for n, p in params.items()},
                **{f"v.{n}": torch.zeros_like(p) for n, p in params.items()}}

    def update(u: Tensors, state: State, params: Mapping[str, Tensor]) -> tuple[Tensors, State]:
        t, step = state["t"] + 1, lr(state["progress"])
        out: Tensors = {}
        changed: State = {"t": t, "lr": step}
        for n, v in u.items():
            g = v.to(params[n].dtype)
            m = b1 * state[f"m.{n}"] + (1 - b1) * g
            v2 = b2 * state[f"v.{n}"] + (1 - b2) * g * g
            changed[f"m.{n}"], changed[f"v.{n}"] = m, v2
            mhat, vhat = m / (1 - b1 ** t), v2 / (1 - b2 ** t)
            # clamp: sqrt has an infinite derivative at 0 (LoRA's B starts at 0, so A's first gradient is 0); it
            # changes no value that survives the + eps and keeps the second-order graph finite
            out[n] = step * mhat / (vhat.clamp_min(1e-30).sqrt() + eps)
        return out, changed

    return Transform(update, init)


def add_decayed_weights(weight_decay: float, lr: Schedule) -> Transform:
    """Decoupled weight decay (AdamW's): adds ``lr(progress) * weight_decay * param`` to the updates; 0: none."""
    if not weight_decay:
        return IDENTITY
    return Transform(lambda u, state, params: (
        {n: v + (lr(state["progress"]) * weight_decay) * params[n] for n, v in u.items()}, {}))


def per_tensor(fn: Callable[[str, Tensor, Tensor], Tensor]) -> Transform:
    """A stateless transform of each tensor's update: ``fn(name, update, param) -> update``."""
    return Transform(lambda u, state, params: ({n: fn(n, v, params[n]) for n, v in u.items()}, {}))


def scale_by_rates(rate: Callable[[str], Tensor], scale: float = 1.0) -> Transform:
    """Per-slice (or per-row) step sizes: ``(scale * rate(name)) * g``; ``rate(name)`` broadcasts against the
    tensor (MetaSGD's learned rates: differentiable, so the outer loss trains them)."""
    return per_tensor(lambda n, v, p: (scale * rate(n)).to(p.dtype) * v.to(p.dtype))


def scale_by_rms(rms: Callable[[str], Tensor], eps: float, max_update: float) -> Transform:
    """RMS-normalised, clamped updates ``clamp(g / (rms(name) + eps), +-max_update)`` in the statistics' dtype,
    then in the tensor's (dynamic evaluation)."""

    def scaled(n: str, v: Tensor, p: Tensor) -> Tensor:
        r = rms(n)
        return (v.to(r.dtype) / (r + eps)).clamp(-max_update, max_update).to(p.dtype)

    return per_tensor(scaled)


def sgd(lr: Schedule, momentum: float = 0.0, nesterov: bool = False, grad_clip: float = 0.0,
        host_clip: bool = False) -> Transform:
    """The preset of the sgd family (sgd, fomaml, reptile, sam) and of the docttt phases' full-model SGD
    (``host_clip``): clip, momentum, scheduled step size."""
    return chain(clip_by_global_norm(grad_clip, host_clip), trace(momentum, nesterov), scale_by_schedule(lr))
