"""Banked GPT model."""
from .attention import ATTN_BACKENDS, causal_attention, flash_available
from .config import ModelConfig, pg_2026_03_23, tiny_synthetic
from .gpt import BANK_LAYOUT, BANK_NAMES, SLICE_KINDS, BankedGPT, Runtime, bank_slice_index, gpt_forward

__all__ = [
    "ATTN_BACKENDS", "BANK_LAYOUT", "BANK_NAMES", "SLICE_KINDS", "BankedGPT", "ModelConfig", "Runtime", "bank_slice_index",
    "causal_attention", "flash_available", "gpt_forward", "pg_2026_03_23", "tiny_synthetic",
]
