from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metattt.data.bpb import ByteLUT, bpb
from metattt.data.shards import read_shard

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SP_MODEL = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
VAL_PREFIX = SHARED / "fineweb_sp1024_valprefix" / "fineweb_val_000000.bin"
needs_shared = pytest.mark.skipif(not SP_MODEL.is_file(), reason=f"shared data not present at {SHARED}")


def _hand_lut() -> ByteLUT:
    # ids: 0 pad, 1 bos (boundaries); 2 "▁the" (3 + space); 3 "ab" (2); 4 "▁" (0 + space)
    return ByteLUT(
        base_bytes=torch.tensor([0, 0, 3, 2, 0], dtype=torch.int32),
        has_leading_space=torch.tensor([False, False, True, False, True]),
        is_boundary=torch.tensor([True, True, False, False, False]),
        bos_id=1,
    )


def test_target_bytes_rule() -> None:
    lut = _hand_lut()
    prev = torch.tensor([[1, 2, 3, 2, 0, 4]])
    tgt = torch.tensor([[2, 3, 2, 4, 4, 1]])
    got = lut.target_bytes(prev, tgt)
    assert got.dtype == torch.float64 and got.shape == tgt.shape
    # after BOS the leading space is not text; after a regular token it is; BOS target is 0 bytes
    assert got.tolist() == [[3.0, 2.0, 4.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="shape"):
        lut.target_bytes(prev[:, :3], tgt)


def test_uniform_lut() -> None:
    lut = ByteLUT.uniform(16)
    assert lut.vocab_size == 16 and lut.bos_id == 1 and lut.kind == "uniform"
    tok = torch.tensor([1, 5, 9, 2, 1, 15, 3, 0, 4])
    b = lut.target_bytes(tok[:-1], tok[1:])
    assert b.tolist() == [1, 1, 0, 0, 1, 0, 0, 1]
    two = ByteLUT.uniform(16, control_ids=(0,), bytes_per_token=2, bos_id=0)
    assert two.target_bytes(tok[:-1], tok[1:]).sum() == 14  # 7 non-pad targets x 2 bytes
    with pytest.raises(ValueError, match="control_ids"):
        ByteLUT.uniform(4, control_ids=(0, 7))


def test_bpb_value_and_errors() -> None:
    assert bpb(math.log(2) * 10, 5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive byte count"):
        bpb(1.0, 0)


def test_dict_roundtrip() -> None:
    lut = _hand_lut()
    back = ByteLUT.from_dict(json.loads(json.dumps(lut.to_dict())))
    assert back.equals(lut) and back.base_bytes.dtype == torch.int32
    assert not ByteLUT.uniform(5).equals(lut)
    with pytest.raises(ValueError, match="missing keys"):
        ByteLUT.from_dict({"bos_id": 1})


def test_missing_tokenizer_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing_tok.model"):
        ByteLUT.from_sentencepiece(tmp_path / "missing_tok.model")


@pytest.fixture(scope="module")
def sp_lut():
    import sentencepiece as spm

    if not SP_MODEL.is_file():
        pytest.skip(f"shared data not present at {SHARED}")
    return spm.SentencePieceProcessor(model_file=str(SP_MODEL)), ByteLUT.from_sentencepiece(SP_MODEL)


@needs_shared
def test_sentencepiece_table_spot_checks(sp_lut) -> None:
    sp, lut = sp_lut
    assert lut.vocab_size == 1024 and lut.bos_id == 1 and lut.kind == "sentencepiece"
    assert lut.is_boundary[:4].all() and not lut.is_boundary[4:].any()  # pad/bos/eos/unk
    assert (lut.base_bytes[:4] == 0).all() and (lut.base_bytes[4:260] == 1).all()  # byte fallback
    space = sp.piece_to_id("\u2581")
    assert lut.base_bytes[space] == 0 and lut.has_leading_space[space]
    the = sp.piece_to_id("\u2581the")
    assert lut.base_bytes[the] == 3 and lut.has_leading_space[the]
    padded = ByteLUT.from_sentencepiece(SP_MODEL, vocab_size=1030)
    assert padded.is_boundary[1024:].all() and (padded.base_bytes[1024:] == 0).all()
    with pytest.raises(ValueError, match="smaller than"):
        ByteLUT.from_sentencepiece(SP_MODEL, vocab_size=1000)


def _doc_bytes(lut: ByteLUT, ids: list[int]) -> float:
    t = torch.tensor([lut.bos_id] + ids)
    return float(lut.target_bytes(t[:-1], t[1:]).sum())


@needs_shared
def test_bytes_match_independent_utf8_count_on_real_text(sp_lut) -> None:
    sp, lut = sp_lut
    # nmt_nfkc turns newlines into spaces, so whole web documents rarely round-trip; their paragraphs do.
    texts, non_ascii = [], 0
    with lzma.open(SHARED / "text" / "fineweb_val" / "part-0000.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            for para in json.loads(line)["text"].split("\n"):
                ids = sp.encode(para)
                if para and sp.decode(ids) == para:
                    texts.append((para, ids))
                    non_ascii += not para.isascii()
            if len(texts) >= 300 and non_ascii >= 5:
                break
    crafted = ["Caf\u00e9 na\u00efve \u2014 \u6771\u4eac 2024: 3.14 \U0001f600!", "x\u00a9y \u00fc\u00df"]
    for s in crafted:
        ids = sp.encode(s)
        if sp.decode(ids) == s:
            texts.append((s, ids))
            non_ascii += 1
    assert len(texts) >= 300 and non_ascii >= 5, (len(texts), non_ascii)
    assert any(lut.base_bytes[i] == 1 and 4 <= i < 260 for _, ids in texts for i in ids)  # byte fallback used
    for text, ids in texts:
        assert _doc_bytes(lut, ids) == len(text.encode("utf-8")), text


@needs_shared
def test_official_val_prefix_bytes(sp_lut) -> None:
    sp, lut = sp_lut
    tokens = torch.from_numpy(read_shard(VAL_PREFIX).astype(np.int64))
    per_target = lut.target_bytes(tokens[:-1], tokens[1:])
    total = float(per_target.sum())
    assert tokens.numel() / total == pytest.approx(0.415, abs=0.0015)  # README: 0.415 tokens per byte
    starts = (tokens == lut.bos_id).nonzero().flatten().tolist() + [tokens.numel()]
    assert len(starts) - 1 == 902
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), per_target.cumsum(0)])
    mismatched = 0
    for s, e in zip(starts[:-1], starts[1:]):
        lut_bytes = float(csum[e - 1] - csum[s])  # targets s+1 .. e-1
        mismatched += lut_bytes != len(sp.decode(tokens[s + 1 : e].tolist()).encode("utf-8"))
    assert mismatched == 0
