"""The scaling-ladder presets (issue 29): the record's block design at five sizes, exact parameter counts."""
from __future__ import annotations

import torch

from metattt.model.gpt import BankedGPT
from metattt.train.budgets import param_counts
from metattt.train.cli import parse_config
from metattt.train.config import preset

# (total, non-embedding) parameters; non-embedding = all but tok_emb, bigram_emb, ve_emb
COUNTS = {
    "ladder-0.6m": (1_075_618, 616_866),
    "ladder-1.2m": (1_677_962, 1_186_442),
    "ladder-2m": (2_557_234, 2_032_946),
    "ladder-4m": (4_775_994, 4_186_170),
    "ladder-8m": (9_024_395, 8_369_035),
    "pg-2026-03-23": (26_928_219, 26_076_251),  # the undertrained anchor
}


def test_ladder_parameter_counts_are_exact_and_span_half_to_eight_million():
    assert {k: param_counts(preset(k).model) for k in COUNTS} == COUNTS
    non_emb = [COUNTS[k][1] for k in COUNTS if k.startswith("ladder-")]
    assert non_emb == sorted(non_emb) and 0.5e6 < non_emb[0] < 0.7e6 and 8e6 < non_emb[-1] < 8.5e6
    assert all(1.6 < b / a < 2.1 for a, b in zip(non_emb, non_emb[1:]))  # about doubling per rung
    m = BankedGPT(preset("ladder-0.6m").model)  # the meta-device count is the real model's
    assert (m.num_params(), m.num_non_embedding_params()) == COUNTS["ladder-0.6m"]


def test_ladder_presets_keep_the_record_design():
    pg = preset("pg-2026-03-23")
    for name in COUNTS:
        if not name.startswith("ladder-"):
            continue
        cfg = preset(name)
        m = cfg.model
        assert (m.num_heads, m.num_kv_heads, m.mlp_mult, m.rope_dims, m.vocab_size) == (8, 4, 3.0, 16, 1024)
        assert m.head_dim >= m.rope_dims and m.model_dim % 8 == 0
        assert m.xsa_layers[-1] == m.ve_layers[-1] == m.num_layers - 1 and len(m.xsa_layers) >= len(m.ve_layers)
        assert (m.bigram_vocab, m.bigram_dim, m.ve_dim) == (pg.model.bigram_vocab, 128, 128)
        assert cfg.seq_len == 2048 and cfg.schedule == "wsd" and cfg.max_wallclock_s == 0 and cfg.ema_decay == 0
        assert cfg.loader_mode == "random"
        assert cfg.train_batch_tokens % cfg.seq_len == 0 and cfg.micro_batch_tokens == cfg.train_batch_tokens
        assert cfg.optim.matrix_lr == pg.optim.matrix_lr and cfg.optim.muon_momentum_warmup_steps == 100
    assert parse_config(["--preset", "ladder-2m", "--save-at-dn", "25,50"]).save_at_dn == (25.0, 50.0)


def test_smallest_rung_trains_a_step_on_cpu():
    cfg = preset("ladder-0.6m")
    model = BankedGPT(cfg.model)
    x = torch.randint(0, 1024, (2, 64))
    loss = model(x, torch.roll(x, -1, 1))
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(1024.0)).item()) < 0.5
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("_bank"))
