"""benchmarks/record_model.py: the two changes to the record script apply exactly once or the script is refused,
and the record's printed numbers are read back from its log."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import record_model as rm  # noqa: E402

FAKE = f"""import os
import torch.nn.functional as F
{rm.IMPORT_LINE}
def main():
    {rm.EMA_LINE}
    return ema_decay
"""


def test_patch_replaces_fa3_and_reads_ema_decay(monkeypatch):
    out = rm.patch(FAKE)
    assert "flash_attn_interface" not in out and "def flash_attn_3_func" in out
    ns: dict = {}
    exec(compile(out, "patched", "exec"), ns)
    monkeypatch.setenv("EMA_DECAY", "0.99")
    assert ns["main"]() == 0.99
    monkeypatch.delenv("EMA_DECAY")
    assert ns["main"]() == 0.997


@pytest.mark.parametrize("bad", [FAKE.replace(rm.IMPORT_LINE, ""), FAKE + "    " + rm.EMA_LINE + "\n"])
def test_patch_refuses_another_script(bad):
    with pytest.raises(rm.PatchError, match="expected"):
        rm.patch(bad)


def test_printed_numbers_last_wins():
    log = ("step:1 val_bpb:3.0\nfinal_int6_roundtrip_exact val_loss:3.1 val_bpb:1.84221119\n"
           "final_int6_sliding_window_exact val_loss:3.0 val_bpb:1.83105171\nlegal_ttt_exact val_loss:2.9 val_bpb:1.9\n"
           "legal_ttt_exact val_loss:2.9 val_bpb:1.81695287\n")
    assert rm.printed_numbers(log) == {"final_int6_roundtrip_exact": 1.84221119,
                                       "final_int6_sliding_window_exact": 1.83105171, "legal_ttt_exact": 1.81695287}


def test_cli_bad_input_exits_2(tmp_path, capsys):
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE)
    base = ["--script", str(script), "--val", str(tmp_path / "v_*.bin"), "--tokenizer", "t", "--out", str(tmp_path / "o")]
    assert rm.main([*base, "--train", str(tmp_path / "none_*.bin")]) == 2
    assert "matched no file" in capsys.readouterr().err
    assert rm.main([*base, "--train", "x", "--env", "SEED"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    script.write_text("print(1)\n")
    assert rm.main([*base, "--train", "x"]) == 2
    assert "expected" in capsys.readouterr().err


def _fake_torchrun(tmp_path, monkeypatch, body: str) -> None:
    """Data files, a record script and a ``torchrun`` on PATH that runs ``body`` (sh) instead, in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    for name in ("tr_0.bin", "va_0.bin"):
        (tmp_path / name).write_bytes(b"\0" * 8)
    (tmp_path / "train_gpt.py").write_text(FAKE)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "torchrun"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_run_with_relative_paths_finds_its_data(tmp_path, monkeypatch):
    """The record script runs with cwd=OUT: the data folder it is handed must still resolve there (a relative
    ``--out`` once handed it ``runs/x/data``, which the script looked for under ``runs/x/runs/x/data``)."""
    # stands in for torchrun + the record script: checks what the record script reads
    _fake_torchrun(tmp_path, monkeypatch, 'ls "$DATA_PATH"/fineweb_train_000000.bin "$DATA_PATH"/fineweb_val_000000.bin '
                   '"$TOKENIZER_PATH" >/dev/null || exit 1\n'
                   'echo "final_int6_roundtrip_exact val_loss:3.1 val_bpb:1.84221119"')
    rc = rm.main(["--script", "train_gpt.py", "--train", "tr_*.bin", "--val", "va_*.bin", "--tokenizer", "tr_0.bin",
                  "--out", "runs/x"])
    assert rc == 0, (tmp_path / "runs/x/train.log").read_text()
    assert json.loads((tmp_path / "runs/x/printed.json").read_text())["printed"] == {
        "final_int6_roundtrip_exact": 1.84221119}


def test_readme_env_is_the_base_and_env_overrides_it(tmp_path, monkeypatch):
    """``--readme-env`` hands the record script its README's run settings; ``--env`` replaces single keys."""
    # prints the settings the record script would read
    _fake_torchrun(tmp_path, monkeypatch, 'echo "NUM_LAYERS=$NUM_LAYERS TTT_LR=$TTT_LR SEED=$SEED EMA_DECAY=$EMA_DECAY"')
    monkeypatch.delenv("NUM_LAYERS", raising=False)
    rc = rm.main(["--script", "train_gpt.py", "--train", "tr_*.bin", "--val", "va_*.bin", "--tokenizer", "tr_0.bin",
                  "--out", "runs/x", "--readme-env", "--env", "SEED=7", "EMA_DECAY=0.99"])
    assert rc == 0
    assert (tmp_path / "runs/x/train.log").read_text().strip() == "NUM_LAYERS=11 TTT_LR=0.002 SEED=7 EMA_DECAY=0.99"
    assert json.loads((tmp_path / "runs/x/printed.json").read_text())["env"] == {
        **rm.README_ENV, "SEED": "7", "EMA_DECAY": "0.99"}
