"""Meta-TTT core: parameter selections, test-time adapters (one update rule each) and the meta-training step."""
from __future__ import annotations

from . import rules
from .adapter import Adapter, AdapterConfig, MissingMetaParamsError, register_nested
from .params import ParamSelection, SelectedParams
from .registry import ADAPTERS, PluginError, Registry, adapter_from_spec, make_adapter, parse_adapter_spec

__all__ = [
    "ADAPTERS", "Adapter", "AdapterConfig", "MissingMetaParamsError", "ParamSelection", "PluginError", "Registry",
    "SelectedParams", "adapter_from_spec", "make_adapter", "parse_adapter_spec", "register_nested", "rules",
]
