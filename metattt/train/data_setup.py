"""Resolve a TrainConfig's data source into shard patterns, a byte LUT and (for synthetic data) bounds."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.bpb import ByteLUT
from ..data.loaders import find_shards
from ..data.fingerprint import short, spec_fingerprint
from ..data.synthetic import (GENERATOR_VERSION, SyntheticSpec, make_synthetic_dataset, named_spec,
                              synthetic_lut)
from .config import TrainConfig


@dataclass
class DataSource:
    train_pattern: str
    val_pattern: str
    lut: ByteLUT
    kind: str  # "synthetic" | "shards"
    bounds: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def synthetic_fingerprint(spec: SyntheticSpec) -> str:
    """Fingerprint of what determines the synthetic corpus: its spec and the generator version."""
    return spec_fingerprint({"generator_version": GENERATOR_VERSION, "spec": spec.to_dict()})


def synthetic_dir(data_dir: str | Path, spec: SyntheticSpec) -> Path:
    """``data_dir`` itself when it already holds this spec's corpus, else a directory of its own for the spec
    (``data_dir/v<vocab>-<fingerprint>``): runs with different specs sharing ``--data-dir`` never touch each
    other's corpus."""
    root = Path(data_dir)
    try:
        old = json.loads((root / "meta.json").read_text())
        if old.get("generator_version") == GENERATOR_VERSION and old.get("spec") == spec.to_dict():
            return root
    except (OSError, ValueError, AttributeError):
        pass
    return root / f"v{spec.vocab_size}-{short(synthetic_fingerprint(spec))}"


def resolve_data(cfg: TrainConfig) -> DataSource:
    """Rank 0 calls it first (a synthetic corpus is generated then); the others after a barrier, and reuse it."""
    if cfg.data == "synthetic":
        spec = named_spec(cfg.synthetic_spec, vocab_size=cfg.model.vocab_size,
                          n_train_tokens=cfg.synthetic_train_tokens, n_val_tokens=cfg.synthetic_val_tokens)
        out = synthetic_dir(Path(cfg.data_dir).absolute(), spec)  # absolute: the artifact's val glob works anywhere
        meta = make_synthetic_dataset(out, spec)
        return DataSource(cfg.train_pattern or meta["train_pattern"], cfg.val_pattern or meta["val_pattern"],
                          synthetic_lut(spec), "synthetic", dict(meta["bounds"]),
                          {"synthetic_spec": spec.to_dict(), "synthetic_fingerprint": synthetic_fingerprint(spec),
                           "data_dir": str(out)})
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
