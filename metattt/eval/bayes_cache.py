"""``bayes-cache``: the exact Bayes cache of the synthetic corpus, the reference any adapter is compared with.

On the synthetic corpus (metattt.data.synthetic) everything a reader of the whole document prefix knows beyond a
chain is two exact quantities: the document-length hazard (when BOS comes) and the Dirichlet posterior of the
document's content distribution, ``(alpha + n_y) / (|C| alpha + N)`` from the document's earlier content tokens.
This protocol scores each target with the model's sliding-window prediction and mixes that cache in:

    P(BOS) = h,    P(y) = (1 - h) q(y) for a function token,    P(y) = (1 - h) q(C) post(y) for a content token,

where ``q`` is the model's distribution renormalised over the regular tokens and ``q(C)`` its mass on the content
set. The model keeps what it is for (function tokens and the content/function split); the cache supplies the
document. With the model replaced by the true chain this scores exactly the document bound (``bayes_unknown``).

Legal and gradient-free: target ``p`` uses counts of tokens before ``p`` only; the ledger records the cache
absorbing each window's targets after they are scored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .spec import ProtocolSpec, Spec

FAMILY = "bayes-cache"


@dataclass(frozen=True)
class BayesCacheSpec(Spec):
    """The protocol; ``synthetic`` (the corpus spec, from the artifact's metadata) is bound before it runs."""

    synthetic: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    windows: str = "sliding"
    mode: str = FAMILY
    adapter: None = None

    @property
    def name(self) -> str:
        return FAMILY

    @property
    def base(self) -> str:
        return self.windows

    @property
    def order(self) -> tuple:
        return (2,)

    def requires(self) -> list[Spec]:
        return [ProtocolSpec("flat"), ProtocolSpec(self.windows)]


def is_bayes_cache(text: str) -> bool:
    return text.strip() == FAMILY


def bind(specs: list[Any], artifact_meta: dict[str, Any]) -> list[Any]:
    """``specs`` with every bayes-cache protocol given the artifact's synthetic spec (ValueError without one)."""
    out = []
    for s in specs:
        if isinstance(s, BayesCacheSpec):
            if artifact_meta.get("data") != "synthetic" or "synthetic_spec" not in artifact_meta:
                raise ValueError(f"protocol {FAMILY} needs an artifact trained on the synthetic corpus (its spec "
                                 "defines the cache); this artifact's metadata names no synthetic spec")
            s = BayesCacheSpec(synthetic=dict(artifact_meta["synthetic_spec"]), windows=s.windows)
        out.append(s)
    return out


def cache_nll(spec_dict: dict[str, Any], tokens: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """Per-target nats (targets ``tokens[1:]``) of the cache mixed with ``log_q`` ((n-1, V) model log-probs)."""
    from ..data.synthetic import SyntheticSpec

    spec = SyntheticSpec.from_dict(spec_dict)
    if log_q.shape != (tokens.size - 1, spec.vocab_size):
        raise ValueError(f"model log-probs of shape {log_q.shape} do not match {tokens.size - 1} targets x vocab "
                         f"{spec.vocab_size}")
    return _mix(spec, tokens, *_model_terms(log_q, tokens[1:].astype(np.int64), spec.first_content))


def _model_terms(log_q: np.ndarray, tgt: np.ndarray, first_content: int) -> tuple[np.ndarray, np.ndarray]:
    """Per target: log q(target) with q renormalised over the regular tokens, and log q(C) (its content mass) --
    all the cache needs of the model, so a long stream never holds (n, V) log-probs at once."""
    from ..data.synthetic import CONTROL_IDS

    lq = log_q.astype(np.float64)
    lq[:, list(CONTROL_IDS)] = -np.inf
    lq = lq - np.logaddexp.reduce(lq, axis=1, keepdims=True)  # q over the regular tokens
    return lq[np.arange(tgt.size), tgt], np.logaddexp.reduce(lq[:, first_content:], axis=1)


def _mix(spec: Any, tokens: np.ndarray, lq_tgt: np.ndarray, log_qc: np.ndarray) -> np.ndarray:
    from ..data.synthetic import document_cache_nats

    cache = document_cache_nats(spec, tokens)
    nll = cache["length"].copy()
    reg = ~cache["is_bos"]
    is_c = cache["is_content"]
    is_f = reg & ~is_c
    nll[is_f] -= lq_tgt[is_f]
    nll[is_c] += cache["posterior"][is_c] - log_qc[is_c]
    return nll


def model_terms(model: torch.nn.Module, tokens: torch.Tensor, plan: Any, batch_tokens: int,
                first_content: int) -> tuple[np.ndarray, np.ndarray]:
    """``_model_terms`` of every target of ``plan`` (position order), one batch of windows at a time."""
    from ..data.synthetic import CONTROL_IDS
    from .windows import batch_windows

    tgts, qcs = [], []
    n_tok = tokens.numel()
    tok_np = tokens.cpu().numpy()
    with torch.inference_mode():
        for a, b in batch_windows(plan.length, batch_tokens):
            starts, ln, sf = plan.start[a:b], plan.length[a:b], plan.score_from[a:b]
            t = int(ln.max())
            idx = torch.from_numpy(starts).to(tokens.device)[:, None] + torch.arange(t, device=tokens.device)
            x = tokens[idx.clamp_(max=n_tok - 1)]
            rows_np = np.repeat(np.arange(b - a), ln - sf)
            cols_np = np.concatenate([np.arange(f, l) for f, l in zip(sf, ln)])
            rows = torch.from_numpy(rows_np).to(tokens.device)
            cols = torch.from_numpy(cols_np).to(tokens.device)
            # on the device, in float64: a (scored rows, V) block never leaves it (a long stream's (n, V) would
            # not fit on the host, and numpy's logaddexp over it took minutes)
            lq = torch.log_softmax(model(x)[rows, cols].double(), dim=-1)
            lq[:, list(CONTROL_IDS)] = -torch.inf
            lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True)  # q over the regular tokens
            tgt = torch.from_numpy(tok_np[starts[rows_np] + cols_np + 1].astype(np.int64)).to(lq.device)
            tgts.append(lq.gather(1, tgt[:, None])[:, 0].cpu().numpy())
            qcs.append(torch.logsumexp(lq[:, first_content:], dim=-1).cpu().numpy())
    return np.concatenate(tgts), np.concatenate(qcs)


def run_bayes_cache(spec: BayesCacheSpec, model: torch.nn.Module, data: Any, plan: Any,
                    cfg: Any) -> tuple[Any, np.ndarray, np.ndarray, dict[str, Any], dict[str, Any]]:
    """Run the protocol on ``data`` (a protocols.StreamData) with ``plan`` (its sliding windows): the stream
    result, per-document and per-block nats, the ledger's verdict and the adapter info, which protocols.py wraps
    into its ProtocolResult (this module does not import protocols.py, which imports it)."""
    from .ledger import Ledger
    from .scoring import StreamResult

    if spec.synthetic is None:
        raise ValueError(f"protocol {FAMILY} was not bound to a synthetic spec (bayes_cache.bind)")
    ledger = Ledger(spec.name, enforce=True)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    from ..data.synthetic import SyntheticSpec

    syn = SyntheticSpec.from_dict(spec.synthetic)
    try:
        lq_tgt, log_qc = model_terms(model, data.tokens, plan, cfg.batch_tokens, syn.first_content)
    finally:
        model.train(was_training)
    if lq_tgt.size != data.n_tokens - 1:
        raise ValueError(f"the plan scored {lq_tgt.size} targets of {data.n_tokens - 1}")
    nll = _mix(syn, data.tokens_np, lq_tgt, log_qc)
    for lo, hi in zip(plan.lo, plan.hi):  # each window's targets are scored, then absorbed by the cache
        ledger.record_score(int(lo), int(hi), ledger.next_step())
        ledger.record_update([(int(lo), int(hi))], ledger.next_step())
    seconds = time.perf_counter() - t0
    summary = ledger.verify()
    stream = StreamResult(plan.name, nll.astype(np.float32), [], seconds, seconds, 0.0, plan.n_windows,
                          plan.n_windows, ledger)
    doc_nats = np.bincount(data.doc_of_target, weights=nll, minlength=data.n_docs)
    block_nats = np.bincount(data.block_of_target, weights=nll)
    info = {"adapter": FAMILY, "config": {"synthetic_spec": spec.synthetic}}
    return stream, doc_nats, block_nats, summary, info
