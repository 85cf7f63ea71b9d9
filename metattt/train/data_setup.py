"""Resolve a TrainConfig's data source into shard patterns, a byte LUT and (for synthetic data) bounds."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.bpb import ByteLUT
from ..data.loaders import find_shards
from ..data.synthetic import SyntheticSpec, make_synthetic_dataset, synthetic_lut
from .config import TrainConfig


@dataclass
class DataSource:
    train_pattern: str
    val_pattern: str
    lut: ByteLUT
    kind: str  # "synthetic" | "shards"
    bounds: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_data(cfg: TrainConfig, is_main: bool = True) -> DataSource:
    if cfg.data == "synthetic":
        spec = SyntheticSpec(vocab_size=cfg.model.vocab_size, n_train_tokens=cfg.synthetic_train_tokens,
                             n_val_tokens=cfg.synthetic_val_tokens)
        meta = make_synthetic_dataset(cfg.data_dir, spec) if is_main else None
        if meta is None:  # other ranks wait for rank 0 (the caller barriers), then read the same files
            meta = make_synthetic_dataset(cfg.data_dir, spec)
        return DataSource(cfg.train_pattern or meta["train_pattern"], cfg.val_pattern or meta["val_pattern"],
                          synthetic_lut(spec), "synthetic", dict(meta["bounds"]),
                          {"synthetic_spec": spec.to_dict(), "data_dir": str(cfg.data_dir)})
    root = Path(os.path.expanduser(cfg.data))
    train = cfg.train_pattern or str(root / "fineweb_train_*.bin")
    val = cfg.val_pattern or str(root / "fineweb_val_*.bin")
    find_shards(train)  # clear errors naming the pattern, before anything is written
    find_shards(val)
    if not cfg.tokenizer:
        raise ValueError("real-data training needs --tokenizer (SentencePiece model) for the exact byte LUT")
    lut = ByteLUT.from_sentencepiece(cfg.tokenizer)
    if lut.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer} has vocab {lut.vocab_size} but the model expects "
                         f"{cfg.model.vocab_size}")
    return DataSource(train, val, lut, "shards", {}, {"tokenizer": str(cfg.tokenizer)})
