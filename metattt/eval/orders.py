"""Runs beyond the first: K document orders x S adapter seeds, for trajectory-aware intervals.

A document bootstrap over one pass is valid for stateless protocols only: with a stateful adapter every
document's Δ depends on the documents before it and on the order (and on the adapter's random init / seed). The
evaluator can therefore repeat every protocol of the run on ``--orders K`` document orders and ``--adapt-seeds
S`` adapter seeds (K x S runs; run (0, 0) is the stream as given with the adapters as specified, the run every
other eval.json number comes from). Order k > 0 permutes the documents with a fixed seed (``order_permutation``)
and every protocol of the run sees the same permutation, so pairing survives; per-document nats are mapped back
to the original document order, so the hierarchical bootstrap (``stats.hierarchical_bootstrap``) resamples
runs, then documents.

What moves: documents that open with BOS, except the stream's last one. A leading fragment without BOS stays
first and the last document stays last, so every document keeps exactly its targets (its tokens after its BOS
and the BOS that follows it) and its bytes, in every order.
"""
from __future__ import annotations

from dataclasses import replace
import time
from typing import Any, Callable

import numpy as np

from .docttt_spec import DocTTTSpec
from .windows import doc_starts

ORDER_SEED = 20_260_501  # the fixed base seed of document orders: order k uses (ORDER_SEED, k)


def order_permutation(tokens: np.ndarray, bos_id: int, order: int) -> np.ndarray:
    """``perm[j]`` = the original index of the document at place j of order ``order`` (identity for 0)."""
    starts = doc_starts(np.asarray(tokens), bos_id)
    n_docs = int(starts.size)
    perm = np.arange(n_docs, dtype=np.int64)
    if order == 0:
        return perm
    first = 0 if np.asarray(tokens)[0] == bos_id else 1  # a fragment before the first BOS stays first
    movable = perm[first: n_docs - 1]  # the last document stays last
    if movable.size > 1:
        rng = np.random.default_rng([ORDER_SEED, int(order)])
        perm[first: n_docs - 1] = rng.permutation(movable)
    return perm


def permute_documents(tokens: np.ndarray, bos_id: int, perm: np.ndarray) -> np.ndarray:
    """The stream with its documents in the order ``perm`` (``order_permutation``)."""
    tokens = np.asarray(tokens)
    starts = doc_starts(tokens, bos_id)
    ends = np.append(starts[1:], tokens.size)
    return np.concatenate([tokens[starts[i]:ends[i]] for i in perm])


def to_original(doc_nats: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Per-document values of a permuted run, back in the original document order."""
    out = np.empty_like(doc_nats)
    out[perm] = doc_nats
    return out


def seeded_spec(spec: Any, seed: int) -> Any:
    """A ``docttt:`` spec with the adapter's seed offset by ``seed`` (0: unchanged); other specs unchanged."""
    if seed == 0 or not isinstance(spec, DocTTTSpec) or spec.adapter is None:
        return spec
    old = dict(spec.adapter_opts)
    new = str(int(old.get("seed", 0)) + seed)
    opts = [(k, new if k == "seed" else v) for k, v in spec.adapter_opts] + ([] if "seed" in old else [("seed", new)])
    return replace(spec, adapter_opts=tuple(opts))


def seeded_adapter_spec(text: str, seed: int) -> str:
    """``name:k=v,...`` with ``seed`` offset by ``seed`` (the adapter must have a ``seed`` option)."""
    if seed == 0:
        return text
    name, _, rest = text.partition(":")
    items = [t for t in rest.split(",") if t.strip()]
    base = 0
    keep = []
    for t in items:
        k, _, v = t.partition("=")
        if k.strip() == "seed":
            base = int(v)
        else:
            keep.append(t)
    return f"{name}:" + ",".join(keep + [f"seed={base + seed}"])


def run_labels(orders: int, seeds: int) -> list[tuple[int, int]]:
    """(order, seed) of every run, the primary (0, 0) first."""
    return [(o, s) for o in range(orders) for s in range(seeds)]


def evaluate_runs(model: Any, tokens_np: np.ndarray, lut: Any, device: Any, specs: list[Any],
                  factory_for_seed: Callable[[int], Callable[[str], Any]], cfg: Any, orders: int, seeds: int,
                  log: Callable[[str], None] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """Every run but the primary (0, 0): the protocols of ``specs`` on order ``o`` with adapter seed ``s``.
    Returns per run ``{"order", "seed", "doc_nats": {primary name: (D,) in the original document order},
    "seconds"}``; ``factory_for_seed(s)`` builds the adapters of seed ``s``; ``kw`` goes to ``evaluate``."""
    from .protocols import evaluate, prepare_stream

    out = []
    bos = int(lut.bos_id)
    cfg = replace(cfg, docttt_model=False)  # the time model was calibrated on the primary run
    for o, s in run_labels(orders, seeds)[1:]:
        perm = order_permutation(tokens_np, bos, o)
        data = prepare_stream(permute_documents(tokens_np, bos, perm), lut, device, cfg.chunk_tokens)
        run_specs = [seeded_spec(sp, s) for sp in specs]
        t0 = time.perf_counter()
        ev = evaluate(model, data, run_specs, factory_for_seed(s), cfg, **kw)
        res = list(ev.results.values())
        names = [sp.name for sp in specs]
        out.append({"order": o, "seed": s, "seconds": time.perf_counter() - t0,
                    "doc_nats": {n: to_original(r.doc_nats, perm) for n, r in zip(names, res)},
                    "invalid": {n: r.stream.invalid for n, r in zip(names, res) if r.stream.invalid}})
        if log is not None:
            log(f"run order {o} seed {s}: {len(res)} protocols in {out[-1]['seconds']:.1f}s")
    return out
