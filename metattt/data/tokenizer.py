"""SentencePiece tokenizer: loading, and training with the Parameter Golf trainer settings.

The settings matter for comparability: byte fallback (no <unk> output), split digits, nmt_nfkc normalisation,
no dummy prefix (so a document's first word carries no '▁'), and pad/bos/eos/unk = 0/1/2/3 (BOS = 1 starts
every document in the shards).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PG_TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe", "character_coverage": 0.999, "byte_fallback": True, "split_digits": True,
    "normalization_rule_name": "nmt_nfkc", "add_dummy_prefix": False, "pad_id": 0, "bos_id": 1, "eos_id": 2,
    "unk_id": 3, "hard_vocab_limit": False}


def load_tokenizer(model_path: str | os.PathLike) -> Any:
    """A ``SentencePieceProcessor`` for ``model_path`` (clear error when the file is missing)."""
    import sentencepiece as spm

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece tokenizer model not found: {path}")
    return spm.SentencePieceProcessor(model_file=str(path))


def _lines(texts: Iterable[str]) -> Iterator[str]:
    # One sentence per line keeps every input under SentencePiece's max_sentence_length; nmt_nfkc turns
    # newlines into spaces at encode time anyway, so no information about pieces is lost.
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 1024, *,
                    input_sentence_size: int = 0, seed: int = 0, num_threads: int | None = None,
                    **overrides: Any) -> Path:
    """Train a BPE tokenizer on ``texts`` and write ``model_path`` (and the ``.vocab`` beside it).

    ``input_sentence_size > 0`` samples that many lines (seeded, so still deterministic).
    """
    import sentencepiece as spm

    path = Path(model_path)
    if path.suffix != ".model":
        raise ValueError(f"tokenizer output path must end in .model, got {path}")
    if vocab_size < 260 + 4:
        raise ValueError(f"vocab_size {vocab_size} too small: byte fallback alone needs 256 + 4 control pieces")
    path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    kwargs: dict[str, Any] = {**PG_TRAINER_SETTINGS, "vocab_size": vocab_size, "minloglevel": 2,
                              "model_prefix": str(path.with_suffix("")), "sentence_iterator": _lines(texts),
                              "num_threads": num_threads or max(1, min(16, os.cpu_count() or 1))}
    if input_sentence_size > 0:
        kwargs["input_sentence_size"] = input_sentence_size
        kwargs["shuffle_input_sentence"] = True
    kwargs.update(overrides)
    spm.SentencePieceTrainer.train(**kwargs)
    return path
