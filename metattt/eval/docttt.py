"""Document-batched score-first TTT (``docttt:ADAPTER``) and its no-adaptation baseline (``doc-chunk``).

The 2026-04 records' evaluation: documents (BOS-delimited spans, ``windows.doc_segments``) are sorted by length
(longest first) into batches; for chunk c of every document of a batch, the window is that document's last
<= ``window`` tokens ending at the chunk. One forward (per-document LoRA applied per row) scores the chunk's
targets, then the *same* forward's loss on the chunk (mean per document, summed over documents; a document's
last chunk is not trained) is back-propagated into the LoRA and the optimiser steps once: score-before-update
at chunk granularity. ``phases``: phase p starts after the batch that completes the first
``phase_docs * (p+1) // phases`` queue documents and runs full-model SGD on exactly those (all scored by then);
then LoRAs are rebuilt on the updated base.

Targets are exactly those of the other protocols (document d's span also predicts the next document's BOS, as
``doc-flat`` does), so per-target nats pair with them. The ledger gets every scored chunk and every update's
positions (a document's own positions; its opening BOS is the delimiter the windows are built from, as in
``doc-flat``); under torch.distributed batches are dealt by a deterministic longest-first schedule
(``batch_schedule``, no lock files), phase steps are split over the ranks, nats are summed and the ledgers
merged, so every rank verifies the whole run.

Divergence (exit 4, as ``ttt:``): when a batch scores a non-finite nat with its adapted LoRAs, or a phase's loss or
parameters go non-finite (the phase is then undone), adaptation stops for the rest of the protocol (later batches are
scored by the base model as it was, no later phase runs) and the result is marked invalid with the batch, chunk or
phase (``StreamResult.invalid``); the diverged batch's own nats stay as scored.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..track.progress import progress as progress_bar
from ..ttt.doclora import DocLoRA, DocLoRAConfig
from .ledger import Ledger
from ..devices import DistCtx, autocast_for as _autocast
from .scoring import StreamResult, _sync
from .windows import WindowPlan, check_no_bos_crossing, doc_segments

BASELINE = "doc-chunk"
FAMILY = "docttt"
_SEG = 10 ** 12  # ledger steps: segment (between phases) * _SEG + counter, one global order for every rank


@dataclass(frozen=True)
class DocTTTSpec:
    """One protocol of the family; ``adapter=None`` is the ``doc-chunk`` baseline (adaptation off)."""

    adapter: str | None = None
    chunk: int = 32
    docs: int = 64
    window: int = 2048
    phases: int = 0
    phase_docs: int = 2000
    phase_lr: float = 0.001
    phase_momentum: float = 0.9
    phase_tokens: int = 32768
    phase_epochs: int = 1
    phase_clip: float = 1.0
    adapter_opts: tuple[tuple[str, str], ...] = ()
    mode: str = field(default=FAMILY, init=False)
    windows: str = field(default=BASELINE, init=False)

    def __post_init__(self) -> None:
        for n in ("chunk", "docs", "window", "phase_docs", "phase_tokens", "phase_epochs"):
            if getattr(self, n) < 1:
                raise ValueError(f"{self.name}: {n} must be >= 1, got {getattr(self, n)}")
        if self.phases < 0:
            raise ValueError(f"{self.name}: phases must be >= 0, got {self.phases}")
        if self.adapter is None and (self.phases or self.adapter_opts):
            raise ValueError(f"{BASELINE} takes no adapter options or phases (use docttt:ADAPTER@...)")
        if self.adapter is not None and self.adapter != DocLoRA.name:
            raise ValueError(f"docttt adapter {self.adapter!r} is unknown; batched adapters: {DocLoRA.name}")
        if self.adapter is not None:
            self.lora_config()  # validates the options now (exit 2 before anything runs)

    @property
    def legal(self) -> bool:
        return True

    @property
    def name(self) -> str:
        opts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                if f.init and f.name not in ("adapter", "adapter_opts") and getattr(self, f.name) != f.default]
        opts += [f"{k}={v}" for k, v in self.adapter_opts]
        head = BASELINE if self.adapter is None else f"{FAMILY}:{self.adapter}"
        return head + ("@" + "/".join(opts) if opts else "")

    @property
    def base(self) -> str:
        """The protocol this one's Δ is taken from: doc-flat → doc-chunk → docttt → docttt + phases."""
        if self.adapter is None:
            return "doc-flat"
        if self.phases:
            return self.without_phases().name
        return self.baseline().name

    def baseline(self) -> "DocTTTSpec":
        return DocTTTSpec(None, self.chunk, self.docs, self.window)

    def without_phases(self) -> "DocTTTSpec":
        return replace(self, phases=0, phase_docs=2000, phase_lr=0.001, phase_momentum=0.9, phase_tokens=32768,
                       phase_epochs=1, phase_clip=1.0)

    def requires(self) -> list["DocTTTSpec"]:
        """The family members its decomposition needs (doc-flat is added by the caller)."""
        out = [self.baseline()] if self.adapter is not None else []
        if self.phases:
            out.append(self.without_phases())
        return out

    def lora_config(self) -> DocLoRAConfig:
        return DocLoRAConfig.from_options(dict(self.adapter_opts))


def is_docttt(text: str) -> bool:
    t = text.strip()
    return t.startswith(FAMILY + ":") or t == BASELINE or t.startswith(BASELINE + "@")


def parse_docttt(text: str) -> DocTTTSpec:
    """``doc-chunk[@chunk=32/window=2048/docs=64]`` or ``docttt:doclora[@opt=value/...]``: protocol options
    (chunk, docs, window, phases, phase_docs, phase_lr, phase_momentum, phase_tokens, phase_epochs, phase_clip)
    and doclora options (rank, alpha, lr, beta1, beta2, eps, weight_decay, targets, keep_a, seed)."""
    t = text.strip()
    head, _, rest = t.partition("@")
    adapter = None if head == BASELINE else head.partition(":")[2]
    if adapter == "":
        raise ValueError(f"protocol {t!r} names no adapter (docttt:{DocLoRA.name})")
    proto = {f.name: f for f in fields(DocTTTSpec) if f.init and f.name not in ("adapter", "adapter_opts")}
    kw: dict[str, Any] = {}
    lora: list[tuple[str, str]] = []
    for item in (s for s in rest.split("/") if s.strip()):
        k, eq, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not eq or not k:
            raise ValueError(f"protocol {t!r}: option {item!r} is not key=value")
        if k in proto:
            typ = type(proto[k].default)
            try:
                kw[k] = typ(v)
            except ValueError as e:
                raise ValueError(f"protocol {t!r}: {k}={v!r} is not a {typ.__name__}") from e
        else:
            lora.append((k, v))
    return DocTTTSpec(adapter, adapter_opts=tuple(lora), **kw)


# ------------------------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class DocQueue:
    """Documents (input spans ``[a, e)``, targets ``a+1..e``) in queue order, cut into batches."""

    a: np.ndarray  # int64 (n_docs,), queue order
    e: np.ndarray
    batches: list[np.ndarray]  # indices into a / e

    @property
    def n_targets(self) -> np.ndarray:
        return self.e - self.a


def doc_queue(tokens: np.ndarray, bos_id: int, docs_per_batch: int) -> DocQueue:
    """Documents sorted by length, longest first (ties: stream order), in batches of ``docs_per_batch``."""
    segs = doc_segments(np.asarray(tokens), bos_id)
    a = np.array([s for s, _ in segs], dtype=np.int64)
    e = np.array([t for _, t in segs], dtype=np.int64)
    order = np.argsort(-(e - a), kind="stable")
    a, e = a[order], e[order]
    return DocQueue(a, e, [np.arange(i, min(i + docs_per_batch, a.size)) for i in range(0, a.size, docs_per_batch)])


def phase_boundaries(queue: DocQueue, phases: int, phase_docs: int) -> list[tuple[int, int]]:
    """(last batch index, number of queue documents to train on) of each phase: phase p trains on the first
    ``phase_docs * (p+1) // phases`` documents, after the batch that completes them (none after the last batch:
    no document would be scored with it)."""
    if phases == 0:
        return []
    limit = min(phase_docs, int(queue.a.size))
    ends = np.cumsum([b.size for b in queue.batches])
    out = []
    for p in range(phases):
        k = limit * (p + 1) // phases
        b = int(np.searchsorted(ends, k, side="left"))
        if k > 0 and b < len(queue.batches) - 1:  # a phase after the last batch could only be wasted
            out.append((b, k))
    return out


def phase_documents(n_docs: int) -> np.ndarray:
    """Queue indices a phase trains on: the first ``n_docs`` documents (all scored by then)."""
    return np.arange(n_docs)


#: host floor of one chunk step, in token-forwards: on the H200 a step of <= 512 tokens costs 50-60 ms whatever
#: its rows, the 64 x 2048 step 1.6 us per token (docs/benchmarks.md, session 8)
STEP_FLOOR_TOKENS = 32768


def batch_costs(n_targets: np.ndarray, batches: list[np.ndarray], chunk: int, window: int) -> np.ndarray:
    """Modelled cost of each batch (token-forwards): over its documents and chunks, the window length
    min((c+1)*chunk, window) (the ``chunk`` shapes), plus ``STEP_FLOOR_TOKENS`` per chunk step. Only for the
    schedule: it ranks batches, it does not time them."""
    nc = -(-np.asarray(n_targets, dtype=np.int64) // chunk)
    k = window // chunk  # chunks whose window is still growing
    grow = np.minimum(nc, k)
    tok = chunk * grow * (grow + 1) // 2 + np.maximum(nc - k, 0) * window
    return np.array([float(tok[b].sum() + STEP_FLOOR_TOKENS * nc[b].max()) for b in batches])


def batch_schedule(costs: np.ndarray, world: int, bounds: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """The rank that runs each batch: within each segment between phases (a phase waits for every batch before
    it), batches in queue order go to the least-loaded rank of the segment so far (ties: the lower rank), i.e.
    longest-processing-time first, since the queue is longest first. Round-robin would give the heaviest batches'
    ranks the heaviest later ones too. A function of the costs only: every rank computes the same schedule."""
    owner = np.zeros(len(costs), dtype=np.int64)
    cuts = sorted({b + 1 for b, _ in bounds if b + 1 < len(costs)})
    for lo, hi in zip([0] + cuts, cuts + [len(costs)]):
        load = np.zeros(world)
        for b in range(lo, hi):
            r = int(np.argmin(load))
            owner[b] = r
            load[r] += costs[b]
    return owner


def chunk_plan(tokens: np.ndarray, bos_id: int, chunk: int, window: int) -> WindowPlan:
    """The ``doc-chunk`` windows as a stream-order :class:`WindowPlan` ("doc-sliding, stride = chunk" in the
    records' sense): for chunk c of a document, the document's last <= ``window`` tokens ending at the chunk,
    scoring the chunk. Used as the reference ``run_stream`` plan (the docttt loop scores the same windows)."""
    starts, lengths, score_from = [], [], []
    for a, e in doc_segments(np.asarray(tokens), bos_id):
        ends = np.minimum(a + chunk * np.arange(1, -(-(e - a) // chunk) + 1, dtype=np.int64), e)
        s = np.maximum(a, ends - window)
        prev = np.concatenate(([a], ends[:-1]))
        starts.append(s)
        lengths.append(ends - s)
        score_from.append(prev - s)
    plan = WindowPlan(BASELINE, int(np.asarray(tokens).size), *(np.concatenate(x) for x in (starts, lengths,
                                                                                             score_from)))
    plan.validate(window)
    check_no_bos_crossing(plan, np.asarray(tokens), bos_id)
    return plan


# ------------------------------------------------------------------------------------------------ one batch
SHAPES = ("exact", "chunk", "batch")


@dataclass(frozen=True)
class BatchPlan:
    """The chunk loop of one batch as index arithmetic (host numpy, fields (chunks, documents) unless noted).

    Row b of chunk c reads the window ``[start, start + length)``; the logit at window column ``col0 + j``
    (j < ``count``) scores target ``start + col0 + j + 1``. Finished documents have ``count`` 0 (a dummy row when
    the forward has more rows than active documents). Forward shapes, by ``shapes``: ``exact`` (rows = active
    documents, length = the longest active window: what ``run_stream`` computes, bit for bit on CPU), ``chunk``
    (rows = active documents but at least ``MIN_ROWS``, length ``min((c+1)*chunk, window)``, the records' context
    size), ``batch`` (``chunk`` lengths and one row per document of the batch: shapes depend only on c, the
    records' layout). Under every shape the dynamic-NTK RoPE base is that of ``min((c+1)*chunk, window)`` tokens:
    the ``exact`` length of a document's last chunk depends on where the document ends (a BOS not yet scored).
    (``run_stream`` gives every forward the base of its plan's window, so ``exact`` equals it bit for bit only
    for models without dynamic NTK.)"""

    start: np.ndarray
    col0: np.ndarray
    count: np.ndarray
    length: np.ndarray
    train: np.ndarray  # bool: the document trains on the chunk (never on its last one)
    t: np.ndarray  # (chunks,) forward length
    rows: np.ndarray  # (chunks,) forward rows
    active: np.ndarray  # (chunks,) documents still scoring: a prefix (sorted longest first)

    @property
    def lo(self) -> np.ndarray:
        """First scored target position."""
        return self.start + self.col0 + 1

    @property
    def hi(self) -> np.ndarray:
        """One past the last scored target position."""
        return self.lo + self.count

    @property
    def n_chunks(self) -> int:
        return int(self.t.size)


def batch_plan(a: np.ndarray, e: np.ndarray, chunk: int, window: int, shapes: str = "exact",
               train: bool = True) -> BatchPlan:
    """The plan of documents ``[a, e)`` (targets ``a+1..e``), sorted longest first; ``train``: adaptation on."""
    if shapes not in SHAPES:
        raise ValueError(f"docttt shapes must be one of {', '.join(SHAPES)}, got {shapes!r}")
    a, e = np.asarray(a, dtype=np.int64), np.asarray(e, dtype=np.int64)
    n = e - a
    if n.size == 0 or np.any(n < 1):
        raise ValueError("batch_plan needs at least one document, each with at least one target")
    if np.any(np.diff(n) > 0):
        raise ValueError("run_batch needs documents sorted by length, longest first")
    nc = -(-n // chunk)
    c = np.arange(int(nc.max()), dtype=np.int64)[:, None]
    end = a + np.minimum((c + 1) * chunk, n)  # inputs end (exclusive) = last target of the chunk
    start = np.maximum(a, end - window)
    act = nc > c
    lo = a + c * chunk + 1
    count = np.where(act, end - lo + 1, 0)
    col0 = np.where(act, lo - 1 - start, 0)
    length = end - start
    tr = act & (nc - 1 > c) if train else np.zeros_like(act)
    t_chunk = np.minimum((c[:, 0] + 1) * chunk, window)
    t = np.where(act, length, 0).max(1) if shapes == "exact" else t_chunk
    active = act.sum(1)
    return BatchPlan(start, col0, count, length, tr, t, forward_rows(active, a.size, shapes), active)


#: fewest forward rows under ``chunk`` shapes: Dynamo specialises a dimension of size 1, so a 1-row step would
#: cost a compiled core one more graph; a finished document's row (nothing scored, no step) pads it
MIN_ROWS = 2


def forward_rows(active: np.ndarray, n_docs: int, shapes: str) -> np.ndarray:
    """Rows of each chunk's forward with ``active`` documents still scoring, of ``n_docs`` (see :class:`BatchPlan`)."""
    active = np.asarray(active)
    if shapes == "batch":
        return np.full_like(active, n_docs)
    if shapes == "chunk":
        return np.maximum(active, min(MIN_ROWS, n_docs))
    return active


class Nats:
    """Per-target nats on the device (index p-1 for target p, plus one slot that absorbs padding) and how often
    each was written: scattered into per chunk, read to the host once per run (no sync per chunk)."""

    def __init__(self, n_tokens: int, device: torch.device) -> None:
        self.n_tokens = n_tokens
        self.nats = torch.zeros(n_tokens, dtype=torch.float32, device=device)
        self.count = torch.zeros(n_tokens, dtype=torch.int32, device=device)

    def put(self, dest: torch.Tensor, vals: torch.Tensor) -> None:
        self.nats.scatter_(0, dest, vals.detach().reshape(-1).float())  # padding: any value lands in the last slot
        self.count.scatter_add_(0, dest, torch.ones_like(dest, dtype=torch.int32))


class _Clock:
    """Marks on the device's timeline: CUDA events (read once per batch) or host time on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> int:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self, i: int, j: int) -> float:
        if self.cuda:
            return self.marks[i].elapsed_time(self.marks[j]) / 1000.0
        return self.marks[j] - self.marks[i]

    def wait(self) -> None:
        if self.cuda and self.marks:
            self.marks[-1].synchronize()


@dataclass
class BatchOut:
    plan: BatchPlan
    sink: Nats
    forwards: int = 0
    train_steps: int = 0
    score_s: float = 0.0
    adapt_s: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    trainables: dict[str, torch.Tensor] | None = None
    nonfinite_chunk: int | None = None  # with an adapter: the first chunk that scored a non-finite nat
    chunk_times: list[tuple[int, int, float, float]] = field(default_factory=list)  # (t, rows, fwd s, update s)

    @property
    def nll(self) -> list[tuple[int, np.ndarray]]:
        """(first target position, nats of consecutive targets) per doc-chunk (a host copy: for checks)."""
        vals = self.sink.nats.cpu().numpy()
        lo, cnt, act = self.plan.lo, self.plan.count, self.plan.count > 0
        return [(int(p), vals[p - 1: p - 1 + k]) for p, k in zip(lo[act], cnt[act])]


def run_batch(model: torch.nn.Module, tokens: torch.Tensor, a: np.ndarray, e: np.ndarray, spec: DocTTTSpec,
              adapter: DocLoRA | None, base: dict[str, torch.Tensor] | None, ledger: Ledger,
              init: tuple[dict, dict] | None = None, autocast: bool = True, attn: str = "auto",
              shapes: str = "exact", sink: Nats | None = None, inplace: bool = False,
              on_chunk: Callable[[], None] | None = None) -> BatchOut:
    """Score (and adapt on) the documents ``[a, e)`` of one batch, chunk by chunk (see module docstring).

    ``init``: the adapter's (trainables, state) for these documents (rows in order; copied unless ``inplace``);
    ``base``: parameter overrides for the base model (after phases). Documents must be sorted by length, longest
    first. ``shapes``: see :class:`BatchPlan`. Nats go to ``sink`` (a fresh one when None). The loop never waits
    for the device: indices come from the host plan (one transfer per batch), the LM head runs only on the chunk's
    positions, nats are scattered on the device, losses and timings are read once at the end. ``on_chunk`` is
    called after each chunk step (progress within a batch: a CPU batch can take many minutes)."""
    device, n_tok = tokens.device, tokens.numel()
    attn = resolve_attn(attn, device, autocast)
    C = spec.chunk
    plan = batch_plan(a, e, C, spec.window, shapes, train=adapter is not None)
    sink = Nats(n_tok, device) if sink is None else sink
    cheat = adapter is not None and adapter.adapts_before_scoring
    tr, st = init if init is not None else (None, None)
    if tr is not None and not inplace:
        tr, st = ({k: v.clone() for k, v in x.items()} for x in (tr, st))
    n_layers = model.cfg.num_layers
    out = BatchOut(plan, sink)
    idx_host = torch.from_numpy(np.stack([plan.start, plan.col0, plan.count, plan.train.astype(np.int64)]))
    if device.type == "cuda":  # pinned: an asynchronous copy, the host does not wait for the device
        idx_host = idx_host.pin_memory()
    idx_dev = idx_host.to(device, non_blocking=True)
    S, COL, CNT, TRN = idx_dev
    ar_c = torch.arange(C, device=device)
    ar_t = torch.arange(int(plan.t.max()) + 1, device=device)
    own = np.maximum(plan.start, np.asarray(a, dtype=np.int64) + 1)  # a document's own positions (not its BOS)
    clock = _Clock(device)
    marks: list[tuple[int, ...]] = []
    losses: list[torch.Tensor] = []
    # the first chunk whose scored nats are non-finite (a diverged LoRA), kept on the device: read once per batch
    never = plan.n_chunks
    first_bad = torch.full((), never, device=device, dtype=torch.int64) if adapter is not None else None
    for c in range(plan.n_chunks):
        act, R, t = int(plan.active[c]), int(plan.rows[c]), int(plan.t[c])
        rope_len = min((c + 1) * C, spec.window)  # the ``chunk`` shapes' length: a function of c only
        train = plan.train[c, :R].copy()
        st_row = S[c, :R]
        buf = tokens[(st_row[:, None] + ar_t[: t + 1]).clamp_(max=n_tok - 1)]
        x = buf[:, :-1]
        valid = ar_c < CNT[c, :R, None]
        cols = torch.where(valid, COL[c, :R, None] + ar_c, 0)
        tgt = buf.gather(1, cols + 1)
        dest = torch.where(valid, st_row[:, None] + cols, n_tok - 1).reshape(-1)

        def forward(grad: bool):
            kw: dict[str, Any] = {}
            leaves = None
            if adapter is not None:
                leaves = {k: v[:R].detach().requires_grad_(grad) for k, v in tr.items()}
                kw.update(adapter.materialize(leaves, n_layers))
            if base is not None:
                kw["params"] = base
            if attn != "auto":
                kw["attn"] = attn
            with _autocast(device, autocast):  # RoPE base of the chunk's window, never of where a document ends
                nll = model(x, tgt, positions=cols, reduction="none", rope_len=rope_len, **kw)
            return nll, leaves

        def update(nll: torch.Tensor, leaves: dict[str, torch.Tensor], train: np.ndarray, step: int) -> None:
            nonlocal tr, st
            w = TRN[c, :R].float() / CNT[c, :R].clamp(min=1).float()  # mean per document, trained docs only
            loss = (torch.where(valid, nll, 0.0) * w[:, None]).sum()
            names = list(leaves)
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
            tr, st = adapter.step(tr, st, dict(zip(names, grads)), 0.0, active=torch.from_numpy(train))
            ok = np.flatnonzero(train)
            ledger.record_update(list(zip(own[c, ok].tolist(), (plan.hi[c, ok]).tolist())), step,
                                 f"docttt chunk {c}")
            out.train_steps += 1
            losses.append(loss.detach() / max(int(train.sum()), 1))

        m0 = clock.mark()
        if cheat and train.any():  # obliged, then refused by the ledger: trains on the chunk before scoring it
            with torch.inference_mode(False), torch.enable_grad():
                nll, leaves = forward(True)
                update(nll, leaves, train, ledger.next_step())
            train = np.zeros_like(train)
        m1 = clock.mark()
        grad = bool(train.any()) or (adapter is not None and shapes != "exact")  # one graph for a compiled core
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            nll, leaves = forward(grad)
            step = ledger.next_step()
            sink.put(dest, nll)
            if first_bad is not None:
                ok = torch.isfinite(torch.where(valid, nll.detach().float(), 0.0)).all()
                first_bad = torch.minimum(first_bad, torch.where(ok, never, c))
            out.forwards += 1
            ledger.record_scores(plan.lo[c, :act], plan.hi[c, :act], step)
            m2 = clock.mark()
            if train.any():
                update(nll, leaves, train, ledger.next_step())
            m3 = clock.mark()
        marks.append((t, R, m0, m1, m2, m3))
        if on_chunk is not None:
            on_chunk()
    clock.wait()
    for t, R, m0, m1, m2, m3 in marks:
        fwd, upd = clock.seconds(m1, m2), clock.seconds(m2, m3) + clock.seconds(m0, m1)
        out.chunk_times.append((t, R, fwd, upd))
        out.score_s += fwd
        out.adapt_s += upd
    bad = never
    if losses:  # one read of the device for the losses and the divergence check
        vals = torch.stack([losses[0], losses[-1], first_bad.float()]).tolist()
        out.loss_first, out.loss_last, bad = vals[0], vals[1], int(vals[2])
    elif first_bad is not None:
        bad = int(first_bad)
    if bad < never:
        out.nonfinite_chunk = bad
    out.trainables = tr
    return out


# ------------------------------------------------------------------------------------------------ phases
def phase_sgd(model: torch.nn.Module, tokens: torch.Tensor, a: np.ndarray, e: np.ndarray, spec: DocTTTSpec,
              base: dict[str, torch.Tensor], ledger: Ledger, autocast: bool = True, ctx: DistCtx = DistCtx(),
              attn: str = "auto") -> tuple[dict, dict]:
    """Full-model SGD (momentum, cosine lr, global-norm clip) on documents ``[a, e)``, ``phase_epochs`` epochs of
    steps of ~``phase_tokens`` tokens; rows are document pieces of <= ``window`` tokens (attention never leaves
    a document). Under torch.distributed each step's rows are split over the ranks and the token-summed
    gradients all-reduced, so every rank takes the single-process step. Returns (new base parameters, stats);
    every step is a ledger update (each rank records its rows)."""
    device, W = tokens.device, spec.window
    pieces = [(int(p), int(min(p + W, q))) for s0, q in zip(a, e) for p in range(int(s0), int(q), W)]
    per = max(1, spec.phase_tokens // W)
    steps = [pieces[i:i + per] for i in range(0, len(pieces), per)] * spec.phase_epochs
    names = [k for k, v in base.items() if v.is_floating_point()]
    cur = {k: v.detach().clone() for k, v in base.items()}
    mom = {k: torch.zeros_like(cur[k]) for k in names}
    doc_start = {int(p): int(s0) for s0, q in zip(a, e) for p in range(int(s0), int(q), W)}
    losses = []
    for k_step, all_rows in enumerate(steps):
        lr = spec.phase_lr * 0.5 * (1 + math.cos(math.pi * k_step / max(1, len(steps))))
        base_n, extra = divmod(len(all_rows), ctx.world)
        r0 = ctx.rank * base_n + min(ctx.rank, extra)
        rows = all_rows[r0: r0 + base_n + (1 if ctx.rank < extra else 0)]
        n_tgt = torch.tensor([float(sum(q - p for p, q in rows))], device=device, dtype=torch.float64)
        loss_sum = torch.zeros((), device=device)
        if rows:
            t = max(q - p for p, q in rows)
            x = torch.zeros(len(rows), t, dtype=torch.long, device=device)
            y = torch.full((len(rows), t), -100, dtype=torch.long, device=device)
            for i, (p, q) in enumerate(rows):
                x[i, : q - p] = tokens[p:q]
                y[i, : q - p] = tokens[p + 1:q + 1]
            with torch.inference_mode(False), torch.enable_grad():
                leaves = {k: cur[k].detach().requires_grad_(True) for k in names}
                with _autocast(device, autocast):
                    loss_sum = model(x, y, params={**cur, **leaves}, reduction="sum",
                                     attn=resolve_attn(attn, device, autocast))
                grads = list(torch.autograd.grad(loss_sum, [leaves[k] for k in names]))
        else:
            grads = [torch.zeros_like(cur[k]) for k in names]
        if ctx.world > 1:
            flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss_sum.detach().float().reshape(1)])
            dist.all_reduce(flat)
            dist.all_reduce(n_tgt)
            parts = torch.split(flat[:-1], [g.numel() for g in grads])
            grads = [v.view_as(g).to(g.dtype) for v, g in zip(parts, grads)]
            loss_sum = flat[-1]
        total = float(n_tgt)
        grads = [g / total for g in grads]
        loss = loss_sum.detach() / total
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            coef = min(1.0, spec.phase_clip / (float(norm) + 1e-6)) if spec.phase_clip > 0 else 1.0
            for k, g in zip(names, grads):
                mom[k] = mom[k] * spec.phase_momentum + g * coef
                cur[k] = cur[k] - lr * mom[k]
        ledger.record_update([(max(p, doc_start[p] + 1), q + 1) for p, q in rows], ledger.next_step(),
                             f"phase sgd step {k_step}")
        losses.append(float(loss.detach()))
    return cur, {"phase_steps": len(steps), "phase_docs": int(a.size), "phase_loss_first": losses[0] if losses
                 else None, "phase_loss_last": losses[-1] if losses else None}


# ------------------------------------------------------------------------------------------------ protocol
def resolve_attn(attn: str, device: torch.device, autocast: bool = True) -> str:
    """The attention backend of the chunk loop. ``auto`` on CUDA under bf16 autocast without flash-attn is SDPA's
    FLASH kernel, not PyTorch's own choice (cuDNN): cuDNN builds a kernel for every new (rows, length) shape, and
    the chunk loop's shapes change at almost every step (docs/benchmarks.md, session 7). In float32 SDPA has no
    cuDNN or FLASH kernel, so its own choice stays."""
    from ..model.attention import flash_available

    if attn == "auto" and autocast and device.type == "cuda" and not flash_available():
        return "sdpa-flash"
    return attn


def _dynamic_core(compiled: Callable) -> Callable:
    """``compiled`` (the core compiled with automatic dynamic shapes) called with the chunk loop's changing
    dimensions marked dynamic: rows (tokens, targets, positions, every LoRA factor) and length (tokens, RoPE
    tables). The first trace is then already the dynamic graph: without marks Dynamo compiles a static graph for
    the first shape and a second, dynamic one at the first change. Size-1 dimensions are not marked (Dynamo
    specialises them; ``MIN_ROWS`` keeps the loop off them). ``maybe_mark_dynamic``: a dimension the model's code
    specialises gets a static graph and the next change a dynamic one, as without marks, instead of an error."""
    import torch._dynamo as dynamo

    def run(cfg, p, tokens, targets, reduction, attn, rope, rt, lora=None, positions=None):
        marks = [(tokens, 0), (tokens, 1)] + [(r, 1) for r in rope]
        marks += [(x, 0) for x in (targets, positions) if x is not None]
        marks += [(f, 0) for pair in (lora or {}).values() for f in pair]
        for x, dim in marks:
            if x.size(dim) > 1:
                dynamo.maybe_mark_dynamic(x, dim)
        return compiled(cfg, p, tokens, targets, reduction, attn, rope, rt, lora, positions)

    return run


@contextlib.contextmanager
def compiled_core(model: torch.nn.Module, enabled: bool = True):
    """Inside the block the model's functional core is the docttt compiled one (dynamic rows and lengths, see
    ``_dynamic_core``; its graphs are kept on the model, so later runs reuse them); the previous core and
    Dynamo's shape options are restored after. Duck shaping (one symbol for dimensions equal at trace time) is off
    inside: a first batch of exactly as many documents as the first forward length would tie the two."""
    if not enabled:
        yield model
        return
    import torch._dynamo as dynamo
    import torch.fx.experimental._config as fx_cfg

    cfg = dynamo.config  # every graph variant (lengths, rows, grad mode, lora or not) counts towards one limit
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    from ..model.gpt import inductor_options

    core, duck = model._core, getattr(fx_cfg, "use_duck_shape", None)
    # no matmul padding: its heuristics compare the symbolic length with small constants and, on the H200 with the
    # test model, pinned it to the first one (16); the loop's lengths are multiples of the chunk anyway
    model.compile_core(dynamic=None, options={**inductor_options(), "shape_padding": False})
    model._core = _dynamic_core(model._core)
    if duck is not None:
        fx_cfg.use_duck_shape = False
    try:
        yield model
    finally:
        model._core = core
        if duck is not None:
            fx_cfg.use_duck_shape = duck


def run_docttt(spec: DocTTTSpec, model: torch.nn.Module, tokens: torch.Tensor, tokens_np: np.ndarray, bos_id: int,
               ledger: Ledger, ctx: DistCtx | None = None, autocast: bool = True, attn: str = "auto",
               make_adapter: Callable[[DocTTTSpec], DocLoRA | None] | None = None, compile: bool = False,
               shapes: str | None = None, progress: bool = False) -> StreamResult:
    """Run one protocol of the family over the whole stream; returns the per-target nats like ``run_stream``.

    Batches are dealt over ranks by ``batch_schedule`` (the same on every rank); a phase's SGD steps are split over all
    ranks (gradients all-reduced), so every rank holds the same base and results equal one process's.
    ``shapes`` (see :class:`BatchPlan`): default ``chunk`` on CUDA (forward lengths depend only on the chunk
    index), ``exact`` elsewhere (bit for bit ``run_stream`` on CPU; ``chunk`` pads, which changes float sums).
    ``compile``: the model's functional core is compiled with the changing rows and lengths marked dynamic
    (``compiled_core``: one graph for the chunk loop, one more for a 1-document batch; ``dynamic=True`` would make
    the model's own dimensions symbolic too, which breaks the graph at attention) and kept on the model for later
    runs; the base parameters are passed detached, so no graph computes gradients for them outside the phases
    (eager)."""
    ctx = DistCtx.current() if ctx is None else ctx
    device = tokens.device
    shapes = ("chunk" if device.type == "cuda" else "exact") if shapes is None else shapes
    if shapes not in SHAPES:
        raise ValueError(f"docttt shapes must be one of {', '.join(SHAPES)}, got {shapes!r}")
    n = int(tokens.numel())
    queue = doc_queue(tokens_np, bos_id, spec.docs)
    adapter = (make_adapter or make_doc_adapter)(spec)
    if adapter is not None and ctx.world > 1 and adapter.cfg.keep_a:
        raise ValueError(f"{spec.name}: keep_a carries A from batch to batch, so results depend on which batches "
                         "a rank ran; it is single-process only")
    bounds = phase_boundaries(queue, spec.phases, spec.phase_docs) if adapter is not None else []
    owner = batch_schedule(batch_costs(queue.n_targets, queue.batches, spec.chunk, spec.window), ctx.world, bounds)
    sink = Nats(n, device)
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    base: dict[str, torch.Tensor] = frozen
    was_training = model.training
    model.eval()
    model.prepare_rope(spec.window, device)  # the tables for the longest forward, built once
    stats: list[dict[str, Any]] = []
    score_s = adapt_s = 0.0
    n_fwd = 0
    tr = None
    _sync(device)
    t_start = time.perf_counter()
    seg, bi = 0, 0
    invalid: dict[str, Any] | None = None  # where adaptation went non-finite (then it stops: see _diverged_note)
    try:
        with compiled_core(model, compile):
            # counted in chunk steps of this rank's batches, so a long batch shows progress too
            n_steps = -(-queue.n_targets // spec.chunk)
            mine = sum(int(n_steps[idx].max()) for b, idx in enumerate(queue.batches) if owner[b] == ctx.rank)
            bar = progress_bar(mine, desc=f"{spec.name} [chunk steps]", enabled=progress and ctx.rank == 0)
            for b, idx in enumerate(queue.batches):
                if owner[b] == ctx.rank:
                    a, e = queue.a[idx], queue.e[idx]
                    init = None
                    ad = adapter if invalid is None else None  # diverged: the rest is scored without adapting
                    if ad is not None:
                        gen = torch.Generator(device=device).manual_seed(ad.cfg.seed * 1_000_003 + b)
                        init = ad.init(base, len(idx), model.cfg, gen, carry=tr)
                    res = run_batch(model, tokens, a, e, spec, ad, base, ledger, init, autocast, attn, shapes,
                                    sink, inplace=True, on_chunk=bar.update)
                    if ad is not None and res.nonfinite_chunk is not None:
                        invalid = {"batch": b, "chunk": res.nonfinite_chunk,
                                   "what": "nats scored with the adapted LoRA"
                                   + (f" on the base phase {bi - 1} left" if bi else "")}
                    tr = res.trainables
                    score_s += res.score_s
                    adapt_s += res.adapt_s
                    n_fwd += res.forwards
                    stats.append({"batch": b, "docs": int(idx.size), "train_steps": res.train_steps,
                                  "loss_first": res.loss_first, "loss_last": res.loss_last})
                while bi < len(bounds) and b == bounds[bi][0]:
                    t0 = time.perf_counter()
                    seg += 1
                    ledger.advance_to(seg * _SEG)  # every rank: after all earlier scores
                    docs = phase_documents(bounds[bi][1])
                    if _any_rank(invalid is not None, ctx, device):  # a phase is collective: every rank skips it
                        invalid = invalid or {"batch": b, "chunk": None, "what": "adaptation on another rank"}
                        stats.append({"phase": bi, "skipped": "adaptation diverged"})
                    else:
                        # phase shapes vary: eager, no recompiles
                        with model.eager_core() if compile else contextlib.nullcontext():
                            new_base, st = phase_sgd(model, tokens, queue.a[docs], queue.e[docs], spec, base, ledger,
                                                     autocast, ctx, attn)
                        stats.append({"phase": bi, **st})
                        what = _phase_nonfinite(st, new_base)  # the same on every rank (gradients all-reduced)
                        if what is None:
                            base = new_base
                        else:  # keep the base the phase started from; no LoRA or phase adapts after this
                            invalid = {"batch": b, "chunk": None, "phase": bi, "what": what}
                    tr = None
                    seg += 1
                    ledger.advance_to(seg * _SEG)
                    bi += 1
                    _sync(device)
                    adapt_s += time.perf_counter() - t0
            bar.close()
    finally:
        model.train(was_training)
    both = torch.stack([sink.nats[:-1], sink.count[:-1].float()])
    if ctx.world > 1:
        dist.all_reduce(both)  # every target is written on one rank (zeros elsewhere)
        parts: list[Any] = [None] * ctx.world
        dist.all_gather_object(parts, ledger)  # steps are globally ordered by construction
        ledger.merge(parts)
    both = both.cpu().numpy()
    nll, done = np.ascontiguousarray(both[0]), both[1].astype(np.int32)
    _sync(device)
    seconds = time.perf_counter() - t_start
    if np.any(done != 1):
        bad = int(np.flatnonzero(done != 1)[0]) + 1
        raise AssertionError(f"{spec.name}: target {bad} scored {int(done[bad - 1])} times (expected once)")
    if ctx.world > 1:  # the earliest divergence of any rank, the same record everywhere
        every: list[Any] = [None] * ctx.world
        dist.all_gather_object(every, invalid)
        invalid = min((x for x in every if x is not None), key=lambda x: x["batch"], default=None)
    return StreamResult(spec.name, nll, [], seconds, score_s, adapt_s, int(queue.n_targets.size), n_fwd, ledger,
                        stats, invalid)


def _any_rank(flag: bool, ctx: DistCtx, device: torch.device) -> bool:
    if ctx.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _phase_nonfinite(stats: dict[str, Any], new_base: dict[str, torch.Tensor]) -> str | None:
    """What of a phase went non-finite (its loss, else a base parameter), or None."""
    for k in ("phase_loss_first", "phase_loss_last"):
        v = stats.get(k)
        if v is not None and not math.isfinite(v):
            return f"{k} ({v})"
    for k, v in new_base.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"phase parameter {k}"
    return None


def make_doc_adapter(spec: DocTTTSpec, model: torch.nn.Module | None = None,
                     extras: Mapping[str, torch.Tensor] | None = None) -> DocLoRA | None:
    """The factory of batched adapters (``doclora`` only, until the registry carries batched adapters).
    ``init=meta`` binds the adapter to ``model`` and loads the learned A0 from the artifact's ``extras``."""
    if spec.adapter is None:
        return None
    ad = DocLoRA(spec.lora_config())
    if ad.cfg.init == "meta":
        if model is None:
            raise ValueError(f"{spec.name}: init=meta needs the model and the artifact's extras")
        ad.bind(model).load_artifact_extras(extras or {})
    return ad
