"""The docttt family's time model: the chunk step timed per forward length, the full val modelled from it.

A short prefix holds few documents, so its length-sorted batches mix lengths and its time is dominated by
few-row tail chunks: its tokens/s extrapolates badly to the full val (and a compiled run's first batch holds
the compilation). Instead the chunk step is timed as a function of context length at full and at the fewest
rows (``calibrate``: two runs of a calibration batch, the first a warm-up that also compiles), the full val is
modelled as documents resampled from the data's lengths (``resample_lengths``), sorted into batches and dealt
over the ranks by the protocol's own schedule (``project_docttt``), and the same model predicts the measured
run as a check. Shared by the evaluator's "proj." column (``EvalConfig.docttt_model``) and
benchmarks/eval_throughput.py, which validated it against a measured full-size share (docs/benchmarks.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .docttt_batch import forward_rows, run_batch
from .docttt_compile import compiled_core
from .docttt_spec import make_doc_adapter
from .ledger import Ledger
from .scoring import _sync
from .windows import doc_segments


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


# ------------------------------------------------------------------------------------------------ time model
@dataclass(frozen=True)
class StepModel:
    """Measured chunk-step times (seconds) at forward lengths ``t`` with ``rows_lo`` (the fewest the loop runs:
    ``docttt_batch.forward_rows``) and ``rows`` rows: ``fwd`` (the scoring forward), ``upd`` (backward + optimiser
    step); linear in t between measured lengths and in the number of rows between ``rows_lo`` and ``rows``;
    ``overhead`` per batch (adapter init, plan, the one sync)."""

    t: np.ndarray
    fwd1: np.ndarray
    fwd_full: np.ndarray
    upd1: np.ndarray
    upd_full: np.ndarray
    rows: int
    overhead: float = 0.0
    rows_lo: int = 1

    def _at(self, lo: np.ndarray, hi: np.ndarray, t: np.ndarray, r: np.ndarray) -> np.ndarray:
        a, b = np.interp(t, self.t, lo), np.interp(t, self.t, hi)
        w = (np.asarray(r, dtype=np.float64) - self.rows_lo) / max(self.rows - self.rows_lo, 1)
        return a + (b - a) * w

    def fwd(self, t: np.ndarray, r: np.ndarray) -> np.ndarray:
        return self._at(self.fwd1, self.fwd_full, t, r)

    def upd(self, t: np.ndarray, r: np.ndarray) -> np.ndarray:
        return self._at(self.upd1, self.upd_full, t, r)


def resample_lengths(lengths: np.ndarray, total: int, seed: int = 0) -> np.ndarray:
    """Document lengths (targets) drawn with replacement from ``lengths`` until they hold >= ``total``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = np.empty(0, dtype=np.int64)
    while out.sum() < total:
        out = np.concatenate([out, rng.choice(lengths, size=int(total / lengths.mean() * 1.05) + 1)])
    return out[: int(np.searchsorted(np.cumsum(out), total)) + 1]


def batch_seconds(n: np.ndarray, model: StepModel, chunk: int, window: int, shapes: str, train: bool) -> float:
    """Modelled time of one batch of documents with ``n`` targets: every chunk c costs fwd(t_c, rows_c), and
    upd(t_c, rows_c) while some document still trains (not on the batch's last chunk); t_c =
    min((c+1)*chunk, window) (``exact`` shapes: the same, the longest window), rows_c = the forward's rows
    (``docttt_batch.forward_rows``: active documents; ``chunk`` shapes at least 2, ``batch`` shapes all)."""
    nc = -(-np.asarray(n, dtype=np.int64) // chunk)
    c = np.arange(int(nc.max()))
    t = np.minimum((c + 1) * chunk, window)
    rows = forward_rows((nc[None, :] > c[:, None]).sum(1), nc.size, shapes)
    s = model.fwd(t, rows).sum() + model.overhead
    if train:
        s += model.upd(t[:-1], rows[:-1]).sum()
    return float(s)


def project_docttt(lengths: np.ndarray, model: StepModel, chunk: int, window: int, docs: int, world: int,
                   shapes: str = "chunk", train: bool = True) -> dict:
    """Modelled protocol time: documents sorted longest first into batches of ``docs``, dealt over ranks by
    docttt's own schedule (``batch_schedule``, no phases); the run takes as long as its slowest rank."""
    n = np.sort(np.asarray(lengths, dtype=np.int64))[::-1]
    batches = [np.arange(i, min(i + docs, n.size)) for i in range(0, n.size, docs)]
    per = np.array([batch_seconds(n[b], model, chunk, window, shapes, train) for b in batches])
    owner = batch_schedule(batch_costs(n, batches, chunk, window), world)
    ranks = np.array([per[owner == r].sum() for r in range(world)])
    return {"wall_s": float(ranks.max()), "rank_s": ranks, "batches": int(per.size), "docs": int(n.size),
            "targets": int(n.sum())}


def calib_batch(model, spec, device, rows: int, shapes: str, autocast: bool, attn: str, extras=None):
    """A closure running one batch of ``rows`` random documents of ``window + chunk`` targets each (every forward
    length from chunk to window): the calibration batch."""
    n = spec.window + spec.chunk
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(4, model.cfg.vocab_size, (rows * (n + 1) + 1,), generator=gen).to(device)
    a = np.arange(rows, dtype=np.int64) * (n + 1)
    adapter = make_doc_adapter(spec, model, extras)  # init=meta: the artifact's learned A0
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    shp = ("chunk" if device.type == "cuda" else "exact") if shapes == "auto" else shapes

    def once():
        init = None
        if adapter is not None:
            t0 = adapter.start(frozen, rows)
            init = (t0, adapter.init(t0))
        return run_batch(model, tokens, a, a + n, spec, adapter, frozen, Ledger(), init, autocast, attn=attn,
                         shapes=shp, inplace=True)

    return once, adapter is not None


def calibrate(model, spec, device, rows: int, shapes: str, compile: bool, autocast: bool, reps: int = 2,
              attn: str = "auto", extras=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(t, fwd s, upd s, overhead s per batch) of the calibration batch of ``rows`` documents, the last of
    ``reps`` runs (earlier: warm-up)."""
    once, train = calib_batch(model, spec, device, rows, shapes, autocast, attn, extras)
    with compiled_core(model, compile):
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            out = once()
            _sync(device)
            wall = time.perf_counter() - t0
    ct = out.chunk_times[:-1] if train else out.chunk_times  # the last chunk trains nobody
    t = np.array([c[0] for c in ct], dtype=np.float64)
    fwd = np.array([c[2] for c in ct])
    upd = np.array([c[3] for c in ct]) if train else np.zeros(len(ct))
    t_u = np.unique(t)  # lengths repeat once the window is full: average them
    fwd_u = np.array([fwd[t == x].mean() for x in t_u])
    upd_u = np.array([upd[t == x].mean() for x in t_u])
    overhead = max(0.0, wall - sum(c[2] + c[3] for c in out.chunk_times))
    return t_u, fwd_u, upd_u, overhead


def step_model(model, spec, device, shapes: str, compile: bool, autocast: bool, attn: str = "auto",
               extras=None) -> tuple[StepModel, str, int]:
    """Calibrate ``spec``'s chunk step at ``spec.docs`` rows and at the fewest rows the loop runs: (the model,
    the resolved shapes, that fewest row count)."""
    D = spec.docs
    t, f_full, u_full, over = calibrate(model, spec, device, D, shapes, compile, autocast, attn=attn, extras=extras)
    shp = shapes if shapes != "auto" else ("chunk" if device.type == "cuda" else "exact")
    lo = int(forward_rows(np.ones(1, dtype=np.int64), D, shp)[0])  # the fewest rows a step runs
    if lo >= D:  # batch shapes: every step runs all D rows
        f1, u1 = f_full, u_full
    else:  # a batch of lo documents (a 1-row batch would be one more graph under chunk shapes)
        _, f1, u1, _ = calibrate(model, spec, device, lo, shapes, compile, autocast, attn=attn, extras=extras)
    return StepModel(t, f1, f_full, u1, u_full, D, over, rows_lo=lo), shp, lo


def doc_lengths(tokens_np: np.ndarray, bos_id: int) -> np.ndarray:
    return np.array([e - a for a, e in doc_segments(tokens_np, bos_id)], dtype=np.int64)


def projection(model, spec, tokens_np: np.ndarray, bos_id: int, device, *, shapes: str, compile: bool,
               autocast: bool, attn: str, full_tokens: int, gpus: int, world: int = 1, extras=None) -> dict[str, Any]:
    """Calibrate (the untimed warm-up of a protocol run) and model: ``check_s`` (this data on ``world`` ranks,
    to hold against the measured run) and ``full_s`` (``full_tokens`` of resampled documents on ``gpus``)."""
    t0 = time.perf_counter()
    sm, shp, _ = step_model(model, spec, device, shapes, compile, autocast, attn, extras)
    calib_s = time.perf_counter() - t0
    train = spec.adapter is not None
    lengths = doc_lengths(tokens_np, bos_id)
    check = project_docttt(lengths, sm, spec.chunk, spec.window, spec.docs, world, shp, train)
    full = project_docttt(resample_lengths(lengths, full_tokens), sm, spec.chunk, spec.window, spec.docs, gpus,
                          shp, train)
    return {"model": "docttt batch-cost model (metattt.eval.docttt_model)", "calibration_s": calib_s,
            "check_s": check["wall_s"], "full_s": full["wall_s"], "full_mean_rank_s": float(full["rank_s"].mean()),
            "full_docs": full["docs"], "full_targets": full["targets"], "gpus": gpus, "shapes": shp,
            "phases_excluded": bool(spec.phases)}
