"""The pseudo-document corpus option of ``python -m metattt.data build`` (issue 18)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from metattt.data.__main__ import main
from metattt.data.pseudodocs import cut_points
from metattt.data.shards import read_shard
from metattt.data.tokenizer import train_tokenizer

WORDS = "the of and to in a river court light music house people year city water was were is on by".split()


def _book(rng: random.Random, n_paras: int) -> str:
    paras = []
    for _ in range(n_paras):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
                 for _ in range(rng.randint(1, 6))]
        paras.append(" ".join(sents))
    return "\n".join(paras)


def _doc(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_cut_points_cover_every_unit_and_track_the_targets() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 60, size=20_000).tolist()
    lengths = np.array([200, 400, 1600])
    cuts = cut_points(counts, lengths, np.random.default_rng(1))
    assert cuts[0][0] == 0 and cuts[-1][1] == len(counts)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(cuts, cuts[1:]))  # contiguous, non-empty
    sizes = np.array([sum(counts[i:j]) for i, j in cuts[:-1]])
    for target in lengths:  # each piece lands on the boundary nearest to one of the targets
        near = np.abs(sizes - target) <= 60
        assert 0.2 < near.mean() < 0.5
    assert np.all(np.min(np.abs(sizes[:, None] - lengths[None, :]), axis=1) <= 60)
    with pytest.raises(ValueError, match="no reference document lengths"):
        cut_points(counts, np.array([], dtype=int), np.random.default_rng(0))


def test_build_mixes_pseudo_documents_with_reference_lengths(tmp_path: Path, capsys) -> None:
    rng = random.Random(0)
    fw = [_doc(rng, rng.choice([60, 120, 240])) for _ in range(60)]
    books = [_book(rng, 600) for _ in range(3)]
    tok = train_tokenizer(fw + books, tmp_path / "tok.model", vocab_size=300)
    args = ["build", "--text", str(_jsonl(tmp_path / "fw.jsonl", fw)), "--val-text",
            str(_jsonl(tmp_path / "val.jsonl", fw[:3])), "--tokenizer", str(tok), "--no-progress",
            "--pseudo-doc-text", str(_jsonl(tmp_path / "books.jsonl", books))]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "pseudo-documents" in capsys.readouterr().out
    meta = json.loads((tmp_path / "a" / "build_meta.json").read_text())
    mix = meta["pseudo_docs"]
    train = np.concatenate([read_shard(tmp_path / "a" / f) for f in meta["train_files"]])
    bos = np.flatnonzero(train == meta["bos_id"])
    assert bos[0] == 0 and bos.size == meta["train_docs"] == mix["text_docs"] + mix["pseudo_docs"] == 60 + mix["pseudo_docs"]
    assert mix["pseudo_docs"] > 20 and mix["text_tokens"] + mix["pseudo_tokens"] == train.size
    lens = np.diff(np.append(bos, train.size)) - 1
    ref, ps = mix["reference_lengths"], mix["pseudo_lengths"]
    assert abs(ps["q50"] - ref["q50"]) / ref["q50"] < 0.25 and abs(ps["mean"] - ref["mean"]) / ref["mean"] < 0.25
    first_real = [int(x) for x in lens[:10]]
    assert len(set(first_real)) > 3  # shuffled: not all real documents first, not one long book
    # deterministic for a seed, another order for another seed
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert main(args + ["--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    same = read_shard(tmp_path / "b" / "fineweb_train_000000.bin")
    assert np.array_equal(same, read_shard(tmp_path / "a" / "fineweb_train_000000.bin"))
    assert not np.array_equal(read_shard(tmp_path / "c" / "fineweb_train_000000.bin")[: same.size], same)
    capsys.readouterr()
    # bad input: one line, exit 2, nothing written
    assert main(args[:-1] + [str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "absent.jsonl" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()
