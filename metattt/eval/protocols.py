"""Protocol specs (``flat``, ``sliding``, ``doc-*``, ``ttt:<adapter>``, ``oracle:<adapter>``) and the evaluation
of a set of them on one token stream, with per-document and per-block accounting for the report.

Every protocol scores the same target set (positions 1..n-1) with the same byte LUT, so all bpb values and
differences are paired.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..data.bpb import bpb
from ..ttt.adapter import Adapter, AdapterConfig
from ..ttt.registry import Registry
from . import bayes_cache, docttt, docttt_model
from .docttt_spec import DocTTTSpec, is_docttt, parse_docttt
from .ledger import Ledger
from .spec import ProtocolSpec, Spec
from .scoring import AdapterFactory, AdapterLike, DistCtx, ScoreConfig, StreamResult, fixed_batch_shape, run_stream, score_windows
from .windows import WindowPlan, doc_ids, doc_plan, doc_starts, flat_plan, sliding_plan

_WINDOW_ALIASES = {"doc": "doc-sliding", "flat": "flat", "sliding": "sliding", "doc-flat": "doc-flat",
                   "doc-sliding": "doc-sliding"}
ORACLE_LABEL = "not a legal score: upper bound"


def parse_protocol(text: str, registry: Registry | None = None) -> Spec:
    """``flat`` | ``sliding`` | ``doc`` (= ``doc-sliding``) | ``doc-flat`` | ``ttt:<adapter>[@<windows>]`` |
    ``oracle:<adapter>[@<windows>]`` (windows default ``sliding``) | the doc-batched family (``docttt:NAME``: a
    per-document adapter of ``registry``, default the built-ins)."""
    t = text.strip()
    if not t:
        raise ValueError("empty protocol name")
    if is_docttt(t):  # the document-batched family: doc-chunk[@...], docttt:ADAPTER[@...]
        return parse_docttt(t, registry)
    if bayes_cache.is_bayes_cache(t):  # the synthetic corpus's exact Bayes cache (a reference, no gradients)
        return bayes_cache.BayesCacheSpec()
    if ":" not in t:
        if t not in _WINDOW_ALIASES:
            raise ValueError(f"unknown protocol {t!r}; expected flat, sliding, doc, doc-flat, doc-sliding, "
                             "ttt:<adapter>[@windows] or oracle:<adapter>[@windows]")
        return ProtocolSpec(_WINDOW_ALIASES[t])
    mode, _, rest = t.partition(":")
    if mode not in ("ttt", "oracle"):
        raise ValueError(f"unknown protocol mode {mode!r} in {t!r}; expected ttt:<adapter> or oracle:<adapter>")
    adapter, _, win = rest.partition("@")
    if not adapter:
        raise ValueError(f"protocol {t!r} names no adapter")
    win = win or "sliding"
    if win not in _WINDOW_ALIASES:
        raise ValueError(f"protocol {t!r}: unknown windowing {win!r}")
    return ProtocolSpec(_WINDOW_ALIASES[win], mode, adapter)


def parse_protocols(text: str | list[str], registry: Registry | None = None) -> list[Spec]:
    """Comma-separated protocols, plus the protocols their deltas need (``Spec.requires``), deduplicated, in the
    run order (``Spec.order``): windows only (flat, sliding, doc-flat, doc-sliding), doc-batched, bayes-cache, ttt,
    oracle."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs = [parse_protocol(s, registry) for s in items if s.strip()]
    if not specs:
        raise ValueError("no protocols given")
    out: list[Spec] = []
    for s in sorted(specs + [r for s in specs for r in s.requires()], key=lambda s: s.order):
        if s not in out:
            out.append(s)
    return out


@dataclass(frozen=True)
class EvalConfig:
    """Evaluator settings (``ScoreConfig`` fields are passed through)."""

    seq_len: int = 2048  # flat windows (the training sequence length)
    context: int = 2048  # sliding windows
    stride: int = 64
    chunk_tokens: int = 32768
    batch_tokens: int = 32 * 2048
    train_seq_len: int | None = None
    autocast: bool = True
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95
    projection_tokens: int = 62_000_000
    projection_gpus: int = 8
    progress: bool = False
    fixed_shapes: bool = False  # one forward shape (set with --compile)
    compat: str = "none"  # "pg-record": the record scripts' scoring beside ours (metattt.eval.compat)
    eager_adapted: bool = False  # score adapted weights with the uncompiled model (the record's TTT loop does)
    sliding_logits: bool = False  # sliding score-only protocols round logits to bf16 under autocast (record compat)
    docttt_compile: bool = False  # docttt: compiled core, dynamic rows and lengths (the CLI's --compile)
    docttt_shapes: str = "auto"  # docttt forward shapes (docttt_batch.SHAPES); auto: chunk on CUDA, exact elsewhere
    attn: str = "auto"  # attention backend (model.attention.ATTN_BACKENDS); docttt resolves auto itself
    position_edges: tuple[int, ...] = (0, 128, 1024, 2048)  # per-position Δ: offsets from the document's BOS
    equivalence_margin: float = 0.001  # TOST margin (bpb) of the report's equivalence table
    orders: int = 1  # document orders (metattt.eval.orders); 1: the intervals are conditional on one order
    adapt_seeds: int = 1  # adapter seeds per order
    docttt_model: bool = False  # docttt: calibrate the batch-cost model first (warm-up; the full-val projection)
    schedule_horizon: int | None = None  # ttt:/oracle: schedules run over this many tokens (None: the scored stream)

    def score_config(self, windows: str | None = None) -> ScoreConfig:
        """``windows``: the protocol's windowing, whose window length fixes the RoPE base of its forwards."""
        record = self.compat == "pg-record"  # its forwards are always context long
        return ScoreConfig(batch_tokens=self.batch_tokens, chunk_tokens=self.chunk_tokens,
                           train_seq_len=self.train_seq_len or self.context, autocast=self.autocast, attn=self.attn,
                           progress=self.progress, fixed_shapes=self.fixed_shapes or record,
                           pad_to=self.context if record else None,
                           rope_len=None if windows is None else self.window_len(windows),
                           schedule_horizon=self.schedule_horizon)

    def window_len(self, windows: str) -> int:
        """The window length a windowing chose: ``seq_len`` for flat windows, ``context`` for sliding ones."""
        return self.seq_len if windows in ("flat", "doc-flat") else self.context

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProtocolResult:
    spec: Spec
    stream: StreamResult
    doc_nats: np.ndarray  # float64 (n_docs,)
    block_nats: np.ndarray  # float64 (n_blocks,)
    ledger: dict[str, Any]
    adapter_info: dict[str, Any] | None = None
    world: int = 1
    compat: dict[str, Any] | None = None  # --compat pg-record: the record's extra tail scorings
    warmup_s: float = 0.0  # untimed warm-up of this protocol (docttt: the cost model's calibration, which compiles)
    projection: dict[str, Any] | None = None  # docttt: the batch-cost model's full-val projection (docttt_model)
    flops: float | None = None  # model FLOPs counted for the whole protocol (metattt.eval.cost)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nats(self) -> float:
        return float(self.doc_nats.sum())


@dataclass
class StreamData:
    """The token stream and everything derived from it that does not depend on the model."""

    tokens: torch.Tensor  # int64 on the scoring device
    tokens_np: np.ndarray  # int64 on CPU
    target_bytes: np.ndarray  # float64 (n-1,)
    doc_of_target: np.ndarray  # int64 (n-1,)
    starts: np.ndarray  # document start positions
    bos_id: int
    block_tokens: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens_np.size)

    @property
    def n_docs(self) -> int:
        return int(self.starts.size)

    @property
    def doc_bytes(self) -> np.ndarray:
        return np.bincount(self.doc_of_target, weights=self.target_bytes, minlength=self.n_docs)

    @property
    def block_of_target(self) -> np.ndarray:
        return np.arange(self.n_tokens - 1, dtype=np.int64) // self.block_tokens

    @property
    def block_bytes(self) -> np.ndarray:
        return np.bincount(self.block_of_target, weights=self.target_bytes)


def prepare_stream(tokens: torch.Tensor | np.ndarray, lut: Any, device: torch.device | str, block_tokens: int,
                   vocab_size: int | None = None) -> StreamData:
    """Validate the stream against the LUT / vocab and precompute bytes and document ids."""
    t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).long().cpu()
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"validation tokens must be a 1-D stream of at least 2 tokens, got shape {tuple(t.shape)}")
    lut_v = int(getattr(lut, "vocab_size", lut.base_bytes.numel()))
    hi = int(t.max())
    if hi >= lut_v:
        raise ValueError(f"validation stream holds token id {hi} but the byte LUT covers only {lut_v} ids "
                         "(tokenizer / LUT does not match the data)")
    if vocab_size is not None and hi >= vocab_size:
        raise ValueError(f"validation stream holds token id {hi} but the model's vocab is {vocab_size}")
    nb = lut.target_bytes(t[:-1], t[1:]).double().numpy()
    arr = t.numpy()
    bos = int(lut.bos_id)
    return StreamData(t.to(device), arr, nb, doc_ids(arr, bos), doc_starts(arr, bos), bos, int(block_tokens))


def build_plan(windows: str, data: StreamData, cfg: EvalConfig) -> WindowPlan:
    n = data.n_tokens
    if windows == "flat":
        return flat_plan(n, cfg.seq_len)
    if windows == "sliding":
        return sliding_plan(n, cfg.context, cfg.stride)
    if windows == "doc-flat":
        return doc_plan(data.tokens_np, data.bos_id, cfg.seq_len, cfg.seq_len, sliding=False)
    if windows == "doc-sliding":
        return doc_plan(data.tokens_np, data.bos_id, cfg.context, cfg.stride, sliding=True)
    raise ValueError(f"unknown windowing {windows!r}")


def adapter_info(adapter: AdapterLike) -> dict[str, Any]:
    """Exact adapted-parameter accounting of a bound adapter (from its selection); an adapter written against the
    evaluator's seam alone (``AdapterLike``, not an ``Adapter``) has no selection to account."""
    info: dict[str, Any] = {"adapter": adapter.name, "config": _cfg_dict(adapter.cfg)}
    if isinstance(adapter, Adapter) and adapter.sel is not None:
        sel = adapter.sel
        tensors = {}
        for n in sel.names:
            idx = sel.slices.get(n)
            tensors[n] = {"slices": "all" if idx is None else [sel.labels.get((n, i), str(i)) for i in idx],
                          "scalars": int(sel.scalars(n))}
        info.update({"selection": sel.spec, "adapted_scalars": int(adapter.adapted_count),
                     "selected_scalars": int(sel.count), "model_scalars": int(sel.model_total),
                     "tensors": tensors})
        info["report"] = adapter.selection_report()
    return info


def _cfg_dict(cfg: Any) -> dict[str, Any] | None:
    if cfg is None:
        return None
    if isinstance(cfg, AdapterConfig):
        return cfg.to_dict()
    try:  # a bare seam adapter's config: a dataclass, else its repr
        return asdict(cfg)
    except TypeError:
        return {"repr": repr(cfg)}


def run_protocol(
    spec: Spec,
    model: torch.nn.Module,
    data: StreamData,
    plan: WindowPlan | None,
    cfg: EvalConfig,
    adapter: AdapterLike | None = None,
    ctx: DistCtx | None = None,
    scorer: torch.nn.Module | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> ProtocolResult:
    """Run one protocol and check its ledger (raises :class:`LegalityError` for an illegal legal protocol).
    ``extras``: the artifact's extras (a batched adapter's learned init, ``docttt:doclora@init=meta``)."""
    ctx = DistCtx.current() if ctx is None else ctx
    if isinstance(spec, DocTTTSpec):
        return _run_docttt(spec, model, data, cfg, ctx, extras)
    if plan is None:  # only a docttt: protocol builds its own windows
        raise ValueError(f"protocol {spec.name} needs a window plan")
    if isinstance(spec, bayes_cache.BayesCacheSpec):
        return ProtocolResult(spec, *bayes_cache.run_bayes_cache(spec, model, data, plan, cfg))
    if spec.mode != "score" and adapter is None:
        raise ValueError(f"protocol {spec.name} needs adapter {spec.adapter!r}")
    ledger = Ledger(spec.name, enforce=spec.legal)
    sc = cfg.score_config(spec.windows)
    if cfg.eager_adapted and spec.mode != "score":  # uncompiled: batches as the record's (a chunk's last is smaller)
        scorer, sc = None, replace(sc, fixed_shapes=False)
    if cfg.sliding_logits and cfg.autocast and spec.mode == "score" and spec.windows == "sliding":
        sc = replace(sc, logits_dtype="bfloat16")  # the record's compiled forward_logits returns bf16
    if spec.mode == "score":
        order = "score_only"
        adapter = None
    elif spec.mode == "oracle":
        order = "adapt_first"
    else:  # the adapter picks what it trains on (training_positions); the enforcing ledger refuses cheats
        order = "score_first"
    res = run_stream(model, data.tokens, plan, sc, adapter=adapter, order=order, ledger=ledger,
                     ctx=ctx, starts=data.starts, scorer=scorer)
    summary = ledger.verify()
    nll = res.token_nll.astype(np.float64)
    doc_nats = np.bincount(data.doc_of_target, weights=nll, minlength=data.n_docs)
    block_nats = np.bincount(data.block_of_target, weights=nll)
    info = adapter_info(adapter) if adapter is not None else None
    compat = None
    if cfg.compat == "pg-record" and spec.windows in ("flat", "sliding"):
        from .compat import tail_scores

        compat = {"tail_windows": 0, "tail_targets": 0, "tail_nats": 0.0, "tail_bytes": 0.0}
        if spec.windows == "sliding":  # flat has no tail in the record either
            compat = tail_scores(model, data, cfg, adapter.params() if adapter is not None else None, scorer, sc)
    from . import cost

    work = cost.window_work(plan.length)
    if adapter is not None:
        epochs = adapter.cfg.epochs if isinstance(adapter, Adapter) else 1  # a bare seam adapter: one pass
        work = work + cost.training_work(summary, epochs,
                                         cfg.score_config().train_seq_len or plan.max_length)
    return ProtocolResult(spec, res, doc_nats, block_nats, summary, info, ctx.world, compat,
                          flops=cost.flops(work, model))


def _run_docttt(spec: DocTTTSpec, model: torch.nn.Module, data: StreamData, cfg: EvalConfig, ctx: DistCtx,
                extras: Mapping[str, torch.Tensor] | None = None) -> ProtocolResult:
    """A ``doc-chunk`` / ``docttt:`` protocol (metattt.eval.docttt), accounted like the others."""
    ledger = Ledger(spec.name, enforce=True)
    proj, warm = None, 0.0
    if cfg.docttt_model:  # calibrating is the run's warm-up (it compiles): the timed run then holds no compilation
        from .docttt_model import projection

        proj = projection(model, spec, data.tokens_np, data.bos_id, data.tokens.device,
                          shapes=cfg.docttt_shapes, compile=cfg.docttt_compile, autocast=cfg.autocast, attn=cfg.attn,
                          full_tokens=cfg.projection_tokens, gpus=cfg.projection_gpus, world=ctx.world,
                          extras=extras)
        warm = proj["calibration_s"]
    res = docttt.run_docttt(spec, model, data.tokens, data.tokens_np, data.bos_id, ledger, ctx,
                            make_adapter=lambda s: docttt.make_doc_adapter(s, model, extras),
                            autocast=cfg.autocast, attn=cfg.attn, compile=cfg.docttt_compile, progress=cfg.progress,
                            shapes=None if cfg.docttt_shapes == "auto" else cfg.docttt_shapes)
    summary = ledger.verify()
    nll = res.token_nll.astype(np.float64)
    doc_nats = np.bincount(data.doc_of_target, weights=nll, minlength=data.n_docs)
    block_nats = np.bincount(data.block_of_target, weights=nll)
    info = None
    if spec.adapter is not None:
        ad = spec.make_adapter().bind(model)
        info = {"adapter": ad.name, "config": ad.cfg.to_dict(),
                "adapted_scalars_per_doc": ad.adapted_count, "docs_per_batch": spec.docs,
                "chunk": spec.chunk, "window": spec.window, "phases": spec.phases}
    if proj is not None:
        proj["measured_over_modelled"] = res.seconds / proj["check_s"] if proj["check_s"] > 0 else None
    from . import cost

    queue = docttt_model.doc_queue(data.tokens_np, data.bos_id, spec.docs)
    phase_t = sum(float(queue.n_targets[:n].sum()) for _, n in
                  docttt_model.phase_boundaries(queue, spec.phases, spec.phase_docs)) if spec.adapter is not None else 0.0
    work = cost.docttt_work(queue.n_targets, spec.chunk, spec.window, spec.adapter is not None, phase_t,
                            spec.phase_epochs)
    return ProtocolResult(spec, res, doc_nats, block_nats, summary, info, ctx.world, warmup_s=warm, projection=proj,
                          flops=cost.flops(work, model))


@dataclass
class EvalResult:
    data: StreamData
    cfg: EvalConfig
    results: dict[str, ProtocolResult] = field(default_factory=dict)
    scorer_compile_s: float = 0.0  # warm-up of a compiled scorer, kept out of every protocol's time


def warm_up_scorer(scorer: torch.nn.Module, data: StreamData, jobs: list[tuple[WindowPlan, AdapterLike | None]],
                   cfg: EvalConfig) -> float:
    """One fixed-shape forward per distinct (batch shape, adapter) of ``jobs`` ((plan, bound adapter or None)
    pairs), so compilation is not billed to the first protocol that needs a graph (its tokens/s and full-val
    projection would be off by the compile time). ``ttt:``/``oracle:`` protocols score through the adapter's
    ``params=`` overrides: a graph of its own, warmed up with the adapter's reset state. Seconds spent."""
    if not cfg.score_config().fixed_shapes:
        return 0.0
    t0 = time.perf_counter()
    seen: set[tuple[int, int, int]] = set()
    for plan, adapter in jobs:
        sc = cfg.score_config(plan.name)  # plans are named by their windowing
        shape = fixed_batch_shape(plan, sc)
        key = (*shape, id(adapter))
        if plan.n_windows and key not in seen:
            seen.add(key)
            if adapter is not None:
                adapter.reset()  # run_stream resets it again before the protocol
            params = adapter.params() if adapter is not None else None
            with torch.inference_mode():
                score_windows(scorer, data.tokens, plan, 0, min(plan.n_windows, shape[1]), sc, params)
    if data.tokens.is_cuda:
        torch.cuda.synchronize(data.tokens.device)
    return time.perf_counter() - t0


def evaluate(
    model: torch.nn.Module,
    data: StreamData,
    specs: list[Spec],
    adapters: Mapping[str, AdapterLike] | AdapterFactory,
    cfg: EvalConfig,
    ctx: DistCtx | None = None,
    log: Callable[[str], None] | None = None,
    scorer: torch.nn.Module | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> EvalResult:
    """Run every protocol in ``specs``; ``adapters`` maps adapter keys to *bound* adapters (or builds them);
    ``extras``: the artifact's extras, for batched adapters that load a learned init."""
    plans: dict[str, WindowPlan] = {}
    bound: dict[str, AdapterLike | None] = {}  # adapters resolved (built and bound, once per key) before anything runs
    for spec in specs:
        if isinstance(spec, DocTTTSpec):  # builds its own document queue; its adapter comes from the spec
            bound[spec.name] = None
            continue
        if spec.windows not in plans:
            plans[spec.windows] = build_plan(spec.windows, data, cfg)
        adapter = None
        if spec.adapter is not None:
            adapter = adapters(spec.adapter) if callable(adapters) else adapters.get(spec.adapter)
            if adapter is None:
                raise KeyError(f"protocol {spec.name}: no adapter {spec.adapter!r} "
                               f"(known: {sorted(adapters) if isinstance(adapters, dict) else '?'})")
        bound[spec.name] = adapter
    out = EvalResult(data, cfg)
    if scorer is not None:
        jobs = [(plans[spec.windows], bound[spec.name]) for spec in specs if not isinstance(spec, DocTTTSpec)
                and not (cfg.eager_adapted and spec.mode != "score")]
        out.scorer_compile_s = warm_up_scorer(scorer, data, jobs, cfg)
        if log is not None and out.scorer_compile_s:
            log(f"compiled scorer warmed up in {out.scorer_compile_s:.1f}s (not counted in protocol times)")
    for spec in specs:
        adapter = bound[spec.name]
        r = run_protocol(spec, model, data, plans.get(spec.windows), cfg, adapter, ctx, scorer, extras)
        out.results[spec.name] = r
        if log is not None:
            log(f"{spec.name:<24} bpb {bpb(r.nats, data.target_bytes.sum()):.5f}  {r.stream.seconds:8.1f}s  "
                f"{r.stream.n_scored / max(r.stream.seconds, 1e-9):,.0f} tok/s")
    return out
