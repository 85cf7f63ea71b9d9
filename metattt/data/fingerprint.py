"""Content fingerprints of token streams and corpus specs.

Why: an artifact names its validation data by a glob, and the files behind a glob can change (a synthetic
corpus regenerated for another spec, a re-built shard set). The trainer stores a fingerprint of the exact
validation tokens it scored; the evaluator recomputes it on the tokens it loads and refuses a mismatch, so a
stored bpb and a re-evaluated one always refer to the same data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

PREFIX = "blake2b-128:"


def tokens_fingerprint(tokens: Any) -> str:
    """``blake2b-128:<hex>`` of the token ids as little-endian uint16 (the shard format), length included."""
    arr = np.asarray(tokens.cpu().numpy() if hasattr(tokens, "cpu") else tokens)
    if arr.ndim != 1:
        raise ValueError(f"fingerprint: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFF):
        raise ValueError("fingerprint: token ids must fit in uint16")
    h = hashlib.blake2b(digest_size=16)
    h.update(int(arr.size).to_bytes(8, "little"))
    h.update(np.ascontiguousarray(arr, dtype="<u2").tobytes())
    return PREFIX + h.hexdigest()


def spec_fingerprint(spec: dict[str, Any]) -> str:
    """``blake2b-128:<hex>`` of a spec dict as canonical JSON (sorted keys): equal specs, equal fingerprints."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return PREFIX + hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def short(fp: str, n: int = 12) -> str:
    """The first ``n`` hex digits of a fingerprint (for directory names and messages)."""
    return fp.removeprefix(PREFIX)[:n]
