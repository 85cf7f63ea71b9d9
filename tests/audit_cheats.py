"""Adapters that cheat where the ledger cannot see it (issue 28): they reach the token stream through the
evaluator's stack frames -- any in-process code can -- and train on tokens not yet scored, while the positions
the loop records for them stay honest. Only the black-box audit (``metattt.eval.audit``) can catch them. Used by
tests/test_eval_audit.py, in-process and as ``--adapter-module`` plug-ins."""
from __future__ import annotations

import sys
from typing import Any

import torch

from metattt.ttt.doclora import DocLoRA
from metattt.ttt.sgd import SGDAdapter


def caller_locals(fn_name: str) -> dict[str, Any]:
    """The local variables of the nearest caller named ``fn_name`` (the evaluator's loop)."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_name != fn_name:
        f = f.f_back
    if f is None:
        raise RuntimeError(f"not called from {fn_name}")
    return f.f_locals


class ChunkPeekDocLoRA(DocLoRA):
    """Trains on the chunk it is about to score: one SGD step of the factors on the forward's own targets, taken
    inside ``materialize``, just before the scoring forward uses them."""

    def materialize(self, base, trainables):
        loc = caller_locals("run_batch")
        x, tgt, cols, valid, model = loc["x"], loc["tgt"], loc["cols"], loc["valid"], loc["model"]
        with torch.inference_mode(False), torch.enable_grad():
            probe = {k: v.detach().clone().requires_grad_(True) for k, v in trainables.items()}
            nll = self.loss(model, x, tgt, super().materialize(base, probe), positions=cols, reduction="none")
            grads = torch.autograd.grad(torch.where(valid, nll, 0.0).sum(), list(probe.values()))
        peeked = {k: v - 0.05 * g.detach() for (k, v), g in zip(trainables.items(), grads)}
        return super().materialize(base, peeked)


def _train_rows_on(ad: DocLoRA, tr: dict, spans: list[tuple[int, int]]) -> dict:
    """One AdamW step of every row's factors on the tokens ``spans[row]`` (whole documents)."""
    loc = caller_locals("run_docttt")
    tokens, model = loc["tokens"], loc["model"]
    with torch.inference_mode(False), torch.enable_grad():
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tr.items()}
        loss = 0.0
        for i, (a, e) in enumerate(spans):
            row = {k: v[i:i + 1] for k, v in leaves.items()}
            x, y = tokens[a:e][None], tokens[a + 1:e + 1][None]
            loss = loss + ad.loss(model, x, y, DocLoRA.materialize(ad, {}, row), reduction="sum")
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return ad.step(tr, ad.init(tr), dict(zip(leaves, grads)))[0]


class SelfTrainDocLoRA(DocLoRA):
    """Trains each document's factors on the whole document before any of it is scored."""

    def start(self, base, rows, key=0, carry=None):
        tr = super().start(base, rows, key, carry)
        loc = caller_locals("run_docttt")
        return _train_rows_on(self, tr, [(int(a), int(e)) for a, e in zip(loc["a"], loc["e"])])


class NextDocDocLoRA(DocLoRA):
    """Trains each document's factors on the document queued after it (not yet scored)."""

    def start(self, base, rows, key=0, carry=None):
        tr = super().start(base, rows, key, carry)
        loc = caller_locals("run_docttt")
        q, idx = loc["queue"], loc["idx"]
        nxt = [min(int(i) + 1, q.a.size - 1) for i in idx]
        return _train_rows_on(self, tr, [(int(q.a[j]), int(q.e[j])) for j in nxt])


class NextChunkAdapt(SGDAdapter):
    """A ``ttt:`` adapter whose ``adapt`` also trains on the next chunk (it declares only the scored one)."""

    name = "nextchunk"

    def adapt(self, model, x, y, progress=0.0, *, autocast=True):
        loc = caller_locals("run_stream")
        chunks, chunk, tokens = loc["chunks"], loc["chunk"], loc["tokens"]
        if chunk.index + 1 < len(chunks):
            nxt = chunks[chunk.index + 1]
            seq = tokens[nxt.lo - 1: nxt.hi]
            super().adapt(model, seq[:-1][None], seq[1:][None], progress, autocast=autocast)
        return super().adapt(model, x, y, progress, autocast=autocast)
