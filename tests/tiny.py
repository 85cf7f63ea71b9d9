"""Shared helpers for tests that need a tiny model: one config and one short training loop."""
from __future__ import annotations

import torch

from metattt.data.loaders import TrainLoader
from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT


def tiny_config(**kw) -> ModelConfig:
    """A 2-layer, 32-wide model for a 64-token vocabulary, with the optional pieces off unless given."""
    base = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, rope_dims=8,
                xsa_layers=(), ve_layers=(), bigram_vocab=0, smear_gate=False, unet_skips=False)
    return ModelConfig(**{**base, **kw})


def trained_tiny(train_pattern: str, seq_len: int, steps: int, cfg: ModelConfig | None = None,
                 lr: float = 0.02) -> BankedGPT:
    """A tiny model after ``steps`` Adam steps on 16-row batches (seed 0), in eval mode."""
    torch.manual_seed(0)
    model = BankedGPT(cfg or tiny_config())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = TrainLoader(train_pattern, seq_len, 16 * seq_len)
    for _ in range(steps):
        x, y = loader.next_batch()
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
