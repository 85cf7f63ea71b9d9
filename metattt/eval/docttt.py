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
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ..devices import DistCtx, autocast_for as _autocast
from ..track.progress import progress as progress_bar
from ..ttt import rules
from ..ttt.adapter import Adapter
from .docttt_batch import SHAPES, Nats, resolve_attn, run_batch
from .docttt_compile import compiled_core
from .docttt_model import batch_costs, batch_schedule, doc_queue, phase_boundaries, phase_documents
from .docttt_spec import DocTTTSpec, make_doc_adapter
from .ledger import Ledger
from .scoring import StreamResult, _sync

_SEG = 10 ** 12  # ledger steps: segment (between phases) * _SEG + counter, one global order for every rank


def phase_sgd(model: torch.nn.Module, tokens: torch.Tensor, a: np.ndarray, e: np.ndarray, spec: DocTTTSpec,
              base: dict[str, torch.Tensor], ledger: Ledger, autocast: bool = True, ctx: DistCtx = DistCtx(),
              attn: str = "auto") -> tuple[dict, dict]:
    """Full-model SGD (``rules.sgd``: global-norm clip, momentum, cosine lr over the steps) on documents ``[a, e)``,
    ``phase_epochs`` epochs of steps of ~``phase_tokens`` tokens; rows are document pieces of <= ``window`` tokens
    (attention never leaves a document). Under torch.distributed each step's rows are split over the ranks and the
    token-summed gradients all-reduced, so every rank takes the single-process step. Returns (new base parameters,
    stats); every step is a ledger update (each rank records its rows)."""
    device, W = tokens.device, spec.window
    pieces = [(int(p), int(min(p + W, q))) for s0, q in zip(a, e) for p in range(int(s0), int(q), W)]
    per = max(1, spec.phase_tokens // W)
    steps = [pieces[i:i + per] for i in range(0, len(pieces), per)] * spec.phase_epochs
    names = [k for k, v in base.items() if v.is_floating_point()]
    cur = {k: v.detach().clone() for k, v in base.items()}
    rule = rules.sgd(rules.Schedule(spec.phase_lr, "cosine"), spec.phase_momentum, grad_clip=spec.phase_clip,
                     host_clip=True)
    state = rule.init({k: cur[k] for k in names})
    doc_start = {int(p): int(s0) for s0, q in zip(a, e) for p in range(int(s0), int(q), W)}
    losses = []
    for k_step, all_rows in enumerate(steps):
        rows = all_rows[ctx.share(len(all_rows))]
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
            *sums, loss_sum, n_tgt = ctx.reduce_sum(grads + [loss_sum.detach(), n_tgt])
            grads = [s.to(g.dtype) for s, g in zip(sums, grads)]
        total = float(n_tgt)
        loss = loss_sum.detach() / total
        with torch.no_grad():
            updates, changed = rule.update({k: g / total for k, g in zip(names, grads)},
                                           {**state, "progress": k_step / len(steps)}, cur)
            state.update(changed)
            cur.update({k: cur[k] - updates[k] for k in names})
        ledger.record_update([(max(p, doc_start[p] + 1), q + 1) for p, q in rows], ledger.next_step(),
                             f"phase sgd step {k_step}")
        losses.append(float(loss.detach()))
    return cur, {"phase_steps": len(steps), "phase_docs": int(a.size), "phase_loss_first": losses[0] if losses
                 else None, "phase_loss_last": losses[-1] if losses else None}


def run_docttt(spec: DocTTTSpec, model: torch.nn.Module, tokens: torch.Tensor, tokens_np: np.ndarray, bos_id: int,
               ledger: Ledger, ctx: DistCtx | None = None, autocast: bool = True, attn: str = "auto",
               make_adapter: Callable[[DocTTTSpec], Adapter | None] | None = None, compile: bool = False,
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
    from ..model.gpt import BankedGPT

    if not isinstance(model, BankedGPT):  # its per-row lora= forward, RoPE tables and compiled core
        raise TypeError(f"{spec.name} runs a BankedGPT, got {type(model).__name__}")
    ctx = DistCtx.current() if ctx is None else ctx
    device = tokens.device
    shapes = ("chunk" if device.type == "cuda" else "exact") if shapes is None else shapes
    if shapes not in SHAPES:
        raise ValueError(f"docttt shapes must be one of {', '.join(SHAPES)}, got {shapes!r}")
    n = int(tokens.numel())
    queue = doc_queue(tokens_np, bos_id, spec.docs)
    adapter = make_adapter(spec) if make_adapter is not None else make_doc_adapter(spec, model)
    if adapter is not None and adapter.sel is None:
        adapter.bind(model)
    if adapter is not None and ctx.world > 1 and adapter.carries():
        raise ValueError(f"{spec.name}: the adapter carries its state from batch to batch (doclora keep_a), so "
                         "results depend on which batches a rank ran; it is single-process only")
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
                        fresh = ad.start(base, len(idx), key=b, carry=tr)
                        init = (fresh, ad.init(fresh))
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
                    if ctx.any(invalid is not None, device):  # a phase is collective: every rank skips it
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
    host = both.cpu().numpy()
    nll, done = np.ascontiguousarray(host[0]), host[1].astype(np.int32)
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
