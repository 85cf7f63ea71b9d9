"""The exact Bayes-cache protocol (issue 30): with the true chain as the model it scores the document bound."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metattt.data.synthetic import (
    FIRST_REGULAR,
    SyntheticSpec,
    generate_split,
    make_chain,
    synthetic_bounds,
    synthetic_lut,
)
from metattt.eval import bayes_cache
from metattt.eval.protocols import EvalConfig, evaluate, parse_protocols, prepare_stream

SPEC = SyntheticSpec(vocab_size=40, n_train_tokens=10, n_val_tokens=2500, min_doc_len=40, max_doc_len=400,
                     alpha=0.5, seed=5)


def _chain_log_probs(spec: SyntheticSpec) -> np.ndarray:
    """(V, V) float64: log P(y | x) of the true chain with each document's content replaced by the prior mean."""
    chain = make_chain(spec)
    v = spec.vocab_size
    lp = np.full((v, v), -np.inf)
    with np.errstate(divide="ignore"):
        lp[:, FIRST_REGULAR:spec.first_content] = np.log(1 - chain.content_prob)[:, None] + np.log(chain.trans_f)
    lp[:, spec.first_content:] = (np.log(chain.content_prob) - math.log(spec.n_content))[:, None]
    return lp


class TrueChain(torch.nn.Module):
    """A 'model' whose logits are the true chain's log-probabilities of the next token given the previous one."""

    def __init__(self, spec: SyntheticSpec) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.from_numpy(np.maximum(_chain_log_probs(spec), -1e30)), False)

    def forward(self, x: torch.Tensor, params=None, **_kw) -> torch.Tensor:
        return self.table[x]


@pytest.mark.parametrize("shared", [False, True])
def test_cache_with_the_true_chain_scores_the_document_bound(shared: bool) -> None:
    spec = SyntheticSpec(**{**SPEC.to_dict(), "shared_theta": shared})
    val = generate_split(spec, "val").astype(np.int64)
    ref = synthetic_bounds(spec, val)["bayes_unknown_bpb"]
    n_bytes = int((val[1:] != 1).sum())
    # exact arithmetic path: the chain's float64 log-probs for every target
    log_q = _chain_log_probs(spec)[val[:-1]]
    nll = bayes_cache.cache_nll(spec.to_dict(), val, log_q)
    assert nll.sum() / math.log(2) / n_bytes == pytest.approx(ref, rel=1e-12)
    # the protocol through the evaluator: sliding windows, the chain as a torch module (float64 forward)
    data = prepare_stream(val, synthetic_lut(spec), "cpu", block_tokens=512, vocab_size=spec.vocab_size)
    specs = bayes_cache.bind(parse_protocols("bayes-cache"), {"data": "synthetic", "synthetic_spec": spec.to_dict()})
    assert [s.name for s in specs] == ["flat", "sliding", "bayes-cache"]
    ev = evaluate(TrueChain(spec), data, specs, {}, EvalConfig(seq_len=64, context=64, stride=16, autocast=False))
    r = ev.results["bayes-cache"]
    assert r.nats / math.log(2) / n_bytes == pytest.approx(ref, rel=1e-9)
    assert r.ledger["legal"] and r.ledger["n_scored_positions"] == val.size - 1 and r.ledger["n_updates"] > 1
    # a model that knows nothing of documents: the bigram bound, above the cache
    sliding = ev.results["sliding"].nats / math.log(2) / data.target_bytes.sum()
    if not shared:
        assert sliding > r.nats / math.log(2) / n_bytes + 0.05


def test_cache_reads_only_the_prefix() -> None:
    val = generate_split(SPEC, "val").astype(np.int64)
    base = bayes_cache.cache_nll(SPEC.to_dict(), val, _chain_log_probs(SPEC)[val[:-1]])
    p = int(np.flatnonzero(val >= SPEC.first_content)[200])  # a content token inside the stream
    other = val.copy()
    other[p] = SPEC.first_content + (val[p] - SPEC.first_content + 1) % SPEC.n_content
    changed = bayes_cache.cache_nll(SPEC.to_dict(), other, _chain_log_probs(SPEC)[other[:-1]])
    assert np.array_equal(base[: p - 1], changed[: p - 1])  # targets before position p never saw it
    assert not np.array_equal(base[p - 1:], changed[p - 1:])


def test_bind_needs_a_synthetic_artifact() -> None:
    specs = parse_protocols("sliding,bayes-cache")
    with pytest.raises(ValueError, match="needs an artifact trained on the synthetic corpus"):
        bayes_cache.bind(specs, {"data": "shards"})
