"""The Adapter: a parameter selection plus ONE functional update rule, run by the evaluator and the meta-trainer.

Why one rule: the project asks whether meta-training raises the test-time-training gain. That question is only
well posed if the meta-trainer trains the model for exactly the update the evaluator performs, so both loops
call the same ``step`` below (the evaluator under no-grad on real chunks, the meta-trainer with or without the
graph of the inner gradients). Contract (binding; docs/adapters.md has a worked example):

Class attributes: ``name`` (registry key, unique per run), ``Config`` (a dataclass subclass of
:class:`AdapterConfig`; ``reset`` in {"never", "chunk", "doc"}, ``epochs`` and ``batch_seqs`` drive the
driver), ``default_selection`` (a :class:`ParamSelection` spec), ``requires_meta_params`` (loading without them
raises :class:`MissingMetaParamsError`), ``per_document`` (one document per row, a leading document dimension;
run by the doc-batched evaluator, ``docttt:NAME``, instead of ``adapt``).

State is plain dicts ``name -> Tensor`` of any shape; nothing below mutates a tensor in place (doclora's fused
AdamW ``step`` excepted), so the same code is differentiable:

* ``setup(model)``: called by ``bind``; create meta-parameters (``nn.Parameter`` attributes or
  :func:`register_nested` ones, e.g. MetaSGD log-rates) and fixed tensors. They are the module's
  parameters / buffers, so ``meta_parameters()``, ``state_dict()`` and artifact extras (keys
  ``ttt.<name>.<state_dict key>``) come from ``torch.nn.Module``.
* ``trainables(base) -> dict``: the tensors the rule differentiates and updates, built from the base weights
  ``base`` (selected name -> tensor). Default: the selected tensors themselves; LoRA: its factors.
  ``start(base, rows, key, carry)``: what an update over ``rows`` rows starts from (default ``trainables(base)``;
  per-document: one set per row; ``key`` seeds a random start, ``carry``: the previous batch's, if ``carries()``).
* ``materialize(base, trainables) -> dict``: the model's overrides. Default: the trainables (``params=``).
  ``loss(model, x, y, overrides, attn, **forward)`` is how they reach the model (doclora: per-row ``lora=``);
  ``forward`` (``positions``, ``rope_len``, ``reduction``) goes to the model as given.
* ``rule() -> Transform``: the update rule, a :func:`metattt.ttt.rules.chain` of transforms built from ``cfg``
  (clipping, momentum, Adam moments, learning-rate schedules, per-slice rates).
* ``init(trainables) -> state``: the rule's state (momentum, moments, step count; dyneval adds anchors).
* ``direction(trainables, grad_at) -> (loss, grads)``: the gradient the rule steps with; ``grad_at(t)`` returns
  (mean loss, masked gradients) at ``t``. Default one call; SAM calls it twice.
* ``step(trainables, state, grads, active=None) -> (trainables, state)``: one update; default ``trainables -
  updates`` with the rule's updates; ``active``: the documents that step. ``state["progress"]`` in [0, 1] drives
  schedules (the driver writes it: chunk index over chunks in evaluation; 0 in meta-training).
* ``batches(x, y) -> [Batch]``: one step per batch. Default: mini-batches of ``batch_seqs`` rows; doclora: one
  per ``chunk``-token chunk of the rows, as the doc-batched evaluator steps.
* ``prepare(model, x, y, autocast)``: called by ``adapt`` before its update (dyneval gathers statistics there).

Drivers (this class; subclasses do not override them): ``take_step`` is one update (``direction``, ``step``,
storage rounding), the unit of the drivers below and of the doc-batched chunk loop (``metattt.eval.docttt_batch``).
``adapt(model, x, y, progress)`` is the evaluator's legal update on scored rows x, y (B, T): ``epochs`` passes
over ``batches``, each mini-batch split over the ranks with token-weighted gradient averaging (so all ranks stay
bit-identical and equal the single-process update up to reduction order), under bf16 autocast on CUDA when
``autocast`` (the evaluator passes its own setting, so ``--no-autocast`` means float32 updates too), whatever the
caller's grad or inference mode. ``inner_loop(model, base, x, y, passes=k, create_graph=...)`` is the
meta-trainer's: the same passes and batches, the same ``step``, on this rank's rows; with ``create_graph=False``
the inner gradients are constants (first order: the result depends on ``base`` through the identity and on
meta-parameters through ``step``), with ``True`` the exact second-order graph (use ``attn="math"``: fused
attention kernels have no double backward). First order, on CPU, ``inner_loop`` with ``passes=k`` returns bit for
bit the weights that the evaluator (``adapt`` with ``epochs=k``; per-document: the doc-batched chunk loop) reaches
on the same rows. ``reset()`` returns to the trained weights and fresh state; ``params()`` gives the current
overrides; ``training_positions(chunk_index) -> int`` names the chunk to train on after scoring ``chunk_index``
(honest adapters: that chunk; the evaluator's ledger refuses others).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple, cast

import torch
from torch import Tensor, nn

from ..devices import DistCtx, autocast_for
from .params import ParamSelection, SelectedParams
from .rules import SCHEDULES, Transform, check_progress

RESET_MODES = ("never", "chunk", "doc")
BACKENDS = ("autograd", "torch.func")
#: hyper-parameters no adapter may set below 0 (step sizes, momentum, clip norms, radii)
NON_NEGATIVE = ("lr", "lr_scale", "momentum", "grad_clip", "rho", "eps", "max_update", "decay", "epsilon", "alpha",
                "weight_decay")

Tensors = dict[str, Tensor]
GradAt = Callable[[Mapping[str, Tensor]], "tuple[Tensor, Tensors]"]


class Batch(NamedTuple):
    """One step's rows: inputs, targets, extra model arguments (``forward``) and per-row loss weights (None: the
    model's mean loss; else the per-target losses, ``reduction="none"`` in ``forward``, weighted per row, summed)."""

    x: Tensor
    y: Tensor
    forward: dict[str, Any] = {}
    weight: Tensor | None = None


def weighted_loss(nll: Tensor, weight: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-target losses (rows, targets) weighted per row and summed (``valid``: targets that count)."""
    return ((nll if valid is None else torch.where(valid, nll, 0.0)) * weight[:, None]).sum()


class MissingMetaParamsError(KeyError):
    """An adapter that needs learned meta-parameters was loaded without them."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass
class AdapterConfig:
    """Hyper-parameters common to all adapters."""

    reset: str = "never"
    epochs: int = 1
    batch_seqs: int = 32

    def validate(self) -> None:
        if self.reset not in RESET_MODES:
            raise ValueError(f"reset must be one of {RESET_MODES}, got {self.reset!r}")
        for name, v in self.to_dict().items():
            if name == "schedule" and v not in SCHEDULES:
                raise ValueError(f"schedule must be one of {SCHEDULES}, got {v!r}")
            if name in ("epochs", "batch_seqs", "steps", "rank", "chunk") and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            # a negative step size or clip silently ascends / disables: refused as doclora refuses them (NaN is left
            # to the evaluator's divergence check, as there)
            if name in NON_NEGATIVE and isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grad_context() -> contextlib.ExitStack:
    """Gradients on, inference mode off: the evaluator scores under inference_mode."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def minibatches(x: Tensor, y: Tensor, batch_seqs: int) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(0, x.size(0), batch_seqs):
        yield x[i:i + batch_seqs], y[i:i + batch_seqs]


def reduce_grads(grads: Tensors, weight: float) -> Tensors:
    """Token-weighted mean of gradients over ranks (identity when not distributed)."""
    ctx = DistCtx.current()
    if not ctx.active or not grads:
        return grads
    names = list(grads)
    w = torch.tensor(weight, dtype=torch.float32, device=grads[names[0]].device)
    *sums, total = ctx.reduce_sum([grads[n].float() * weight for n in names] + [w])
    total = total.clamp_min(1e-12)
    return {n: (s / total).to(grads[n].dtype) for n, s in zip(names, sums)}


def register_nested(root: nn.Module, dotted: str, value: Tensor, *, buffer: bool = False) -> None:
    """Register ``value`` under a dotted name (``log_lr.blocks.0.attn_scale``) through empty container modules,
    so torch's ``state_dict`` keys are the dotted names themselves."""
    *path, leaf = dotted.split(".")
    mod = root
    for part in path:
        if part not in mod._modules:
            mod.add_module(part, nn.Module())
        mod = cast(nn.Module, mod._modules[part])  # just added or already a container module, never None
    if buffer:
        mod.register_buffer(leaf, value)
    else:
        mod.register_parameter(leaf, value if isinstance(value, nn.Parameter) else nn.Parameter(value))


def _stored(d: Mapping[str, Any], dtypes: Mapping[str, torch.dtype],
            key: Callable[[str], str] = lambda k: k) -> dict[str, Any]:
    """``d`` with the tensors whose ``key(name)`` has a storage dtype rounded to it (their own dtype kept)."""
    return {k: (v.to(dtypes[key(k)]).to(v.dtype) if isinstance(v, Tensor) and key(k) in dtypes else v)
            for k, v in d.items()}


class Adapter(nn.Module):
    """Base class; subclasses set ``name``/``Config`` and override the functional core (module docstring)."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    requires_meta_params: ClassVar[bool] = False
    default_selection: ClassVar[str] = "all"
    trains_in_eval: ClassVar[bool] = True
    per_document: ClassVar[bool] = False
    #: True: the doc-batched chunk loop trains on each chunk before scoring it (its ledger refuses; cheat tests only)
    adapts_before_scoring: ClassVar[bool] = False

    def __init__(self, cfg: AdapterConfig | None = None, selection: "str | ParamSelection | None" = None) -> None:
        super().__init__()
        self.cfg: AdapterConfig = cfg if cfg is not None else self.Config()
        if not isinstance(self.cfg, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.cfg).__name__}")
        self.cfg.validate()
        self.selection = ParamSelection.parse(selection if selection is not None else self.default_selection)
        self.sel: SelectedParams | None = None
        self._trained: Tensors = {}
        self._cur: Tensors = {}
        self._state: dict[str, Any] = {}
        # trainables kept at a lower precision between steps (name -> dtype): every update is rounded to it, as
        # a framework holding those tensors in that dtype would (the record's bf16 tables: --compat pg-record);
        # with storage_state, their gradients and optimiser state (keys "<kind>.<name>") are rounded too, as such
        # a framework's gradients and torch.optim buffers have the parameter's dtype
        self.storage_dtypes: dict[str, torch.dtype] = {}
        self.storage_state: bool = False

    # ------------------------------------------------------------------ functional core (override these)
    def setup(self, model: nn.Module) -> None:
        """Create meta-parameters / fixed tensors after the selection is resolved (``self.sel``)."""

    def trainables(self, base: Mapping[str, Tensor]) -> Tensors:
        return {n: base[n] for n in self._require_bound().names}

    def start(self, base: Mapping[str, Tensor], rows: int, key: int = 0,
              carry: Mapping[str, Tensor] | None = None) -> Tensors:
        return self.trainables(base)

    def carries(self) -> bool:
        """Whether ``start`` uses ``carry`` (results then depend on which batches a process ran)."""
        return False

    def materialize(self, base: Mapping[str, Tensor], trainables: Mapping[str, Tensor]) -> Tensors:
        return dict(trainables)

    def rule(self) -> Transform:
        raise NotImplementedError(f"adapter {self.name!r} defines no update rule")

    def init(self, trainables: Mapping[str, Tensor]) -> dict[str, Any]:
        return self.rule().init(trainables)

    def direction(self, trainables: Mapping[str, Tensor], grad_at: GradAt) -> tuple[Tensor, Tensors]:
        return grad_at(trainables)

    def step(self, trainables: Tensors, state: dict[str, Any], grads: Tensors,
             active: Tensor | None = None) -> tuple[Tensors, dict[str, Any]]:
        if active is not None:
            raise ValueError(f"adapter {self.name!r} has no per-document rows to mask (active=)")
        updates, changed = self.rule().update(grads, state, trainables)
        return {n: p - updates[n] for n, p in trainables.items()}, {**state, **changed}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, overrides: Mapping[str, Tensor],
             attn: str | None = None, **forward: Any) -> Tensor:
        """Next-token loss with ``overrides`` (mean unless ``forward`` says otherwise; an adapter whose overrides
        are not parameters, e.g. per-row LoRA factors, passes them its own way here)."""
        if attn is not None:
            forward["attn"] = attn
        return model(x, y, params=dict(overrides), **forward)

    def batches(self, x: Tensor, y: Tensor) -> list[Batch]:
        return [Batch(xb, yb) for xb, yb in minibatches(x, y, self.cfg.batch_seqs)]

    def prepare(self, model: nn.Module, x: Tensor, y: Tensor, autocast: bool) -> None:
        """Called by ``adapt`` before it updates on the scored rows (dyneval gathers its statistics there)."""

    def mask(self, grads: Tensors) -> Tensors:
        """Zero the gradient rows of unselected bank slices (frozen slices stay bit-identical)."""
        return self._require_bound().mask_grads(grads)

    # ------------------------------------------------------------------ lifecycle
    def bind(self, model: nn.Module) -> "Adapter":
        """Resolve the selection, snapshot the trained weights, (re)create meta-parameters, reset."""
        self.sel = self.selection.resolve(model)
        self._modules.clear()
        self._parameters.clear()
        self._buffers.clear()
        with torch.inference_mode(False), torch.no_grad():
            named = dict(model.named_parameters())
            self._trained = {n: named[n].detach().clone() for n in self.sel.names}
            self.setup(model)
        self.reset()
        return self

    def reset(self) -> None:
        """Back to the trained weights and fresh optimiser state (the evaluator decides when, from cfg.reset)."""
        self._require_bound()
        with torch.inference_mode(False), torch.no_grad():
            self._cur = {n: t.clone() for n, t in self.trainables(self._trained).items()}
            self._state = self.init(self._cur)

    def _require_bound(self) -> SelectedParams:
        if self.sel is None:
            raise RuntimeError(f"adapter {self.name!r} is not bound: call adapter.bind(model) first")
        return self.sel

    def params(self) -> Tensors:
        self._require_bound()
        with torch.no_grad():
            return self.materialize(self._trained, self._cur)

    def training_positions(self, chunk_index: int) -> int:
        return chunk_index

    def selection_report(self) -> str:
        return self._require_bound().report()

    @property
    def adapted_count(self) -> int:
        """Scalars the update changes (exact, per slice; LoRA: its factors)."""
        return self._require_bound().count

    def extra_repr(self) -> str:
        return f"cfg={self.cfg}, selection={self.selection.spec!r}"

    # ------------------------------------------------------------------ meta-parameters / artifact
    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def load_state_dict(self, sd: Mapping[str, Tensor], strict: bool = True, assign: bool = False):  # noqa: ANN201
        """torch's load with this project's errors: missing learned meta-parameters raise
        :class:`MissingMetaParamsError` naming the artifact keys; a wrong shape names the state."""
        own = self.state_dict(keep_vars=True)
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing and (strict or self.requires_meta_params):
            raise MissingMetaParamsError(
                f"adapter {self.name!r} needs meta-parameters that are missing: {missing} "
                f"(expected artifact extras {[f'ttt.{self.name}.{k}' for k in missing]}); was the model "
                f"meta-trained with this adapter and selection {self.selection.spec!r}?")
        if unexpected and strict:
            raise KeyError(f"adapter {self.name!r}: unexpected state keys {unexpected}; expected {sorted(own)}")
        for k, t in own.items():
            if k in sd and tuple(sd[k].shape) != tuple(t.shape):
                raise ValueError(f"adapter {self.name!r}: state {k!r} has shape {tuple(sd[k].shape)}, "
                                 f"expected {tuple(t.shape)} (different model or selection?)")
        return super().load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False, assign=assign)

    def artifact_extras(self) -> Tensors:
        return {f"ttt.{self.name}.{k}": v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_artifact_extras(self, extras: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load ``ttt.<name>.*`` keys from an artifact's extras (other keys are ignored)."""
        prefix = f"ttt.{self.name}."
        self.load_state_dict({k[len(prefix):]: v for k, v in extras.items() if k.startswith(prefix)}, strict=strict)

    # ------------------------------------------------------------------ the one driver of both loops
    def _grad_at(self, model: nn.Module, base: Mapping[str, Tensor], x: Tensor, y: Tensor, *, second: bool,
                 attn: str | None, backend: str, over_ranks: bool, forward: Mapping[str, Any] | None = None,
                 weight: Tensor | None = None) -> GradAt:
        """``grad_at(t)``: (loss, masked gradients) on (x, y) at trainables ``t``; constants unless ``second``.
        ``forward``, ``weight``: a :class:`Batch`'s; the loss reported for a weighted batch is its mean per row."""

        def loss_of(t: Mapping[str, Tensor]) -> Tensor:
            out = self.loss(model, x, y, {**base, **self.materialize(base, t)}, attn, **(forward or {}))
            return out if weight is None else weighted_loss(out, weight)

        def grad_at(t: Mapping[str, Tensor]) -> tuple[Tensor, Tensors]:
            if x.size(0) == 0:  # a rank with no rows in this mini-batch still joins the average, with weight 0
                grads = {n: torch.zeros_like(v) for n, v in t.items()}
                return torch.zeros((), device=x.device), reduce_grads(grads, 0.0)
            if second:
                ins = {n: (v if v.requires_grad else v.detach().requires_grad_(True)) for n, v in t.items()}
            else:
                ins = {n: v.detach().requires_grad_(True) for n, v in t.items()}
            if backend == "torch.func":
                grads, loss = torch.func.grad_and_value(loss_of)(ins)
                grads = dict(grads)
                if not second:
                    grads = {n: g.detach() for n, g in grads.items()}
            else:
                loss = loss_of(ins)
                gs = torch.autograd.grad(loss, list(ins.values()), create_graph=second, allow_unused=True)
                grads = {n: (g if g is not None else torch.zeros_like(ins[n])) for n, g in zip(ins, gs)}
            grads = self.mask(grads)
            if over_ranks:
                grads = reduce_grads(grads, float(y.numel()))
            loss = loss.detach()
            return (loss if weight is None else loss / x.size(0)), grads

        return grad_at

    def take_step(self, trainables: Tensors, state: dict[str, Any], grad_at: GradAt, *, no_grad_step: bool = True,
                  active: Tensor | None = None) -> tuple[Tensor, Tensors, dict[str, Any]]:
        """One update: ``direction`` (gradients from ``grad_at``), then ``step`` (``active``: the rows that step,
        per-document adapters), the storage dtypes' rounding included; returns (loss, trainables, state). The
        unit of ``adapt``, ``inner_loop`` and the doc-batched evaluator's chunk loop."""
        loss, grads = self.direction(trainables, grad_at)
        with torch.no_grad() if no_grad_step else contextlib.nullcontext():
            if self.storage_dtypes and self.storage_state:
                grads = _stored(grads, self.storage_dtypes)
            trainables, state = (self.step(trainables, state, grads) if active is None
                                 else self.step(trainables, state, grads, active))
            if self.storage_dtypes:
                trainables = _stored(trainables, self.storage_dtypes)
                if self.storage_state:
                    state = _stored(state, self.storage_dtypes, key=lambda k: k.partition(".")[2])
        return loss, trainables, state

    def _run(self, model: nn.Module, base: Mapping[str, Tensor], trainables: Tensors, state: dict[str, Any],
             x: Tensor, y: Tensor, *, passes: int, progress: float, second: bool, no_grad_step: bool,
             attn: str | None = None, backend: str = "autograd",
             over_ranks: bool = False) -> tuple[Tensors, dict[str, Any], list[list[Tensor]]]:
        """``passes`` epochs over ``batches(x, y)``, one ``take_step`` per batch."""
        if backend not in BACKENDS:
            raise ValueError(f"inner-loop backend must be one of {BACKENDS}, got {backend!r} "
                             "(the 'higher' backend lives in metattt.ttt.meta)")
        ctx = DistCtx.current() if over_ranks else DistCtx()
        batches = [b._replace(x=b.x[ctx.share(b.x.size(0))], y=b.y[ctx.share(b.y.size(0))])
                   for b in self.batches(x, y)]
        losses: list[list[Tensor]] = []
        state = {**state, "progress": progress}
        for _ in range(passes):
            epoch = []
            for b in batches:
                grad_at = self._grad_at(model, base, b.x, b.y, second=second, attn=attn, backend=backend,
                                        over_ranks=over_ranks, forward=b.forward, weight=b.weight)
                loss, trainables, state = self.take_step(trainables, state, grad_at, no_grad_step=no_grad_step)
                epoch.append(loss)
            losses.append(epoch)
        return trainables, state, losses

    def adapt(self, model: nn.Module, x: Tensor, y: Tensor, progress: float = 0.0, *,
              autocast: bool = True) -> dict[str, float]:
        """The evaluator's legal update on already-scored rows (see the module docstring); ``autocast``: bf16
        autocast on CUDA (False: float32, as the scoring forwards under ``--no-autocast``)."""
        self._require_bound()
        if self.per_document:
            raise ValueError(f"adapter {self.name!r} adapts one document per row: evaluate it as "
                             f"docttt:{self.name}, not on the window evaluator's rows")
        if x.shape != y.shape or x.ndim != 2:
            raise ValueError(f"adapt expects x, y of equal shape (B,T); got {tuple(x.shape)} and {tuple(y.shape)}")
        if not self.trains_in_eval or not self._cur:
            return {"steps": 0}
        check_progress(progress)  # before any work
        self.prepare(model, x, y, autocast)
        with grad_context(), autocast_for(x.device, autocast):
            self._cur, self._state, losses = self._run(model, self._trained, self._cur, self._state, x, y,
                                                       passes=self.cfg.epochs, progress=progress, second=False,
                                                       no_grad_step=True, over_ranks=True)
        first = torch.stack(losses[0]).float().mean().item() if losses and losses[0] else float("nan")
        last = torch.stack(losses[-1]).float().mean().item() if losses and losses[-1] else float("nan")
        st = {"loss_first": first, "loss_last": last, "steps": sum(len(e) for e in losses)}
        if "lr" in self._state:  # the step size the rule used (a schedule's value at this progress)
            st["lr"] = self._state["lr"]
        return st

    def inner_loop(self, model: nn.Module, base: Mapping[str, Tensor], x: Tensor, y: Tensor, *, passes: int,
                   create_graph: bool, attn: str | None = None,
                   backend: str = "autograd") -> tuple[Tensors, dict[str, Tensor]]:
        """The meta-trainer's inner loop from ``base`` (name -> tensor, usually the model's parameters): returns
        (the ``params=`` overrides after ``passes`` epochs, ``{"loss_first": mean loss of the first pass}``)."""
        sel = self._require_bound()
        missing = [n for n in sel.names if n not in base]
        if missing:
            raise KeyError(f"inner_loop base lacks selected parameters {missing}")
        t0 = self.start(base, x.size(0))
        t, _, losses = self._run(model, base, t0, self.init(t0), x, y, passes=passes, progress=0.0,
                                 second=create_graph, no_grad_step=False, attn=attn, backend=backend)
        first = torch.stack(losses[0]).float().mean() if losses and losses[0] else torch.full((), float("nan"))
        return self.materialize(base, t), {"loss_first": first}
