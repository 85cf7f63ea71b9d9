"""The throughput benchmark parses its variant tokens and runs end to end (CPU, tiny preset)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import train_throughput as tt  # noqa: E402


def test_variant_tokens():
    v = tt.parse_variant("compile+bf16+unfused-qkv+unfolded+no-qkv-kernel+mb=196608+attn=sdpa-cudnn+ind:max_autotune=1")
    assert v["compile"] and v["bf16"] and not v["fused_qkv"] and not v["fold_gains"] and not v["qkv_kernel"] and v["mb"] == 196608 and v["attn"] == "sdpa-cudnn"
    assert v["inductor"] == {"max_autotune": True}  # parsed to the option's own type
    plain = tt.parse_variant("eager")
    assert not plain["compile"] and not plain["bf16"] and plain["fused_qkv"] and plain["fold_gains"] and plain["inductor"] == {}
    with pytest.raises(SystemExit, match="unknown variant token"):
        tt.parse_variant("compile+fast")
    with pytest.raises(SystemExit, match="unknown variant token 'mlp-kernel'"):  # removed with its kernel
        tt.parse_variant("compile+mlp-kernel")
    with pytest.raises(SystemExit, match="unknown Inductor option"):
        tt.parse_variant("compile+ind:no_such_option=1")


def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--preset", "tiny-synthetic",
                          "--variants", "eager,eager+bf16+unfused-qkv", "--steps", "1", "--warmup", "0",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["eager", "eager+bf16+unfused-qkv"]
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["accum"] >= 1 for r in rows)


def test_attention_benchmark_imports_and_parses_args():
    """It carries its own CUDA-event timer (the MLP-kernel benchmark it borrowed it from was removed)."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--backends" in res.stdout
