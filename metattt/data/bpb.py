"""Bytes per target token, for scoring in bits per byte (bpb).

bpb normalises by UTF-8 bytes of the text, so models with different tokenizers are comparable. Following the
Parameter Golf evaluator, the byte count of target ``y`` after token ``x`` is ``base_bytes[y]`` (UTF-8 length of
the piece without its leading '▁'; byte-fallback pieces ``<0xNN>`` count 1; control/unknown/unused count 0) plus
1 when the piece starts with '▁' and ``x`` is not a boundary token (control/unknown/pad/BOS/EOS): after BOS the
leading space is not part of the text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_SPACE = "\u2581"


@dataclass(frozen=True, eq=False)  # tensor fields: compare with .equals()
class ByteLUT:
    """Per-token byte-count tables (CPU tensors of length vocab_size)."""

    base_bytes: torch.Tensor  # int32
    has_leading_space: torch.Tensor  # bool
    is_boundary: torch.Tensor  # bool
    bos_id: int
    kind: str = "custom"

    def __post_init__(self) -> None:
        n = self.base_bytes.numel()
        if not (self.has_leading_space.numel() == n == self.is_boundary.numel()):
            raise ValueError("ByteLUT tables must all have length vocab_size")
        if not 0 <= self.bos_id < n:
            raise ValueError(f"ByteLUT bos_id {self.bos_id} outside vocab of size {n}")

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.numel())

    @classmethod
    def from_sentencepiece(cls, model_path: str | os.PathLike, vocab_size: int | None = None) -> ByteLUT:
        """Tables from a SentencePiece model; ``vocab_size`` larger than the model pads with boundary tokens."""
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor(model_file=str(path))
        n_sp = int(sp.vocab_size())
        n = n_sp if vocab_size is None else int(vocab_size)
        if n < n_sp:
            raise ValueError(f"vocab_size {n} is smaller than the tokenizer's {n_sp} pieces ({path})")
        base = np.zeros(n, dtype=np.int32)
        space = np.zeros(n, dtype=bool)
        boundary = np.ones(n, dtype=bool)
        for i in range(n_sp):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            boundary[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith(_SPACE):
                space[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
        bos = int(sp.bos_id())
        if bos < 0:
            raise ValueError(f"tokenizer {path} has no BOS token; Parameter Golf documents start with BOS")
        return cls(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary), bos, "sentencepiece")

    @classmethod
    def uniform(cls, vocab_size: int, control_ids: Sequence[int] = (0, 1, 2, 3), bytes_per_token: int = 1,
                bos_id: int = 1) -> ByteLUT:
        """Every regular token is ``bytes_per_token`` bytes; control tokens are 0-byte boundaries."""
        if any(not 0 <= c < vocab_size for c in control_ids):
            raise ValueError(f"control_ids {tuple(control_ids)} outside vocab of size {vocab_size}")
        base = torch.full((vocab_size,), int(bytes_per_token), dtype=torch.int32)
        boundary = torch.zeros(vocab_size, dtype=torch.bool)
        idx = torch.tensor(list(control_ids), dtype=torch.long)
        base[idx] = 0
        boundary[idx] = True
        return cls(base, torch.zeros(vocab_size, dtype=torch.bool), boundary, int(bos_id), "uniform")

    def target_bytes(self, prev: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Bytes of each target token ``tgt`` given its preceding token ``prev`` (float64, same shape)."""
        if prev.shape != tgt.shape:
            raise ValueError(f"prev shape {tuple(prev.shape)} != tgt shape {tuple(tgt.shape)}")
        dev = tgt.device
        prev, tgt = prev.long(), tgt.long()
        base = self.base_bytes.to(dev)[tgt].to(torch.float64)
        extra = self.has_leading_space.to(dev)[tgt] & ~self.is_boundary.to(dev)[prev.to(dev)]
        return base + extra.to(torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "bos_id": self.bos_id, "base_bytes": self.base_bytes.tolist(),
                "has_leading_space": self.has_leading_space.to(torch.uint8).tolist(),
                "is_boundary": self.is_boundary.to(torch.uint8).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteLUT:
        missing = {"bos_id", "base_bytes", "has_leading_space", "is_boundary"} - set(d)
        if missing:
            raise ValueError(f"ByteLUT dict is missing keys {sorted(missing)}")
        return cls(torch.tensor(d["base_bytes"], dtype=torch.int32),
                   torch.tensor(d["has_leading_space"], dtype=torch.bool),
                   torch.tensor(d["is_boundary"], dtype=torch.bool), int(d["bos_id"]), str(d.get("kind", "custom")))

    def equals(self, other: ByteLUT) -> bool:
        return self.bos_id == other.bos_id and all(torch.equal(getattr(self, k), getattr(other, k))
                                                   for k in ("base_bytes", "has_leading_space", "is_boundary"))


LN2 = math.log(2.0)


def bpb(nats: Any, nbytes: Any) -> Any:
    """Bits per byte, ``nats / ln2 / bytes``: the one formula every score, interval and table uses.

    Scalars (python, numpy or 0-d) give a float and need a positive byte count; arrays (bootstrap resamples,
    per-bucket tables) divide elementwise and leave zero-byte cells to the caller's mask."""
    if np.ndim(nats) == 0 and np.ndim(nbytes) == 0:
        nats, nbytes = float(nats), float(nbytes)
        if not nbytes > 0:
            raise ValueError(f"bpb needs a positive byte count, got {nbytes}")
    return nats / LN2 / nbytes
