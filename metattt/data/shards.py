"""Parameter Golf token shard format.

A shard is a 1024-byte header of 256 little-endian int32 ``[MAGIC, VERSION, n_tokens, 0, ...]`` followed by
``n_tokens`` little-endian uint16 token ids. We check the header strictly because a silently misread shard
(wrong dtype, truncated copy) trains on garbage without any visible error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metattt.atomic import atomic_path

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN_ID = 65535


class ShardFormatError(ValueError):
    """A shard file whose header or contents do not match the Parameter Golf format."""


def _header(n_tokens: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = n_tokens
    return header


def write_shard(path: str | os.PathLike, tokens: np.ndarray | list[int], vocab_size: int | None = None) -> Path:
    """Write ``tokens`` as a shard at ``path`` atomically (temp file + rename) and return the path.

    A crash mid-write leaves at most a stray ``.tmp`` file: an existing shard at ``path`` is never half-written.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"write_shard({path}): tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        limit = MAX_TOKEN_ID if vocab_size is None else vocab_size - 1
        if lo < 0 or hi > limit:
            bad = lo if lo < 0 else hi
            raise ValueError(f"write_shard({path}): token id {bad} outside [0, {limit}]"
                             + ("" if vocab_size is None else f" (vocab_size={vocab_size})"))
    if arr.size >= 2**31:
        raise ValueError(f"write_shard({path}): {arr.size} tokens exceed the int32 header count")
    data = arr.astype(TOKEN_DTYPE, copy=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_header(int(data.size)).tobytes())
        f.write(data.tobytes())
    return path


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate the header and file size of a shard; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardFormatError(f"{path}: truncated header: expected at least {HEADER_BYTES} bytes, got {size}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardFormatError(f"{path}: bad magic: expected {SHARD_MAGIC}, found {int(header[0])}")
    if int(header[1]) != SHARD_VERSION:
        raise ShardFormatError(f"{path}: wrong version: expected {SHARD_VERSION}, found {int(header[1])}")
    n_tokens = int(header[2])
    if n_tokens < 0:
        raise ShardFormatError(f"{path}: negative token count {n_tokens} in header")
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        kind = "truncated" if size < expected else "trailing bytes"
        raise ShardFormatError(f"{path}: {kind}: header says {n_tokens} tokens so expected {expected} bytes, "
                               f"got {size}")
    return n_tokens


def read_shard(path: str | os.PathLike, mmap: bool = True, vocab_size: int | None = None) -> np.ndarray:
    """Return the tokens of a shard as a uint16 array (read-only memory map by default).

    With ``vocab_size`` every id is checked to be ``< vocab_size`` (this reads the whole shard).
    """
    path = Path(path)
    n_tokens = read_shard_header(path)
    if n_tokens == 0:
        tokens = np.empty(0, dtype=TOKEN_DTYPE)
    elif mmap:
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    else:
        with open(path, "rb") as f:
            f.seek(HEADER_BYTES)
            tokens = np.fromfile(f, dtype=TOKEN_DTYPE, count=n_tokens)
    if vocab_size is not None and n_tokens:
        bad = np.flatnonzero(tokens >= vocab_size)
        if bad.size:
            i = int(bad[0])
            raise ShardFormatError(f"{path}: token id {int(tokens[i])} at position {i} is >= vocab_size {vocab_size} "
                                   f"({bad.size} such tokens)")
    return tokens
