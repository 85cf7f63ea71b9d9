"""Black-box future-perturbation audit: legality checked against what adapter code *does*, not what it declares.

The ledger proves that the positions the evaluation loop *handed* to an update were scored first; any in-process
code can still read the token stream some other way (a ``DocLoRA`` subclass training on the chunk it is about to
score, a plug-in that peeks at the next chunk, a monkeypatched loop). The audit does not look at code: it re-runs
a protocol on a copy of (a prefix of) the stream whose tokens from a position ``q`` on are replaced, and requires
that every target scored before ``q`` -- by the ledger's own clock: scored at an earlier step, or in the same
forward at an earlier position -- keeps its nats. A legal protocol's score of target ``p`` is a function of
tokens the evaluation had already scored, so nothing at or after ``q`` may move it; a change is a legality
violation (:class:`AuditError`, a :class:`LegalityError`: exit 3).

Two perturbations, each at seeded points ``q`` inside one document of the prefix:

* ``tokens``: tokens ``q .. end of the document`` replaced by random non-BOS tokens; every BOS stays, so the
  document queue, windows and chunks are those of the unperturbed run. Compared: every target scored before q.
* ``boundary``: a BOS written at ``q`` (the document now ends there; the rest becomes a document of its own).
  Compared: the targets of q's document before q. This catches computations that depend on where a document
  ends, e.g. a RoPE base taken from a forward's own length (issue 28). q lies within the protocol's first window
  of the document: beyond it, document-isolated sliding windows (``doc-sliding``, and ``docttt``'s chunk windows)
  place a document's *last* window by its end (shifted back to end at the BOS, so its targets get more context):
  a dependence on the document's end that these protocols have by design (up to 5e-3 nats on the tiny test
  model), which this check would otherwise report. Run for ``doc-chunk`` but not for ``docttt:`` adapters: their
  queue is sorted by length, so where a document ends decides its batch, hence its LoRA's random init (drawn
  per batch) and, with phases, what the base was trained on before it is scored -- by the protocol's design too
  (the ``tokens`` perturbation, which keeps every document's length, covers them).

On CPU the ``tokens`` comparison is exact (tolerance 0; ``boundary``: ``BOUNDARY_TOL``). On CUDA the re-runs
are float32 whatever ``--no-autocast`` says (bf16 test-time updates are chaotic at the level of single targets:
two honest bf16 runs differed by up to 0.25 nats on one target, float32 runs not at all), and a tolerance still
applies for atomics in backward kernels (``AuditConfig.tol``; an unperturbed repeat is run to show the noise, and
where it alone exceeds the tolerance the audit is :class:`AuditInconclusive`: it cannot judge, which is not a
finding of illegality). ``oracle:`` adapts before scoring by design: it is expected to fail, which is reported,
not refused. The audit runs on a bounded prefix (``prefix_tokens``), so it costs a few prefix re-runs per
protocol (docs/benchmarks.md); what it cannot catch is in docs/adapters.md "Trust model".
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch

from .docttt_spec import DocTTTSpec
from .ledger import Ledger, LegalityError
from .windows import doc_ids, doc_starts

if TYPE_CHECKING:
    from ..model.gpt import BankedGPT
    from .scoring import AdapterFactory, AdapterLike

CUDA_TOL = 1e-3  # nats per target on CUDA, where the re-runs are float32 (0.0 measured on an H100, docs/benchmarks.md)
#: a moved BOS regroups documents (the docttt queue is sorted by length) and shortens windows, so the compared
#: targets are computed in forwards of other shapes, whose float32 sums round differently (3.6e-7 nats seen on
#: the tiny test model); a leak such as a RoPE base taken from a forward's length is orders of magnitude larger
BOUNDARY_TOL = 1e-5


class AuditError(LegalityError):
    """A protocol's scores before position q changed when tokens from q on were replaced: it read the future."""


class AuditInconclusive(AuditError):
    """An unperturbed re-run already moved scores past the tolerance (nondeterministic GPU kernels, amplified by
    large test-time updates): at that tolerance the audit cannot tell a leak from noise, so it certifies nothing.
    Not a finding of illegality; still an error, since the evaluation's legality is then unchecked."""


@dataclass(frozen=True)
class AuditConfig:
    """How much to audit: ``points`` token perturbations and ``boundary_points`` BOS moves per protocol, on a
    prefix of ``prefix_tokens`` tokens (None: ``default_prefix``), seeded; ``tol``: allowed |Δ nats| per target
    (None: 0 on CPU, ``CUDA_TOL`` on CUDA)."""

    points: int = 2
    boundary_points: int = 1
    prefix_tokens: int | None = None
    seed: int = 0
    tol: float | None = None

    def __post_init__(self) -> None:
        if self.points < 0 or self.boundary_points < 0 or self.points + self.boundary_points < 1:
            raise ValueError("the audit needs at least one perturbation point")
        if self.prefix_tokens is not None and self.prefix_tokens < 16:
            raise ValueError(f"audit prefix must be at least 16 tokens, got {self.prefix_tokens}")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"audit tolerance must be >= 0, got {self.tol}")

    def tolerance(self, device: torch.device, kind: str = "tokens") -> float:
        tol = float(self.tol) if self.tol is not None else (CUDA_TOL if device.type == "cuda" else 0.0)
        return max(tol, BOUNDARY_TOL) if kind == "boundary" else tol


# ------------------------------------------------------------------------------------------------ streams
def sub_stream(data: Any, tokens_np: np.ndarray) -> Any:
    """A ``StreamData`` over ``tokens_np`` (a prefix of ``data``'s stream, possibly perturbed): document ids
    and starts recomputed, bytes those of the original prefix (only nats are compared)."""
    m = int(tokens_np.size)
    t = torch.from_numpy(np.ascontiguousarray(tokens_np)).to(data.tokens.device)
    return replace(data, tokens=t, tokens_np=tokens_np, target_bytes=data.target_bytes[: m - 1],
                   doc_of_target=doc_ids(tokens_np, data.bos_id), starts=doc_starts(tokens_np, data.bos_id))


def default_prefix(spec: Any, data: Any, cfg: Any) -> tuple[int, str]:
    """(prefix tokens, why): 4 chunks for ``run_stream`` protocols (2 when that would exceed 1/16 of the
    stream: a short evaluation's audit stays a fraction of it); for the document-batched family the tokens
    of the first ``2 * docs`` documents (two batches, so a phase can run), at most an eighth of the documents,
    at least 8."""
    n = data.n_tokens
    if isinstance(spec, DocTTTSpec):  # a short stream: an eighth of its documents (at least 8)
        k = max(8, min(2 * spec.docs, data.n_docs // 8))
        m = int(data.starts[k]) + 1 if data.starts.size > k else n  # + the next BOS: its target ends the last doc
        return min(m, n), f"the first {min(k, data.n_docs)} documents"
    m = min(n, max(2 * cfg.chunk_tokens, min(4 * cfg.chunk_tokens, n // 16)))  # a short stream: 2 chunks
    return m, f"the first {-(-m // cfg.chunk_tokens)} chunks"


def audit_spec(spec: Any, prefix_docs: int) -> Any:
    """The protocol as audited on a prefix: the same code, with ``docs`` per batch at most half the prefix's
    documents (two batches at least) and ``phase_docs`` at most one batch, so every phase falls before the
    prefix's last batch (on the full stream ``phase_docs`` is usually more than the prefix holds)."""
    if not isinstance(spec, DocTTTSpec):
        return spec
    docs = min(spec.docs, max(1, prefix_docs // 2))
    out = replace(spec, docs=docs) if docs != spec.docs else spec
    if spec.phases and spec.phase_docs > docs:
        out = replace(out, phase_docs=docs)
    return out


def pick_points(tokens_np: np.ndarray, bos_id: int, k: int, rng: np.random.Generator,
                within: int | None = None, after: int = 0) -> list[tuple[int, int, int]]:
    """``k`` points (q, document start a, document end e) inside documents with at least 3 targets, documents
    drawn with probability proportional to their room (without replacement while possible), q uniform in
    ``[a+2, e-1]`` (targets a+1..q-1 of the document come before q), below ``a + within`` if given and at or
    after ``after`` (a stream protocol's second chunk: a peek at the next chunk shows only from there; when no
    document has room there, anywhere)."""
    starts = doc_starts(tokens_np, bos_id)
    ends = np.concatenate((starts[1:], [tokens_np.size]))
    first = np.maximum(starts + 2, after)
    room = (ends if within is None else np.minimum(ends, starts + within)) - first
    if after and not (room >= 1).any():
        return pick_points(tokens_np, bos_id, k, rng, within)
    ok = np.flatnonzero(room >= 1)
    if ok.size == 0 or k == 0:
        return []
    w = room[ok].astype(np.float64)
    pick = rng.choice(ok, size=k, replace=k > ok.size, p=w / w.sum())
    out = []
    for d in pick:
        a, e = int(starts[d]), int(ends[d])
        out.append((int(rng.integers(first[d], first[d] + room[d])), a, e))
    return out


def perturb(tokens_np: np.ndarray, q: int, e: int, kind: str, bos_id: int, vocab: int,
            rng: np.random.Generator) -> np.ndarray:
    """A copy with tokens ``[q, e)`` replaced (``tokens``: random non-BOS tokens, token q surely different) or
    a BOS written at q (``boundary``)."""
    out = tokens_np.copy()
    if kind == "boundary":
        out[q] = bos_id
        return out
    n = e - q
    new = rng.integers(0, vocab - 1, size=n)
    new = np.where(new >= bos_id, new + 1, new)  # never a BOS
    if new[0] == tokens_np[q]:
        cands = [v for v in range(vocab) if v not in (bos_id, int(tokens_np[q]))]
        new[0] = cands[int(rng.integers(len(cands)))]
    out[q:e] = new
    return out


def score_steps(ledger: Ledger, n_tokens: int) -> np.ndarray:
    """Ledger step at which each target 1..n-1 was scored (index p-1); -1 where none was recorded."""
    steps = np.full(n_tokens - 1, -1, dtype=np.int64)
    for lo, hi, st in ledger.scores():
        steps[lo - 1: hi - 1] = st
    return steps


def before_mask(steps: np.ndarray, q: int) -> np.ndarray:
    """Targets the ledger says were scored before q: at an earlier step, or at q's step at a lower position (the
    same forward: causal attention keeps them from seeing q)."""
    pos = np.arange(1, steps.size + 1)
    sq = steps[q - 1]
    return (steps >= 0) & ((steps < sq) | ((steps == sq) & (pos < q)))


# ------------------------------------------------------------------------------------------------ one protocol
def audit_protocol(spec: Any, run: Callable[[Any, Any], Any], data: Any, cfg: Any, device: torch.device,
                   acfg: AuditConfig = AuditConfig(), vocab: int | None = None) -> dict[str, Any]:
    """Audit one protocol. ``run(spec, stream_data) -> ProtocolResult`` runs it (its ledger verified) on a
    stream. Returns what was checked; raises :class:`AuditError` when a legal protocol fails (an oracle's
    failure is returned, marked expected)."""
    t0 = time.perf_counter()
    m, what = (acfg.prefix_tokens, f"the first {acfg.prefix_tokens} tokens") if acfg.prefix_tokens else \
        default_prefix(spec, data, cfg)
    m = min(int(m), data.n_tokens)
    toks = np.asarray(data.tokens_np[:m])
    base_data = sub_stream(data, toks)
    spec_a = audit_spec(spec, base_data.n_docs)
    vocab = int(vocab if vocab is not None else int(toks.max()) + 1)
    # the same points for every protocol of one prefix: seeded by the prefix only
    rng = np.random.default_rng([acfg.seed, m])
    ref = run(spec_a, base_data)
    ref_nll = ref.stream.token_nll.astype(np.float64)
    steps = score_steps(ref.stream.ledger, m)
    rec: dict[str, Any] = {"prefix_tokens": m, "prefix": what, "prefix_docs": int(base_data.n_docs),
                           "tolerance": acfg.tolerance(device), "checks": []}
    if spec_a is not spec:
        rec["audited_as"] = spec_a.name
    if device.type == "cuda":  # the noise an unperturbed re-run shows (the tolerance must sit above it)
        again = run(spec_a, base_data).stream.token_nll.astype(np.float64)
        rec["rerun_max_diff"] = float(np.abs(again - ref_nll).max()) if again.size else 0.0
        if rec["rerun_max_diff"] > rec["tolerance"]:
            rec["status"], rec["seconds"] = "inconclusive", time.perf_counter() - t0
            raise AuditInconclusive(
                f"audit of {spec.name!r} is inconclusive, not a legality finding: an unperturbed re-run on {what} of "
                f"the stream moved scores by up to {rec['rerun_max_diff']:.3g} nats, above the tolerance "
                f"{rec['tolerance']:g}, so no perturbation could be judged; set --audit-tol above that noise (it "
                "then detects only larger leaks), audit on the CPU (exact), or pass --no-audit")
    after = 0 if isinstance(spec, DocTTTSpec) else min(cfg.chunk_tokens, m // 2)
    points = [("tokens", p) for p in pick_points(toks, data.bos_id, acfg.points, rng, after=after)]
    if not isinstance(spec, DocTTTSpec) or spec.adapter is None:
        window = spec.window if isinstance(spec, DocTTTSpec) else cfg.window_len(spec.windows)
        points += [("boundary", p) for p in pick_points(toks, data.bos_id, acfg.boundary_points, rng, window,
                                                        after)]
    else:
        rec["boundary_skipped"] = ("docttt adapters: the length-sorted queue decides a document's batch, hence its "
                                   "LoRA init and what phases trained the base on, so moving a document's end "
                                   "moves its scores by design")
    failures = []
    for kind, (q, a, e) in points:
        pert = perturb(toks, q, e, kind, data.bos_id, vocab, rng)
        out = run(spec_a, sub_stream(data, pert)).stream.token_nll.astype(np.float64)
        mask = before_mask(steps, q)
        if kind == "boundary":
            pos = np.arange(1, m)
            mask &= (pos > a) & (pos < q)
        same = (out == ref_nll) | (np.isnan(out) & np.isnan(ref_nll))  # a diverged run's NaNs on both sides
        diff = np.where(same, 0.0, np.abs(out - ref_nll))[mask]
        diff = np.where(np.isnan(diff), np.inf, diff)
        tol = acfg.tolerance(device, kind)
        bad = np.flatnonzero(mask)[diff > tol] + 1 if diff.size else np.array([], dtype=np.int64)
        chk = {"kind": kind, "q": int(q), "doc_start": int(a), "doc_end": int(e), "compared": int(mask.sum()),
               "max_diff": float(diff.max()) if diff.size else 0.0, "changed": int(bad.size), "tolerance": tol}
        rec["checks"].append(chk)
        if bad.size:
            failures.append((chk, int(bad[0])))
    rec["targets_compared"] = int(sum(c["compared"] for c in rec["checks"]))
    rec["max_diff"] = max((c["max_diff"] for c in rec["checks"]), default=0.0)
    rec["seconds"] = time.perf_counter() - t0
    if not failures:
        rec["status"] = "pass" if rec["targets_compared"] else "nothing compared (no document of the prefix has room)"
        return rec
    chk, first = failures[0]
    msg = (f"audit of {spec.name!r}: {'a BOS written' if chk['kind'] == 'boundary' else 'tokens replaced'} at "
           f"q={chk['q']} (document [{chk['doc_start']}, {chk['doc_end']})) changed {chk['changed']} of the "
           f"{chk['compared']} targets scored before q (first: position {first}; max |diff| {chk['max_diff']:.3g} "
           f"nats > tolerance {chk['tolerance']:g}); on {what} of the stream"
           + (f"; an unperturbed re-run moved scores by up to {rec['rerun_max_diff']:.3g}" if "rerun_max_diff" in rec
              else ""))
    if not spec.legal:
        rec["status"] = "fail (expected: oracle adapts before it scores; not a legal score)"
        rec["failure"] = msg
        return rec
    rec["status"] = "fail"
    raise AuditError(f"ILLEGAL evaluation {spec.name!r}: {msg}"
                     + (f" and {len(failures) - 1} more failing points" if len(failures) > 1 else "")
                     + ". Its scores depend on tokens it had not scored yet.")


def run_audit(model: BankedGPT, data: Any, specs: list[Any], adapters: Mapping[str, AdapterLike] | AdapterFactory,
              cfg: Any, acfg: AuditConfig = AuditConfig(), ctx: Any = None, scorer: Any = None,
              extras: Mapping[str, torch.Tensor] | None = None, log: Callable[[str], None] | None = None
              ) -> dict[str, Any]:
    """Audit every protocol of ``specs`` (adapters as for ``protocols.evaluate``); the summary for eval.json.
    Raises :class:`AuditError` at the first legal protocol that fails."""
    from .protocols import build_plan, run_protocol

    t0 = time.perf_counter()
    device = data.tokens.device
    # On CUDA the audit's re-runs are float32: under bf16 autocast a test-time update amplifies rounding into
    # per-target differences of up to 0.25 nats between two honest runs (H100, ttt:sgd on a 0.6M-parameter
    # model, docs/benchmarks.md), while float32 re-runs agree exactly. What the audit tests -- which tokens an
    # update reads -- does not depend on the precision, so float32 costs time, not coverage.
    fp32 = device.type == "cuda" and cfg.autocast
    quiet = replace(cfg, progress=False, autocast=False) if fp32 else replace(cfg, progress=False)
    if fp32:
        scorer = None  # the compiled scorer was traced under autocast: the eager model serves the float32 re-runs
    out: dict[str, Any] = {"ran": True, "config": asdict(acfg), "protocols": {},
                           "precision": "float32" if fp32 or not cfg.autocast or device.type != "cuda" else "bf16"}

    for spec in specs:
        adapter: AdapterLike | None = None
        if spec.adapter is not None and not isinstance(spec, DocTTTSpec):
            adapter = adapters(spec.adapter) if callable(adapters) else adapters[spec.adapter]

        def run(s: Any, d: Any, adapter: AdapterLike | None = adapter) -> Any:
            plan = None if isinstance(s, DocTTTSpec) else build_plan(s.windows, d, quiet)
            return run_protocol(s, model, d, plan, quiet, adapter, ctx, scorer, extras)

        rec = audit_protocol(spec, run, data, quiet, device, acfg, vocab=int(model.cfg.vocab_size))
        out["protocols"][spec.name] = rec
        if log is not None:
            log(f"audit {spec.name:<22} {rec['status']}: {len(rec['checks'])} points, {rec['targets_compared']:,} "
                f"targets compared, max |diff| {rec['max_diff']:.3g} (tol {rec['tolerance']:g}"
                + (f", re-run noise {rec['rerun_max_diff']:.3g}" if "rerun_max_diff" in rec else "")
                + f"), {rec['prefix']}, {rec['seconds']:.1f}s")
    out["seconds"] = time.perf_counter() - t0
    return out
