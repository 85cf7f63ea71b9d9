"""Cut long texts (books) into pseudo-documents whose token lengths follow a reference length distribution.

Why: FineWeb validation is a stream of short documents (≈ 1,150 tokens) joined by BOS, so a model must learn to
use context within a document and to drop it at BOS. Books are long; trained on whole books, a model never sees
that reset (docs/benchmarks.md: a book-trained model loses 0.005 bpb to cross-document context). Cutting books
into BOS-delimited pieces with FineWeb's length distribution gives that signal with book-sized data.

Cuts fall on paragraph (line) boundaries, and inside paragraphs longer than ``MAX_UNIT_TOKENS`` on sentence
boundaries: for each piece a target length is drawn from the reference lengths (the token counts of the FineWeb
documents given to the builder, sampled with replacement), and the piece ends at the unit boundary nearest to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np

MAX_UNIT_TOKENS = 256
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def cut_points(counts: Sequence[int], lengths: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Paragraph ranges [i, j) whose summed token counts track targets drawn from ``lengths``."""
    if lengths.size == 0:
        raise ValueError("no reference document lengths to draw pseudo-document lengths from")
    out: list[tuple[int, int]] = []
    i, n = 0, len(counts)
    while i < n:
        target = int(lengths[rng.integers(lengths.size)])
        acc, j = 0, i
        while j < n and acc + counts[j] <= target:
            acc += counts[j]
            j += 1
        if j < n and (j == i or abs(acc + counts[j] - target) < abs(target - acc)):
            acc += counts[j]
            j += 1
        out.append((i, j))
        i = j
    return out


def pseudo_documents(texts: Iterator[str], sp, lengths: np.ndarray, rng: np.random.Generator) -> Iterator[str]:
    """The pseudo-document texts of every long text, in order (paragraphs re-joined with newlines)."""
    for text in texts:
        paras = [p for p in text.split("\n") if p.strip()]
        if not paras:
            continue
        units: list[str] = []
        seps: list[str] = []
        counts: list[int] = []
        for para, n in zip(paras, (len(ids) for ids in sp.encode(paras, out_type=int))):
            parts = [para] if n <= MAX_UNIT_TOKENS else [x for x in _SENTENCE_END.split(para) if x]
            part_counts = [n] if len(parts) == 1 else [len(ids) for ids in sp.encode(parts, out_type=int)]
            units += parts
            seps += ["\n"] + [" "] * (len(parts) - 1)
            counts += part_counts
        for i, j in cut_points(counts, lengths, rng):
            yield units[i] + "".join(seps[k] + units[k] for k in range(i + 1, j))


def length_summary(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Mean and quantiles of document lengths in tokens (BOS excluded), for build_meta.json and reports."""
    a = np.asarray(lengths, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    qs = np.quantile(a, QUANTILES)
    return {"n": int(a.size), "mean": float(a.mean()), **{f"q{int(round(q * 100)):02d}": float(v)
                                                          for q, v in zip(QUANTILES, qs)}}
