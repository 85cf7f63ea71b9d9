from __future__ import annotations

import json
import lzma
import random
from pathlib import Path

import numpy as np
import pytest

from metattt.data.__main__ import main
from metattt.data.build import BuildConfig, build_dataset, iter_documents
from metattt.data.shards import read_shard
from metattt.data.tokenizer import load_tokenizer, train_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SP_MODEL = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
needs_shared = pytest.mark.skipif(not SP_MODEL.is_file(), reason=f"shared data not present at {SHARED}")

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
         "court law state river city music water light year people time day world house school").split()


def _fake_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(3, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            sents.append(" ".join(words).capitalize() + f" in {rng.randint(1800, 2024)}.")
        docs.append(" ".join(sents) + ("\n\nCaf\u00e9 \u00fcber" if rng.random() < 0.2 else ""))
    return docs


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    data = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    if path.name.endswith(".xz"):
        path.write_bytes(lzma.compress(data.encode()))
    else:
        path.write_text(data)
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer(_fake_docs(200), d / "tiny.model", vocab_size=320)


def test_iter_documents_formats_and_order(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    _write_jsonl(tmp_path / "corpus" / "b.jsonl.xz", ["xz one", "", "xz two"])
    _write_jsonl(tmp_path / "corpus" / "a.jsonl", ["plain"])
    (tmp_path / "corpus" / "c.txt").write_text("a whole\n\nfile is one document\n")
    (tmp_path / "corpus" / "ignored.csv").write_text("x")
    docs = list(iter_documents([tmp_path / "corpus"]))
    assert docs == ["plain", "xz one", "xz two", "a whole\n\nfile is one document\n"]  # empty docs skipped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        list(iter_documents([bad]))
    with pytest.raises(ValueError, match="unsupported input file"):
        list(iter_documents([tmp_path / "corpus" / "ignored.csv"]))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        list(iter_documents([tmp_path / "nowhere.jsonl"]))


def test_trained_tokenizer_has_challenge_settings_and_is_deterministic(tmp_path: Path, tiny_tokenizer) -> None:
    sp = load_tokenizer(tiny_tokenizer)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.is_byte(i) for i in range(4, 260)) and sp.id_to_piece(4) == "<0x00>"
    assert not sp.encode("court", out_type=str)[0].startswith("\u2581")  # add_dummy_prefix=False
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    assert sp.decode(sp.encode("\u6771")) == "\u6771"  # byte fallback, no <unk>
    assert sp.encode("\uff21") == sp.encode("A")  # nmt_nfkc: fullwidth A -> A
    again = load_tokenizer(train_tokenizer(_fake_docs(200), tmp_path / "again.model", vocab_size=320))

    def table(p):
        return [(p.id_to_piece(i), p.get_score(i)) for i in range(p.vocab_size())]

    assert sp.vocab_size() > 260 and table(again) == table(sp)
    with pytest.raises(FileNotFoundError, match="absent.model"):
        load_tokenizer(tmp_path / "absent.model")


def test_build_shards_bos_per_doc(tmp_path: Path, tiny_tokenizer) -> None:
    docs = _fake_docs(40, seed=1)
    src = _write_jsonl(tmp_path / "docs.jsonl.xz", docs)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fineweb_train_000009.bin").write_bytes(b"stale")
    summary = build_dataset(BuildConfig([src], tiny_tokenizer, out, val_docs=5, shard_tokens=1000, progress=False))
    sp = load_tokenizer(tiny_tokenizer)
    expected = {"val": docs[:5], "train": docs[5:]}
    assert summary["removed_stale_shards"] == ["fineweb_train_000009.bin"]
    for split in ("val", "train"):
        files = sorted(out.glob(f"fineweb_{split}_*.bin"))
        assert [f.name for f in files] == summary[f"{split}_files"]
        assert all(read_shard(f).size == 1000 for f in files[:-1])
        tok = np.concatenate([read_shard(f) for f in files]).astype(np.int64)
        assert tok.size == summary[f"{split}_tokens"] and tok[0] == 1 and not (tok == 2).any()  # BOS, no EOS
        bos = np.flatnonzero(tok == 1)
        assert len(bos) == summary[f"{split}_docs"] == len(expected[split])
        parts = np.split(tok, bos[1:])
        assert [p[1:].tolist() for p in parts] == [sp.encode(d) for d in expected[split]]
    assert json.loads((out / "build_meta.json").read_text())["vocab_size"] == sp.vocab_size()


def test_build_config_errors(tmp_path: Path, tiny_tokenizer) -> None:
    src = _write_jsonl(tmp_path / "d.jsonl", _fake_docs(3))
    with pytest.raises(ValueError, match="exactly one validation source"):
        BuildConfig([src], tiny_tokenizer, tmp_path / "o")
    with pytest.raises(ValueError, match="exactly one validation source"):
        BuildConfig([src], tiny_tokenizer, tmp_path / "o", val_docs=1, val_text=[src])
    with pytest.raises(ValueError, match="no training documents"):
        build_dataset(BuildConfig([src], tiny_tokenizer, tmp_path / "o", val_docs=3, progress=False))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_dataset(BuildConfig([src], tmp_path / "nope.model", tmp_path / "o", val_docs=1, progress=False))


def test_cli_build_with_tokenizer_training_and_synthetic(tmp_path: Path, capsys) -> None:
    src = _write_jsonl(tmp_path / "t.jsonl", _fake_docs(60, seed=2))
    val = _write_jsonl(tmp_path / "v.jsonl", _fake_docs(4, seed=3))
    tok = tmp_path / "tok" / "cli.model"
    rc = main(["build", "--text", str(src), "--val-text", str(val), "--tokenizer", str(tok), "--out",
               str(tmp_path / "o"), "--train-tokenizer", "--vocab-size", "400", "--no-progress"])
    line = capsys.readouterr().out
    assert rc == 0 and tok.is_file() and "64 docs (4 val)" in line and "vocab 400" in line
    assert load_tokenizer(tok).vocab_size() == 400
    rc = main(["synthetic", "--out", str(tmp_path / "syn"), "--n-train-tokens", "3000", "--n-val-tokens", "1500",
               "--min-doc-len", "20", "--max-doc-len", "40", "--vocab-size", "32"])
    assert rc == 0 and "bayes_known_bpb" in capsys.readouterr().out
    assert json.loads((tmp_path / "syn" / "meta.json").read_text())["spec"]["vocab_size"] == 32


@needs_shared
def test_build_reproduces_official_val_shard(tmp_path: Path) -> None:
    """Our pipeline on the val-prefix text gives the challenge's own token ids, byte for byte."""
    n = 60
    with lzma.open(SHARED / "text" / "fineweb_valprefix" / "part-0000.jsonl.xz", "rt", encoding="utf-8") as f:
        docs = [json.loads(next(f))["text"] for _ in range(n)]
    src = _write_jsonl(tmp_path / "val.jsonl", docs)
    summary = build_dataset(BuildConfig([src, src], SP_MODEL, tmp_path / "o", val_docs=n, progress=False))
    ours = read_shard(tmp_path / "o" / "fineweb_val_000000.bin")
    official = read_shard(SHARED / "fineweb_sp1024_valprefix" / "fineweb_val_000000.bin")
    assert summary["val_docs"] == n and ours.size > 50_000
    assert np.array_equal(ours, official[: ours.size])
    assert official[ours.size] == 1  # the next official document starts right where ours end


GREEK = "αβγδεζηθικ"  # each letter's second UTF-8 byte is its own (byte-fallback pieces mark a book's tokens)


def _fake_books(n: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    books = []
    for k in range(n):
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + " " + GREEK[k] * 3 + "."
                 for _ in range(rng.randint(30, 60))]
        books.append("\n".join(paras))
    return books


def _docs_of(path_glob: list[Path]) -> list[tuple[int, ...]]:
    tok = np.concatenate([read_shard(f) for f in path_glob]).astype(np.int64)
    return [tuple(p[1:].tolist()) for p in np.split(tok, np.flatnonzero(tok == 1)[1:])]


def test_indist_split_holds_out_whole_books_and_a_document_fraction(tmp_path: Path, tiny_tokenizer) -> None:
    docs, books = _fake_docs(50, seed=7), _fake_books(len(GREEK))
    text = _write_jsonl(tmp_path / "docs.jsonl", docs)
    btext = _write_jsonl(tmp_path / "books.jsonl.xz", books)
    sp = load_tokenizer(tiny_tokenizer)
    mark = {k: sp.piece_to_id(f"<0x{L.encode()[1]:02X}>") for k, L in enumerate(GREEK)}
    assert all(mark[k] in sp.encode(L) for k, L in enumerate(GREEK))  # byte fallback: the mark is in the ids

    def build(out: Path, seed: int = 3) -> dict:
        return build_dataset(BuildConfig([text], tiny_tokenizer, out, pseudo_doc_text=[btext], seed=seed,
                                         indist_val_frac=0.2, indist_val_books=3, indist_val_min_tokens=500,
                                         shard_tokens=4000, progress=False))

    summary = build(tmp_path / "o")
    split = summary["indist_val_split"]
    assert not summary["val_files"] and summary["indist_val_files"][0] == "indist_val_000000.bin"
    assert json.loads((tmp_path / "o" / "build_meta.json").read_text())["indist_val_split"] == split
    held = sorted(int(r.rsplit("#", 1)[1]) for r in split["text_refs"])
    out_books = sorted(int(b["ref"].rsplit("#", 1)[1]) for b in split["held_out_books"])
    assert len(held) == split["text_docs"] == 10 and len(out_books) == split["books"] == 3
    train = _docs_of(sorted((tmp_path / "o").glob("fineweb_train_*.bin")))
    val = _docs_of(sorted((tmp_path / "o").glob("indist_val_*.bin")))
    assert len(val) == summary["indist_val_docs"] == split["docs"] == 13
    assert sum(len(d) + 1 for d in val) == summary["indist_val_tokens"] == split["tokens"]
    enc = [tuple(sp.encode(d)) for d in docs]
    # the held-out documents are exactly the unmarked val documents, and none of them trains
    assert sorted(d for d in val if not any(m in d for m in mark.values())) == sorted(enc[i] for i in held)
    assert sorted(d for d in train if not any(m in d for m in mark.values())) == \
        sorted(enc[i] for i in range(len(docs)) if i not in held)
    for k in range(len(GREEK)):
        n_train = sum(mark[k] in d for d in train)
        n_val = sum(mark[k] in d for d in val)
        if k in out_books:  # no token of a held-out book trains; exactly one piece of it validates
            assert (n_train, n_val) == (0, 1), k
        else:
            assert n_train > 1 and n_val == 0, k
    assert all(b["pieces"] > 1 and b["book_tokens"] > b["val_tokens"] for b in split["held_out_books"])
    # deterministic by seed; another seed holds out other documents
    build(tmp_path / "again")
    for f in summary["train_files"] + summary["indist_val_files"]:
        assert (tmp_path / "again" / f).read_bytes() == (tmp_path / "o" / f).read_bytes()
    assert build(tmp_path / "other", seed=4)["indist_val_split"]["text_refs"] != split["text_refs"]


def test_indist_split_errors_lose_nothing(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    text = _write_jsonl(tmp_path / "docs.jsonl", _fake_docs(20, seed=8))
    btext = _write_jsonl(tmp_path / "books.jsonl", _fake_books(2))
    out = tmp_path / "o"
    out.mkdir()
    (out / "fineweb_train_000000.bin").write_bytes(b"kept")
    base = ["build", "--text", str(text), "--tokenizer", str(tiny_tokenizer), "--out", str(out), "--no-progress"]
    assert main([*base, "--indist-val-frac", "0.2"]) == 2  # default minimum 500,000 tokens
    assert "fewer than --indist-val-min-tokens 500,000" in capsys.readouterr().err
    assert main([*base, "--pseudo-doc-text", str(btext), "--indist-val-books", "3", "--indist-val-min-tokens", "0"]) == 2
    assert "--indist-val-books 3 exceeds the 2 texts" in capsys.readouterr().err
    assert main([*base, "--indist-val-books", "1"]) == 2
    assert "none given" in capsys.readouterr().err
    assert main([*base, "--indist-val-frac", "1.0"]) == 2
    assert "must be in [0, 1)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["fineweb_train_000000.bin"]
    assert (out / "fineweb_train_000000.bin").read_bytes() == b"kept"
    # with an official val source beside it, and the CLI's summary line
    assert main([*base, "--val-docs", "2", "--indist-val-frac", "0.25", "--indist-val-min-tokens", "10"]) == 0
    line = capsys.readouterr().out
    assert "in-distribution val (indist_val_*.bin): 4 docs" in line and "4 of 18 --text documents" in line
    assert sorted(p.name for p in out.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                        "indist_val_000000.bin"]


def _long_books(n: int, seed: int = 11) -> list[str]:
    """Books whose paragraphs are short or long (many sentences, past MAX_UNIT_TOKENS: the sentence re-split),
    one long paragraph without a sentence end (kept whole), and blank lines."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".!?;:")

    books = []
    for k in range(n):
        paras = [" ".join(sentence() for _ in range(rng.choice([1, 2, 40, 80]))) for _ in range(rng.randint(20, 40))]
        paras.insert(3, " ".join(rng.choice(WORDS) for _ in range(400)) + f" {GREEK[k % len(GREEK)]}")
        books.append("\n".join(paras[:10] + ["", "  "] + paras[10:]))
    return books


def test_units_of_matches_per_paragraph_encoding(tiny_tokenizer) -> None:
    """``units_of`` batches the sentences of all long paragraphs into one encode call; the units and counts are
    those of the original one-call-per-paragraph loop."""
    from metattt.data.pseudodocs import _SENTENCE_END, MAX_UNIT_TOKENS, units_of

    sp = load_tokenizer(tiny_tokenizer)
    for book in _long_books(3):
        units: list[str] = []
        seps: list[str] = []
        counts: list[int] = []
        paras = [p for p in book.split("\n") if p.strip()]
        for para in paras:
            n = len(sp.encode(para))
            parts = [para] if n <= MAX_UNIT_TOKENS else [x for x in _SENTENCE_END.split(para) if x]
            units += parts
            seps += ["\n"] + [" "] * (len(parts) - 1)
            counts += [n] if len(parts) == 1 else [len(sp.encode(x)) for x in parts]
        assert units_of(book, sp) == units_of(book, sp, num_threads=1) == (units, seps, counts)
        assert len(units) > 2 * len(paras) and max(counts) > MAX_UNIT_TOKENS  # both the re-split and a kept whole
    assert units_of("\n \n", sp) == ([], [], [])


def test_build_is_byte_identical_for_any_workers(tmp_path: Path, tiny_tokenizer) -> None:
    """``workers`` only spreads the per-book unit counting over processes: every output byte is the same."""
    text = _write_jsonl(tmp_path / "docs.jsonl", _fake_docs(40, seed=9))
    books = _write_jsonl(tmp_path / "books.jsonl.xz", _long_books(12))
    kw = {"shard_tokens": 20_000, "progress": False, "seed": 2}
    for name, extra in (("mix", {"val_docs": 5}),
                        ("indist", {"indist_val_frac": 0.2, "indist_val_books": 3, "indist_val_min_tokens": 100})):
        outs = {w: tmp_path / f"{name}_w{w}" for w in (1, 2, 3)}
        for w, out in outs.items():
            build_dataset(BuildConfig([text], tiny_tokenizer, out, pseudo_doc_text=[books], workers=w, **kw, **extra))
        files = sorted(p.name for p in outs[1].iterdir())
        assert "build_meta.json" in files and len(files) > 3
        assert json.loads((outs[1] / "build_meta.json").read_text())["pseudo_docs"]["pseudo_docs"] > 12
        for w in (2, 3):
            assert sorted(p.name for p in outs[w].iterdir()) == files
            assert all((outs[w] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files), (name, w)
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        BuildConfig([text], tiny_tokenizer, tmp_path / "o", val_docs=1, workers=0)
