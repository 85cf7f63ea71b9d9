"""Artifact: quantize (int6 banks / int8 embeddings), serialize + zstd, byte accounting.

`save_artifact` / `load_artifact` work on plain state dicts; `save_model_artifact` / `load_model_artifact`
(model_io) rebuild a `BankedGPT` from the stored config; metattt.model is imported only when used.
"""
from __future__ import annotations

from .budget import DEFAULT_BUDGET, ArtifactReport, KindBytes, code_bytes, default_code_bytes, default_code_paths
from .errors import (ArtifactError, ArtifactVersionError, ConfigMismatchError, CorruptedArtifactError,
                     NotAnArtifactError, OverBudgetError, StateDictMismatchError, TruncatedArtifactError)
from .format import (FORMAT_VERSION, HEADER_SIZE, MAGIC, LoadedArtifact, check_expect, load_artifact,
                     pack_artifact, save_artifact, unpack_artifact)
from .model_io import load_model_artifact, load_state_strict, model_state, save_model_artifact
from .quant import (QuantConfig, QuantizedState, classify, dequantize_rows, dequantize_state_dict, from_rows,
                    quantize_rows, quantize_state_dict, to_rows)

__all__ = [
    "DEFAULT_BUDGET", "ArtifactReport", "KindBytes", "code_bytes", "default_code_bytes", "default_code_paths",
    "ArtifactError", "ArtifactVersionError", "ConfigMismatchError", "CorruptedArtifactError",
    "NotAnArtifactError", "OverBudgetError", "StateDictMismatchError", "TruncatedArtifactError",
    "FORMAT_VERSION", "HEADER_SIZE", "MAGIC", "LoadedArtifact", "check_expect", "load_artifact",
    "pack_artifact", "save_artifact", "unpack_artifact",
    "QuantConfig", "QuantizedState", "classify", "dequantize_rows", "dequantize_state_dict", "from_rows",
    "quantize_rows", "quantize_state_dict", "to_rows",
    "save_model_artifact", "load_model_artifact", "load_state_strict", "model_state",
]

