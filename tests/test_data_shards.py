from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from metattt.data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    ShardFormatError,
    read_shard,
    read_shard_header,
    write_shard,
)


def _write_raw(path: Path, header: list[int], tokens: np.ndarray) -> Path:
    h = np.zeros(256, dtype="<i4")
    h[: len(header)] = header
    path.write_bytes(h.tobytes() + tokens.astype("<u2").tobytes())
    return path


def test_roundtrip_and_exact_layout(tmp_path: Path) -> None:
    toks = np.array([1, 5, 65535, 0, 1023, 7], dtype=np.int64)
    p = write_shard(tmp_path / "a.bin", toks)
    raw = p.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * toks.size
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [SHARD_MAGIC, 1, toks.size] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == toks.tolist()
    for mmap in (True, False):
        got = read_shard(p, mmap=mmap)
        assert got.dtype == np.uint16 and got.tolist() == toks.tolist()
    assert read_shard_header(p) == toks.size


def test_empty_shard(tmp_path: Path) -> None:
    p = write_shard(tmp_path / "e.bin", np.array([], dtype=np.uint16))
    assert read_shard(p).size == 0


@pytest.mark.parametrize(
    "header, n_written, message",
    [
        ([123, 1, 4], 4, "bad magic: expected 20240520, found 123"),
        ([SHARD_MAGIC, 2, 4], 4, "wrong version: expected 1, found 2"),
        ([SHARD_MAGIC, 1, 10], 4, "truncated: header says 10 tokens so expected 1044 bytes, got 1032"),
        ([SHARD_MAGIC, 1, 2], 4, "trailing bytes"),
    ],
)
def test_bad_headers_name_file_and_problem(tmp_path: Path, header, n_written, message) -> None:
    p = _write_raw(tmp_path / "bad.bin", header, np.arange(n_written))
    with pytest.raises(ShardFormatError, match=message) as e:
        read_shard(p)
    assert str(p) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_truncated_header_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "short.bin"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(ShardFormatError, match="truncated header: expected at least 1024 bytes, got 100"):
        read_shard(p)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_shard(tmp_path / "nope.bin")


def test_vocab_check_on_read_and_write(tmp_path: Path) -> None:
    p = write_shard(tmp_path / "v.bin", [1, 2, 1500, 3])
    assert read_shard(p, vocab_size=2048).tolist() == [1, 2, 1500, 3]
    with pytest.raises(ShardFormatError, match=r"token id 1500 at position 2 is >= vocab_size 1024"):
        read_shard(p, vocab_size=1024)
    with pytest.raises(ValueError, match=r"token id 70000 outside \[0, 65535\]"):
        write_shard(tmp_path / "w.bin", [1, 70000])
    with pytest.raises(ValueError, match=r"token id -1"):
        write_shard(tmp_path / "w.bin", [1, -1])
    with pytest.raises(ValueError, match="vocab_size=8"):
        write_shard(tmp_path / "w.bin", [1, 9], vocab_size=8)
    with pytest.raises(ValueError, match="1-D"):
        write_shard(tmp_path / "w.bin", np.zeros((2, 2), dtype=np.int64))
    assert not (tmp_path / "w.bin").exists()


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    p = write_shard(tmp_path / "keep.bin", [1, 2, 3])
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_shard(p, [9, 9, 9, 9])
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.bin"]
