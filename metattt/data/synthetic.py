"""The embedded "document language": a synthetic corpus where test-time adaptation provably helps.

Generative model (vocab V, ids 0..3 control, BOS = 1; regular ids split into function tokens F = first half
and content tokens C = second half, or the last ``content_types`` ids):

* a global chain, fixed by the seed: for every previous token x a sparse distribution ``T_F[x]`` over F
  (Dirichlet, small concentration) and a content probability ``c(x)`` in ``content_prob_range``;
* every document d draws its own content distribution ``theta_d ~ Dirichlet(alpha * 1_C)``; with small
  alpha a document uses a few content words heavily (its "names" / "topic words");
* ``P(y | x, theta_d) = (1 - c(x)) T_F[x, y]`` for y in F and ``c(x) theta_d[y]`` for y in C;
* a document is BOS followed by L regular tokens (no EOS), L ~ Uniform{min_doc_len..max_doc_len} or a
  (discretised, truncated) lognormal / log-uniform law on that range (``length_dist``).

Documents are longer than a small context window, so a reader that adapts to the document's own statistics
(beyond its window) can approach ``bayes_unknown_bpb``; a pure bigram reader cannot beat ``bigram_bpb``.

Scoring follows ``ByteLUT.uniform``: every regular target is 1 byte, BOS targets are 0 bytes but their nats
count (as in the Parameter Golf evaluator). The chain bounds (bigram / bayes_unknown / bayes_known) all use
the exact document-length hazard to predict BOS, which costs the same nats per document (the entropy of the
length law, ``log(max-min+1)`` for uniform lengths) in each of them (about 0.005 bits per byte at the defaults),
so the differences between them are purely about content-token prediction.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metattt.data.bpb import ByteLUT
from metattt.atomic import atomic_write
from metattt.data.shards import read_shard, read_shard_header, write_shard

GENERATOR_VERSION = 2
BOS_ID = 1
CONTROL_IDS = (0, 1, 2, 3)
FIRST_REGULAR = 4
_STREAM_CHAIN, _STREAM_VAL, _STREAM_TRAIN = 0, 1, 2
LENGTH_DISTS = ("uniform", "lognormal", "loguniform")
META_WINDOWS = (128, 256, 512, 2048)  # context lengths (256: the tiny preset's) whose windowed Bayes bound is recorded in meta.json


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the synthetic corpus; equal specs give byte-identical files."""

    vocab_size: int = 256
    n_train_tokens: int = 4_000_000
    n_val_tokens: int = 200_000
    min_doc_len: int = 512
    max_doc_len: int = 4096
    alpha: float = 0.05  # per-document content Dirichlet concentration (small: few heavy content words)
    function_concentration: float = 0.1  # Dirichlet concentration of each function-token transition row
    content_prob_min: float = 0.25
    content_prob_max: float = 0.6
    shard_tokens: int = 1 << 20
    seed: int = 0
    # the zero-room control: one content distribution shared by every document (a global parameter, like the
    # chain), so a reader of the document learns nothing a reader of the corpus does not know
    shared_theta: bool = False
    # content word types |C| (0: half the regular vocabulary, the original split); the rest are function tokens
    content_types: int = 0
    # document length law on [min_doc_len, max_doc_len]: "uniform", "lognormal" (median ``length_median``, 0: the
    # geometric mean of the bounds, log-sd ``length_sigma``; FineWeb-like) or "loguniform" (P(L) ~ 1/L)
    length_dist: str = "uniform"
    length_median: float = 0.0
    length_sigma: float = 1.0

    def __post_init__(self) -> None:
        if not 8 <= self.vocab_size <= 65536:
            raise ValueError(f"SyntheticSpec.vocab_size must be in [8, 65536], got {self.vocab_size}")
        if not 1 <= self.min_doc_len <= self.max_doc_len:
            raise ValueError(f"need 1 <= min_doc_len <= max_doc_len, got {self.min_doc_len}, {self.max_doc_len}")
        if self.n_train_tokens < 2 or self.n_val_tokens < 2:
            raise ValueError("n_train_tokens and n_val_tokens must be at least 2")
        if self.alpha <= 0 or self.function_concentration <= 0:
            raise ValueError("alpha and function_concentration must be positive")
        if not 0 < self.content_prob_min <= self.content_prob_max < 1:
            raise ValueError("need 0 < content_prob_min <= content_prob_max < 1")
        if self.shard_tokens < 1:
            raise ValueError("shard_tokens must be positive")
        if self.content_types and not 1 <= self.content_types <= self.vocab_size - FIRST_REGULAR - 1:
            raise ValueError(f"content_types must be 0 (half) or in [1, {self.vocab_size - FIRST_REGULAR - 1}] "
                             f"(at least one function token), got {self.content_types}")
        if self.length_dist not in LENGTH_DISTS:
            raise ValueError(f"length_dist must be one of {', '.join(LENGTH_DISTS)}, got {self.length_dist!r}")
        if self.length_median < 0 or self.length_sigma <= 0:
            raise ValueError("need length_median >= 0 and length_sigma > 0")

    @property
    def n_function(self) -> int:
        if self.content_types:
            return self.vocab_size - FIRST_REGULAR - self.content_types
        return (self.vocab_size - FIRST_REGULAR) // 2

    @property
    def n_content(self) -> int:
        return self.vocab_size - FIRST_REGULAR - self.n_function

    @property
    def first_content(self) -> int:
        return FIRST_REGULAR + self.n_function

    def to_dict(self) -> dict[str, Any]:
        """The fields; those added later (``_LATER_FIELDS``) only when not at their default, so corpora written
        before they existed keep their spec (and fingerprint)."""
        d = asdict(self)
        for k, default in _LATER_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticSpec:
        return cls(**d)


_LATER_FIELDS: dict[str, Any] = {"shared_theta": False, "content_types": 0, "length_dist": "uniform",
                                 "length_median": 0.0, "length_sigma": 1.0}


def length_pmf(spec: SyntheticSpec) -> np.ndarray:
    """P(L = k) for k = min_doc_len..max_doc_len (regular tokens per document) under ``spec.length_dist``."""
    a, b = spec.min_doc_len, spec.max_doc_len
    k = np.arange(a, b + 1, dtype=np.float64)
    if spec.length_dist == "uniform":
        return np.full(k.size, 1.0 / k.size)
    if spec.length_dist == "loguniform":
        w = 1.0 / k
    else:  # lognormal, discretised: the mass of [k - 1/2, k + 1/2)
        from scipy.special import ndtr

        mu = math.log(spec.length_median) if spec.length_median > 0 else 0.5 * (math.log(a) + math.log(b))
        z = (np.log(np.concatenate([k - 0.5, [b + 0.5]])) - mu) / spec.length_sigma
        w = np.diff(ndtr(z))
    return w / w.sum()


def _hazard(spec: SyntheticSpec, k: np.ndarray) -> np.ndarray:
    """P(the document ends now | k regular tokens emitted so far): the exact BOS predictor of every bound."""
    a, b = spec.min_doc_len, spec.max_doc_len
    if spec.length_dist == "uniform":  # closed form (bit-identical to the bounds before other laws existed)
        return np.where(k >= a, 1.0 / np.maximum(b - k + 1, 1), 0.0)
    pmf = length_pmf(spec)
    sf = np.cumsum(pmf[::-1])[::-1]  # P(L >= a + i)
    i = np.clip(k - a, 0, pmf.size - 1)
    h = np.where(sf[i] > 0, pmf[i] / np.maximum(sf[i], 1e-300), 1.0)
    return np.where(k < a, 0.0, np.where(k >= b, 1.0, np.minimum(h, 1.0)))


# Named corpus designs: the fields a design chooses (vocabulary and token counts come from the caller, e.g. the
# trainer's model vocab and --synthetic-train-tokens). The trainer's --synthetic-spec picks one; the main job's
# design search is recorded in metattt/train/config.py (_tiny_synthetic).
MAIN_JOB_DESIGN: dict[str, Any] = {"alpha": 4.0, "content_prob_min": 0.5, "content_prob_max": 0.8,
                                    "min_doc_len": 2048, "max_doc_len": 8192}
# The GPU corpus (vocabulary 1024, context 2048): the design chosen by experiments/synth_design.py (its search
# table is in experiments/ceiling_synth_gpu.toml's header), in two length variants.
GPU_DESIGN: dict[str, Any] = {"alpha": 1.0, "content_types": 1000, "content_prob_min": 0.7, "content_prob_max": 0.9}
NAMED_SPECS: dict[str, dict[str, Any]] = {
    "document-language": {},  # the generator's defaults (the main job's corpus before issue 30)
    "main-job": MAIN_JOB_DESIGN,
    "zero-room": {**MAIN_JOB_DESIGN, "shared_theta": True},  # the main job's design, one theta for all documents
    # long documents: 2K-32K tokens, uniform (mean 17K): most targets are far beyond a 2,048 window
    "gpu-long": {**GPU_DESIGN, "min_doc_len": 2048, "max_doc_len": 32768},
    # FineWeb-like lengths: lognormal, median 1,150 tokens, log-sd 1 (mean ≈ 1.9K), 64..32K
    "gpu-fineweb": {**GPU_DESIGN, "min_doc_len": 64, "max_doc_len": 32768, "length_dist": "lognormal",
                    "length_median": 1150.0, "length_sigma": 1.0},
    "gpu-long-zero-room": {**GPU_DESIGN, "min_doc_len": 2048, "max_doc_len": 32768, "shared_theta": True},
    # the CPU-sized variant of the GPU study (experiments/ceiling_synth_cpu.toml, CI): the main job's design with
    # documents of 256..1024 tokens against a 64-token context, and a FineWeb-like length law scaled down 16x
    "ci-long": {**MAIN_JOB_DESIGN, "min_doc_len": 256, "max_doc_len": 1024},
    "ci-fineweb": {**MAIN_JOB_DESIGN, "min_doc_len": 8, "max_doc_len": 1024, "length_dist": "lognormal",
                   "length_median": 72.0, "length_sigma": 1.0},
    "ci-long-zero-room": {**MAIN_JOB_DESIGN, "min_doc_len": 256, "max_doc_len": 1024, "shared_theta": True},
}


def named_spec(name: str, **fields: Any) -> SyntheticSpec:
    """The spec of design ``name`` (``NAMED_SPECS``) with ``fields`` (vocab_size, token counts, ...) set."""
    if name not in NAMED_SPECS:
        raise ValueError(f"unknown synthetic spec {name!r}; choose from {', '.join(NAMED_SPECS)}")
    return SyntheticSpec(**{**NAMED_SPECS[name], **fields})


@dataclass(frozen=True)
class Chain:
    """The global part of the generative model."""

    trans_f: np.ndarray  # (V, n_function) float64, rows sum to 1
    content_prob: np.ndarray  # (V,) float64
    alias_prob: np.ndarray  # (V, n_function) Walker alias tables for sampling trans_f rows
    alias_idx: np.ndarray  # (V, n_function) int64


def synthetic_lut(spec: SyntheticSpec) -> ByteLUT:
    """The byte convention of the synthetic corpus: regular tokens 1 byte, control tokens 0."""
    return ByteLUT.uniform(spec.vocab_size, control_ids=CONTROL_IDS, bytes_per_token=1, bos_id=BOS_ID)


def _rng(spec: SyntheticSpec, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([spec.seed, stream]))


def _dirichlet(rng: np.random.Generator, conc: float, shape: tuple[int, int]) -> np.ndarray:
    """Rows ~ Dirichlet(conc * 1), computed in log space so tiny concentrations never underflow to 0/0."""
    # Gamma(a) = Gamma(a + 1) * U^(1/a)  (exact), taken in logs.
    log_g = np.log(rng.standard_gamma(conc + 1.0, size=shape)) + np.log(rng.random(shape)) / conc
    log_g -= log_g.max(axis=1, keepdims=True)
    p = np.exp(log_g)
    return p / p.sum(axis=1, keepdims=True)


def _alias_tables(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias tables for each row of ``p`` (O(1) vectorised sampling per draw)."""
    rows, n = p.shape
    prob = np.ones((rows, n))
    alias = np.tile(np.arange(n), (rows, 1))
    for r in range(rows):
        scaled = p[r] * n
        small = [i for i in range(n) if scaled[i] < 1.0]
        large = [i for i in range(n) if scaled[i] >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[r, s] = scaled[s]
            alias[r, s] = g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias


def make_chain(spec: SyntheticSpec) -> Chain:
    """The seeded global chain (function transitions and content probabilities)."""
    rng = _rng(spec, _STREAM_CHAIN)
    trans_f = _dirichlet(rng, spec.function_concentration, (spec.vocab_size, spec.n_function))
    content_prob = rng.uniform(spec.content_prob_min, spec.content_prob_max, size=spec.vocab_size)
    alias_prob, alias_idx = _alias_tables(trans_f)
    return Chain(trans_f, content_prob, alias_prob, alias_idx)


def _doc_params(spec: SyntheticSpec, rng: np.random.Generator, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Document lengths (enough docs to fill ``n_tokens`` incl. BOS) and their content distributions."""
    lengths: list[np.ndarray] = []
    total = 0
    mean = (spec.min_doc_len + spec.max_doc_len) / 2 + 1
    pmf = None if spec.length_dist == "uniform" else length_pmf(spec)
    if pmf is not None:
        mean = float((np.arange(spec.min_doc_len, spec.max_doc_len + 1) * pmf).sum()) + 1
    while total < n_tokens:
        size = int((n_tokens - total) / mean) + 4
        chunk = (rng.integers(spec.min_doc_len, spec.max_doc_len + 1, size=size) if pmf is None
                 else spec.min_doc_len + rng.choice(pmf.size, size=size, p=pmf))
        lengths.append(chunk)
        total += int((chunk + 1).sum())
    all_lengths = np.concatenate(lengths)
    n_docs = int(np.searchsorted(np.cumsum(all_lengths + 1), n_tokens) + 1)
    all_lengths = all_lengths[:n_docs]
    if spec.shared_theta:
        theta = np.repeat(_dirichlet(rng, spec.alpha, (1, spec.n_content)), n_docs, axis=0)
    else:
        theta = _dirichlet(rng, spec.alpha, (n_docs, spec.n_content))
    return all_lengths, theta


def _split_rng(spec: SyntheticSpec, split: str) -> tuple[np.random.Generator, int]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return ((_rng(spec, _STREAM_TRAIN), spec.n_train_tokens) if split == "train"
            else (_rng(spec, _STREAM_VAL), spec.n_val_tokens))


def document_params(spec: SyntheticSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, theta)`` of the documents of ``split``: regular-token counts and content distributions
    (rows over C, in content-index order), recomputed from the seed."""
    rng, n_tokens = _split_rng(spec, split)
    return _doc_params(spec, rng, n_tokens)


def generate_split(spec: SyntheticSpec, split: str, chain: Chain | None = None) -> np.ndarray:
    """The token stream (uint16) of ``split`` ("train" or "val"); val does not depend on n_train_tokens."""
    chain = make_chain(spec) if chain is None else chain
    rng, n_tokens = _split_rng(spec, split)
    lengths, theta = _doc_params(spec, rng, n_tokens)
    n_docs, max_len = len(lengths), int(lengths.max())
    # Content tokens are iid from theta_d, so each document's content draws can be made up front and consumed
    # in order; only the content/function choice and function tokens depend on the previous token.
    cum_theta = np.cumsum(theta, axis=1)
    pool = np.empty((n_docs, max_len), dtype=np.int64)
    u = rng.random((n_docs, max_len))
    for d in range(n_docs):
        pool[d] = np.minimum(np.searchsorted(cum_theta[d], u[d], side="right"), spec.n_content - 1)
    pool += spec.first_content
    out = np.empty((n_docs, max_len + 1), dtype=np.int64)
    out[:, 0] = BOS_ID
    x = np.full(n_docs, BOS_ID, dtype=np.int64)
    used = np.zeros(n_docs, dtype=np.int64)
    rows = np.arange(n_docs)
    for t in range(max_len):
        is_content = rng.random(n_docs) < chain.content_prob[x]
        j = rng.integers(spec.n_function, size=n_docs)
        keep = rng.random(n_docs) < chain.alias_prob[x, j]
        func = np.where(keep, j, chain.alias_idx[x, j]) + FIRST_REGULAR
        y = np.where(is_content, pool[rows, used], func)
        used += is_content
        out[:, t + 1] = y
        x = y
    mask = np.arange(max_len + 1)[None, :] <= lengths[:, None]
    return out[mask][:n_tokens].astype(np.uint16)


def _split_docs(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position document index and document start positions; the stream must start with BOS."""
    if tokens.size == 0 or tokens[0] != BOS_ID:
        raise ValueError("synthetic val tokens must start with BOS (1)")
    is_bos = tokens == BOS_ID
    return np.cumsum(is_bos) - 1, np.flatnonzero(is_bos)


def _earlier_counts(ci: np.ndarray, yc: np.ndarray, dc: np.ndarray,
                    n_content: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each content target (positions ``ci``, content ids ``yc``, documents ``dc``, ``ci`` ascending): n_y, the
    earlier occurrences of its token in its document, and n_all, the content tokens earlier in its document (the
    Dirichlet posterior's counts). Content positions are ordered by (doc, token, position) and counted within each
    (doc, token) group; that order and its group keys are returned too: (order, sorted keys, n_y, n_all)."""
    order = np.lexsort((ci, yc, dc))
    key = dc[order] * n_content + yc[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = key[1:] != key[:-1]
    grp_start = np.maximum.accumulate(np.where(new, np.arange(order.size), 0))
    n_y = np.empty(order.size, dtype=np.int64)
    n_y[order] = np.arange(order.size) - grp_start
    n_all = np.arange(ci.size) - np.searchsorted(dc, dc, side="left")  # ci ascending: dc is nondecreasing
    return order, key, n_y, n_all


def _target_nats(spec: SyntheticSpec, tokens: np.ndarray, chain: Chain, lengths: np.ndarray, theta: np.ndarray,
                 windows: Sequence[int] = (), context_lo: np.ndarray | None = None) -> dict[str, Any]:
    """Per-target nats (float64, one per target ``tokens[1:]``) of the chain predictors.

    ``window``: {W: nats of the reader whose posterior sees the last W tokens}; ``context`` (when
    ``context_lo`` is given): nats of the reader whose posterior sees ``tokens[context_lo[i] : i + 1]`` for the
    target ``tokens[i + 1]`` -- the context a protocol's window really gives it. Readers never look across
    their document's start (earlier documents say nothing about this one).
    """
    tok = np.asarray(tokens, dtype=np.int64)
    doc, starts = _split_docs(tok)
    complete = np.diff(starts) - 1  # lengths of the documents followed by another BOS
    n_cmp = min(complete.size, lengths.size)
    mismatch = np.flatnonzero(complete[:n_cmp] != lengths[:n_cmp])
    if mismatch.size or complete.size > lengths.size:
        where = int(mismatch[0]) if mismatch.size else lengths.size
        raise ValueError(f"val tokens do not match this spec's val stream: document {where} differs "
                         f"(got {complete.size} complete documents, the spec generates {lengths.size})")
    prev, tgt = tok[:-1], tok[1:]
    t = np.arange(1, tok.size)
    k = (t - 1) - starts[doc[:-1]]  # regular tokens already emitted in the current document
    hazard = _hazard(spec, k)
    is_bos = tgt == BOS_ID
    if np.any(tgt[~is_bos] < FIRST_REGULAR) or np.any(tgt >= spec.vocab_size):
        raise ValueError("val tokens contain control/out-of-vocab ids other than BOS: not from this spec")
    if np.any(is_bos & (hazard <= 0)) or np.any(~is_bos & (hazard >= 1)):
        raise ValueError("val document lengths are outside [min_doc_len, max_doc_len]: not from this spec")
    shared = np.empty(tgt.size)  # the nats every predictor shares: length hazard and function tokens
    shared[is_bos] = -np.log(hazard[is_bos])
    shared[~is_bos] = -np.log1p(-hazard[~is_bos])
    length = shared.copy()

    c = chain.content_prob[prev]
    fc = spec.first_content
    is_f = (tgt >= FIRST_REGULAR) & (tgt < fc)
    is_c = tgt >= fc
    shared[is_f] += -np.log(1.0 - c[is_f]) - np.log(chain.trans_f[prev[is_f], tgt[is_f] - FIRST_REGULAR])

    # content: prior mean (bigram), known theta_d, posterior predictive from the document's own prefix
    doc_t = doc[1:]
    ci = np.flatnonzero(is_c)
    yc = tgt[ci] - fc
    dc = doc_t[ci]
    if dc.size and dc.max() >= theta.shape[0]:
        raise ValueError("val tokens have more documents than this spec generates")
    base_c = -np.log(c[ci])
    known_c = base_c - np.log(theta[dc, yc])
    if spec.shared_theta:  # theta is global: the chain itself knows it, no reader of a document learns more
        bigram_c = unknown_c = known_c
    else:
        bigram_c = base_c + math.log(spec.n_content)
    order, grp_key, n_y, n_all = _earlier_counts(ci, yc, dc, spec.n_content)
    if not spec.shared_theta:
        unknown_c = base_c - np.log((spec.alpha + n_y) / (spec.n_content * spec.alpha + n_all))

    def full(content_nats: np.ndarray) -> np.ndarray:
        out = shared.copy()
        out[ci] += content_nats
        return out

    # windowed reader: only stream positions [lo, t) inform the posterior
    pos = ci + 1  # stream position of each content target
    big = tok.size + 1
    keys_sorted = grp_key * big + pos[order]
    own_key = (dc * spec.n_content + yc) * big
    content_cum = np.concatenate([[0], np.cumsum(tok >= fc)])

    def seen_from(lo_c: np.ndarray) -> np.ndarray:
        if spec.shared_theta:
            return known_c
        lo = np.maximum(starts[dc] + 1, lo_c)
        n_y_w = n_y - (np.searchsorted(keys_sorted, own_key + lo) - np.searchsorted(keys_sorted, own_key))
        n_all_w = content_cum[pos] - content_cum[lo]
        return base_c - np.log((spec.alpha + n_y_w) / (spec.n_content * spec.alpha + n_all_w))

    window_nats: dict[int, np.ndarray] = {}
    for w in windows:
        if w < 1:
            raise ValueError(f"window must be >= 1, got {w}")
        window_nats[int(w)] = full(seen_from(pos - w))
    posterior = np.zeros(tgt.size)  # content targets: -log of the document-prefix predictive within C
    posterior[ci] = unknown_c - base_c
    out: dict[str, Any] = {
        "length": length, "posterior": posterior, "is_content": is_c, "window": window_nats,
        "bigram": full(bigram_c), "known": full(known_c), "unknown": full(unknown_c), "is_bos": is_bos, "doc": doc_t,
        "n_docs": int(starts.size), "content_fraction": float(ci.size / max(1, (~is_bos).sum()))}
    if context_lo is not None:
        lo_all = np.asarray(context_lo, dtype=np.int64)
        if lo_all.shape != tgt.shape or np.any(lo_all < 0) or np.any(lo_all > t - 1):
            raise ValueError("context_lo needs one start per target, each in [0, target position - 1]")
        out["context"] = full(seen_from(lo_all[ci]))
    return out


def _val_nats(spec: SyntheticSpec, val_tokens: np.ndarray | Any, **kw: Any) -> tuple[np.ndarray, dict[str, Any], int]:
    """(tokens, :func:`_target_nats` of them against this spec's val stream, regular targets = bytes)."""
    tokens = np.asarray(val_tokens.cpu().numpy() if hasattr(val_tokens, "cpu") else val_tokens).astype(np.int64)
    if tokens.ndim != 1 or tokens.size < 2:
        raise ValueError("val_tokens must be a 1-D stream of at least 2 tokens")
    r = _target_nats(spec, tokens, make_chain(spec), *document_params(spec, "val"), **kw)
    n_bytes = int((~r["is_bos"]).sum())
    if n_bytes == 0:
        raise ValueError("val_tokens contain no regular (byte-carrying) targets")
    return tokens, r, n_bytes


def synthetic_bounds(spec: SyntheticSpec, val_tokens: np.ndarray | Any,
                     windows: Sequence[int] = ()) -> dict[str, float]:
    """Reference bpb values for ``val_tokens`` (a prefix of this spec's val stream, starting with BOS).

    ``unigram_bpb``: cross-entropy of the val tokens' own empirical unigram distribution (BOS included as a
    symbol) — the best any context-free predictor can do on this data.
    ``bigram_bpb``: the true chain with each document's content distribution replaced by its prior mean.
    ``bayes_unknown_bpb``: the exact Bayes posterior predictive of a reader of the whole document prefix,
    content probability ``c(x) (alpha + n_y) / (|C| alpha + N)``.
    ``bayes_known_bpb``: the true generating distribution (document content distribution known).
    ``bayes_window{W}_bpb`` (for each W in ``windows``): the Bayes reader whose posterior only sees the last W
    tokens, i.e. the best a model with a W-token context can do without adapting; the gap to
    ``bayes_unknown_bpb`` is what test-time adaptation over the whole document can add.
    """
    tokens, r, n_bytes = _val_nats(spec, val_tokens, windows=windows)
    counts = np.bincount(tokens[1:], minlength=spec.vocab_size).astype(np.float64)
    p = counts / counts.sum()
    unigram_nats = float(-(counts[counts > 0] * np.log(p[counts > 0])).sum())
    ln2 = math.log(2.0)
    return {"unigram_bpb": unigram_nats / ln2 / n_bytes,
            **{f"{k}_bpb": float(r[n].sum()) / ln2 / n_bytes
               for k, n in (("bigram", "bigram"), ("bayes_unknown", "unknown"), ("bayes_known", "known"))},
            **{f"bayes_window{w}_bpb": float(v.sum()) / ln2 / n_bytes for w, v in r["window"].items()},
            "n_tokens": int(tokens.size), "n_bytes": n_bytes, "n_docs": r["n_docs"],
            "content_fraction": r["content_fraction"]}


def protocol_bounds(spec: SyntheticSpec, val_tokens: np.ndarray | Any, context_lo: np.ndarray) -> dict[str, Any]:
    """The exact Bayes bounds a protocol's scored tokens face, per target and per document.

    ``context_lo[i]``: the first stream position the window scoring target ``tokens[i + 1]`` feeds (a sliding
    plan at stride S gives each target between W - S + 1 and W tokens, its own input token included, fewer at a
    document's start;
    ``metattt.eval.windows.context_starts`` computes it from a plan). ``window_bpb``: the Bayes reader of exactly
    that context (what a model of this context can reach without adapting); ``document_bpb``: the reader of the
    whole document prefix (``bayes_unknown_bpb``); ``room_bpb`` their difference, what adapting beyond the window
    can add on these very targets. ``doc_window_nats`` / ``doc_document_nats`` / ``doc_bytes`` (per document of
    the stream) let a bootstrap resample documents together with their room.
    """
    _, r, n_bytes = _val_nats(spec, val_tokens, context_lo=context_lo)
    nb = (~r["is_bos"]).astype(np.float64)
    ln2 = math.log(2.0)
    win, docb = r["context"], r["unknown"]
    per_doc = {k: np.bincount(r["doc"], weights=w, minlength=r["n_docs"])
               for k, w in (("doc_window_nats", win), ("doc_document_nats", docb), ("doc_bytes", nb))}
    return {"window_bpb": float(win.sum()) / ln2 / n_bytes, "document_bpb": float(docb.sum()) / ln2 / n_bytes,
            "room_bpb": float((win - docb).sum()) / ln2 / n_bytes, "window_nats": win, "document_nats": docb,
            **per_doc, "n_bytes": n_bytes}


def document_cache_nats(spec: SyntheticSpec, val_tokens: np.ndarray | Any) -> dict[str, np.ndarray]:
    """Per target ``tokens[1:]``: what a Bayes reader of the document prefix knows beyond any chain, in nats --
    ``length`` (-log of the document-length hazard's BOS / not-BOS probability) and ``posterior`` (content targets:
    -log of the predictive ``(alpha + n_y) / (|C| alpha + N)`` within the content set, from the document's earlier
    content tokens; 0 elsewhere) -- and ``is_content`` / ``is_bos`` masks. Only tokens before each target count.

    Computed from the tokens alone (any stream starting with BOS, not only this spec's val stream): the
    evaluator's audit scores perturbed copies of the stream, whose impossible events get infinite nats."""
    tok = np.asarray(val_tokens.cpu().numpy() if hasattr(val_tokens, "cpu") else val_tokens).astype(np.int64)
    doc, starts = _split_docs(tok)
    tgt = tok[1:]
    k = np.arange(tgt.size) - starts[doc[:-1]]  # regular tokens already emitted in the current document
    hazard = _hazard(spec, k)
    is_bos = tgt == BOS_ID
    with np.errstate(divide="ignore"):
        length = np.where(is_bos, -np.log(hazard), -np.log1p(-hazard))
    is_c = (tgt >= spec.first_content) & (tgt < spec.vocab_size)
    ci = np.flatnonzero(is_c)
    yc, dc = tgt[ci] - spec.first_content, doc[1:][ci]
    posterior = np.zeros(tgt.size)
    if spec.shared_theta:  # the global theta: the document adds nothing a chain does not know
        theta = document_params(spec, "val")[1][0]
        posterior[ci] = -np.log(theta[yc])
    elif ci.size:
        _, _, n_y, n_all = _earlier_counts(ci, yc, dc, spec.n_content)
        posterior[ci] = -np.log((spec.alpha + n_y) / (spec.n_content * spec.alpha + n_all))
    return {"length": length, "posterior": posterior, "is_content": is_c, "is_bos": is_bos}


def _shard_names(prefix: str, n_tokens: int, shard_tokens: int) -> list[str]:
    return [f"{prefix}_{i:06d}.bin" for i in range(max(1, -(-n_tokens // shard_tokens)))]


def _existing_ok(out: Path, meta: dict[str, Any]) -> bool:
    try:
        for split in ("train", "val"):
            sizes = [read_shard_header(out / name) for name in meta["files"][split]]
            if sum(sizes) != meta[f"n_{split}_tokens"]:
                return False
        extra = {p.name for p in out.glob("train_*.bin")} | {p.name for p in out.glob("val_*.bin")}
        return extra == set(meta["files"]["train"]) | set(meta["files"]["val"])
    except (OSError, ValueError, KeyError):
        return False


def _with_patterns(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "dir": str(out), "train_pattern": str(out / "train_*.bin"), "val_pattern": str(out / "val_*.bin")}


class CorpusClashError(ValueError):
    """The output directory holds files this generator did not make for this spec: they are never deleted."""


GENERATING = ".generating.json"  # written before the shards, removed after meta.json: marks an interrupted run


def _spec_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diff = [f"{k} {old.get(k)!r} there vs {new.get(k)!r} here" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diff) or "same fields"


def _claim(out: Path, spec: SyntheticSpec) -> dict[str, Any] | None:
    """The reusable metadata of ``out`` for ``spec``, None when ``out`` may be (re)generated for it, or raise
    :class:`CorpusClashError` when it holds another spec's corpus or files of unknown origin."""
    mine: dict[str, Any] = {"generator_version": GENERATOR_VERSION, "spec": spec.to_dict()}
    for fname in ("meta.json", GENERATING):
        path = out / fname
        if not path.is_file():
            continue
        try:
            old = json.loads(path.read_text())
            old_mine = {"generator_version": old["generator_version"], "spec": old["spec"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorpusClashError(f"{path} is unreadable ({e}); not regenerating over it: remove {out} or choose "
                                   "another directory") from e
        if old_mine != mine:
            what = (f"generator version {old_mine['generator_version']} there vs {GENERATOR_VERSION} here"
                    if old_mine["generator_version"] != GENERATOR_VERSION else _spec_diff(old_mine["spec"], mine["spec"]))
            raise CorpusClashError(f"{out} holds a synthetic corpus made for another spec ({what}); it is never "
                                   "deleted: choose another directory")
        if fname == "meta.json" and _existing_ok(out, old):
            return old
        return None  # our own corpus, damaged or interrupted: regenerate it
    stray = sorted(p.name for p in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")))
    if stray:
        raise CorpusClashError(f"{out} holds shards ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}) "
                               "without a synthetic meta.json: not made by this generator; choose another directory")
    return None


def make_synthetic_dataset(out_dir: str | os.PathLike, spec: SyntheticSpec | None = None) -> dict[str, Any]:
    """Write train/val shards and ``meta.json`` for ``spec`` into ``out_dir``; reuse them if already there.

    Returns the metadata (spec, vocab, lut kind, bounds, file lists) plus absolute ``train_pattern`` /
    ``val_pattern``. A directory holding another spec's corpus (or shards of unknown origin) is refused with
    :class:`CorpusClashError`, never overwritten; one holding this spec's corpus, damaged or interrupted
    (``meta.json`` is written last), is regenerated.
    """
    spec = SyntheticSpec() if spec is None else spec
    out = Path(out_dir)
    meta_path = out / "meta.json"
    if out.exists() and not out.is_dir():
        raise CorpusClashError(f"synthetic corpus directory {out} is a file")
    old = _claim(out, spec) if out.is_dir() else None
    if old is not None:
        return {**_with_patterns(out, old), "reused": True}
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / GENERATING, json.dumps({"generator_version": GENERATOR_VERSION, "spec": spec.to_dict()}))
    if meta_path.exists():
        meta_path.unlink()
    for stale in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        stale.unlink()  # this spec's own shards (checked by _claim)
    chain = make_chain(spec)
    files: dict[str, list[str]] = {}
    val_tokens = None
    for split in ("val", "train"):
        tokens = generate_split(spec, split, chain)
        names = _shard_names(split, tokens.size, spec.shard_tokens)
        for i, name in enumerate(names):
            write_shard(out / name, tokens[i * spec.shard_tokens : (i + 1) * spec.shard_tokens], spec.vocab_size)
        files[split] = names
        if split == "val":
            val_tokens = tokens
    assert val_tokens is not None
    bounds = synthetic_bounds(spec, val_tokens, windows=META_WINDOWS)
    meta = {"format": "metattt-synthetic", "generator_version": GENERATOR_VERSION, "spec": spec.to_dict(),
            "vocab_size": spec.vocab_size, "bos_id": BOS_ID, "control_ids": list(CONTROL_IDS), "lut": "uniform",
            "bounds": bounds, "n_train_tokens": spec.n_train_tokens, "n_val_tokens": spec.n_val_tokens,
            "files": files}
    atomic_write(meta_path, json.dumps(meta, indent=2))
    (out / GENERATING).unlink()
    return {**_with_patterns(out, meta), "reused": False, "generation_seconds": time.perf_counter() - t0}


def load_synthetic_val(out_dir: str | os.PathLike) -> np.ndarray:
    """Concatenated val tokens of a synthetic dataset directory (convenience for tests and reports)."""
    out = Path(out_dir)
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.asarray(read_shard(out / n)) for n in meta["files"]["val"]])
