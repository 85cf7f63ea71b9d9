"""Meta-training outer step: ``meta_loss(model, adapter, x, y, cfg)`` for the trainer.

outer = (w_post + w_delta) * L_post - w_delta * L_pre, with L_post the outer-split loss at the weights adapted by
``adapter.inner_loop`` on the inner split and L_pre the same loss at the current weights. ``loss.backward()``
puts meta-gradients on the model's parameters and on the adapter's meta-parameters (MetaSGD rates).

* order="first": inner gradients are constants, so the gradient at the adapted point reaches the base weights
  through the identity (FOMAML); no double backward.
* order="second": exact meta-gradient through the k inner steps (create_graph), with the inner forward on the
  ``math`` attention path (fused kernels have no double backward). Backends: "autograd", "torch.func"
  (``torch.func.grad``), "higher" (optional, ``pip install higher``; plain-SGD adapters only).
* Reptile is its own meta-update (``reptile_update``); for a reptile adapter ``meta_loss`` returns the
  surrogate sum_n <theta_n, sg(theta_n - theta_k,n)> whose gradient is the Reptile direction theta - theta_k,
  so the trainer's optimiser applies it (plain SGD with lr epsilon reproduces the interpolation exactly).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .adapter import Adapter, grad_context
from .none import NoneAdapter
from .registry import adapter_from_spec
from .reptile import ReptileAdapter
from .sgd import SGDAdapter

SPLITS = ("same-batch", "cross-doc", "seq-half")
ORDERS = ("first", "second")
META_BACKENDS = ("autograd", "torch.func", "higher")


@dataclass
class MetaConfig:
    """How (and how often) the trainer adds the meta-objective."""

    adapter: str | None = None  # adapter spec, e.g. "fomaml:lr=0.01,select=banks:layers>=2"; None = off
    every: int = 4
    inner_steps: int = 1
    split: str = "same-batch"
    outer_weight: float = 1.0
    delta_weight: float = 0.0
    start_frac: float = 0.0
    order: str = "first"
    backend: str = "autograd"
    log_pre: bool = True  # compute L_pre for stats even when delta_weight == 0 (one extra forward, no grad)
    micro_batches: int = 1  # micro-batches of a meta step that carry the meta-objective (0 = all); the
    # others train on the plain loss, which keeps the overhead of a meta step small under accumulation
    meta_lr: float = 0.01  # Adam lr of the adapter's meta-parameters (MetaSGD log-rates), used by the trainer

    def __post_init__(self) -> None:
        problems = []
        if self.split not in SPLITS:
            problems.append(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.order not in ORDERS:
            problems.append(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.backend not in META_BACKENDS:
            problems.append(f"backend must be one of {META_BACKENDS}, got {self.backend!r}")
        if self.every < 1 or self.inner_steps < 1:
            problems.append(f"every ({self.every}) and inner_steps ({self.inner_steps}) must be >= 1")
        if self.micro_batches < 0:
            problems.append(f"micro_batches must be >= 0, got {self.micro_batches}")
        if self.meta_lr <= 0:
            problems.append(f"meta_lr must be > 0, got {self.meta_lr}")
        if not 0.0 <= self.start_frac <= 1.0:
            problems.append(f"start_frac must be in [0, 1], got {self.start_frac}")
        if problems:
            raise ValueError("invalid MetaConfig: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return bool(self.adapter)

    def active(self, step: int, progress: float) -> bool:
        """Whether training step ``step`` (at training ``progress`` in [0,1]) includes the meta-objective."""
        return self.enabled and progress >= self.start_frac and step % self.every == 0

    def make_adapter(self) -> Adapter:
        if not self.adapter:
            raise ValueError("MetaConfig.adapter is not set")
        return adapter_from_spec(self.adapter)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_batch(x: Tensor, y: Tensor, split: str) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    """(inner x,y), (outer x,y), first outer position scored. seq-half: inner = first half of every row,
    outer = the full rows scored on their second half only (context kept, future tokens never trained on)."""
    b, t = x.shape
    if split == "same-batch":
        return (x, y), (x, y), 0
    if split == "cross-doc":
        if b < 2:
            raise ValueError(f"split 'cross-doc' needs >= 2 sequences per batch, got {b}")
        h = b // 2
        return (x[:h], y[:h]), (x[h:], y[h:]), 0
    if split == "seq-half":
        if t < 2:
            raise ValueError(f"split 'seq-half' needs sequences of length >= 2, got {t}")
        h = t // 2
        return (x[:, :h], y[:, :h]), (x, y), h
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")


def _outer_loss(model: nn.Module, x: Tensor, y: Tensor, start: int, params: Mapping[str, Tensor]) -> Tensor:
    if start == 0:
        return model(x, y, params=dict(params))
    return model(x, y, params=dict(params), reduction="none")[:, start:].mean()


def _import_higher():  # noqa: ANN202
    try:
        import higher  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError("meta backend 'higher' needs the optional package: pip install 'metattt[meta]' "
                          "(or pip install higher)") from e
    return higher


def higher_inner_loop(model: nn.Module, adapter: Adapter, x: Tensor, y: Tensor, *, steps: int,
                      create_graph: bool, attn: str | None = None) -> dict[str, Tensor]:
    """The plain-SGD inner loop via ``higher``'s differentiable optimiser (an independent implementation
    used to cross-check the autograd / torch.func backends). Returns adapted selected tensors."""
    higher = _import_higher()
    if not isinstance(adapter, SGDAdapter) or type(adapter).__name__ == "SAMAdapter":
        raise ValueError(f"backend 'higher' supports plain-SGD adapters (sgd, fomaml, reptile), not {adapter.name!r}")
    sel = adapter._require_bound()
    names = [n for n, _ in model.named_parameters()]
    selected = set(sel.names)
    opt = torch.optim.SGD(model.parameters(), lr=adapter.cfg.lr)

    def mask(grads):  # noqa: ANN001, ANN202
        out = []
        for n, g in zip(names, grads):
            if n not in selected or g is None:
                out.append(None if g is None else torch.zeros_like(g))
            else:
                m = sel.masks[n]
                out.append(g if m is None else g * m)
        return out

    kw = {} if attn is None else {"attn": attn}
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=create_graph) as (fm, diffopt):
        for _ in range(steps):
            diffopt.step(fm(x, y, **kw), grad_callback=mask)
        fast = dict(zip(names, fm.parameters()))
    return {n: fast[n] for n in sel.names}


def meta_loss(model: nn.Module, adapter: Adapter, x: Tensor, y: Tensor,
              cfg: MetaConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Outer meta-objective on batch (x, y); returns (loss, stats) with detached tensor stats
    (``meta/L_pre``, ``meta/L_post``, ``meta/gain``) so the caller decides when to sync."""
    if isinstance(adapter, NoneAdapter):
        raise ValueError("meta_loss with the 'none' adapter has nothing to meta-train")
    if adapter.sel is None:
        adapter.bind(model)
    if isinstance(adapter, ReptileAdapter):
        return reptile_loss(model, adapter, x, y, steps=cfg.inner_steps, weight=cfg.outer_weight)
    (xi, yi), (xo, yo), start = split_batch(x, y, cfg.split)
    second = cfg.order == "second"
    attn = "math" if second else None
    base = dict(model.named_parameters())
    with grad_context():
        if cfg.backend == "higher":
            adapted = higher_inner_loop(model, adapter, xi, yi, steps=cfg.inner_steps, create_graph=second, attn=attn)
        else:
            adapted = adapter.inner_loop(model, base, xi, yi, steps=cfg.inner_steps, create_graph=second,
                                         attn=attn, backend=cfg.backend)
        l_post = _outer_loss(model, xo, yo, start, adapted)
        loss = (cfg.outer_weight + cfg.delta_weight) * l_post
        l_pre = None
        if cfg.delta_weight:
            l_pre = _outer_loss(model, xo, yo, start, {})
            loss = loss - cfg.delta_weight * l_pre
        elif cfg.log_pre:
            with torch.no_grad():
                l_pre = _outer_loss(model, xo, yo, start, {})
    stats = {"meta/L_post": l_post.detach()}
    if l_pre is not None:
        stats["meta/L_pre"] = l_pre.detach()
        stats["meta/gain"] = (l_pre - l_post).detach()
    return loss, stats


def _reptile_target(model: nn.Module, adapter: Adapter, x: Tensor, y: Tensor, steps: int) -> dict[str, Tensor]:
    base = dict(model.named_parameters())
    with grad_context():
        adapted = adapter.inner_loop(model, base, x, y, steps=steps, create_graph=False)
    return {n: t.detach() for n, t in adapted.items()}


def reptile_update(model: nn.Module, adapter: Adapter, x: Tensor, y: Tensor, *, steps: int | None = None,
                   epsilon: float | None = None) -> dict[str, float]:
    """In place: theta <- theta + epsilon * (theta_k - theta) on the selected tensors, theta_k after ``steps``
    inner steps of ``adapter`` (any adapter with an inner loop) on (x, y). Frozen slices stay bit-identical."""
    if adapter.sel is None:
        adapter.bind(model)
    steps = steps if steps is not None else getattr(adapter.cfg, "steps", None)
    epsilon = epsilon if epsilon is not None else getattr(adapter.cfg, "epsilon", None)
    if steps is None or epsilon is None:
        raise ValueError(f"reptile_update with adapter {adapter.name!r} needs explicit steps= and epsilon=")
    target = _reptile_target(model, adapter, x, y, steps)
    named = dict(model.named_parameters())
    moved = 0.0
    with torch.no_grad():
        for n, tk in target.items():
            p = named[n]
            d = tk - p
            moved += float(d.float().square().sum())
            p.add_(d * epsilon)
    return {"reptile/step_norm": moved ** 0.5 * epsilon}


def reptile_loss(model: nn.Module, adapter: Adapter, x: Tensor, y: Tensor, *, steps: int | None = None,
                 weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Surrogate whose gradient w.r.t. each selected tensor is ``weight * (theta - theta_k)``."""
    steps = steps if steps is not None else getattr(adapter.cfg, "steps", 1)
    target = _reptile_target(model, adapter, x, y, steps)
    named = dict(model.named_parameters())
    loss = sum((named[n] * (named[n].detach() - tk)).sum() for n, tk in target.items()) * weight
    dist2 = sum(float((named[n].detach() - tk).float().square().sum()) for n, tk in target.items())
    return loss, {"reptile/dist": torch.tensor(dist2 ** 0.5)}
