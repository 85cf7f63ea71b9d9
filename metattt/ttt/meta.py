"""Meta-training outer step: ``meta_loss(model, adapter, x, y, cfg)`` for the trainer.

outer = (w_post + w_delta) * L_post - w_delta * L_pre, with L_post the outer-split loss at the weights that
``adapter.inner_loop`` reaches on the inner split -- the adapter's own ``step``, the one the evaluator runs, for
the evaluator's own number of passes (the adapter's ``epochs``) over the inner split's mini-batches, unless
``MetaConfig.inner_steps`` overrides it -- and L_pre the same loss at the current weights. ``loss.backward()``
puts meta-gradients on the model's parameters and on the adapter's meta-parameters.

Why the adapter's ``epochs`` by default: the question is whether meta-training raises the gain of the update the
evaluator performs; an inner loop of another length (the old default was 1 pass while ``ttt:sgd`` evaluates 3)
meta-trains for a different update. Momentum, clipping and per-slice rates come with ``step`` itself; the
optimiser state starts fresh in every meta step, as it does in the evaluator before its first chunk.

Schedule progress inside one meta step: 0. The evaluator's ``progress`` is the chunk's place in the stream (chunk
index / (chunks - 1)), constant during one ``adapt`` call; a meta step starts from the current (trained) weights
with fresh optimiser state, which is the evaluator's situation at its first chunk only, i.e. progress 0 (peak lr
of a cosine schedule). Later chunks start from weights already adapted on earlier chunks with carried momentum,
which no single meta step reproduces; sampling progress would change the lr without the matching start point.
So the first-order inner loop equals ``adapt(..., progress=0)`` bit for bit (tests/test_ttt_meta.py).

* order="first": inner gradients are constants, so the gradient at the adapted point reaches the base weights
  through the identity (FOMAML); no double backward.
* order="second": exact meta-gradient through the inner steps (create_graph), with the inner forward on the
  ``math`` attention path (fused kernels have no double backward). Backends: "autograd", "torch.func", "higher"
  (optional, ``pip install higher``; plain constant-lr SGD adapters only, as an independent cross-check).
* a ``per_document`` adapter (the registry's flag, plug-ins included; e.g. ``doclora``, the batched per-document
  LoRA of the doc-batched evaluator: one document per row) runs the same ``inner_loop`` on the rows' first half
  (split "seq-half", first order): its ``batches`` are the evaluator's, one step per ``chunk``-token chunk, so
  doclora learns the shared A init (``init=meta``) for the evaluated update, and the outer loss is taken at
  exactly the factors the evaluator would reach.
* an adapter with a :class:`ReptileConfig` (``reptile``, or a plug-in's subclass of it): the surrogate
  sum_n <theta_n, sg(epsilon * (theta_n - theta_k,n))>, whose gradient is the Reptile direction; theta_k after the
  same passes as above (the adapter's ``epochs``).

Statistics (detached tensors, no host sync): ``meta/L_post``, ``meta/L_inner`` (first inner pass, free) and,
when known, ``meta/L_pre`` and ``meta/gain``. L_pre is free when the split is "same-batch" and the inner split is
one mini-batch (it is the first inner loss); otherwise it costs one more no-grad forward of the outer split,
about a third of a forward+backward, i.e. roughly +15% on a first-order meta micro-batch (inner fwd+bwd, outer
fwd+bwd), so that forward is opt-in (``log_pre``) unless ``delta_weight`` needs L_pre anyway.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, cast

import torch
from torch import Tensor, nn

from .adapter import Adapter, grad_context
from .registry import Registry
from .sgd import ReptileConfig

SPLITS = ("same-batch", "cross-doc", "seq-half")
ORDERS = ("first", "second")
META_BACKENDS = ("autograd", "torch.func", "higher")


@dataclass
class MetaConfig:
    """How (and how often) the trainer adds the meta-objective."""

    adapter: str | None = None  # adapter spec, e.g. "fomaml:lr=0.01,select=banks:layers>=2"; None = off
    adapter_modules: tuple[str, ...] = ()  # plug-in files / modules whose adapters the spec may name
    every: int = 4
    # passes over the inner split's mini-batches (doclora: over its chunks); None = the evaluated update's own
    # (the adapter's ``epochs``; doclora: 1); an int is an explicit override, recorded in config.json and in the
    # summary's ``meta_inner`` (``inner_passes``)
    inner_steps: int | None = None
    split: str = "same-batch"
    outer_weight: float = 1.0
    delta_weight: float = 0.0
    start_frac: float = 0.0
    order: str = "first"
    backend: str = "autograd"
    log_pre: bool = False  # pay one no-grad forward for L_pre when it is not free (see the module docstring)
    micro_batches: int = 1  # micro-batches of a meta step that carry the meta-objective (0 = all); the
    # others train on the plain loss, which keeps the overhead of a meta step small under accumulation
    meta_lr: float = 0.01  # Adam lr of the adapter's meta-parameters (MetaSGD log-rates), used by the trainer

    def __post_init__(self) -> None:
        # plug-in files as absolute paths, so a resumed run (config.json) finds them from any directory
        self.adapter_modules = tuple(str(Path(m).expanduser().resolve()) if m.endswith(".py") else m
                                     for m in (self.adapter_modules or ()))
        problems = []
        if self.split not in SPLITS:
            problems.append(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.order not in ORDERS:
            problems.append(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.backend not in META_BACKENDS:
            problems.append(f"backend must be one of {META_BACKENDS}, got {self.backend!r}")
        if self.every < 1 or (self.inner_steps is not None and self.inner_steps < 1):
            problems.append(f"every ({self.every}) and inner_steps ({self.inner_steps}) must be >= 1")
        if self.micro_batches < 0:
            problems.append(f"micro_batches must be >= 0, got {self.micro_batches}")
        if self.meta_lr <= 0:
            problems.append(f"meta_lr must be > 0, got {self.meta_lr}")
        if not 0.0 <= self.start_frac <= 1.0:
            problems.append(f"start_frac must be in [0, 1], got {self.start_frac}")
        if (self.split != "seq-half" or self.order != "first") and self.per_document:
            who = f"adapter {self.adapter_name} is per-document (one document per row)"
            if self.split != "seq-half":
                problems.append(f"{who}: it needs split 'seq-half', got {self.split!r}")
            if self.order != "first":
                problems.append(f"{who}: it meta-trains first-order only")
        if problems:
            raise ValueError("invalid MetaConfig: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return bool(self.adapter)

    def registry(self) -> Registry:
        return Registry.build(self.adapter_modules)

    @property
    def adapter_name(self) -> str:
        return (self.adapter or "").split(":", 1)[0].strip()

    @property
    def per_document(self) -> bool:
        """The spec names a ``per_document`` adapter of the registry (plug-ins included): one document per row,
        meta-trained on split seq-half at first order, evaluated as ``docttt:NAME``. An unknown name: False (the
        registry names it when the adapter is made)."""
        cls = self.registry().classes.get(self.adapter_name) if self.adapter else None
        return cls is not None and cls.per_document

    @property
    def doc_chunk(self) -> int:
        """Tokens per update of the per-document adapter (its ``chunk``, a docttt protocol option too, so the
        final evaluation gets the same one)."""
        ad = self.make_adapter()
        if not ad.per_document:
            raise ValueError(f"adapter spec {self.adapter!r} is not a per-document adapter")
        return int(ad.cfg.to_dict()["chunk"])  # the registry refuses a per-document adapter without ``chunk``

    def make_adapter(self, registry: Registry | None = None) -> Adapter:
        """The registry's adapter for the spec; a per-document adapter with an ``init`` option (doclora) with its
        learned init switched on (``init=meta``)."""
        if not self.adapter:
            raise ValueError("MetaConfig.adapter is not set")
        reg = registry or self.registry()
        name, opts = reg.parse_spec(self.adapter)
        cls = reg.get(name)
        if cls.per_document and "init" in {f.name for f in fields(cls.Config)}:
            if opts.get("init", "meta") != "meta":
                raise ValueError(f"meta-training {name} learns its init: init must be 'meta'")
            opts["init"] = "meta"
        return reg.make(name, **opts)

    def inner_passes(self, adapter: Adapter) -> int:
        """Passes of the inner loop: the override ``inner_steps``, else the evaluated update's (``epochs``;
        doclora: 1, one pass over the chunks, as the doc-batched evaluator takes)."""
        return self.inner_steps if self.inner_steps is not None else adapter.cfg.epochs

    def inner_summary(self, adapter: Adapter) -> dict[str, Any]:
        """What the inner loop ran, for the run's summary: passes and whether they are the evaluated update's."""
        out: dict[str, Any] = {"passes": self.inner_passes(adapter),
                               "source": "adapter epochs" if self.inner_steps is None else "override inner_steps",
                               "progress": 0.0}
        if adapter.per_document:
            out["chunk"] = self.doc_chunk
        return out

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


def _outer_loss(adapter: Adapter, model: nn.Module, x: Tensor, y: Tensor, start: int,
                params: Mapping[str, Tensor]) -> Tensor:
    """The outer loss at the overrides ``params``, through the adapter's ``loss`` (its way into the model)."""
    if start == 0:
        return adapter.loss(model, x, y, params)
    return adapter.loss(model, x, y, params, reduction="none")[:, start:].mean()


def _import_higher():  # noqa: ANN202
    try:
        import higher  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError("meta backend 'higher' needs the optional package: pip install 'metattt[meta]' "
                          "(or pip install higher)") from e
    return higher


def higher_inner_loop(model: nn.Module, adapter: Adapter, x: Tensor, y: Tensor, *, steps: int,
                      create_graph: bool, attn: str | None = None) -> dict[str, Tensor]:
    """Plain constant-lr full-batch SGD via ``higher``'s differentiable optimiser: an independent implementation
    that cross-checks the autograd / torch.func backends. Returns adapted selected tensors."""
    higher = _import_higher()
    c, lr = adapter.cfg, adapter.rule().sgd_lr
    own = type(adapter)  # the rule's own step on the selected tensors themselves, one gradient per step
    plain = (own.direction, own.step, own.trainables, own.materialize, own.loss) == (
        Adapter.direction, Adapter.step, Adapter.trainables, Adapter.materialize, Adapter.loss)
    if lr is None or not plain or x.size(0) > c.batch_seqs:
        raise ValueError(f"backend 'higher' supports plain constant-lr SGD adapters (sgd rule with momentum=0, "
                         f"grad_clip=0, one mini-batch), not {adapter.name!r} with {c}")
    sel = adapter._require_bound()
    names = [n for n, _ in model.named_parameters()]
    selected = set(sel.names)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

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
    """Outer meta-objective on batch (x, y); returns (loss, detached tensor stats) so the caller decides when to
    sync."""
    if not adapter.trains_in_eval:
        raise ValueError(f"meta_loss with the {adapter.name!r} adapter has nothing to meta-train")
    if adapter.sel is None:
        adapter.bind(model)
    passes = cfg.inner_passes(adapter)
    if isinstance(adapter.cfg, ReptileConfig):
        return reptile_loss(model, adapter, x, y, epsilon=adapter.cfg.epsilon, steps=passes, weight=cfg.outer_weight)
    (xi, yi), (xo, yo), start = split_batch(x, y, cfg.split)
    second = cfg.order == "second"
    attn = "math" if second else None
    base = dict(model.named_parameters())
    stats: dict[str, Tensor] = {}
    with grad_context():
        if cfg.backend == "higher":
            adapted = higher_inner_loop(model, adapter, xi, yi, steps=passes, create_graph=second, attn=attn)
        else:
            adapted, inner = adapter.inner_loop(model, base, xi, yi, passes=passes, create_graph=second,
                                                attn=attn, backend=cfg.backend)
            stats["meta/L_inner"] = inner["loss_first"]
        l_post = _outer_loss(adapter, model, xo, yo, start, adapted)
        loss = (cfg.outer_weight + cfg.delta_weight) * l_post
        l_pre = None
        if cfg.delta_weight:
            l_pre = _outer_loss(adapter, model, xo, yo, start, {})
            loss = loss - cfg.delta_weight * l_pre
        elif cfg.split == "same-batch" and "meta/L_inner" in stats and xi.size(0) <= adapter.cfg.batch_seqs:
            l_pre = stats["meta/L_inner"]  # the first inner loss is the loss at the current weights on this batch
        elif cfg.log_pre:
            with torch.no_grad():
                l_pre = _outer_loss(adapter, model, xo, yo, start, {})
    stats["meta/L_post"] = l_post.detach()
    if l_pre is not None:
        stats["meta/L_pre"] = l_pre.detach()
        stats["meta/gain"] = (l_pre - l_post).detach()
    return loss, stats


def reptile_loss(model: nn.Module, adapter: Adapter, x: Tensor, y: Tensor, *, epsilon: float,
                 steps: int | None = None, weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Surrogate whose gradient w.r.t. each selected tensor is ``weight * epsilon * (theta - theta_k)``, theta_k
    after ``steps`` (default: the adapter's ``epochs``, the evaluated update) first-order passes of the adapter's
    step on (x, y)."""
    steps = steps if steps is not None else adapter.cfg.epochs
    named = dict(model.named_parameters())
    with grad_context():
        adapted, inner = adapter.inner_loop(model, named, x, y, passes=steps, create_graph=False)
    target = {n: t.detach() for n, t in adapted.items()}
    diff = {n: named[n].detach() - tk for n, tk in target.items()}
    loss = cast(Tensor, sum((named[n] * d).sum() for n, d in diff.items())) * (weight * epsilon)
    dist2 = sum(d.float().square().sum() for d in diff.values())
    return loss, {"meta/L_inner": inner["loss_first"], "reptile/dist": torch.as_tensor(dist2).sqrt()}
