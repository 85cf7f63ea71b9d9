"""Meta-TTT core: parameter selections, test-time adapters (the inner loop) and the meta-training step."""
from __future__ import annotations

from .adapter import Adapter, AdapterConfig, MissingMetaParamsError
from .params import ParamSelection, SelectedParams
from .registry import ADAPTERS, adapter_from_spec, make_adapter, parse_adapter_spec

__all__ = [
    "ADAPTERS", "Adapter", "AdapterConfig", "MissingMetaParamsError", "ParamSelection", "SelectedParams",
    "adapter_from_spec", "make_adapter", "parse_adapter_spec",
]
