"""Window plans: which tokens each forward pass sees and which target positions it scores.

Positions are *target* indices into the token stream: position ``p`` (1 <= p < n_tokens) is the prediction of
``tokens[p]`` from tokens before it. Window ``i`` feeds ``tokens[start : start + length]`` and scores targets
``start + 1 + score_from .. start + length`` (inclusive), i.e. the half-open range ``[lo, hi)`` with
``lo = start + 1 + score_from`` and ``hi = start + 1 + length``.

Every plan scores every target 1..n_tokens-1 exactly once, in increasing order, so that all protocols score
the same token set (paired comparisons) and the exact-once property is a check on the interval endpoints
(``validate``) rather than on a 62M-entry counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    """Windows over a stream of ``n_tokens`` tokens (arrays of equal length, int64)."""

    name: str
    n_tokens: int
    start: np.ndarray
    length: np.ndarray
    score_from: np.ndarray

    @property
    def n_windows(self) -> int:
        return int(self.start.size)

    @property
    def lo(self) -> np.ndarray:
        """First scored target position of each window."""
        return self.start + 1 + self.score_from

    @property
    def hi(self) -> np.ndarray:
        """One past the last scored target position of each window."""
        return self.start + 1 + self.length

    @property
    def n_scored(self) -> int:
        return int((self.length - self.score_from).sum())

    @property
    def max_length(self) -> int:
        return int(self.length.max()) if self.n_windows else 0

    def validate(self, context: int | None = None) -> None:
        """Assert that every target 1..n_tokens-1 is scored exactly once and each window fits the stream."""
        n = self.n_tokens
        if n < 2:
            raise ValueError(f"{self.name}: a stream of {n} tokens has no target to score")
        lo, hi = self.lo, self.hi
        problems = []
        if np.any(self.start < 0):
            problems.append(f"window {int(np.argmax(self.start < 0))} starts before the stream")
        if np.any(hi > n):
            problems.append(f"window {int(np.argmax(hi > n))} reads past the stream end ({n} tokens)")
        if np.any(self.score_from < 0) or np.any(lo >= hi):
            bad = int(np.argmax((self.score_from < 0) | (lo >= hi)))
            problems.append(f"window {bad} scores an empty or negative range")
        if context is not None and np.any(self.length > context):
            problems.append(f"window {int(np.argmax(self.length > context))} longer than context {context}")
        if self.n_windows == 0 or lo[0] != 1 or hi[-1] != n:
            problems.append(f"scored ranges do not span targets 1..{n - 1}")
        gaps = np.flatnonzero(lo[1:] != hi[:-1])
        if gaps.size:
            i = int(gaps[0])
            problems.append(
                f"targets scored not exactly once: window {i} ends at {int(hi[i])} but window {i + 1} "
                f"starts at {int(lo[i + 1])}"
            )
        if problems:
            raise AssertionError(f"window plan {self.name!r} is invalid: " + "; ".join(problems))


def context_starts(plan: WindowPlan) -> np.ndarray:
    """Per target ``1..n_tokens-1`` (index ``p - 1``): the first stream position of the window that scores it, so
    target ``p`` is predicted from ``tokens[context_starts[p - 1] : p]`` (the exact context the plan gives it)."""
    return np.repeat(plan.start, plan.length - plan.score_from)


def _segment(a: int, e: int, context: int, stride: int, align_end: bool) -> tuple[np.ndarray, ...]:
    """Windows for inputs ``tokens[a:e]`` scoring targets ``a+1..e``.

    Sliding (``align_end``): window k ends at ``min(a + context + k*stride, e)`` and is ``context`` long
    (the last one is shifted back to end at ``e``: more context, same shape), scoring what the previous window
    did not. Flat (not ``align_end``): consecutive non-overlapping windows, the last one possibly short.
    """
    n = e - a
    if n <= 0:
        raise ValueError(f"empty segment [{a}, {e})")
    if n <= context:
        return np.array([a]), np.array([n]), np.array([0])
    if not align_end:
        starts = np.arange(a, e, context, dtype=np.int64)
        lengths = np.minimum(context, e - starts)
        return starts, lengths, np.zeros_like(starts)
    k = 1 + -(-(n - context) // stride)
    ends = np.minimum(a + context + stride * np.arange(k, dtype=np.int64), e)
    starts = ends - context
    prev_end = np.concatenate(([a], ends[:-1]))
    return starts, np.full(k, context, dtype=np.int64), prev_end - starts


def _plan(name: str, n_tokens: int, segments: list[tuple[int, int]], context: int, stride: int,
          align_end: bool) -> WindowPlan:
    parts = [_segment(a, e, context, stride, align_end) for a, e in segments]
    start, length, score_from = (np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(3))
    plan = WindowPlan(name, int(n_tokens), start, length, score_from)
    plan.validate(context)
    return plan


def _check_sizes(n_tokens: int, context: int, stride: int) -> None:
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")


def flat_plan(n_tokens: int, seq_len: int) -> WindowPlan:
    """Non-overlapping windows of ``seq_len`` (the challenge's eval; the last window may be short)."""
    _check_sizes(n_tokens, seq_len, seq_len)
    return _plan("flat", n_tokens, [(0, n_tokens - 1)], seq_len, seq_len, align_end=False)


def sliding_plan(n_tokens: int, context: int, stride: int) -> WindowPlan:
    """Windows of ``context`` advanced by ``stride``; each scores its last ``stride`` targets (first: all)."""
    _check_sizes(n_tokens, context, stride)
    return _plan("sliding", n_tokens, [(0, n_tokens - 1)], context, stride, align_end=True)


def doc_segments(tokens: np.ndarray, bos_id: int) -> list[tuple[int, int]]:
    """Input spans ``[a, e)`` split at BOS: each document's tokens, whose targets also include the next BOS.

    Scoring the next document's BOS from the end of this document keeps the target set identical to the
    non-isolated protocols while no window's inputs ever contain a BOS other than its first token.
    """
    n = int(tokens.size)
    bos = np.flatnonzero(np.asarray(tokens) == bos_id).astype(np.int64)
    starts = bos if bos.size and bos[0] == 0 else np.concatenate(([0], bos))
    ends = np.concatenate((starts[1:], [n - 1]))
    keep = ends > starts
    return [(int(a), int(e)) for a, e in zip(starts[keep], ends[keep])]


def doc_plan(tokens: np.ndarray, bos_id: int, context: int, stride: int, sliding: bool = True) -> WindowPlan:
    """Document-isolated windows: attention never crosses a BOS (``sliding`` or flat within each document)."""
    n = int(np.asarray(tokens).size)
    _check_sizes(n, context, stride if sliding else context)
    segs = doc_segments(np.asarray(tokens), bos_id)
    name = "doc-sliding" if sliding else "doc-flat"
    plan = _plan(name, n, segs, context, stride if sliding else context, align_end=sliding)
    check_no_bos_crossing(plan, np.asarray(tokens), bos_id)
    return plan


def check_no_bos_crossing(plan: WindowPlan, tokens: np.ndarray, bos_id: int) -> None:
    """Assert no window's inputs hold a BOS after their first token (doc isolation)."""
    cum = np.concatenate(([0], np.cumsum(tokens == bos_id, dtype=np.int64)))
    inside = cum[plan.start + plan.length] - cum[plan.start + 1]
    if np.any(inside > 0):
        i = int(np.argmax(inside > 0))
        raise AssertionError(
            f"window plan {plan.name!r}: window {i} (tokens {int(plan.start[i])}.."
            f"{int(plan.start[i] + plan.length[i])})"
            " crosses a document boundary"
        )


def doc_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Stream position where each document starts (its BOS; 0 for a prefix before the first BOS)."""
    tokens = np.asarray(tokens)
    bos = np.flatnonzero(tokens == bos_id).astype(np.int64)
    return bos if bos.size and bos[0] == 0 else np.concatenate(([0], bos)).astype(np.int64)


def doc_ids(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Document index of every target position 1..n-1 (array of length n-1).

    A target belongs to the document whose tokens precede it, so the BOS that opens document d+1 is the
    last target of document d; tokens before the first BOS form document 0 when the stream does not open
    with BOS.
    """
    starts = doc_starts(tokens, bos_id)
    pos = np.arange(1, int(np.asarray(tokens).size), dtype=np.int64)
    return np.searchsorted(starts, pos, side="left") - 1


@dataclass(frozen=True)
class Chunk:
    """Windows ``w0..w1-1`` of a plan, scoring target positions ``[lo, hi)``; ``doc``: document of ``lo``."""

    index: int
    w0: int
    w1: int
    lo: int
    hi: int
    doc: int = 0

    @property
    def n_scored(self) -> int:
        return self.hi - self.lo


def make_chunks(plan: WindowPlan, chunk_tokens: int, starts: np.ndarray | None = None) -> list[Chunk]:
    """Group consecutive windows into chunks of about ``chunk_tokens`` scored targets.

    A window belongs to the chunk holding its first scored target, so chunks are whole windows, contiguous in
    position and identical for every protocol on the same plan (``ttt:none`` reproduces ``sliding`` bit for
    bit). With document ``starts`` (for per-document adapter resets) chunks also restart at every document:
    the chunk key is (document of the first scored target, offset within it // chunk_tokens).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    lo = plan.lo
    if starts is None:
        doc = np.zeros_like(lo)
        offset = lo - 1
    else:
        doc = np.searchsorted(starts, lo, side="left") - 1
        offset = lo - 1 - starts[doc]
    key = np.stack((doc, offset // chunk_tokens), axis=1)
    new = np.ones(lo.size, dtype=bool)
    new[1:] = np.any(key[1:] != key[:-1], axis=1)
    w0s = np.flatnonzero(new)
    w1s = np.concatenate((w0s[1:], [plan.n_windows]))
    hi = plan.hi
    return [Chunk(i, int(a), int(b), int(lo[a]), int(hi[b - 1]), int(doc[a]))
            for i, (a, b) in enumerate(zip(w0s, w1s))]


def batch_windows(lengths: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """Split consecutive windows into batches ``[i, j)`` whose padded size ``count * max_len`` fits ``batch_tokens``.

    Deterministic in the lengths alone, so the same windows always form the same batches.
    """
    n = int(lengths.size)
    if n and int(lengths.min()) == int(lengths.max()):  # fast path: uniform windows (flat/sliding)
        per = max(1, batch_tokens // int(lengths[0]))
        return [(i, min(i + per, n)) for i in range(0, n, per)]
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        j, longest = i, 0
        while j < n:
            cand = max(longest, int(lengths[j]))
            if j > i and cand * (j - i + 1) > batch_tokens:
                break
            longest, j = cand, j + 1
        out.append((i, j))
        i = j
    return out
