"""BankedGPT <-> artifact: rebuild from the stored config, strict load, logits close after int6/int8."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metattt.artifact import (ConfigMismatchError, CorruptedArtifactError, OverBudgetError, QuantConfig,
                              StateDictMismatchError, TruncatedArtifactError, default_code_bytes,
                              load_model_artifact, save_artifact, save_model_artifact)
from metattt.model import BankedGPT, ModelConfig, tiny_synthetic


def _model(seed: int = 0) -> BankedGPT:
    """Tiny model with every weight non-trivial (init zeroes out-proj/down and sets gains to constants)."""
    torch.manual_seed(seed)
    m = BankedGPT(tiny_synthetic())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("_bank"):
                p.normal_(0, p.shape[-1] ** -0.5)
            else:
                p.add_(torch.randn_like(p) * (0.02 if p.dim() >= 2 else 0.1))
    return m.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[BankedGPT, Path, object]:
    m = _model()
    p = tmp_path_factory.mktemp("art") / "artifact.ptz"
    r = save_model_artifact(p, m, level=9, quant=QuantConfig(small_numel=4096),
                            extras={"metasgd.lr": torch.full((3,), 0.01)}, meta={"note": "tiny"})
    return m, p, r


def test_roundtrip_logits_close(saved):
    m, p, _ = saved
    m2, la = load_model_artifact(p, device="cpu")
    assert isinstance(m2, BankedGPT) and m2.cfg == m.cfg
    assert ModelConfig.from_dict(la.config) == m.cfg
    assert set(la.state_dict) == set(m.state_dict())
    schemes = {n: e["scheme"] for n, e in la.quantized.entries.items()}
    assert schemes["qo_bank"] == "int6_row" and schemes["tok_emb"] == "int8_row"
    assert schemes["blocks.0.q_gain"] == "fp32"
    assert torch.equal(m2.blocks[0].q_gain, m.blocks[0].q_gain)  # control tensors bit-exact
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, m.cfg.vocab_size, (2, 48), generator=g)
    y = torch.randint(0, m.cfg.vocab_size, (2, 48), generator=g)
    with torch.no_grad():
        a, b = m(x), m2(x)
        la_, lb = float(m(x, y)), float(m2(x, y))
    rel = float((a - b).norm() / a.norm())
    assert 1e-4 < rel < 0.1, rel  # measured ~0.04 for int6 banks; a slice mix-up gives O(1)
    assert abs(la_ - lb) < 0.02
    assert la.meta == {"note": "tiny"} and torch.equal(la.extras["metasgd.lr"], torch.full((3,), 0.01))


def test_size_accounting_default_code(saved):
    _, p, r = saved
    assert r.compressed_bytes == p.stat().st_size
    assert r.code_bytes == default_code_bytes() > 0
    assert r.total_bytes == r.compressed_bytes + r.code_bytes
    assert r.headroom == r.budget - r.total_bytes
    _, la = load_model_artifact(p)
    assert la.report.compressed_bytes == r.compressed_bytes and la.report.total_bytes == r.total_bytes


def test_expect_and_budget_on_load(saved):
    _, p, r = saved
    load_model_artifact(p, expect={"vocab_size": 256, "num_layers": 4})
    with pytest.raises(ConfigMismatchError, match="vocab_size: stored 256 vs expected 1024"):
        load_model_artifact(p, expect={"vocab_size": 1024})
    with pytest.raises(OverBudgetError):
        load_model_artifact(p, budget=r.total_bytes - 1)


def test_bad_files_surface_through_model_loader(saved, tmp_path: Path):
    _, p, _ = saved
    data = p.read_bytes()
    q = tmp_path / "x.ptz"
    q.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedArtifactError, match="x.ptz"):
        load_model_artifact(q)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x10
    q.write_bytes(bytes(bad))
    with pytest.raises(CorruptedArtifactError, match="x.ptz"):
        load_model_artifact(q)


def test_strict_state_mismatch_lists_keys(tmp_path: Path):
    m = _model()
    cfg = m.cfg.to_dict()
    sd = dict(m.state_dict())
    del sd["smear_gate"]
    sd["stray_weight"] = torch.zeros(3)
    save_artifact(tmp_path / "a.ptz", cfg, sd, level=1, code_bytes=0)
    with pytest.raises(StateDictMismatchError, match=r"missing=\['smear_gate'\] unexpected=\['stray_weight'\]") as ei:
        load_model_artifact(tmp_path / "a.ptz")
    assert ei.value.missing == ["smear_gate"] and ei.value.unexpected == ["stray_weight"]
    # right keys, wrong shapes: config says vocab 128, tensors are for vocab 256
    save_artifact(tmp_path / "b.ptz", {**cfg, "vocab_size": 128}, dict(m.state_dict()), level=1, code_bytes=0)
    with pytest.raises(StateDictMismatchError, match="tok_emb: stored \\(256, 128\\) vs model \\(128, 128\\)"):
        load_model_artifact(tmp_path / "b.ptz")


def test_model_save_over_budget_keeps_existing(saved, tmp_path: Path):
    m, p, _ = saved
    q = tmp_path / "keep.ptz"
    q.write_bytes(p.read_bytes())
    with pytest.raises(OverBudgetError, match="keep.ptz"):
        save_model_artifact(q, _model(seed=3), level=1, budget=10_000)
    assert q.read_bytes() == p.read_bytes()


def test_wrapped_model_saves_plain_names(tmp_path: Path):
    class Wrapper(torch.nn.Module):  # stands in for DDP (.module) / torch.compile (._orig_mod)
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    m = _model(seed=4)
    save_model_artifact(tmp_path / "w.ptz", Wrapper(Wrapper(m)), level=1, code_bytes=0)
    m2, la = load_model_artifact(tmp_path / "w.ptz")
    assert "tok_emb" in la.state_dict and m2.cfg == m.cfg
