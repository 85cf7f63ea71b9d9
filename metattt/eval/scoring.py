"""The one scoring code path: windows -> chunks -> batched forwards -> per-target nats (+ score-first TTT).

Every protocol (flat, sliding, doc, ttt, oracle) runs through :func:`run_stream`. Windows are grouped into
chunks of target positions; within a chunk, consecutive windows form batches deterministically, so the same
plan always produces the same forwards in the same order (``ttt:none`` == ``sliding`` bit for bit). With an
adapter, each chunk is scored with the current weights and only then handed to the adapter (``score_first``);
``adapt_first`` is the oracle ordering and is only allowed with a non-enforcing ledger.

An adapter whose update leaves a non-finite loss (in its returned stats) or non-finite parameters (in
``params()``) is reset to the trained weights and not adapted again for the rest of the protocol; the result is
marked invalid with the chunk index (``StreamResult.invalid``) and the remaining chunks are scored with the
trained weights, so every target still gets a finite score and the other protocols are untouched.

Under torch.distributed, a chunk's windows (and its training sequences) are split contiguously across ranks
and the per-target nats are all-gathered, so every rank ends with the full result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..devices import DistCtx, autocast_for, row_share
from ..track.progress import progress as progress_bar
from .ledger import Ledger, LegalityError
from .windows import Chunk, WindowPlan, batch_windows, make_chunks

ORDERS = ("score_only", "score_first", "adapt_first")
# The official FineWeb val as the records score it: the Parameter Golf val loader reports "tokens:62021632" (the
# shard trimmed to whole 2,048-token sequences); at 32,768-token chunks that is 1,893 chunks.
FULL_VAL_TOKENS = 62_021_632


class AdapterResetLike(Protocol):
    @property
    def reset(self) -> str: ...  # "never" | "chunk" | "doc": when the evaluator resets the adapter


class AdapterLike(Protocol):
    """The evaluator's seam: exactly what scoring (``run_stream``), protocols (report, scorer warm-up) and the
    ``--compat`` tail use of an adapter, so an adapter written against it alone runs. ``Adapter`` implements it
    (mypy checks it where registry adapters reach ``evaluate``); the report also accounts an ``Adapter``'s
    selection and ``cfg.epochs``, found by ``isinstance``. Read-only members: the evaluator never assigns them,
    and a class attribute (``Adapter.name``) can only satisfy a read-only protocol member."""

    @property
    def name(self) -> str: ...  # the report's adapter name

    @property
    def cfg(self) -> AdapterResetLike: ...

    def reset(self) -> None: ...

    def params(self) -> dict[str, torch.Tensor]: ...

    def adapt(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float, *,
              autocast: bool = True) -> Any: ...

    def training_positions(self, chunk_index: int) -> int: ...


AdapterFactory = Callable[[str], AdapterLike]  # adapter key -> bound adapter (what ``evaluate`` may be given)


@dataclass(frozen=True)
class ScoreConfig:
    """How forwards are batched and chunks formed (none of it changes what is scored)."""

    batch_tokens: int = 32 * 2048  # padded tokens per forward (32 windows of 2048)
    chunk_tokens: int = 32768
    train_seq_len: int | None = None  # length of the adapter's training sequences (None: the window context)
    autocast: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    attn: str = "auto"
    progress: bool = False  # a per-chunk progress display (stderr; plain periodic lines when not a TTY)
    # pad every forward to one (windows, length) shape: a torch.compile'd scorer then compiles once instead of
    # again for each chunk's smaller last batch and for short windows (padding is never scored)
    fixed_shapes: bool = False
    pad_to: int | None = None  # pad every forward to at least this length (the record's x_batch)
    # round the scored logits to this dtype once before the float32 loss (the record's compiled sliding evaluator
    # returns bf16 logits; --compat pg-record). Done here, outside any compiled graph, so the rounding is exact
    logits_dtype: str | None = None
    # the RoPE base of every forward is that of this many tokens at least (the protocol's window length): a
    # batch's own length can depend on where documents end, i.e. on tokens not yet scored (dynamic NTK RoPE)
    rope_len: int | None = None
    # stateful schedules (e.g. sgd's cosine lr) index chunks against a stream of this many tokens instead of the
    # one scored: a 1M-token prefix then decays the lr as the first 1M tokens of the full val would (None: the
    # scored stream; schedule_progress)
    schedule_horizon: int | None = None

    def __post_init__(self) -> None:
        if self.batch_tokens < 1 or self.chunk_tokens < 1:
            raise ValueError("batch_tokens and chunk_tokens must be positive")
        if self.schedule_horizon is not None and self.schedule_horizon < 2:
            raise ValueError(f"schedule_horizon must be >= 2 tokens, got {self.schedule_horizon}")
        if self.train_seq_len is not None and self.train_seq_len < 1:
            raise ValueError("train_seq_len must be positive")


@dataclass
class StreamResult:
    """Per-target nats (index p-1 for target position p) and timings of one protocol run."""

    plan_name: str
    token_nll: np.ndarray  # float32 (n_tokens - 1,)
    chunks: list[Chunk]
    seconds: float
    score_seconds: float
    adapt_seconds: float
    n_windows: int
    n_forwards: int
    ledger: Ledger
    adapt_stats: list[Any] = field(default_factory=list)
    invalid: dict[str, Any] | None = None  # {"chunk": index, "what": "loss_last (nan)"} when adaptation diverged

    @property
    def n_scored(self) -> int:
        return int(self.token_nll.size)


def schedule_progress(index: int, n_chunks: int, n_tokens: int, horizon: int | None = None) -> float:
    """The ``progress`` in [0, 1] handed to the adapter with chunk ``index`` of ``n_chunks`` over ``n_tokens``.

    Default (``horizon`` None): ``index / (n_chunks - 1)``, so the schedule runs its whole course on whatever
    stream is scored; a 32-chunk prefix then decays the lr ~60x faster than the record's ~1,900 chunks of the
    full val. With ``horizon`` tokens, the stream is taken as the start of a ``horizon``-token one of the same
    chunk density (``n_chunks * horizon / n_tokens`` chunks) and progress is clipped to 1 (a horizon shorter than
    the stream ends the schedule early). ``horizon == n_tokens`` gives the default bit for bit."""
    if horizon is None:
        return index / max(1, n_chunks - 1)
    span = max(1.0, n_chunks * horizon / n_tokens - 1.0)
    return min(1.0, index / span)


def parse_horizon(text: str) -> int | None:
    """The CLI's ``--schedule-horizon``: ``none`` (the scored stream), ``full`` (:data:`FULL_VAL_TOKENS`) or a
    token count (``1040298``, ``62_021_632``)."""
    t = text.strip().lower()
    if t in ("none", ""):
        return None
    if t == "full":
        return FULL_VAL_TOKENS
    try:
        n = int(t.replace("_", "").replace(",", ""))
    except ValueError:
        raise ValueError(f"expected a token count, 'full' or 'none', got {text!r}") from None
    if n < 2:
        raise ValueError(f"a horizon of {n} tokens is no stream (>= 2)")
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_windows(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    plan: WindowPlan,
    w0: int,
    w1: int,
    cfg: ScoreConfig,
    params: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, int]:
    """Nats (float32, on CPU) of the scored targets of windows ``w0..w1-1`` in position order; #forwards."""
    device = tokens.device
    outs: list[torch.Tensor] = []
    lengths = plan.length[w0:w1]
    if cfg.fixed_shapes:
        t_fix, per = fixed_batch_shape(plan, cfg)
        batches = [(i, min(i + per, lengths.size)) for i in range(0, lengths.size, per)]
    else:
        batches = batch_windows(lengths, cfg.batch_tokens)
    n_tok = tokens.numel()
    for a, b in batches:
        starts = plan.start[w0 + a : w0 + b]
        ln = plan.length[w0 + a : w0 + b]
        sf = plan.score_from[w0 + a : w0 + b]
        t = max(int(ln.max()), cfg.pad_to or 0)
        if cfg.fixed_shapes:  # extra rows repeat the first window; extra columns are right padding
            t = t_fix
            starts = np.concatenate([starts, np.full(per - starts.size, starts[0], dtype=starts.dtype)])
        st = torch.from_numpy(starts).to(device)
        idx = st[:, None] + torch.arange(t + 1, device=device)[None, :]
        buf = tokens[idx.clamp_(max=n_tok - 1)]
        x = buf[:, :-1]
        # right padding beyond a window's length is never scored; causal attention keeps it invisible
        counts = ln - sf
        rows = np.repeat(np.arange(b - a), counts)
        cols = np.concatenate([np.arange(f, l) for f, l in zip(sf, ln)]) if len(ln) > 1 else np.arange(sf[0], ln[0])
        rows_t = torch.from_numpy(rows).to(device)
        cols_t = torch.from_numpy(cols).to(device)
        kw: dict[str, Any] = {} if cfg.attn == "auto" else {"attn": cfg.attn}
        if cfg.rope_len is not None:
            kw["rope_len"] = cfg.rope_len
        with autocast_for(device, cfg.autocast):
            logits = model(x, params=params, **kw)
        sel = logits[rows_t, cols_t]
        if cfg.logits_dtype is not None:
            sel = sel.to(getattr(torch, cfg.logits_dtype))
        sel = sel.float()
        tgt = buf[rows_t, cols_t + 1]
        outs.append(F.cross_entropy(sel, tgt, reduction="none"))
    nll = torch.cat(outs) if outs else torch.empty(0)
    return nll.float().cpu(), len(batches)


def fixed_batch_shape(plan: WindowPlan, cfg: ScoreConfig) -> tuple[int, int]:
    """(window length, windows per forward) of every forward under ``fixed_shapes``, within ``batch_tokens``."""
    t = max(plan.max_length, cfg.pad_to or 0)
    per = max(1, cfg.batch_tokens // t)
    return t, per


def _gather_chunk(local: torch.Tensor, sizes: list[int], ctx: DistCtx, device: torch.device) -> torch.Tensor:
    """All ranks' nats of one chunk, concatenated in rank order (rank shares are contiguous in position)."""
    if ctx.world == 1:
        return local
    m = max(sizes)
    buf = torch.zeros(m, dtype=torch.float32, device=device)
    buf[: local.numel()] = local.to(device)
    parts = [torch.empty(m, dtype=torch.float32, device=device) for _ in range(ctx.world)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


def training_sequences(lo: int, hi: int, seq_len: int) -> tuple[int, int, int]:
    """(first input position, n sequences, sequence length) of a training batch over targets ``[lo, hi)``.

    Sequence i feeds ``tokens[lo-1 + i*L : lo-1 + (i+1)*L]`` and predicts the next tokens, so the batch
    contains positions ``[lo-1, lo + n*L)``. A remainder shorter than ``L`` is left out (it is still scored).
    """
    n = hi - lo
    if n <= 0:
        raise ValueError(f"empty training range [{lo}, {hi})")
    if lo < 1:
        raise ValueError(f"training range [{lo}, {hi}) starts before the first target (1)")
    if n < seq_len:
        return lo - 1, 1, n
    return lo - 1, n // seq_len, seq_len


def _resolve_training_range(adapter: AdapterLike, chunk: Chunk, chunks: list[Chunk]) -> tuple[int, int]:
    """Target range of the chunk the adapter asks to train on after scoring ``chunk`` (the ledger judges it)."""
    # what the ledger cannot judge is refused like what it judges illegal (exit 3, not a crash)
    want = adapter.training_positions(chunk.index)
    if not isinstance(want, (int, np.integer)) or isinstance(want, bool):
        raise LegalityError(f"adapter.training_positions({chunk.index}) must return a chunk index (int), got "
                            f"{want!r}: refused (the ledger can only judge a chunk of this stream)")
    if not 0 <= int(want) < len(chunks):
        raise LegalityError(f"adapter.training_positions({chunk.index}) asked to train on chunk {int(want)}, "
                            f"not one of the stream's {len(chunks)} chunks (0..{len(chunks) - 1}): refused")
    c = chunks[int(want)]
    return c.lo, c.hi


def _adapt_on(model: torch.nn.Module, tokens: torch.Tensor, adapter: AdapterLike, lo: int, hi: int, seq_len: int,
              progress: float, ledger: Ledger, step: int, label: str, autocast: bool = True) -> Any:
    first, n_seq, length = training_sequences(lo, hi, seq_len)
    device = tokens.device
    # every rank passes the whole chunk; the adapter splits each of its mini-batches over the ranks
    starts = first + length * torch.arange(n_seq, device=device)
    idx = starts[:, None] + torch.arange(length + 1, device=device)[None, :]
    buf = tokens[idx]
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
    ledger.record_update([(first, first + n_seq * length + 1)], step, label)
    # the adapter owns grad mode and the rank average; the precision is the evaluator's (--no-autocast: float32)
    return adapter.adapt(model, x, y, progress, autocast=autocast)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item()) if v.numel() == 1 else None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return None


def nonfinite_in(stats: Any, params: dict[str, torch.Tensor]) -> str | None:
    """What is non-finite after an adapter update (a stats value, else a parameter), or None when all is finite."""
    if isinstance(stats, dict):
        for k, v in stats.items():
            x = _number(v)
            if x is not None and not np.isfinite(x):
                return f"{k} ({x})"
    names = [n for n, t in params.items() if t.is_floating_point()]
    if names:
        ok = torch.stack([torch.isfinite(params[n]).all() for n in names])
        if not bool(ok.all()):
            return f"parameter {names[int((~ok).nonzero()[0])]}"
    return None


def _diverged(stats: Any, adapter: AdapterLike, ctx: DistCtx, device: torch.device) -> str | None:
    """:func:`nonfinite_in`, agreed over ranks (any rank's divergence stops every rank)."""
    what = nonfinite_in(stats, adapter.params())
    if ctx.any(what is not None, device) and what is None:
        what = "loss or parameters on another rank"
    return what


def run_stream(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    plan: WindowPlan,
    cfg: ScoreConfig,
    *,
    adapter: AdapterLike | None = None,
    order: str = "score_only",
    ledger: Ledger | None = None,
    ctx: DistCtx | None = None,
    starts: np.ndarray | None = None,
    scorer: torch.nn.Module | None = None,
) -> StreamResult:
    """Score every target of ``plan`` once, optionally adapting between chunks (see module docstring).

    The adapter's ``cfg.reset`` decides when it returns to the trained weights: "never" (once, at the start),
    "chunk" (before every update) or "doc" (chunks restart at each document of ``starts`` and the adapter is
    reset when a new document begins). ``scorer``: the module used for scoring forwards (e.g. a
    ``torch.compile`` of ``model``); the adapter always trains through ``model``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order != "score_only" and adapter is None:
        raise ValueError(f"order {order!r} needs an adapter")
    if tokens.dim() != 1 or tokens.numel() != plan.n_tokens:
        raise ValueError(f"tokens must be the 1-D stream of {plan.n_tokens} tokens the plan was built for")
    ctx = DistCtx.current() if ctx is None else ctx
    ledger = Ledger(plan.name) if ledger is None else ledger
    device = tokens.device
    reset = str(adapter.cfg.reset) if adapter is not None else "never"
    if reset not in ("never", "chunk", "doc"):
        raise ValueError(f"adapter reset mode {reset!r} is not one of never, chunk, doc")
    if reset == "doc" and starts is None:
        raise ValueError("adapter reset='doc' needs the document starts of the stream")
    chunks = make_chunks(plan, cfg.chunk_tokens, starts if reset == "doc" else None)
    seq_len = cfg.train_seq_len or plan.max_length
    nll = np.zeros(plan.n_tokens - 1, dtype=np.float32)
    done = np.zeros(plan.n_tokens - 1, dtype=bool)
    score_s = adapt_s = 0.0
    n_forwards = 0
    stats: list[Any] = []
    invalid: dict[str, Any] | None = None
    was_training = model.training
    model.eval()
    if adapter is not None:
        adapter.reset()

    def adapt(chunk: Any, progress: float, after: bool) -> None:
        """One adapter update, timed: on the chunk itself (oracle) or ``after`` scoring it (what it asks for)."""
        nonlocal invalid, adapt_s
        assert adapter is not None  # only orders that need an adapter adapt (checked above)
        t0 = time.perf_counter()
        if reset == "chunk":
            adapter.reset()
        lo, hi = _resolve_training_range(adapter, chunk, chunks) if after else (chunk.lo, chunk.hi)
        step = ledger.next_step()
        stats.append(_adapt_on(model, tokens, adapter, lo, hi, seq_len, progress, ledger, step,
                               f"{'after' if after else 'oracle'} chunk {chunk.index}", cfg.autocast))
        invalid = _stop_if_diverged(stats[-1], adapter, ctx, device, chunk.index)
        _sync(device)
        adapt_s += time.perf_counter() - t0

    _sync(device)
    t_start = time.perf_counter()
    try:
        for chunk in progress_bar(chunks, desc=plan.name, enabled=cfg.progress and ctx.rank == 0):
            last = chunk.index == len(chunks) - 1
            progress = schedule_progress(chunk.index, len(chunks), plan.n_tokens, cfg.schedule_horizon)
            if (adapter is not None and reset == "doc" and chunk.index > 0
                    and chunk.doc != chunks[chunk.index - 1].doc and invalid is None):
                adapter.reset()
            if order == "adapt_first" and invalid is None:
                adapt(chunk, progress, after=False)
            t0 = time.perf_counter()
            step = ledger.next_step()
            shares = [row_share(chunk.w1 - chunk.w0, ctx.world, r) for r in range(ctx.world)]
            a, b = shares[ctx.rank]
            sizes = [int((plan.length[chunk.w0 + sa: chunk.w0 + sb] - plan.score_from[chunk.w0 + sa: chunk.w0 + sb])
                         .sum()) for sa, sb in shares]
            for _attempt in range(2):
                params = adapter.params() if adapter is not None else None
                with torch.inference_mode():
                    fwd = model if scorer is None else scorer
                    local, nf = score_windows(fwd, tokens, plan, chunk.w0 + a, chunk.w0 + b, cfg, params)
                n_forwards += nf
                full = _gather_chunk(local, sizes, ctx, device)
                if adapter is None or invalid is not None or bool(torch.isfinite(full).all()):
                    break
                # the adapted weights score non-finite nats: back to the trained weights, which saw nothing, and
                # score this chunk again with them (its scores were never recorded)
                adapter.reset()
                invalid = {"chunk": int(chunk.index), "what": "nats scored with the adapted weights"}
            if full.numel() != chunk.n_scored:
                raise AssertionError(f"chunk {chunk.index}: scored {full.numel()} targets, expected {chunk.n_scored}")
            if done[chunk.lo - 1 : chunk.hi - 1].any():
                raise AssertionError(f"chunk {chunk.index}: a target in [{chunk.lo}, {chunk.hi}) was scored twice")
            nll[chunk.lo - 1 : chunk.hi - 1] = full.numpy()
            done[chunk.lo - 1 : chunk.hi - 1] = True
            ledger.record_score(chunk.lo, chunk.hi, step)
            _sync(device)
            score_s += time.perf_counter() - t0
            useless = reset == "doc" and not last and chunks[chunk.index + 1].doc != chunk.doc  # reset next anyway
            if order == "score_first" and not last and not useless and invalid is None:
                adapt(chunk, progress, after=True)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t_start
    missing = np.flatnonzero(~done)
    if missing.size:
        raise AssertionError(f"{plan.name}: {missing.size} targets never scored "
                             f"(first: position {int(missing[0]) + 1})")
    return StreamResult(plan.name, nll, chunks, seconds, score_s, adapt_s, plan.n_windows, n_forwards, ledger, stats,
                        invalid)


def _stop_if_diverged(stats: Any, adapter: AdapterLike, ctx: DistCtx, device: torch.device, chunk_index: int
                      ) -> dict[str, Any] | None:
    """None while the adapter is finite; else reset it to the trained weights and say where it diverged."""
    what = _diverged(stats, adapter, ctx, device)
    if what is None:
        return None
    adapter.reset()
    return {"chunk": int(chunk_index), "what": what}
