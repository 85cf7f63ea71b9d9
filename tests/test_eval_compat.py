"""``--compat pg-record``: the record scripts' scoring, checked against an independent implementation of their
evaluator loops (written here from their description in docs/interop.md), on a tiny model with dynamic NTK RoPE
so that padding every forward to the context matters."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metattt.artifact.model_io import save_model_artifact
from metattt.data.synthetic import SyntheticSpec, make_synthetic_dataset, synthetic_lut
from metattt.data.loaders import load_val_tokens
from metattt.eval.compat import tail_plan, truncate
from metattt.eval.run import main
from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT

SPEC = SyntheticSpec(vocab_size=64, n_train_tokens=2000, n_val_tokens=2500, min_doc_len=200, max_doc_len=600)
L, STRIDE = 64, 16


def _record_like_model(noise: float = 0.0) -> BankedGPT:
    """A tiny model with every record feature the compat path touches (XSA, VE, bigram, NTK RoPE), seeded 0, in
    eval mode; ``noise`` > 0 adds Gaussian noise of that scale to every parameter (drawn after the init, so the
    global RNG continues as it would inline)."""
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                      rope_dims=8, rope_ntk_len=16, xsa_layers=(1,), ve_layers=(1,), ve_dim=8, bigram_vocab=32,
                      bigram_dim=8)
    torch.manual_seed(0)
    model = BankedGPT(cfg).eval()
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    return model


def _record_eval(model: BankedGPT, tokens: torch.Tensor, lut, sliding: bool, bf16_logits: bool = False
                 ) -> tuple[float, float]:
    """The record's eval_val (flat) / eval_val_sliding loops: truncated stream, windows padded to L.
    ``bf16_logits``: the model's logits rounded to bf16 before the loss (its compiled sliding forward returns them
    so). Returns (bpb, nats of the short tail windows)."""
    tokens = tokens[: ((tokens.numel() - 1) // L) * L + 1]
    total = tokens.numel() - 1
    nats = nbytes = tail = 0.0
    starts = range(0, total, STRIDE) if sliding else range(0, total, L)
    for ws in starts:
        end = min(ws + L, total)
        wlen = end - ws
        x = torch.zeros(1, L, dtype=torch.long)
        x[0, :wlen] = tokens[ws:end]
        y = tokens[ws + 1:end + 1]
        with torch.no_grad():
            logits = model(x)[0, :wlen]
            nll = F.cross_entropy((logits.bfloat16() if bf16_logits else logits).double(), y, reduction="none")
        s = 0 if (ws == 0 or not sliding) else max(wlen - STRIDE, 0)
        nats += float(nll[s:].sum())
        tail += float(nll[s:].sum()) if wlen < L else 0.0
        nbytes += float(lut.target_bytes(x[0, s:wlen], y[s:]).double().sum())
    return nats / math.log(2) / nbytes, tail


def test_tail_plan_is_the_records_extra_windows() -> None:
    p = tail_plan(2049, 2048, 64)
    assert p.n_windows == 31 and set((p.hi - p.lo).tolist()) == {64} and int(p.hi[0]) == 2049
    assert truncate(torch.arange(5000), 2048).numel() == 4097


def test_compat_numbers_equal_the_record_loops(tmp_path: Path, capsys) -> None:
    meta = make_synthetic_dataset(tmp_path / "data", SPEC)
    model = _record_like_model(noise=0.05)
    lut = synthetic_lut(SPEC)
    art = tmp_path / "run" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, model, meta={"lut": lut.to_dict(), "val_pattern": meta["val_pattern"], "seq_len": L},
                        allow_over_budget=True)
    argv = [str(art), "--protocols", "flat,sliding", "--stride", str(STRIDE), "--bootstrap", "0", "--quiet",
            "--wandb", "off", "--compat", "pg-record"]
    assert main(argv[:-2] + ["--compat-knobs", "qat=0"]) == 2  # knobs without --compat: a clear error
    assert main(argv + ["--compat-knobs", "qat=3"]) == 2
    assert main(argv) == 0
    rep = json.loads((tmp_path / "run" / "eval.json").read_text())
    from metattt.artifact.model_io import load_model_artifact

    loaded, _ = load_model_artifact(art)
    tokens = load_val_tokens(meta["val_pattern"])
    for name, sliding in (("flat", False), ("sliding", True)):
        c = rep["protocols"][name]["compat"]
        ref_bpb, ref_tail = _record_eval(loaded, tokens, lut, sliding)
        assert c["bpb"] == pytest.approx(ref_bpb, rel=1e-6)
        # the tail alone is a few windows: checked tightly (it is where the padding to L matters)
        assert c["tail_nats"] == pytest.approx(ref_tail, rel=1e-6, abs=1e-9)
    assert rep["protocols"]["sliding"]["compat"]["tail_windows"] == L // STRIDE - 1
    assert rep["meta"]["compat"] == "pg-record" if "meta" in rep else True
    # our own number stays "every target exactly once" (on the truncated stream)
    n_targets = ((SPEC.n_val_tokens - 1) // L) * L
    assert rep["data"]["n_targets"] == n_targets


def test_storage_dtypes_round_every_update_of_the_named_tensors() -> None:
    from metattt.ttt.registry import adapter_from_spec

    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                      rope_dims=8, xsa_layers=(), ve_layers=(), bigram_vocab=0, smear_gate=False, unet_skips=False)
    torch.manual_seed(0)
    model = BankedGPT(cfg)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    plain = adapter_from_spec("sgd:lr=0.05,epochs=2,batch_seqs=2").bind(model)
    rounded = adapter_from_spec("sgd:lr=0.05,epochs=2,batch_seqs=2").bind(model)
    rounded.storage_dtypes = {"tok_emb": torch.bfloat16}
    plain.adapt(model, x, y, 0.0)
    rounded.adapt(model, x, y, 0.0)
    t = rounded.params()["tok_emb"]
    assert torch.equal(t, t.bfloat16().float()) and not torch.equal(t, plain.params()["tok_emb"])
    assert not torch.equal(plain.params()["tok_emb"], plain.params()["tok_emb"].bfloat16().float())


def test_storage_state_rounds_gradients_and_momentum_of_the_named_tensors() -> None:
    from metattt.ttt.registry import adapter_from_spec

    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                      rope_dims=8, xsa_layers=(), ve_layers=(), bigram_vocab=0, smear_gate=False, unet_skips=False)
    torch.manual_seed(0)
    model = BankedGPT(cfg)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    runs = {}
    for state in (False, True):
        ad = adapter_from_spec("sgd:lr=0.05,epochs=2,batch_seqs=2").bind(model)
        ad.storage_dtypes, ad.storage_state = {"tok_emb": torch.bfloat16}, state
        ad.adapt(model, x, y, 0.0)
        runs[state] = ad
    mom = runs[True]._state["mom.tok_emb"]
    assert mom.dtype == torch.float32 and torch.equal(mom, mom.bfloat16().float())
    assert not torch.equal(runs[False]._state["mom.tok_emb"], runs[False]._state["mom.tok_emb"].bfloat16().float())
    other = runs[True]._state["mom.qo_bank"]  # tensors without a storage dtype stay float32 values
    assert not torch.equal(other, other.bfloat16().float())
    assert not torch.equal(runs[True].params()["tok_emb"], runs[False].params()["tok_emb"])


def _int6_grid(w: torch.Tensor) -> torch.Tensor:
    """The record's late-QAT weight, as read from its CastedLinear: rows on a grid of max|row|/31 (at least 1/31),
    integers clamped to [-32, 31]."""
    s = torch.clamp(w.abs().max(dim=1).values / 31, min=1 / 31)
    return (w / s[:, None]).round().clamp(-32, 31) * s[:, None]


def test_fake_int6_is_the_records_late_qat_forward_and_identity_backward() -> None:
    from metattt.eval.compat import fake_int6

    torch.manual_seed(0)
    w = (torch.randn(6, 5) * torch.tensor([0.01, 0.5, 2.0, 3.0, 0.2, 40.0])[:, None]).requires_grad_(True)
    out = fake_int6(w)
    assert torch.equal(out.detach(), _int6_grid(w.detach()))
    (out * torch.arange(30.0).view(6, 5)).sum().backward()
    assert torch.equal(w.grad, torch.arange(30.0).view(6, 5))


def test_record_ttt_factory_trains_through_quantized_projections() -> None:
    from metattt.eval.compat import parse_knobs, record_ttt_factory
    from metattt.ttt.registry import adapter_from_spec

    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                      rope_dims=8, xsa_layers=(1,), ve_layers=(1,), ve_dim=8, bigram_vocab=32, bigram_dim=8)
    torch.manual_seed(0)
    model = BankedGPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    make = lambda _key: adapter_from_spec("sgd:lr=0.05,epochs=1,batch_seqs=2").bind(model)  # noqa: E731
    ad = record_ttt_factory(make, parse_knobs(""), bf16=False)("sgd")
    assert not ad.storage_dtypes  # the bf16 parts need autocast on CUDA
    p = model.param_dict()
    want = model(x, y, params={"bigram_proj": _int6_grid(p["bigram_proj"].detach()),
                               "ve_proj": _int6_grid(p["ve_proj"].detach())})
    got = ad.loss(model, x, y, ad.params())
    assert torch.allclose(got, want, rtol=0, atol=1e-6) and not torch.allclose(got, model(x, y), atol=1e-6)
    off = record_ttt_factory(make, parse_knobs("qat=0"), bf16=False)("sgd")
    assert torch.equal(off.loss(model, x, y, off.params()), model(x, y))


@pytest.mark.parametrize("bad", ["qat=2", "nope=1", "attn=fast", "qat"])
def test_bad_compat_knobs_are_a_clear_error(bad: str) -> None:
    from metattt.eval.compat import parse_knobs

    with pytest.raises(ValueError, match="--compat-knobs"):
        parse_knobs(bad)


def test_record_casts_change_nothing_in_float32() -> None:
    from metattt.model.gpt import Runtime

    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                      rope_dims=8, xsa_layers=(1,), ve_layers=(1,), ve_dim=8, bigram_vocab=32, bigram_dim=8)
    torch.manual_seed(0)
    a = BankedGPT(cfg)
    b = BankedGPT(cfg, Runtime(record_casts=True, attn="math"))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="runtime attn"):
        Runtime(attn="fast")


def test_eager_adapted_scoring_keeps_the_records_batches_and_numbers() -> None:
    """``eager_adapted`` scores TTT protocols without row padding (a chunk's last batch is smaller, as in the
    record's loop) but still pads every forward to the context: with an adapter that never moves (lr 0) its
    compat numbers equal the sliding protocol's, tail windows included."""
    from metattt.eval.protocols import EvalConfig, evaluate, parse_protocols, prepare_stream
    from metattt.ttt.registry import adapter_from_spec

    model = _record_like_model()
    tokens = truncate(torch.randint(2, 64, (700,)), L)
    data = prepare_stream(tokens, synthetic_lut(SPEC), "cpu", 128)
    ecfg = EvalConfig(seq_len=L, context=L, stride=STRIDE, chunk_tokens=128, batch_tokens=4 * L, n_boot=0,
                      compat="pg-record", eager_adapted=True)
    ad = adapter_from_spec("sgd:lr=0.0,epochs=1,batch_seqs=2").bind(model)
    shapes: list[tuple[int, ...]] = []  # scoring forwards (inference mode), not the adapter's training ones
    hook = model.register_forward_pre_hook(
        lambda _m, a: shapes.append(tuple(a[0].shape)) if torch.is_inference_mode_enabled() else None)
    by = evaluate(model, data, parse_protocols("ttt:sgd"), {"sgd": ad}, ecfg).results
    hook.remove()
    assert {t for _, t in shapes} == {L} and min(b for b, _ in shapes) < 4  # padded to L, last batches not
    by.update(evaluate(model, data, parse_protocols("sliding"), {}, ecfg).results)
    assert by["ttt:sgd"].compat["tail_nats"] == pytest.approx(by["sliding"].compat["tail_nats"], rel=1e-5)
    assert by["ttt:sgd"].nats == pytest.approx(by["sliding"].nats, rel=1e-5)
    assert by["ttt:sgd"].compat["tail_windows"] == L // STRIDE - 1


def test_sliding_logits_round_the_sliding_score_only() -> None:
    """``sliding_logits`` (RecordNumerics; set under bf16 autocast on CUDA, forced here on the CPU): the sliding
    protocol's logits, tail windows included, are rounded to bf16 once before the loss, as the record's compiled
    ``forward_logits`` returns them; flat (whose loss the record fuses into its compiled graph) is untouched."""
    from metattt.eval.compat import compat_bpb, parse_knobs
    from metattt.eval.protocols import EvalConfig, evaluate, parse_protocols, prepare_stream

    assert parse_knobs("sliding_logits=0").sliding_logits is False and parse_knobs("").sliding_logits
    model = _record_like_model(noise=0.5)  # logits of a few units: bf16 rounding moves the loss visibly
    lut = synthetic_lut(SPEC)
    tokens = truncate(torch.randint(2, 64, (700,)), L)
    data = prepare_stream(tokens, lut, "cpu", 128)
    base = EvalConfig(seq_len=L, context=L, stride=STRIDE, chunk_tokens=128, batch_tokens=4 * L, n_boot=0,
                      compat="pg-record")
    specs = parse_protocols("flat,sliding")
    plain = evaluate(model, data, specs, {}, base).results
    rounded = evaluate(model, data, specs, {}, replace(base, sliding_logits=True)).results
    assert rounded["flat"].nats == plain["flat"].nats
    total = float(data.target_bytes.sum())
    for res, bf16 in ((plain, False), (rounded, True)):
        ref_bpb, ref_tail = _record_eval(model, tokens, lut, sliding=True, bf16_logits=bf16)
        got = res["sliding"]
        assert compat_bpb(got.nats, total, got.compat) == pytest.approx(ref_bpb, rel=1e-6)
        assert got.compat["tail_nats"] == pytest.approx(ref_tail, rel=1e-6)
    # the rounding is seen (well beyond the tolerance above), and only with the switch
    assert abs(rounded["sliding"].nats / plain["sliding"].nats - 1) > 1e-5  # 2.6e-5 here
    # float32 runs (the audit's re-runs, --no-autocast) never round
    f32 = evaluate(model, data, specs, {}, replace(base, sliding_logits=True, autocast=False)).results
    assert f32["sliding"].nats == plain["sliding"].nats


def test_record_ttt_factory_steps_the_ve_scales_as_the_records_factors() -> None:
    """The record's TTT steps s and l_i, not e_i = s*l_i: one SGD step on the factors, taken by hand on the same
    function, is what the wrapped adapter's step gives to first order (error O(lr^2)); the products' own step
    differs by O(lr). With the knob off (the default), or without factors in the artifact, the adapter is left as
    it was."""
    from metattt.eval.compat import parse_knobs, record_ttt_factory
    from metattt.ttt.registry import adapter_from_spec

    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                      rope_dims=8, xsa_layers=(1,), ve_layers=(0, 1), ve_dim=8, bigram_vocab=32, bigram_dim=8)
    torch.manual_seed(0)
    model = BankedGPT(cfg).double()  # float64: the O(lr^2) error is far above rounding
    s, ls = 0.35, [1.15, 0.8]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        model.ve_scales.copy_(torch.tensor([s * ls[0], s * ls[1]]))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    lr = 1e-2
    fs = torch.tensor(s, requires_grad=True, dtype=torch.float64)
    fl = torch.tensor(ls, requires_grad=True, dtype=torch.float64)
    model(x, y, params={"ve_scales": fs * fl}).backward()
    want = ((fs - lr * fs.grad) * (fl - lr * fl.grad)).detach()
    model.zero_grad(set_to_none=True)
    e0 = model.ve_scales.detach().clone()

    def stepped(knobs: str, factors) -> torch.Tensor:
        spec = f"sgd:lr={lr},momentum=0,epochs=1,batch_seqs=2,grad_clip=0,schedule=constant"
        ad = record_ttt_factory(lambda _k: adapter_from_spec(spec).bind(model), parse_knobs(knobs), bf16=False,
                                ve_factors=factors)("sgd")
        ad.adapt(model, x, y, autocast=False)
        return ad.params()["ve_scales"].detach()

    factors = {"shared": s, "layers": ls}
    got, off = stepped("qat=0,ve_factors=1", factors), stepped("qat=0", factors)
    absent = stepped("qat=0,ve_factors=1", None)
    moved = (want - e0).abs().max()
    assert moved > 0
    assert (got - want).abs().max() < 1e-2 * moved  # measured 1.4e-3 of it
    assert (off - want).abs().max() > 0.3 * moved  # stepping the products is another update (measured 0.64)
    assert torch.equal(off, absent)
