"""Where a gain comes from: per-position decomposition of every protocol's nats (eval.json ``per_position``).

Three cuts of the same per-target nats, each a partition of the targets, so bucket sums add up to the totals
(target and byte counts exactly; nats up to float summation order, exactly when the nats are dyadic):

* **position in document**: the target's offset from its document's opening BOS (0 = the first token after it;
  the BOS that opens the next document is its document's last target), bucketed by ``edges`` (default
  [0, 128), [128, 1024), [1024, 2048), [2048, inf)). A gain at offsets < 128 cannot be adaptation to *that*
  document; a gain at >= 2048 is where a 2048-token window stops seeing the document's start.
* **position in the stream**: deciles of the target index, so a gain that appears only late in the stream
  (continued training on the val distribution) shows as such.
* **within-document vs carried**: for two ``ttt:`` protocols of the same adapter and windows that differ only in
  ``reset`` (``doc`` vs ``never``), bpb(reset=doc) - bpb(reset=never) is what is carried across documents. A
  ``reset=doc`` protocol that took no update at all (every document fits in one chunk) is flagged: its Δ is zero
  by construction, not a measured absence of within-document gain.

Δ of a bucket uses the bucket's own bytes; its ``share`` (Δ x bucket bytes / total bytes) is its contribution,
and the shares of a cut sum to the total Δ.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.bpb import bpb
from .stats import bootstrap

DEFAULT_DOC_EDGES: tuple[int, ...] = (0, 128, 1024, 2048)
N_STREAM_BUCKETS = 10


def check_edges(edges: Sequence[int]) -> tuple[int, ...]:
    """Bucket edges: start at 0, strictly increasing (the last bucket is open-ended)."""
    e = tuple(int(x) for x in edges)
    if not e or e[0] != 0 or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"position buckets must start at 0 and increase strictly, got {list(edges)}")
    return e


def parse_edges(text: str) -> tuple[int, ...]:
    """``"0,128,1024,2048"`` -> edges (the CLI's ``--position-buckets``)."""
    try:
        return check_edges([int(t) for t in text.split(",") if t.strip()])
    except ValueError as e:
        raise ValueError(f"--position-buckets: {e}" if "buckets" in str(e) else
                         f"--position-buckets needs comma-separated integers, got {text!r}") from e


def doc_offsets(doc_of_target: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Offset of every target (positions 1..n-1) from its document's start token: 0 for the first target."""
    pos = np.arange(1, doc_of_target.size + 1, dtype=np.int64)
    return pos - np.asarray(starts, dtype=np.int64)[doc_of_target] - 1


def bucket_of(values: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    return np.searchsorted(np.asarray(edges, dtype=np.int64), values, side="right") - 1


def stream_buckets(n_targets: int, k: int = N_STREAM_BUCKETS) -> np.ndarray:
    """Bucket (0..k-1) of each target by its index in the stream: equal-count slices."""
    return (np.arange(n_targets, dtype=np.int64) * k) // max(n_targets, 1)


def _labels(edges: Sequence[int]) -> list[str]:
    return [f"[{a}, {b})" for a, b in zip(edges, edges[1:])] + [f"[{edges[-1]}, inf)"]


def _cut(bucket: np.ndarray, n: int, nbytes: np.ndarray, token_nll: Mapping[str, np.ndarray],
         pairs: Mapping[str, tuple[str, str]], total_bytes: float) -> dict[str, Any]:
    targets = np.bincount(bucket, minlength=n)
    b = np.bincount(bucket, weights=nbytes, minlength=n)
    nats = {p: np.bincount(bucket, weights=v.astype(np.float64), minlength=n) for p, v in token_nll.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        bpbs = {p: np.where(b > 0, bpb(v, np.where(b > 0, b, 1)), np.nan) for p, v in nats.items()}
    deltas = {}
    for key, (a, c) in pairs.items():
        d = bpbs[a] - bpbs[c]
        share = bpb(nats[a] - nats[c], total_bytes)
        deltas[key] = {"from": a, "to": c, "value": _list(d), "share": _list(share)}
    return {"targets": targets.tolist(), "bytes": b.tolist(), "nats": {p: v.tolist() for p, v in nats.items()},
            "bpb": {p: _list(v) for p, v in bpbs.items()}, "delta": deltas}


def _list(x: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in x]


def carried_pairs(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(reset=doc protocol, reset=never protocol) pairs: same adapter, windows and every other option."""
    def key(r: Any) -> tuple | None:
        info = r.adapter_info or {}
        cfg = info.get("config")
        if r.spec.mode != "ttt" or not isinstance(cfg, dict) or "reset" not in cfg:
            return None
        rest = tuple(sorted((k, repr(v)) for k, v in cfg.items() if k != "reset"))
        return (info.get("adapter"), r.spec.windows, info.get("selection"), rest)

    out = []
    for nd, rd in results.items():
        if key(rd) is None or rd.adapter_info["config"]["reset"] != "doc":
            continue
        for nn, rn in results.items():
            if key(rn) == key(rd) and rn.adapter_info["config"]["reset"] == "never":
                out.append((nd, nn))
    return out


def no_step_notes(results: Mapping[str, Any], chunk_tokens: int, longest_doc: int) -> dict[str, str]:
    """Adapting protocols that took no update: their Δ is zero by construction."""
    out = {}
    for n, r in results.items():
        if r.spec.adapter is None:
            continue
        if r.spec.mode == "ttt" and len(r.stream.adapt_stats) == 0:
            reset = ((r.adapter_info or {}).get("config") or {}).get("reset")
            why = (f"reset=doc with {chunk_tokens}-token chunks and documents of at most {longest_doc} targets: no "
                   "document spans a chunk boundary, so no update was taken" if reset == "doc"
                   else "the adapter took no update")
            out[n] = f"Δ is zero by construction: {why}"
    return out


def per_position(data: Any, results: Mapping[str, Any], pairs: Mapping[str, tuple[str, str]],
                 edges: Sequence[int] = DEFAULT_DOC_EDGES, chunk_tokens: int = 0, n_boot: int = 0, seed: int = 0,
                 level: float = 0.95) -> dict[str, Any]:
    """The ``per_position`` section of eval.json (module docstring). ``results``: name -> ProtocolResult;
    ``pairs``: the report's named deltas (key -> (A, B))."""
    edges = check_edges(edges)
    nll = {n: r.stream.token_nll for n, r in results.items()}
    nb = data.target_bytes
    total = float(nb.sum())
    off = doc_offsets(data.doc_of_target, data.starts)
    doc_cut = _cut(bucket_of(off, edges), len(edges), nb, nll, pairs, total)
    doc_cut.update({"edges": list(edges), "labels": _labels(edges),
                    "offset": "target position - its document's start - 1 (0 = first token after BOS)"})
    n = int(nb.size)
    sb = stream_buckets(n)
    st_cut = _cut(sb, N_STREAM_BUCKETS, nb, nll, pairs, total)
    first = np.searchsorted(sb, np.arange(N_STREAM_BUCKETS))
    st_cut.update({"first_target": [int(x) + 1 for x in first],
                   "labels": [f"d{i + 1}" for i in range(N_STREAM_BUCKETS)]})
    doc_len = np.bincount(data.doc_of_target, minlength=data.n_docs)
    carried = []
    cp = carried_pairs(results)
    if cp:
        _, diffs = bootstrap({n: r.doc_nats for n, r in results.items()}, data.doc_bytes, cp, n_boot=n_boot,
                             seed=seed, level=level)
        for nd, nn in cp:
            d = diffs[(nd, nn)]
            carried.append({"within_doc": nd, "never": nn, "carried": d.point, "ci95": [d.lo, d.hi],
                            "meaning": f"bpb({nd}) - bpb({nn}): the gain carried across documents "
                                       f"(positive = carrying state helps)",
                            "within_doc_updates": len(results[nd].stream.adapt_stats)})
    return {"doc_position": doc_cut, "stream_decile": st_cut, "carried": carried,
            "zero_by_construction": no_step_notes(results, chunk_tokens, int(doc_len.max()) if doc_len.size else 0),
            "note": "bucket sums equal the totals (targets and bytes exactly, nats up to float summation order); "
                    "share = Δ(bucket) x bytes(bucket) / all bytes, so a cut's shares sum to the total Δ"}


def format_per_position(pp: Mapping[str, Any], keys: Sequence[str] | None = None, max_rows: int = 8) -> list[str]:
    """A compact table: Δ per bucket of each cut for the named Δ ``keys`` (default all; bits per byte within
    the bucket, positive = better; the shares are in eval.json)."""
    lines: list[str] = []
    for cut, title in (("doc_position", "position in document (offset from BOS)"), ("stream_decile",
                                                                                   "stream decile")):
        c = pp.get(cut) or {}
        rows = [(k, d) for k, d in (c.get("delta") or {}).items() if keys is None or k in keys][:max_rows]
        if not rows:
            continue
        labels = c["labels"]
        w = max(10, *(len(x) + 1 for x in labels))
        lines.append(f"Δ by {title}, bits/byte within each bucket:")
        lines.append(f"  {'delta':<26}" + "".join(f"{x:>{w}}" for x in labels))
        for k, d in rows:
            lines.append(f"  {k[:25]:<26}" + "".join(f"{_f(v):>{w}}" for v in d["value"]))
    for c in pp.get("carried") or []:
        lines.append(f"carried across documents: bpb({c['within_doc']}) - bpb({c['never']}) = {_f(c['carried'])} "
                     f"[{_f(c['ci95'][0])}, {_f(c['ci95'][1])}] ({c['within_doc_updates']} within-document updates)")
    for n, note in (pp.get("zero_by_construction") or {}).items():
        lines.append(f"{n}: {note}")
    return lines


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:+.5f}"
