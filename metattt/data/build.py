"""Build Parameter Golf style shards from raw text: ``fineweb_{train,val}_NNNNNN.bin``.

Inputs: ``.jsonl`` (field "text"; also ``.jsonl.xz`` / ``.jsonl.gz`` / ``.jsonl.zst``) with one document per
line, and ``.txt`` files with one document per file. Directories are searched recursively (sorted, so the
result is deterministic). Each document becomes BOS + ids (no EOS), as in the challenge data.

Corpus option (``--pseudo-doc-text BOOKS``): long texts are cut into BOS-delimited pseudo-documents whose token
lengths follow the length distribution of reference documents (``--pseudo-doc-lengths-from``, default the
train documents of ``--text``), and the train split is the pseudo-documents and the ``--text`` train documents
in one seeded random order (``metattt/data/pseudodocs.py``). Validation is unchanged.

In-distribution validation split (``--indist-val-frac F``, ``--indist-val-books N``): a seeded fraction of the
``--text`` train documents and N whole ``--pseudo-doc-text`` texts (books) are held out of training; each held-out
book gives at most one pseudo-document (one seeded piece; the rest of the book is dropped, so no held-out book
contributes a training token, and no validation stream holds two pieces of one book, which would hand adaptation
a signal FineWeb does not have). They are shuffled into ``indist_val_NNNNNN.bin``; the ``fineweb_val`` shards
(``--val-docs`` / ``--val-text``, optional with the split) stay the other validation set. The split (which
documents and books, token counts) is recorded in ``build_meta.json``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metattt.data.pseudodocs import Units, cut_text, length_summary, pseudo_documents, units_mapper
from metattt.data.shards import write_shard
from metattt.data.tokenizer import load_tokenizer, train_tokenizer

JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (".txt",)
DEFAULT_SHARD_TOKENS = 100_000_000
UnitsMap = Callable[[Iterable[str]], Iterator[Units]]


def default_workers() -> int:
    """The CPUs this process may use, at most 16. Why: SentencePiece encoding dominates the build and most of it
    is per-book unit counting for the pseudo-documents (many small calls), which only a process pool spreads over
    the cores (``pseudodocs.units_mapper``); past ~16 workers the sequential reading and cutting limit anyway."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, n))


@dataclass
class BuildConfig:
    text: list[Path]
    tokenizer: Path
    out: Path
    val_docs: int | None = None  # first N documents of ``text`` become val
    val_text: list[Path] = field(default_factory=list)  # or: separate val inputs
    train_tokenizer: bool = False
    vocab_size: int = 1024
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    batch_docs: int = 256
    progress: bool = True
    pseudo_doc_text: list[Path] = field(default_factory=list)  # long texts cut into pseudo-documents (train)
    pseudo_doc_lengths: list[Path] = field(default_factory=list)  # length reference (default: --text train docs)
    seed: int = 0  # pseudo-document lengths and the train document order
    indist_val_frac: float = 0.0  # fraction of the --text train documents held out into indist_val_*.bin
    indist_val_books: int = 0  # whole --pseudo-doc-text texts held out, one pseudo-document each into the val split
    indist_val_min_tokens: int = 500_000  # the split must hold at least this many tokens (checked before writing)
    workers: int = field(default_factory=default_workers)  # processes cutting books (output unchanged)

    def __post_init__(self) -> None:
        self.text = [Path(p) for p in self.text]
        self.val_text = [Path(p) for p in self.val_text]
        self.pseudo_doc_text = [Path(p) for p in self.pseudo_doc_text]
        self.pseudo_doc_lengths = [Path(p) for p in self.pseudo_doc_lengths]
        if self.pseudo_doc_lengths and not self.pseudo_doc_text:
            raise ValueError("--pseudo-doc-lengths-from needs --pseudo-doc-text")
        self.tokenizer, self.out = Path(self.tokenizer), Path(self.out)
        if not self.text:
            raise ValueError("no --text inputs given")
        if self.val_docs is not None and self.val_text:
            raise ValueError("choose exactly one validation source: --val-docs N or --val-text FILES")
        if self.val_docs is None and not self.val_text and not self.indist_split:
            raise ValueError("choose exactly one validation source: --val-docs N or --val-text FILES "
                             "(or an in-distribution split: --indist-val-frac / --indist-val-books)")
        if not 0.0 <= self.indist_val_frac < 1.0:
            raise ValueError(f"--indist-val-frac must be in [0, 1), got {self.indist_val_frac}")
        if self.indist_val_books < 0 or self.indist_val_min_tokens < 0:
            raise ValueError("--indist-val-books and --indist-val-min-tokens must be >= 0")
        if self.indist_val_books and not self.pseudo_doc_text:
            raise ValueError("--indist-val-books holds out --pseudo-doc-text texts; none given")
        if self.val_docs is not None and self.val_docs < 0:
            raise ValueError(f"--val-docs must be >= 0, got {self.val_docs}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_tokens < 1:
            raise ValueError(f"--shard-tokens must be positive, got {self.shard_tokens}")

    @property
    def indist_split(self) -> bool:
        return self.indist_val_frac > 0 or self.indist_val_books > 0


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    return None


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Input files in a deterministic order: explicit files as given, directories recursively sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not found:
                raise FileNotFoundError(f"no {JSONL_SUFFIXES + TEXT_SUFFIXES} files under directory {p}")
            files.extend(found)
        elif p.is_file():
            if _kind(p) is None:
                raise ValueError(f"unsupported input file {p}: expected one of {JSONL_SUFFIXES + TEXT_SUFFIXES}")
            files.append(p)
        else:
            raise FileNotFoundError(f"text input not found: {p}")
    return files


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    if name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Documents (non-empty texts) of all inputs, in order."""
    return (text for _, text in iter_records(paths))


def iter_records(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str]]:
    """``(ref, text)`` of every document of all inputs, in order; ``ref`` names it for ``build_meta.json``
    (``folder/file:line``, plus ``#id`` when the JSON line has an ``id``)."""
    for path in expand_inputs(paths):
        where = f"{path.parent.name}/{path.name}"
        if _kind(path) == "txt":
            text = path.read_text(encoding="utf-8")
            if text.strip():
                yield where, text
            continue
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from e
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: 'text' is {type(text).__name__}, expected a string")
                if text.strip():
                    yield f"{where}:{lineno}" + (f"#{obj['id']}" if obj.get("id") is not None else ""), text


class _ShardWriter:
    """Accumulates a token stream and cuts it into fixed-size shards named ``{prefix}_NNNNNN.bin``."""

    def __init__(self, out: Path, prefix: str, shard_tokens: int, vocab_size: int):
        self.out, self.prefix, self.shard_tokens, self.vocab_size = out, prefix, shard_tokens, vocab_size
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.files: list[str] = []
        self.tokens = 0
        self.docs = 0

    def add(self, ids: np.ndarray) -> None:
        self.docs += 1
        self.tokens += ids.size
        while ids.size:
            take = min(ids.size, self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + take] = ids[:take]
            self.fill += take
            ids = ids[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{self.prefix}_{len(self.files):06d}.bin"
        write_shard(self.out / name, self.buf[: self.fill], self.vocab_size)
        self.files.append(name)
        self.fill = 0


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    items = iter(it)
    return iter(lambda: list(itertools.islice(items, n)), [])


def _encode(sp, docs: Iterable[str], bos: int, batch_docs: int, bar=None) -> Iterator[np.ndarray]:
    """BOS + ids of each document, in order."""
    for batch in _batched(docs, batch_docs):
        for ids in sp.encode(batch, out_type=int):
            yield np.array([bos, *ids], dtype=np.int64)
        if bar is not None:
            bar.update(len(batch))


def _reference_lengths(cfg: BuildConfig, sp, bos: int, docs: list[np.ndarray]) -> np.ndarray:
    """Token lengths the pseudo-documents follow: ``--pseudo-doc-lengths-from``, else the train documents."""
    if cfg.pseudo_doc_lengths:
        ref = np.array([a.size - 1 for a in _encode(sp, iter_documents(cfg.pseudo_doc_lengths), bos,
                                                    cfg.batch_docs)], dtype=np.int64)
    else:
        ref = np.array([a.size - 1 for a in docs], dtype=np.int64)
    ref = ref[ref > 0]
    if ref.size == 0:
        raise ValueError("no reference documents for the pseudo-document lengths (empty --text train split and "
                         "no --pseudo-doc-lengths-from)")
    return ref


def _mixed_train(cfg: BuildConfig, sp, bos: int, docs: list[np.ndarray], books: Iterable[str], units: UnitsMap,
                 bar, ref: np.ndarray) -> tuple[list[np.ndarray], dict]:
    """The (encoded) train documents plus the pseudo-documents cut from ``books`` to the reference lengths ``ref``
    (``_reference_lengths``: the split computes them once for its held-out books and this), in one seeded order."""
    rng = np.random.default_rng(cfg.seed)
    pseudo = [a.astype(np.uint16) for a in _encode(sp, pseudo_documents(units(books), ref, rng), bos,
                                                   cfg.batch_docs, bar)]
    if not pseudo:
        raise ValueError(f"--pseudo-doc-text {', '.join(map(str, cfg.pseudo_doc_text))} holds no text")
    n_real = len(docs)
    order = rng.permutation(n_real + len(pseudo))
    allr = docs + pseudo
    info = {"seed": cfg.seed, "pseudo_docs": len(pseudo), "pseudo_tokens": int(sum(a.size for a in pseudo)),
            "text_docs": n_real, "text_tokens": int(sum(a.size for a in docs)),
            "reference_lengths": length_summary(ref),
            "pseudo_lengths": length_summary([a.size - 1 for a in pseudo]),
            "pseudo_doc_text": [str(p) for p in cfg.pseudo_doc_text],
            "length_source": [str(p) for p in cfg.pseudo_doc_lengths] or "train documents of --text"}
    return [allr[i] for i in order], info


def _indist_split(cfg: BuildConfig, sp, bos: int, train_records: Iterable[tuple[str, str]], units: UnitsMap,
                  bar) -> tuple[list[np.ndarray], list[np.ndarray], dict | None, dict]:
    """Hold out the in-distribution validation split (module docstring): returns the train arrays, the
    validation arrays (one seeded order), the pseudo-document mix summary (or None) and the split's record."""
    records = list(train_records)
    docs = [a.astype(np.uint16) for a in _encode(sp, (t for _, t in records), bos, cfg.batch_docs, bar)]
    pick = np.random.default_rng([cfg.seed, 29])  # the split's own stream: the cuts and the train order keep theirs
    held = sorted(pick.permutation(len(docs))[: int(round(cfg.indist_val_frac * len(docs)))].tolist())
    held_set = set(held)
    train_docs = [a for i, a in enumerate(docs) if i not in held_set]
    val = [docs[i] for i in held]
    info: dict[str, Any] = {
        "seed": cfg.seed, "text_frac": cfg.indist_val_frac, "text_docs_total": len(docs),
        "text_docs": len(held), "text_tokens": int(sum(docs[i].size for i in held)),
        "text_refs": [records[i][0] for i in held]}
    mix = None
    if cfg.pseudo_doc_text:
        books = list(iter_records(cfg.pseudo_doc_text))
        if cfg.indist_val_books > len(books):
            raise ValueError(f"--indist-val-books {cfg.indist_val_books} exceeds the {len(books)} texts of "
                             "--pseudo-doc-text")
        out = sorted(pick.permutation(len(books))[: cfg.indist_val_books].tolist())
        ref = _reference_lengths(cfg, sp, bos, train_docs)
        held_books = []
        for i, u in zip(out, units(books[i][1] for i in out)):  # one seeded piece of each; the rest is dropped
            pieces = [a.astype(np.uint16) for a in _encode(sp, cut_text(u, ref, pick), bos, cfg.batch_docs)]
            j = int(pick.integers(len(pieces)))
            val.append(pieces[j])
            held_books.append({"ref": books[i][0], "book_tokens": int(sum(a.size for a in pieces)),
                               "pieces": len(pieces), "piece": j, "val_tokens": int(pieces[j].size)})
        out_set = set(out)
        train, mix = _mixed_train(cfg, sp, bos, train_docs,
                                  (t for k, (_, t) in enumerate(books) if k not in out_set), units, bar, ref)
        info.update({"books_total": len(books), "books": len(held_books),
                     "book_tokens": sum(b["val_tokens"] for b in held_books),
                     "book_tokens_dropped": sum(b["book_tokens"] - b["val_tokens"] for b in held_books),
                     "held_out_books": held_books})
    else:
        train = train_docs
    val = [val[i] for i in pick.permutation(len(val))]
    info["docs"], info["tokens"] = len(val), int(sum(a.size for a in val))
    info["min_tokens"] = cfg.indist_val_min_tokens
    if info["tokens"] < cfg.indist_val_min_tokens:
        raise ValueError(f"the in-distribution validation split holds {info['tokens']:,} tokens, fewer than "
                         f"--indist-val-min-tokens {cfg.indist_val_min_tokens:,} (raise --indist-val-frac or "
                         "--indist-val-books)")
    return train, val, mix, info


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_dataset(cfg: BuildConfig) -> dict[str, Any]:
    """Tokenize the inputs into train/val shards in ``cfg.out``; returns (and writes) a summary."""
    from tqdm import tqdm

    def split_records() -> tuple[Iterator[tuple[str, str]], Iterator[tuple[str, str]]]:
        if cfg.val_text:
            return iter_records(cfg.val_text), iter_records(cfg.text)
        n_val = cfg.val_docs or 0
        return itertools.islice(iter_records(cfg.text), n_val), itertools.islice(iter_records(cfg.text), n_val, None)

    def texts(records: Iterable[tuple[str, str]]) -> Iterator[str]:
        return (t for _, t in records)

    expand_inputs(cfg.text + cfg.val_text + cfg.pseudo_doc_text + cfg.pseudo_doc_lengths)  # fail fast on bad paths before any long work
    if cfg.train_tokenizer:
        _, train_iter = split_records()  # never train the tokenizer on val documents
        train_tokenizer(texts(train_iter), cfg.tokenizer, cfg.vocab_size)
    sp = load_tokenizer(cfg.tokenizer)
    vocab = int(sp.vocab_size())
    if vocab > 65536:
        raise ValueError(f"tokenizer {cfg.tokenizer} has {vocab} pieces; uint16 shards hold at most 65536")
    bos = int(sp.bos_id())
    if bos < 0:
        raise ValueError(f"tokenizer {cfg.tokenizer} has no BOS piece; shards need BOS at each document start")

    val_iter, train_iter = split_records()
    bar = tqdm(desc="tokenizing", unit="doc", disable=not cfg.progress)
    mix: dict[str, Any] | None = None
    split: dict[str, Any] | None = None
    indist: list[np.ndarray] = []
    train: Iterable[np.ndarray]
    if cfg.indist_split:  # in memory, so a too-small split fails before any shard is touched
        with units_mapper(sp, cfg.tokenizer, cfg.workers if cfg.pseudo_doc_text else 1) as units:
            train, indist, mix, split = _indist_split(cfg, sp, bos, train_iter, units, bar)
    elif cfg.pseudo_doc_text:
        docs = [a.astype(np.uint16) for a in _encode(sp, texts(train_iter), bos, cfg.batch_docs, bar)]
        with units_mapper(sp, cfg.tokenizer, cfg.workers) as units:
            train, mix = _mixed_train(cfg, sp, bos, docs, iter_documents(cfg.pseudo_doc_text), units, bar,
                                      _reference_lengths(cfg, sp, bos, docs))
    else:
        train = _encode(sp, texts(train_iter), bos, cfg.batch_docs, bar)

    cfg.out.mkdir(parents=True, exist_ok=True)
    stale = [p for pat in ("fineweb_train_*.bin", "fineweb_val_*.bin", "indist_val_*.bin")
             for p in sorted(cfg.out.glob(pat))]
    for p in stale:  # old shards would silently join the new ones through the loaders' glob
        p.unlink()
    writers = {s: _ShardWriter(cfg.out, prefix, cfg.shard_tokens, vocab)
               for s, prefix in (("val", "fineweb_val"), ("train", "fineweb_train"), ("indist_val", "indist_val"))}
    for name, arrays in (("val", _encode(sp, texts(val_iter), bos, cfg.batch_docs, bar)), ("train", train),
                         ("indist_val", indist)):
        w = writers[name]
        for arr in arrays:
            w.add(arr)
        w.flush()
    bar.close()
    if writers["train"].docs == 0:
        raise ValueError("no training documents left after the validation split (lower --val-docs?)")
    if writers["val"].docs == 0 and (cfg.val_docs is not None or cfg.val_text):
        raise ValueError("no validation documents (raise --val-docs or check --val-text)")
    summary = {
        "tokenizer": str(cfg.tokenizer), "tokenizer_sha256": _sha256(cfg.tokenizer), "vocab_size": vocab,
        "bos_id": bos, "shard_tokens": cfg.shard_tokens, "removed_stale_shards": [p.name for p in stale],
        **{f"{s}_{k}": getattr(writers[s], k) for s in ("train", "val") for k in ("docs", "tokens", "files")},
        **({"pseudo_docs": mix} if mix is not None else {}),
    }
    if split is not None:
        summary.update({f"indist_val_{k}": getattr(writers["indist_val"], k) for k in ("docs", "tokens", "files")})
        summary["indist_val_split"] = split
    (cfg.out / "build_meta.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_line(summary: dict[str, Any], out: Path) -> str:
    docs = summary["train_docs"] + summary["val_docs"]
    tokens = summary["train_tokens"] + summary["val_tokens"]
    shards = len(summary["train_files"]) + len(summary["val_files"])
    return (
        f"built {out}: {docs:,} docs ({summary['val_docs']:,} val), {tokens:,} tokens "
        f"({summary['val_tokens']:,} val), {shards} shards, vocab {summary['vocab_size']}"
    ) + (_mix_line(summary["pseudo_docs"]) if summary.get("pseudo_docs") else "") + (
        _split_line(summary["indist_val_split"]) if summary.get("indist_val_split") else "")


def _split_line(m: dict[str, Any]) -> str:
    books = (f" + {m['books']} held-out books ({m['book_tokens']:,} tokens, one piece each; "
             f"{m['book_tokens_dropped']:,} more tokens of them dropped)") if "books" in m else ""
    return (f"\nin-distribution val (indist_val_*.bin): {m['docs']:,} docs, {m['tokens']:,} tokens = "
            f"{m['text_docs']:,} of {m['text_docs_total']:,} --text documents ({m['text_tokens']:,} tokens){books}")


def _mix_line(m: dict[str, Any]) -> str:
    r, p = m["reference_lengths"], m["pseudo_lengths"]
    return (f"\ntrain = {m['text_docs']:,} documents ({m['text_tokens']:,} tokens) + {m['pseudo_docs']:,} "
            f"pseudo-documents ({m['pseudo_tokens']:,} tokens), shuffled (seed {m['seed']}); lengths in tokens, "
            f"reference vs pseudo: median {r['q50']:.0f} vs {p['q50']:.0f}, q10 {r['q10']:.0f} vs {p['q10']:.0f}, "
            f"q90 {r['q90']:.0f} vs {p['q90']:.0f}, mean {r['mean']:.0f} vs {p['mean']:.0f}")
