"""One batch of the docttt chunk loop: its index arithmetic (``BatchPlan``), the loop that scores each chunk and
then adapts on it (``run_batch``), and the ``doc-chunk`` windows as a ``WindowPlan`` (``chunk_plan``, the
``run_stream`` reference the loop is checked against). The protocol around it is ``metattt.eval.docttt``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..devices import autocast_for as _autocast
from ..ttt.adapter import Adapter, Tensors, weighted_loss
from .docttt_spec import BASELINE, DocTTTSpec
from .ledger import Ledger
from .windows import WindowPlan, check_no_bos_crossing, doc_segments


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
              adapter: Adapter | None, base: dict[str, torch.Tensor] | None, ledger: Ledger,
              init: tuple[dict, dict] | None = None, autocast: bool = True, attn: str = "auto",
              shapes: str = "exact", sink: Nats | None = None, inplace: bool = False,
              on_chunk: Callable[[], None] | None = None) -> BatchOut:
    """Score (and adapt on) the documents ``[a, e)`` of one batch, chunk by chunk (see module docstring).

    ``adapter``: a bound per-document adapter (``materialize``, ``loss``, ``take_step`` with the documents that
    train as ``active``); ``init``: its (trainables, state) for these documents (rows in order; copied unless
    ``inplace``);
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
    if init is not None and not inplace:
        tr, st = ({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in x.items()} for x in init)
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

        def forward(grad: bool, at: Tensors | None = None) -> tuple[torch.Tensor, Tensors | None]:
            """Per-target nats of the chunk's rows with the factors ``at`` (default: the current ones)."""
            ov: dict[str, torch.Tensor] = dict(base) if base is not None else {}
            leaves = None
            cur = tr if at is None else at
            if adapter is not None and cur is not None:
                leaves = {k: v[:R].detach().requires_grad_(grad) for k, v in cur.items()}
                ov.update(adapter.materialize(ov, leaves))
            kw: dict[str, Any] = {"positions": cols, "reduction": "none", "rope_len": rope_len,
                                  **({} if attn == "auto" else {"attn": attn})}
            with _autocast(device, autocast):  # RoPE base of the chunk's window, never of where a document ends
                nll = model(x, tgt, params=ov, **kw) if adapter is None else adapter.loss(model, x, tgt, ov, **kw)
            return nll, leaves

        def update(nll: torch.Tensor, leaves: Tensors | None, train: np.ndarray, step: int) -> None:
            nonlocal tr, st
            assert adapter is not None and tr is not None and st is not None and leaves is not None
            w = TRN[c, :R].float() / CNT[c, :R].clamp(min=1).float()  # mean per document, trained docs only

            def grad_at(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Tensors]:
                """The loss and gradients at ``t``: the scored forward's own graph at the current factors."""
                nll_t, leaves_t = (nll, leaves) if t is tr else forward(True, dict(t))
                assert leaves_t is not None
                loss = weighted_loss(nll_t, w, valid)
                grads = torch.autograd.grad(loss, list(leaves_t.values()))
                return loss.detach() / max(int(train.sum()), 1), dict(zip(leaves_t, grads))

            loss, tr, st = adapter.take_step(tr, st, grad_at, active=torch.from_numpy(train))
            ok = np.flatnonzero(train)
            ledger.record_update(list(zip(own[c, ok].tolist(), (plan.hi[c, ok]).tolist())), step,
                                 f"docttt chunk {c}")
            out.train_steps += 1
            losses.append(loss)

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
        assert first_bad is not None  # losses come from an adapter
        vals = torch.stack([losses[0], losses[-1], first_bad.float()]).tolist()
        out.loss_first, out.loss_last, bad = vals[0], vals[1], int(vals[2])
    elif first_bad is not None:
        bad = int(first_bad)
    if bad < never:
        out.nonfinite_chunk = bad
    out.trainables = tr
    return out


def resolve_attn(attn: str, device: torch.device, autocast: bool = True) -> str:
    """The attention backend of the chunk loop. ``auto`` on CUDA under bf16 autocast without flash-attn is SDPA's
    FLASH kernel, not PyTorch's own choice (cuDNN): cuDNN builds a kernel for every new (rows, length) shape, and
    the chunk loop's shapes change at almost every step (docs/benchmarks.md, session 7). In float32 SDPA has no
    cuDNN or FLASH kernel, so its own choice stays."""
    from ..model.attention import flash_available

    if attn == "auto" and autocast and device.type == "cuda" and not flash_available():
        return "sdpa-flash"
    return attn
