"""Data: Parameter Golf shards, loaders, byte accounting for bpb, corpus building, synthetic corpus."""

from __future__ import annotations

from metattt.data.bpb import ByteLUT, bpb
from metattt.data.build import BuildConfig, build_dataset, iter_documents
from metattt.data.download import OfflineError, download_fineweb
from metattt.data.loaders import TrainLoader, find_shards, load_val_tokens
from metattt.data.shards import ShardFormatError, read_shard, read_shard_header, write_shard
from metattt.data.synthetic import (SyntheticSpec, document_params, generate_split, make_synthetic_dataset,
                                    synthetic_bounds, synthetic_lut)
from metattt.data.tokenizer import PG_TRAINER_SETTINGS, load_tokenizer, train_tokenizer

__all__ = [
    "PG_TRAINER_SETTINGS", "BuildConfig", "ByteLUT", "OfflineError", "ShardFormatError", "SyntheticSpec",
    "TrainLoader", "bpb", "build_dataset", "document_params", "download_fineweb", "find_shards", "generate_split",
    "iter_documents", "load_tokenizer", "load_val_tokens", "make_synthetic_dataset", "read_shard",
    "read_shard_header", "synthetic_bounds", "synthetic_lut", "train_tokenizer", "write_shard",
]
