"""Artifact container: round trip, byte accounting, every bad-artifact error, atomic writes."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

from metattt.artifact import (HEADER_SIZE, MAGIC, ArtifactError, ArtifactVersionError, ConfigMismatchError,
                              CorruptedArtifactError, NotAnArtifactError, OverBudgetError, QuantConfig,
                              TruncatedArtifactError, code_bytes, default_code_paths, load_artifact,
                              pack_artifact, save_artifact)

CFG = {"vocab_size": 64, "num_layers": 2, "model_dim": 32, "xsa_layers": [1]}
CODE = 1000  # fixed code bytes: keeps tests independent of the package's own size


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L, d = 2, 32
    sd = {
        "tok_emb": torch.randn(64, d, generator=g) * 0.02,
        "qo_bank": torch.randn(2 * L, d, d, generator=g) * d ** -0.5,
        "kv_bank": torch.randn(2 * L, 16, d, generator=g) * d ** -0.5,
        "mlp_up_bank": torch.randn(L, 3 * d, d, generator=g) * d ** -0.5,
        "mlp_down_bank": torch.randn(L, d, 3 * d, generator=g) * (3 * d) ** -0.5,
        "bigram_emb": torch.randn(48, 8, generator=g) * 0.02,
        "bigram_proj": torch.randn(d, 8, generator=g),
        "bigram_scale": torch.tensor([0.05]),
        "skip_weights": torch.ones(1, d),
    }
    for i in range(L):
        sd[f"blocks.{i}.q_gain"] = torch.full((4,), 1.5)
        sd[f"blocks.{i}.resid_mix"] = torch.randn(2, d, generator=g)
    return sd


def _save(path, sd=None, **kw):
    kw.setdefault("level", 3)
    kw.setdefault("code_bytes", CODE)
    return save_artifact(path, CFG, _state() if sd is None else sd, **kw)


@pytest.fixture
def art(tmp_path: Path) -> Path:
    p = tmp_path / "artifact.ptz"
    _save(p, extras={"metasgd.lr.qo_bank": torch.full((4,), 0.01)},
          meta={"tokenizer_sha": "abc", "summary": {"val_bpb": 1.23}})
    return p


def test_roundtrip_config_meta_extras_and_state(art: Path):
    sd = _state()
    la = load_artifact(art, code_bytes=CODE)
    assert la.config == CFG
    assert la.meta == {"tokenizer_sha": "abc", "summary": {"val_bpb": 1.23}}
    assert list(la.extras) == ["metasgd.lr.qo_bank"]
    assert torch.equal(la.extras["metasgd.lr.qo_bank"], torch.full((4,), 0.01))
    assert list(la.state_dict) == list(sd)
    for n, t in sd.items():
        got = la.state_dict[n]
        assert got.shape == t.shape and got.dtype == torch.float32, n
        rel = float((got - t).norm() / t.norm())
        if n.endswith("_bank"):
            assert 0 < rel < 0.05, (n, rel)
        elif n in ("tok_emb", "bigram_emb", "bigram_proj"):
            assert rel < 1e-3, (n, rel)  # fp16 at this size (below small_numel)
        else:
            assert torch.equal(got, t), n  # control tensors: fp32 exact


def test_size_accounting(tmp_path: Path, art: Path):
    la = load_artifact(art, code_bytes=CODE)
    r = la.report
    assert r.compressed_bytes == art.stat().st_size
    assert r.code_bytes == CODE and r.total_bytes == r.compressed_bytes + CODE
    assert r.headroom == 16_000_000 - r.total_bytes and r.budget == 16_000_000
    sd = _state()
    assert r.raw_param_bytes == sum(t.numel() * 4 for t in sd.values())
    assert r.by_kind["int6_row"].count == 4 and r.by_kind["extras"].count == 1
    assert r.by_kind["int6_row"].stored_bytes == sum(sd[n].numel() + sd[n].shape[0] * sd[n].shape[1] * 2
                                                     for n in sd if n.endswith("_bank"))
    assert r.quantized_bytes > r.compressed_bytes - HEADER_SIZE  # zstd did compress
    save_report = _save(tmp_path / "b.ptz", extras={"metasgd.lr.qo_bank": torch.full((4,), 0.01)},
                        meta={"tokenizer_sha": "abc", "summary": {"val_bpb": 1.23}})
    assert save_report.compressed_bytes == r.compressed_bytes == (tmp_path / "b.ptz").stat().st_size
    text = str(r)
    assert f"{r.total_bytes:,}" in text and "int6_row" in text and "headroom" in text


def test_pack_is_deterministic_and_level_matters():
    a, _ = pack_artifact(CFG, _state(), level=3, code_bytes=0)
    b, _ = pack_artifact(CFG, _state(), level=3, code_bytes=0)
    c, _ = pack_artifact(CFG, _state(), level=22, code_bytes=0)
    assert a == b
    assert a[:4] == MAGIC and len(c) <= len(a)
    with pytest.raises(ValueError, match="level"):
        pack_artifact(CFG, _state(), level=0)


def test_quant_config_is_stored(tmp_path: Path):
    p = tmp_path / "a.ptz"
    _save(p, quant=QuantConfig(small_numel=512, bank_qmax=15))
    la = load_artifact(p, code_bytes=CODE)
    assert la.quantized.config.bank_qmax == 15
    assert la.quantized.entries["tok_emb"]["scheme"] == "int8_row"
    assert int(la.quantized.arrays["qo_bank.q"].abs().max()) == 15


# ------------------------------------------------------------------------------------------- bad artifacts
def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "bad.ptz"
    p.write_bytes(data)
    return p


def test_bad_magic(tmp_path: Path, art: Path):
    data = bytearray(art.read_bytes())
    data[:4] = b"PK\x03\x04"
    with pytest.raises(NotAnArtifactError, match="bad.ptz.*not an artifact"):
        load_artifact(_write(tmp_path, bytes(data)))
    with pytest.raises(NotAnArtifactError):
        load_artifact(_write(tmp_path, b"{}"))


@pytest.mark.parametrize("keep", [0, 2, 10, HEADER_SIZE, -1, -100])
def test_truncated(tmp_path: Path, art: Path, keep: int):
    data = art.read_bytes()
    with pytest.raises(TruncatedArtifactError, match="bad.ptz.*truncated"):
        load_artifact(_write(tmp_path, data[:keep] if keep >= 0 else data[:len(data) + keep]))


def test_flipped_payload_byte_is_corruption(tmp_path: Path, art: Path):
    data = art.read_bytes()
    for pos in (HEADER_SIZE, HEADER_SIZE + 50, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(CorruptedArtifactError, match="bad.ptz.*checksum"):
            load_artifact(_write(tmp_path, bytes(bad)))
    bad = bytearray(data)
    bad[30] ^= 0xFF  # inside the stored digest
    with pytest.raises(CorruptedArtifactError, match="checksum"):
        load_artifact(_write(tmp_path, bytes(bad)))
    with pytest.raises(CorruptedArtifactError, match="trailing"):
        load_artifact(_write(tmp_path, data + b"\0"))


def test_wrong_version_and_flags(tmp_path: Path, art: Path):
    data = bytearray(art.read_bytes())
    bad = bytearray(data)
    bad[4] += 1  # version u16 LE low byte
    with pytest.raises(ArtifactVersionError, match="bad.ptz.*version 2"):
        load_artifact(_write(tmp_path, bytes(bad)))
    bad = bytearray(data)
    struct.pack_into("<H", bad, 6, 0x8001)
    with pytest.raises(ArtifactVersionError, match="flags"):
        load_artifact(_write(tmp_path, bytes(bad)))


def test_expect_mismatch_names_fields(art: Path):
    load_artifact(art, expect={"vocab_size": 64, "xsa_layers": (1,)})  # tuple vs stored list is fine
    with pytest.raises(ConfigMismatchError) as ei:
        load_artifact(art, expect={"vocab_size": 1024, "num_layers": 2, "rope_dims": 16})
    msg = str(ei.value)
    assert "artifact.ptz" in msg and "vocab_size: stored 64 vs expected 1024" in msg
    assert "rope_dims: stored '<missing>'" in msg and "num_layers" not in msg
    assert ei.value.mismatches == {"vocab_size": (64, 1024), "rope_dims": ("<missing>", 16)}


def test_all_errors_share_base_and_missing_file(tmp_path: Path):
    for cls in (NotAnArtifactError, TruncatedArtifactError, CorruptedArtifactError, ArtifactVersionError,
                OverBudgetError, ConfigMismatchError):
        assert issubclass(cls, ArtifactError)
    with pytest.raises(FileNotFoundError, match="nope.ptz"):
        load_artifact(tmp_path / "nope.ptz")


def test_over_budget(tmp_path: Path):
    p = tmp_path / "a.ptz"
    with pytest.raises(OverBudgetError, match="a.ptz.*over budget.*not written") as ei:
        _save(p, budget=2000)
    assert not p.exists() and ei.value.report.total_bytes > 2000
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either
    r = _save(p, budget=2000, allow_over_budget=True)
    assert p.exists() and r.headroom < 0 and "OVER BUDGET" in str(r)
    assert load_artifact(p, code_bytes=CODE).report.budget == 16_000_000  # load only checks when asked
    with pytest.raises(OverBudgetError, match="over budget"):
        load_artifact(p, budget=2000, code_bytes=CODE)
    # code bytes count against the budget too
    with pytest.raises(OverBudgetError):
        _save(p, budget=r.compressed_bytes + 10, code_bytes=11)
    _save(p, budget=r.compressed_bytes + 10, code_bytes=10)


# ------------------------------------------------------------------------------------------- atomic writes
def test_failed_save_keeps_existing_artifact(tmp_path: Path, art: Path, monkeypatch: pytest.MonkeyPatch):
    before = art.read_bytes()
    with pytest.raises(OverBudgetError):
        _save(art, budget=100)
    with pytest.raises(TypeError, match="meta must be JSON"):
        _save(art, meta={"bad": object()})

    def boom(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", boom)  # fail in the middle of the write itself
    with pytest.raises(OSError, match="disk full"):
        _save(art, sd=_state(seed=1))
    monkeypatch.undo()
    assert art.read_bytes() == before
    assert sorted(p.name for p in art.parent.iterdir()) == ["artifact.ptz"]
    load_artifact(art, code_bytes=CODE)
    _save(art, sd=_state(seed=1))  # a successful save does replace it
    assert art.read_bytes() != before


def test_bad_inputs(tmp_path: Path):
    with pytest.raises(TypeError, match="model_cfg"):
        save_artifact(tmp_path / "x.ptz", [1, 2], _state(), code_bytes=0)
    with pytest.raises(TypeError, match="extras"):
        save_artifact(tmp_path / "x.ptz", CFG, _state(), extras={"a": object()}, code_bytes=0)


# ------------------------------------------------------------------------------------------- code bytes
def test_code_bytes_counts_utf8(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 'é'\n", encoding="utf-8")  # é = 2 bytes
    (tmp_path / "pkg" / "b.txt").write_text("ignored in dirs")
    (tmp_path / "c.py").write_bytes(b"y=1\n")
    assert code_bytes([tmp_path / "pkg" / "a.py"]) == 9
    assert code_bytes([tmp_path / "pkg", tmp_path / "c.py", tmp_path / "c.py"]) == 13  # dedup
    (tmp_path / "d.py").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="d.py.*UTF-8"):
        code_bytes([tmp_path / "d.py"])
    with pytest.raises(FileNotFoundError, match="missing.py"):
        code_bytes([tmp_path / "missing.py"])


def test_default_code_paths_convention():
    paths = default_code_paths()
    names = {(p.parent.name, p.name) for p in paths}
    assert ("artifact", "format.py") in names and ("artifact", "quant.py") in names
    assert ("model", "gpt.py") in names  # imported lazily inside the loader's function
    assert ("kernels", "qkv_prep.py") in names  # the model runs it on CUDA
    assert ("metattt", "atomic.py") in names and ("metattt", "__init__.py") in names  # the loader imports them
    assert all(p.parent.name in ("metattt", "model", "kernels", "artifact") and p.suffix == ".py" for p in paths)
    assert code_bytes(paths) == sum(p.stat().st_size for p in paths)


def test_default_code_paths_is_the_import_closure(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "entry.py": "import os\nfrom . import helper\nfrom .sub import leaf\n\ndef f():\n    from pkg.lazy import x\n",
        "helper.py": "from .sub.leaf import y\n",
        "lazy.py": "x = 1\n",
        "unused.py": "import pkg.entry\n",  # imports the entry, but nothing imports it: not shipped
        "sub/__init__.py": "",
        "sub/leaf.py": "y = 2\nfrom .. import helper\n",  # a cycle is fine
        "sub/other.py": "z = 3\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    got = {p.relative_to(pkg).as_posix() for p in default_code_paths(pkg, entry="pkg.entry")}
    assert got == {"__init__.py", "entry.py", "helper.py", "lazy.py", "sub/__init__.py", "sub/leaf.py"}
