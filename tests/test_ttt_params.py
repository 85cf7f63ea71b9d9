"""Parameter selections: exact counts, bank-slice freezing, parsing errors, registry specs."""
from __future__ import annotations

import pytest
import torch

from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT
from metattt.ttt import ParamSelection, adapter_from_spec, make_adapter, parse_adapter_spec


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_layers: int = 3, tie: bool = True, seed: int = 0) -> BankedGPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, num_layers=num_layers, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                      rope_dims=8, xsa_layers=(num_layers - 1,), ve_layers=(num_layers - 1,), ve_dim=8,
                      bigram_vocab=32, bigram_dim=8, tie_embeddings=tie)
    m = BankedGPT(cfg)
    with torch.no_grad():  # out-proj / down start at zero: randomise so every slice gets a gradient
        for p in (m.qo_bank, m.mlp_down_bank):
            p.normal_(std=0.1)
    return m


def test_banks_layers_ge2_count_matches_hand_calculation() -> None:
    m = tiny_model(3)
    d, kv, h = 32, 16, 64  # model_dim, num_kv_heads*head_dim, mlp_mult*d
    per_layer = d * d + d * d + kv * d + kv * d + h * d + d * h  # q, out, k, v, up, down
    sel = ParamSelection.parse("banks:layers>=2").resolve(m)
    assert sel.count == per_layer == 7168
    assert sel.slices["qo_bank"] == [2, 5] and sel.slices["kv_bank"] == [2, 5]
    assert sel.slices["mlp_up_bank"] == [2] and sel.slices["mlp_down_bank"] == [2]
    assert sel.masks["qo_bank"].flatten().tolist() == [0, 0, 1, 0, 0, 1]
    # "all:layers>=2": everything except layers 0-1's bank slices and blocks.0/1 control tensors
    total = sum(p.numel() for p in m.parameters())
    frozen = 2 * per_layer + sum(p.numel() for n, p in m.named_parameters() if n.startswith(("blocks.0.", "blocks.1.")))
    sel_all = ParamSelection.parse("all:layers>=2").resolve(m)
    assert sel_all.count == total - frozen
    assert sel_all.model_total == total
    assert "TOTAL" in sel_all.report() and f"{total:,}" in sel_all.report()


@pytest.mark.parametrize("spec", ["banks:layers>=2", "all:layers>=2"])
def test_sgd_step_leaves_frozen_layer_slices_bit_identical(spec: str) -> None:
    m = tiny_model(3)
    a = make_adapter("sgd", spec, lr=0.05, momentum=0.9, epochs=2, batch_seqs=2, schedule="constant").bind(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, 64, (4, 16), generator=g)
    y = torch.randint(4, 64, (4, 16), generator=g)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    a.adapt(m, x, y, progress=0.0)
    after = {**before, **a.params()}
    for bank, idx, layer, kind in m.named_bank_slices():
        same = torch.equal(after[bank][idx], before[bank][idx])
        assert same == (layer < 2), (bank, idx, layer, kind)
    for n in before:  # the module itself is never mutated
        assert torch.equal(dict(m.named_parameters())[n], before[n])
    if spec.startswith("all"):
        assert torch.equal(after["blocks.0.q_gain"], before["blocks.0.q_gain"])
        assert not torch.equal(after["blocks.2.attn_scale"], before["blocks.2.attn_scale"])
        assert not torch.equal(after["tok_emb"], before["tok_emb"])


def test_kinds_groups_and_head() -> None:
    m = tiny_model(3)
    sel = ParamSelection.parse("banks[q,v]:layers=1-2").resolve(m)
    assert sel.names == ("qo_bank", "kv_bank")
    assert sel.slices["qo_bank"] == [1, 2] and sel.slices["kv_bank"] == [4, 5]
    assert sel.count == 2 * 32 * 32 + 2 * 16 * 32
    assert ParamSelection.parse("head").resolve(m).names == ("tok_emb",)  # tied: the head is tok_emb
    assert ParamSelection.parse("head").resolve(tiny_model(3, tie=False)).names == ("lm_head",)
    emb = ParamSelection.parse("emb").resolve(m)
    assert set(emb.names) == {"tok_emb", "bigram_emb", "bigram_proj", "ve_emb", "ve_proj"}
    norms = set(ParamSelection.parse("norms:layers<1").resolve(m).names)
    assert {"blocks.0.attn_scale", "blocks.0.resid_mix", "blocks.0.q_gain", "skip_weights", "smear_gate",
            "bigram_scale", "ve_scales"} <= norms
    assert not any(n.startswith(("blocks.1.", "blocks.2.")) for n in norms)
    combo = ParamSelection.parse("banks:layers>=2+emb+norms+head").resolve(m)
    assert combo.count == ParamSelection.parse("banks:layers>=2").resolve(m).count + emb.count + \
        ParamSelection.parse("norms").resolve(m).count
    assert ParamSelection.parse("all").resolve(m).count == sum(p.numel() for p in m.parameters())
    assert ParamSelection.parse("none").resolve(m).count == 0
    qg = ParamSelection.parse("q_gain").resolve(m)  # one scalar per head and layer, nothing else
    assert qg.names == ("blocks.0.q_gain", "blocks.1.q_gain", "blocks.2.q_gain") and qg.count == 3 * 2
    assert ParamSelection.parse("q_gain:layers>=2").resolve(m).names == ("blocks.2.q_gain",)


@pytest.mark.parametrize("spec, msg", [
    ("bankz", "unknown group"), ("banks[q,x]", "unknown slice kinds"), ("emb[q]", "only apply to banks"),
    ("banks:layer>=2", "bad filter"), ("banks:layers=3-1", "empty layer range"), ("", "non-empty"),
])
def test_selection_parse_errors(spec: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        ParamSelection.parse(spec)


def test_selection_that_selects_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="selects no parameters"):
        ParamSelection.parse("banks:layers>=7").resolve(tiny_model(3))


def test_registry_spec_parsing_and_errors() -> None:
    name, kw = parse_adapter_spec("sgd:lr=0.002,momentum=0.9,epochs=3,select=banks[q,k,v,out]:layers=1-2")
    assert name == "sgd" and kw == {"lr": 0.002, "momentum": 0.9, "epochs": 3, "select": "banks[q,k,v,out]:layers=1-2"}
    a = adapter_from_spec("sgd:lr=1,epochs=2,select=banks:layers>=1")
    assert a.cfg.lr == 1.0 and isinstance(a.cfg.lr, float) and a.selection.spec == "banks:layers>=1"
    with pytest.raises(ValueError, match="valid adapters: none, sgd"):
        parse_adapter_spec("adam:lr=1")
    with pytest.raises(ValueError, match=r"unknown hyper-parameters \['lrr'\].*momentum"):
        adapter_from_spec("sgd:lrr=0.1")
    with pytest.raises(ValueError, match="is not a int"):
        make_adapter("sgd", epochs=1.5)
    with pytest.raises(ValueError, match="reset must be one of"):
        make_adapter("sgd", reset="sometimes")
    with pytest.raises(ValueError, match="key=value"):
        parse_adapter_spec("sgd:lr")
