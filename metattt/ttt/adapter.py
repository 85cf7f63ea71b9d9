"""The Adapter: one inner-loop object shared by the legal evaluator and the meta-trainer.

Contract (binding; see docs/architecture.md):

* ``Adapter(cfg, selection)``: ``name`` (registry key), ``cfg`` (a typed hyper-parameter dataclass with at least
  ``reset`` in {"never", "chunk", "doc"}), ``selection`` (a :class:`ParamSelection`).
* ``bind(model) -> self``: resolve the selection against the model, snapshot the trained weights as detached
  clones, initialise per-adapter state (momentum, LoRA factors, meta-parameters). Call again after loading
  new weights into the model.
* ``reset()``: back to the trained weights (and fresh optimiser state). The *evaluator* decides when, from
  ``cfg.reset``: "never" (continuous adaptation), "chunk" or "doc".
* ``params() -> dict[str, Tensor]``: the current adapted weights, to score with ``model(x, params=...)``
  ({} for the none adapter). Tensors are owned by the adapter and updated in place by ``adapt``.
* ``adapt(model, x, y, progress) -> dict``: the legal update on already-scored tokens x, y (B,T) (epochs of
  mini-batches over the rows); ``progress`` in [0,1] drives schedules (cosine lr over chunks). Gradients are
  taken under ``torch.enable_grad()`` and outside inference mode, whatever the caller's context; bf16
  autocast on CUDA. If torch.distributed is initialised, every rank passes the same rows; each mini-batch is
  split over the ranks and gradients are token-weighted averages before every update, so the update is the
  single-process one (up to reduction order) and all ranks stay bit-identical. Returns stats: loss_first / loss_last (mean mini-batch loss of the first / last epoch),
  steps, lr.
* ``training_positions(chunk_index) -> int``: which chunk the adapter trains on after chunk ``chunk_index``
  has been scored; honest adapters return ``chunk_index`` (the evaluator checks it against its ledger).
* ``inner_loop(model, base, x, y, *, steps, create_graph, attn=None, backend="autograd") -> dict``: the
  functional inner loop for meta-training: ``steps`` full-batch steps from ``base`` (name -> tensor, usually
  the model's own parameters). Returns the adapted tensors *for the selected names only* (merge with base or
  let the model fall back to its own parameters). With ``create_graph=False`` the inner gradients are constants
  (first order): the result depends on ``base`` through the identity and on meta-parameters (MetaSGD rates)
  linearly, so an outer ``backward`` gives the first-order meta-gradient with no double backward. With
  ``create_graph=True`` it is the exact (second-order) meta-gradient; use ``attn="math"`` then (fused
  attention kernels have no double backward). ``backend``: "autograd" or "torch.func".
* ``meta_parameters() -> dict[str, nn.Parameter]`` (empty unless learned, e.g. MetaSGD log-rates);
  ``state_dict()/load_state_dict(sd, strict=True)``: the meta-parameters and stored statistics;
  ``artifact_extras()/load_artifact_extras(extras)`` the same under keys ``ttt.<adapter>.<name>``.
  ``requires_meta_params``: loading without them raises :class:`MissingMetaParamsError` naming the keys.
* ``selection_report() -> str``: exact adapted scalars per tensor / slice.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .params import ParamSelection, SelectedParams

RESET_MODES = ("never", "chunk", "doc")
SCHEDULES = ("constant", "cosine")
BACKENDS = ("autograd", "torch.func")


class MissingMetaParamsError(KeyError):
    """An adapter that needs learned meta-parameters was loaded without them."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass
class AdapterConfig:
    """Hyper-parameters common to all adapters."""

    reset: str = "never"

    def validate(self) -> None:
        if self.reset not in RESET_MODES:
            raise ValueError(f"reset must be one of {RESET_MODES}, got {self.reset!r}")
        sched = getattr(self, "schedule", None)
        if sched is not None and sched not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {sched!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("epochs", "batch_seqs", "steps", "rank") and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def autocast_for(x: Tensor) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the evaluator's speed path), nothing on CPU (exact tests)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else contextlib.nullcontext()


def grad_context() -> contextlib.ExitStack:
    """Gradients on, inference mode off: the evaluator scores under inference_mode."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def call_loss(model: nn.Module, x: Tensor, y: Tensor, params: Mapping[str, Tensor], attn: str | None = None) -> Tensor:
    """Mean next-token loss under ``params`` overrides (``attn`` only passed when set)."""
    if attn is None:
        return model(x, y, params=dict(params))
    return model(x, y, params=dict(params), attn=attn)


def minibatches(x: Tensor, y: Tensor, batch_seqs: int) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(0, x.size(0), batch_seqs):
        yield x[i:i + batch_seqs], y[i:i + batch_seqs]


def dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_rows(n: int) -> slice:
    """This rank's contiguous share of ``n`` rows (first ranks take the remainder); all rows when not distributed."""
    if not dist_active():
        return slice(0, n)
    world, rank = dist.get_world_size(), dist.get_rank()
    base, extra = divmod(n, world)
    a = rank * base + min(rank, extra)
    return slice(a, a + base + (1 if rank < extra else 0))


def reduce_grads(grads: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """Token-weighted mean of gradients over ranks (identity when not distributed)."""
    if not dist_active():
        return grads
    names = list(grads)
    flat = torch.cat([grads[n].float().flatten() * weight for n in names] +
                     [torch.tensor([weight], dtype=torch.float32, device=grads[names[0]].device)])
    dist.all_reduce(flat)
    total = flat[-1].clamp_min(1e-12)
    out, off = {}, 0
    for n in names:
        g = grads[n]
        out[n] = (flat[off:off + g.numel()] / total).view_as(g).to(g.dtype)
        off += g.numel()
    return out


def global_norm(grads: Mapping[str, Tensor]) -> Tensor:
    """L2 norm over all tensors, in at least float32 (float64 stays float64: exact tests)."""
    gs = list(grads.values())
    dt = torch.promote_types(gs[0].dtype, torch.float32)
    if all(g.dtype == gs[0].dtype and g.device == gs[0].device for g in gs):
        norms = torch._foreach_norm([g.to(dt) for g in gs] if gs[0].dtype != dt else gs)
    else:
        norms = [g.to(dt).norm() for g in gs]
    return torch.linalg.vector_norm(torch.stack([n.to(dt) for n in norms]))


def clip_grads(grads: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """Global-norm clip (no host sync: the coefficient stays a tensor)."""
    if not max_norm or max_norm <= 0 or not grads:
        return grads
    norm = global_norm(grads)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return {n: g * coef.to(g.dtype) for n, g in grads.items()}


def lr_at(lr: float, schedule: str, progress: float) -> float:
    if not 0.0 <= progress <= 1.0 + 1e-9:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return lr


class Adapter:
    """Base class; subclasses set ``name``/``Config`` and override the update rules."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type] = AdapterConfig
    requires_meta_params: ClassVar[bool] = False
    default_selection: ClassVar[str] = "all"
    trains_in_eval: ClassVar[bool] = True

    def __init__(self, cfg: AdapterConfig | None = None, selection: "str | ParamSelection | None" = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()
        if not isinstance(self.cfg, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.cfg).__name__}")
        self.cfg.validate()
        self.selection = ParamSelection.parse(selection if selection is not None else self.default_selection)
        self.sel: SelectedParams | None = None
        self._trained: dict[str, Tensor] = {}
        self._cur: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ lifecycle
    def bind(self, model: nn.Module) -> "Adapter":
        self.sel = self.selection.resolve(model)
        with torch.inference_mode(False), torch.no_grad():
            named = dict(model.named_parameters())
            self._trained = {n: named[n].detach().clone() for n in self.sel.names}
            self._init_state(model)
        self.reset()
        return self

    def _init_state(self, model: nn.Module) -> None:
        """Per-adapter state created at bind (meta-parameters, statistics)."""

    def reset(self) -> None:
        self._require_bound()
        with torch.inference_mode(False), torch.no_grad():
            self._cur = {n: t.clone() for n, t in self._trained.items()}
            self._reset_optim()

    def _reset_optim(self) -> None:
        """Clear optimiser state (momentum buffers...)."""

    def _require_bound(self) -> SelectedParams:
        if self.sel is None:
            raise RuntimeError(f"adapter {self.name!r} is not bound: call adapter.bind(model) first")
        return self.sel

    def params(self) -> dict[str, Tensor]:
        return dict(self._cur)

    def trained_params(self) -> dict[str, Tensor]:
        return dict(self._trained)

    def training_positions(self, chunk_index: int) -> int:
        return chunk_index

    def selection_report(self) -> str:
        return self._require_bound().report()

    @property
    def adapted_count(self) -> int:
        return self._require_bound().count

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cfg={self.cfg}, selection={self.selection.spec!r})"

    # ------------------------------------------------------------------ meta-parameters / artifact
    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.meta_parameters().items()}

    def load_state_dict(self, sd: Mapping[str, Tensor], strict: bool = True) -> None:
        own = self.meta_parameters()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing and (strict or self.requires_meta_params):
            raise MissingMetaParamsError(
                f"adapter {self.name!r} needs meta-parameters that are missing: {missing} "
                f"(expected artifact extras {[f'ttt.{self.name}.{k}' for k in missing]}); was the model "
                f"meta-trained with this adapter and selection {self.selection.spec!r}?")
        if unexpected and strict:
            raise KeyError(f"adapter {self.name!r}: unexpected state keys {unexpected}; expected {sorted(own)}")
        with torch.no_grad():
            for n, p in own.items():
                if n in sd:
                    t = sd[n]
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(f"adapter {self.name!r}: state {n!r} has shape {tuple(t.shape)}, "
                                         f"expected {tuple(p.shape)} (different model or selection?)")
                    p.copy_(t.to(device=p.device, dtype=p.dtype))

    def artifact_extras(self) -> dict[str, Tensor]:
        return {f"ttt.{self.name}.{k}": v.cpu() for k, v in self.state_dict().items()}

    def load_artifact_extras(self, extras: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load ``ttt.<name>.*`` keys from an artifact's extras (other keys are ignored)."""
        prefix = f"ttt.{self.name}."
        self.load_state_dict({k[len(prefix):]: v for k, v in extras.items() if k.startswith(prefix)}, strict=strict)

    # ------------------------------------------------------------------ evaluation-time adaptation
    def adapt(self, model: nn.Module, x: Tensor, y: Tensor, progress: float = 0.0) -> dict[str, float]:
        self._require_bound()
        if x.shape != y.shape or x.ndim != 2:
            raise ValueError(f"adapt expects x, y of equal shape (B,T); got {tuple(x.shape)} and {tuple(y.shape)}")
        if not self.trains_in_eval or not self._trainable():
            return {"steps": 0}
        cfg = self.cfg
        lr = lr_at(cfg.lr, getattr(cfg, "schedule", "constant"), progress)
        epochs, bs = getattr(cfg, "epochs", 1), getattr(cfg, "batch_seqs", x.size(0))
        # Every rank holds the same rows; each mini-batch is split over the ranks and the token-weighted gradient
        # average makes the update the single-process one (a rank with no rows contributes weight 0).
        batches = [(xb[rank_rows(xb.size(0))], yb[rank_rows(yb.size(0))]) for xb, yb in minibatches(x, y, bs)]
        n_batches = len(batches)
        losses: list[list[Tensor]] = []
        with grad_context(), autocast_for(x):
            for _ in range(epochs):
                losses.append([self._update(model, xb, yb, lr) for xb, yb in batches])
        first = torch.stack(losses[0]).float().mean().item() if losses and losses[0] else float("nan")
        last = torch.stack(losses[-1]).float().mean().item() if losses and losses[-1] else float("nan")
        return {"loss_first": first, "loss_last": last, "steps": epochs * n_batches, "lr": lr}

    def _update(self, model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Tensor:
        """One update of the adapter's state on a mini-batch; returns the (pre-update) loss."""
        raise NotImplementedError

    # helpers for subclasses -------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, Tensor]:
        """Tensors that ``adapt`` differentiates and updates (full-parameter adapters: ``_cur``)."""
        return self._cur

    def _materialize(self, trainable: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Parameter overrides for the model from trainable tensors (LoRA builds W + BA here)."""
        return dict(trainable)

    def _mask(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._require_bound().mask_grads(grads)

    def _grad(self, model: nn.Module, x: Tensor, y: Tensor,
              trainable: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, masked rank-averaged gradients) of the mean loss at ``trainable`` (default: current state)."""
        trainable = self._trainable() if trainable is None else trainable
        leaves = {n: t.detach().requires_grad_(True) for n, t in trainable.items()}
        if x.size(0) == 0:  # padding step of a rank with fewer rows
            zero = {n: torch.zeros_like(t) for n, t in leaves.items()}
            return torch.zeros((), device=x.device), reduce_grads(zero, 0.0)
        loss = call_loss(model, x, y, self._materialize(leaves))
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(leaves, gs)}
        grads = self._mask(grads)
        return loss.detach(), reduce_grads(grads, float(y.numel()))

    # ------------------------------------------------------------------ functional inner loop (meta-training)
    def inner_loop(self, model: nn.Module, base: Mapping[str, Tensor], x: Tensor, y: Tensor, *, steps: int,
                   create_graph: bool, attn: str | None = None, backend: str = "autograd") -> dict[str, Tensor]:
        self._require_bound()
        if backend not in BACKENDS:
            raise ValueError(f"inner-loop backend must be one of {BACKENDS}, got {backend!r} "
                             "(the 'higher' backend lives in metattt.ttt.meta)")
        missing = [n for n in self._require_bound().names if n not in base]
        if missing:
            raise KeyError(f"inner_loop base lacks selected parameters {missing}")
        state = self._inner_init(base)
        for k in range(steps):
            state = self._inner_step(model, base, state, x, y, k, create_graph, attn, backend)
        return self._inner_materialize(base, state)

    def _inner_init(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: base[n] for n in self._require_bound().names}

    def _inner_materialize(self, base: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(state)

    def _inner_step(self, model: nn.Module, base: Mapping[str, Tensor], state: dict[str, Tensor], x: Tensor,
                    y: Tensor, k: int, create_graph: bool, attn: str | None, backend: str) -> dict[str, Tensor]:
        raise NotImplementedError(f"adapter {self.name!r} has no functional inner loop")

    def _inner_grads(self, model: nn.Module, base: Mapping[str, Tensor], state: Mapping[str, Tensor], x: Tensor,
                     y: Tensor, create_graph: bool, attn: str | None, backend: str) -> dict[str, Tensor]:
        """Masked gradient of the loss at ``state`` (constants unless ``create_graph``)."""

        def loss_of(s: Mapping[str, Tensor]) -> Tensor:
            return call_loss(model, x, y, {**base, **self._inner_materialize(base, s)}, attn)

        if backend == "torch.func":
            grads = dict(torch.func.grad(loss_of)(dict(state)))
            if not create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
        else:
            ins = {n: (t if t.requires_grad else t.detach().requires_grad_(True)) for n, t in state.items()}
            gs = torch.autograd.grad(loss_of(ins), list(ins.values()), create_graph=create_graph, allow_unused=True)
            grads = {n: (g if g is not None else torch.zeros_like(ins[n])) for n, g in zip(ins, gs)}
        return self._inner_mask(grads)

    def _inner_mask(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._mask(grads)

