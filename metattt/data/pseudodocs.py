"""Cut long texts (books) into pseudo-documents whose token lengths follow a reference length distribution.

Why: FineWeb validation is a stream of short documents (≈ 1,150 tokens) joined by BOS, so a model must learn to
use context within a document and to drop it at BOS. Books are long; trained on whole books, a model never sees
that reset (docs/benchmarks.md: a book-trained model loses 0.005 bpb to cross-document context). Cutting books
into BOS-delimited pieces with FineWeb's length distribution gives that signal with book-sized data.

Cuts fall on paragraph (line) boundaries, and inside paragraphs longer than ``MAX_UNIT_TOKENS`` on sentence
boundaries: for each piece a target length is drawn from the reference lengths (the token counts of the FineWeb
documents given to the builder, sampled with replacement), and the piece ends at the unit boundary nearest to it.

Speed: finding the units (``units_of``: token counts of every paragraph, and of the sentences of long ones) is
most of a build's SentencePiece work and needs no rng, so ``units_mapper`` runs it for many books at once in
worker processes; the cuts (``cut_text``), which draw from the seeded rng, stay sequential, so the pseudo-documents
are the same for any number of workers.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager

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


Units = tuple[list[str], list[str], list[int]]  # a text's units, the separator before each, their token counts


def units_of(text: str, sp, num_threads: int = -1) -> Units:
    """The cut units of ``text`` (paragraphs; sentences of paragraphs over ``MAX_UNIT_TOKENS``), the separator
    that precedes each ("\\n" starts a paragraph, " " a sentence) and each unit's token count.

    Pure and rng-free, so it can run for many texts at once in worker processes (``units_mapper``); it is most of
    the build's SentencePiece work. The sentences of all long paragraphs are encoded in one batched call (the
    counts are the same as one call per paragraph: each string is encoded on its own).
    """
    paras = [p for p in text.split("\n") if p.strip()]
    counts = [len(ids) for ids in sp.encode(paras, out_type=int, num_threads=num_threads)]
    split = {i: parts for i, n in enumerate(counts) if n > MAX_UNIT_TOKENS
             and len(parts := [x for x in _SENTENCE_END.split(paras[i]) if x]) > 1}
    flat = [x for parts in split.values() for x in parts]
    part_counts = iter([len(ids) for ids in sp.encode(flat, out_type=int, num_threads=num_threads)] if flat else [])
    units: list[str] = []
    seps: list[str] = []
    unit_counts: list[int] = []
    for i, (para, n) in enumerate(zip(paras, counts)):
        parts = split.get(i, [para])
        units += parts
        seps += ["\n"] + [" "] * (len(parts) - 1)
        unit_counts += [n] if len(parts) == 1 else [next(part_counts) for _ in parts]
    return units, seps, unit_counts


def cut_text(units: Units, lengths: np.ndarray, rng: np.random.Generator) -> list[str]:
    """The pseudo-document texts of one text's units (units re-joined with their separators); draws the piece
    lengths from ``rng`` (``cut_points``), so texts must be cut in order for a seed to give the same corpus."""
    parts, seps, counts = units
    return [parts[i] + "".join(seps[k] + parts[k] for k in range(i + 1, j))
            for i, j in cut_points(counts, lengths, rng)] if parts else []


def pseudo_documents(units: Iterable[Units], lengths: np.ndarray, rng: np.random.Generator) -> Iterator[str]:
    """The pseudo-document texts of every text (given as its ``units_of``), in order."""
    for u in units:
        yield from cut_text(u, lengths, rng)


_worker_sp = None


def _init_worker(model_path: str) -> None:
    global _worker_sp
    from metattt.data.tokenizer import load_tokenizer

    _worker_sp = load_tokenizer(model_path)


def _worker_units(text: str) -> Units:
    return units_of(text, _worker_sp, num_threads=1)  # the pool is the parallelism: no threads inside a worker


def _ordered(pool: ProcessPoolExecutor, texts: Iterable[str], ahead: int) -> Iterator[Units]:
    """``units_of`` of each text, in order, with at most ``ahead`` texts in flight. Not ``pool.map``: it
    submits every text at once, so all books (and then their units, waiting for the consumer) would sit in
    memory; here texts are read lazily and the workers stay ``ahead`` texts in front of the cutting. ``ahead``
    must cover the books of one batch of pieces that the caller encodes between reads (256 pieces, tens of
    books), or the workers idle meanwhile."""
    pending: deque[Future[Units]] = deque()
    for text in texts:
        pending.append(pool.submit(_worker_units, text))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextmanager
def units_mapper(sp, model_path: str | os.PathLike, workers: int) -> Iterator[Callable[[Iterable[str]],
                                                                                       Iterator[Units]]]:
    """A function from texts to their ``units_of``, in order: in ``workers`` processes (each loads the tokenizer
    once from ``model_path``), or in this process with ``sp`` (and SentencePiece's own threads) when
    ``workers <= 1``. Why processes: ``units_of`` makes a few SentencePiece calls per book, too small for
    SentencePiece's threads to keep many cores busy, while books are independent; the cuts, which draw from the
    seeded rng, stay sequential in the caller, so the corpus does not depend on ``workers``."""
    if workers <= 1:
        yield lambda texts: (units_of(t, sp) for t in texts)
        return
    # fork where there is one: a spawned or forkserver worker would re-import metattt.data (and with it torch,
    # ~1 s and ~300 MB each) and the caller's __main__. The workers touch no lock of this process: they only load
    # the tokenizer and encode; the executor forks them all at the first submit, before its own threads start.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        yield functools.partial(_ordered, pool, ahead=max(64, 4 * workers))


def length_summary(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Mean and quantiles of document lengths in tokens (BOS excluded), for build_meta.json and reports."""
    a = np.asarray(lengths, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    qs = np.quantile(a, QUANTILES)
    return {"n": int(a.size), "mean": float(a.mean()), **{f"q{int(round(q * 100)):02d}": float(v)
                                                          for q, v in zip(QUANTILES, qs)}}
