"""Banked GPT: bank layout, functional forward, options."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from metattt.model import BankedGPT, ModelConfig, Runtime, bank_slice_index, gpt_forward, tiny_synthetic


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4,
                xsa_layers=(2,), ve_layers=(1, 2), ve_dim=8, bigram_vocab=32, bigram_dim=8)
    base.update(kw)
    return ModelConfig(**base)


def randomize(model: BankedGPT, seed: int = 0) -> BankedGPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_bank_shapes_and_layout():
    cfg = tiny()
    m = BankedGPT(cfg)
    L, d, kv, h = cfg.num_layers, cfg.model_dim, cfg.kv_dim, cfg.mlp_hidden
    assert m.qo_bank.shape == (2 * L, d, d) and m.kv_bank.shape == (2 * L, kv, d)
    assert m.mlp_up_bank.shape == (L, h, d) and m.mlp_down_bank.shape == (L, d, h)
    assert bank_slice_index(cfg, "q", 1) == ("qo_bank", 1)
    assert bank_slice_index(cfg, "out", 1) == ("qo_bank", L + 1)
    assert bank_slice_index(cfg, "v", 2) == ("kv_bank", L + 2)
    slices = m.named_bank_slices()
    assert len(slices) == 6 * L
    # every bank slice is named exactly once
    seen = {(b, i) for b, i, _, _ in slices}
    assert len(seen) == 6 * L
    assert sum(getattr(m, b)[i].numel() for b, i in seen) == sum(
        getattr(m, b).numel() for b in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"))


def test_bank_slices_are_the_layer_weights():
    """Perturbing layer 1's V slice changes the output exactly as a per-layer V weight would."""
    cfg = tiny(xsa_layers=(), ve_layers=())
    m = randomize(BankedGPT(cfg))
    x = torch.randint(0, 64, (2, 16))
    w = m.layer_weights(1)
    assert w["v"].data_ptr() == m.kv_bank[cfg.num_layers + 1].data_ptr()
    kv = m.kv_bank.detach().clone()
    kv[cfg.num_layers + 1] *= 0  # zero layer 1's V
    out_a = m(x, banks={"kv_bank": kv})
    # Reference: with V of layer 1 zero the attention output of layer 1 is zero, same as zeroing its out-proj.
    qo = m.qo_bank.detach().clone()
    qo[cfg.num_layers + 1] *= 0
    out_b = m(x, banks={"qo_bank": qo})
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_a, m(x))


@pytest.mark.parametrize("extra", [{}, {"recur_start": 1, "recur_end": 2, "recur_times": 2}, {"parallel_start": 1},
                                   {"tie_embeddings": False}])
def test_forward_with_banks_equals_module_and_does_not_mutate(extra):
    cfg = tiny(**extra)
    m = randomize(BankedGPT(cfg), seed=1)
    x = torch.randint(0, 64, (2, 16))
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    ref = m(x, x)
    banks = {n: getattr(m, n).detach().clone().requires_grad_() for n in
             ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")}
    out = m(x, x, banks=banks)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in banks.values())
    assert all(getattr(m, n).grad is None for n in banks)  # bank gradients went to the copies only
    # Changing the copy changes the result; the module stays untouched.
    with torch.no_grad():
        banks["mlp_up_bank"].mul_(2)
    assert not torch.allclose(m(x, x, banks=banks), ref)
    for k, v in m.named_parameters():
        assert torch.equal(v, before[k]), k
    # the functional core equals the module
    torch.testing.assert_close(gpt_forward(cfg, m.param_dict(), x), m(x), rtol=0, atol=0)


def test_unknown_override_is_an_error():
    m = BankedGPT(tiny())
    with pytest.raises(KeyError, match="nope"):
        m(torch.zeros(1, 4, dtype=torch.long), params={"nope": torch.zeros(1)})


def test_causality_and_attention_backends_agree():
    cfg = tiny()
    m = randomize(BankedGPT(cfg), seed=2)
    x = torch.randint(0, 64, (2, 24))
    a = m(x, attn="sdpa")
    b = m(x, attn="math")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, m(x, attn="sdpa-repeat"), rtol=1e-5, atol=1e-5)
    x2 = x.clone()
    x2[:, 12:] = (x2[:, 12:] + 1) % 64
    c = m(x2)
    torch.testing.assert_close(a[:, :12], c[:, :12], rtol=1e-5, atol=1e-5)  # future tokens do not leak
    assert not torch.allclose(a[:, 12:], c[:, 12:])


def test_reductions_and_softcap():
    cfg = tiny(logit_softcap=5.0)
    m = randomize(BankedGPT(cfg), seed=3)
    x = torch.randint(0, 64, (2, 8))
    logits = m(x)
    assert logits.dtype == torch.float32 and logits.abs().max() <= 5.0
    per = m(x, x, reduction="none")
    assert per.shape == x.shape
    torch.testing.assert_close(per.mean(), m(x, x))
    torch.testing.assert_close(per.sum(), m(x, x, reduction="sum"))


def test_config_roundtrip_and_validation():
    cfg = tiny_synthetic()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    rec = dataclasses.replace(cfg, recur_start=1, recur_end=3, recur_times=3)
    assert rec.layer_schedule() == [0, 1, 2, 1, 2, 1, 2, 3]


def test_record_preset_size():
    from metattt.model import pg_2026_03_23
    cfg = pg_2026_03_23()
    m = BankedGPT(cfg)
    banks = sum(getattr(m, b).numel() for b in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"))
    assert banks == 11 * (2 * 512 * 512 + 2 * 256 * 512 + 2 * 1536 * 512)
    assert 26_000_000 < m.num_params() < 28_000_000


def test_eager_core_context_restores_the_compiled_core():
    m = BankedGPT(tiny())
    sentinel = object()
    m._core = sentinel
    with m.eager_core():
        assert m._core is not sentinel
        m(torch.zeros(1, 4, dtype=torch.long))
    assert m._core is sentinel


def test_rope_tables_are_cached_once_per_device_and_sliced():
    m = randomize(BankedGPT(tiny()), seed=4)
    x = torch.randint(0, 64, (1, 20))
    long_first = m(x)
    short = m(x[:, :7])
    assert len(m._rope_cache) == 1 and m._rope_cache["cpu"][0].size(1) == 20
    torch.testing.assert_close(short, long_first[:, :7], rtol=1e-5, atol=1e-5)
    fresh = randomize(BankedGPT(tiny()), seed=4)
    torch.testing.assert_close(fresh(x[:, :7]), short, rtol=0, atol=0)  # sliced tables == tables built for 7


def test_training_after_a_compiled_scorer_under_inference_mode():
    """The evaluator scores with torch.compile(model) under inference_mode, then TTT trains the same model: the
    RoPE tables that the compiled graph cached are inference tensors and must not reach autograd (found on an
    H100: 'Inference tensors cannot be saved for backward'; CPU reproduces it)."""
    m = randomize(BankedGPT(tiny()), seed=5)
    x = torch.randint(0, 64, (2, 17))
    scorer = torch.compile(m, dynamic=False, fullgraph=True)  # and no graph break in the table lookup
    with torch.inference_mode():
        scored = scorer(x[:, :-1], x[:, 1:], reduction="none")
    loss = m(x[:, :-1], x[:, 1:])
    loss.backward()  # raised before the fix
    assert m.qo_bank.grad is not None and not m._rope_cache["cpu"][0].is_inference()
    torch.testing.assert_close(scored.mean(), loss.detach(), rtol=1e-5, atol=1e-5)
    m.prepare_rope(32, torch.device("cpu"))  # what the evaluator does before compiling: tables for every window
    assert m._rope_cache["cpu"][0].size(1) == 32 and not m._rope_cache["cpu"][0].is_inference()


def test_fused_qkv_equals_three_gemms():
    model = randomize(BankedGPT(tiny())).double()  # float64: only the GEMM grouping may differ
    tok = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    fused = model(tok[:, :-1], tok[:, 1:], reduction="none")
    g_fused = torch.autograd.grad(fused.sum(), [model.qo_bank, model.kv_bank])
    model.runtime = Runtime(fused_qkv=False)
    split = model(tok[:, :-1], tok[:, 1:], reduction="none")
    g_split = torch.autograd.grad(split.sum(), [model.qo_bank, model.kv_bank])
    torch.testing.assert_close(fused, split, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fused, g_split):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_fused[1].abs().sum() > 0  # the V half of kv_bank gets gradient through the fused path too


@pytest.mark.parametrize("parallel_start", [None, 1])
def test_folded_gains_equal_scaled_outputs(parallel_start):
    """attn_scale/mlp_scale folded into the out/down weights: same loss and same gradients for every parameter."""
    model = randomize(BankedGPT(tiny(parallel_start=parallel_start))).double()
    tok = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    params = [p for _, p in model.named_parameters()]
    outs, grads = [], []
    for fold in (True, False):
        model.runtime = Runtime(fold_gains=fold)
        loss = model(tok[:, :-1], tok[:, 1:], reduction="none")
        outs.append(loss)
        grads.append(torch.autograd.grad(loss.sum(), params))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    g = dict(zip([n for n, _ in model.named_parameters()], grads[0]))
    assert g["blocks.0.attn_scale"].abs().sum() > 0 and g["blocks.2.mlp_scale"].abs().sum() > 0


def test_bf16_residual_stream_only_under_autocast():
    model = randomize(BankedGPT(tiny()))
    tok = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    ref = model(tok[:, :-1], tok[:, 1:], reduction="none")
    model.runtime = Runtime(residual_dtype="bfloat16")
    # without autocast the switch is a no-op: fp32 weights need an fp32 stream
    torch.testing.assert_close(model(tok[:, :-1], tok[:, 1:], reduction="none"), ref, rtol=0, atol=0)
    seen: list[torch.dtype] = []
    from metattt.model import gpt as gpt_mod

    orig = gpt_mod._block

    def spy(cfg, p, x, *a, **k):
        seen.append(x.dtype)
        return orig(cfg, p, x, *a, **k)

    gpt_mod._block = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tok[:, :-1], tok[:, 1:], reduction="none")
            model.runtime = Runtime()
            high = model(tok[:, :-1], tok[:, 1:], reduction="none")
    finally:
        gpt_mod._block = orig
    n = len(model.cfg.layer_schedule())
    assert seen == [torch.bfloat16] * n + [torch.float32] * n
    assert low.dtype == high.dtype == torch.float32  # the loss stays fp32 either way
    diff = (low - high).abs()
    assert 0 < diff.mean() < 0.01 * high.mean()  # bf16 rounding (~0.4% per op), nothing worse


def test_runtime_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="residual_dtype"):
        Runtime(residual_dtype="float16")


def test_compile_core_passes_inductor_options_unless_a_mode_is_given(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    BankedGPT(tiny()).compile_core()
    BankedGPT(tiny()).compile_core(mode="max-autotune")  # torch.compile refuses mode and options together
    import torch._inductor.config as icfg

    if hasattr(icfg.triton, "mix_order_reduction"):
        assert seen[0]["options"] == {"triton.mix_order_reduction": False}
    assert "options" not in seen[1] and seen[1]["mode"] == "max-autotune"
