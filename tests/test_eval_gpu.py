"""Evaluator on CUDA (bf16 autocast): agrees with CPU fp32, ttt:none stays bitwise equal to sliding.

Self-contained (no artifact / zstandard needed): a tiny random-init model and a synthetic stream."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metattt.data.bpb import ByteLUT
from metattt.eval.protocols import EvalConfig, evaluate, parse_protocols, prepare_stream
from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT
from metattt.ttt.registry import make_adapter

pytestmark = pytest.mark.gpu


def _setup(device):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=2,
                      rope_dims=8, xsa_layers=(1,), ve_layers=(1,), ve_dim=16, bigram_vocab=128, bigram_dim=16)
    model = BankedGPT(cfg)
    with torch.no_grad():  # output-side matrices start at zero: give them weight so scoring is non-trivial
        model.qo_bank[2:].normal_(std=0.05)
        model.mlp_down_bank.normal_(std=0.05)
    rng = np.random.default_rng(0)
    toks = rng.integers(4, 64, size=6000)
    toks[::500] = 1
    lut = ByteLUT.uniform(64)
    return model.to(device).eval(), prepare_stream(toks, lut, device, 512)


def test_gpu_bf16_scoring_matches_cpu_and_ttt_none_is_bitwise():
    cfg = EvalConfig(seq_len=128, context=128, stride=16, chunk_tokens=512, batch_tokens=4096, n_boot=0)
    m, data = _setup("cuda")
    ads = {"none": make_adapter("none").bind(m), "sgd": make_adapter("sgd", lr=0.05).bind(m)}
    r = evaluate(m, data, parse_protocols("sliding,ttt:none,ttt:sgd,doc"), ads, cfg).results
    assert np.array_equal(r["ttt:none"].stream.token_nll, r["sliding"].stream.token_nll)
    mc, dc = _setup("cpu")
    cpu = evaluate(mc, dc, parse_protocols("sliding"), {}, cfg).results["sliding"]
    assert r["sliding"].nats == pytest.approx(cpu.nats, rel=2e-2)  # bf16 autocast vs fp32
    assert r["ttt:sgd"].nats < r["sliding"].nats


def test_gpu_no_autocast_means_float32_test_time_updates():
    """``--no-autocast`` (EvalConfig.autocast=False) must train in float32 too, not only score: the adapter's loss
    runs outside bf16 autocast; with autocast on it runs inside (both checked, so the probe itself is live)."""
    from metattt.ttt.sgd import SGDAdapter

    class Probe(SGDAdapter):
        name = "probe"
        seen: list

        def loss(self, model, x, y, overrides, attn=None):
            self.seen.append(torch.is_autocast_enabled("cuda"))
            return super().loss(model, x, y, overrides, attn)

    m, data = _setup("cuda")
    for autocast in (False, True):
        cfg = EvalConfig(seq_len=128, context=128, stride=16, chunk_tokens=512, batch_tokens=4096, n_boot=0,
                         autocast=autocast)
        probe = Probe(SGDAdapter.Config(lr=0.05)).bind(m)
        probe.seen = []
        evaluate(m, data, parse_protocols("ttt:probe"), {"probe": probe}, cfg)
        assert probe.seen and set(probe.seen) == {autocast}, (autocast, probe.seen[:4])
