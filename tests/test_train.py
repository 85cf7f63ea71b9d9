"""Trainer: CLI → config, a short run end to end, and exact resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metattt.train.cli import parse_config
from metattt.train.config import TrainConfig
from metattt.train.loop import train
from metattt.train.schedule import lr_scale, meta_step_due

TINY = ["--model.num-layers", "2", "--model.model-dim", "32", "--model.num-heads", "2", "--model.num-kv-heads", "1",
        "--model.xsa-layers", "1", "--model.ve-layers", "1", "--model.ve-dim", "8", "--model.bigram-vocab", "64",
        "--model.bigram-dim", "8", "--model.rope-dims", "8", "--seq-len", "64", "--train-batch-tokens", "1024",
        "--micro-batch-tokens", "512", "--synthetic-train-tokens", "60000", "--synthetic-val-tokens", "4000",
        "--val-every", "0", "--max-wallclock-s", "0", "--progress", "false", "--wandb", "off", "--warmdown-iters", "3"]


def _args(tmp: Path, *extra: str) -> list[str]:
    return [*TINY, "--data-dir", str(tmp / "syn"), "--run-root", str(tmp / "runs"), *extra]


def test_cli_overrides_and_presets():
    cfg = parse_config(["--preset", "pg-2026-03-23", "--seq-len", "1024", "--model.num-layers", "9",
                        "--model.xsa-layers", "5,6,7,8", "--model.ve-layers", "7,8", "--optim.matrix-lr", "0.02", "--meta.adapter", "fomaml"])
    assert cfg.seq_len == 1024 and cfg.model.num_layers == 9 and cfg.model.xsa_layers == (5, 6, 7, 8)
    assert cfg.optim.matrix_lr == 0.02 and cfg.meta.adapter == "fomaml"
    assert cfg.train_batch_tokens == 786_432 and cfg.model.model_dim == 512 and cfg.ema_decay == 0.997
    with pytest.raises(SystemExit):
        parse_config(["--preset", "nope"])
    fast = parse_config(["--runtime.residual-dtype", "bfloat16", "--runtime.fused-qkv", "false"])
    assert fast.runtime.residual_dtype == "bfloat16" and fast.runtime.fused_qkv is False
    d = fast.to_dict()
    assert TrainConfig.from_dict(d).runtime == fast.runtime
    old = fast.to_dict()
    old["runtime"]["mlp_kernel"] = True  # a config.json from before the MLP kernel was removed still resumes
    assert TrainConfig.from_dict(old).runtime == fast.runtime
    assert parse_config([]).final_eval == "short" and cfg.final_eval == "off"  # tiny preset evaluates, pg not
    d.pop("runtime")  # a config.json written before the runtime section existed still loads
    assert TrainConfig.from_dict(d).runtime.residual_dtype == "float32"


def test_lr_schedule():
    assert lr_scale(0, 0.0, iterations=100, warmdown_iters=10, max_wallclock_s=0) == 1.0
    assert lr_scale(95, 0.0, iterations=100, warmdown_iters=10, max_wallclock_s=0) == pytest.approx(0.5)
    # by wallclock: 1 s/step so far, 10-step warmdown, 5 s left -> half way down
    assert lr_scale(50, 50.0, iterations=0, warmdown_iters=10, max_wallclock_s=55.0) == pytest.approx(0.5)
    assert lr_scale(10, 90.0, iterations=0, warmdown_iters=0, max_wallclock_s=100.0, warmdown_frac=0.2) == \
        pytest.approx(0.5)
    assert meta_step_due(4, 0.5, 8, 10, 0.0, 0.0) is True
    assert meta_step_due(4, 0.5, 4, 10, 0.0, 0.0) is False
    assert meta_step_due(4, 0.0, 6, 10, 0.0, 0.0) is False


def _train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if r["kind"] == "train"}


def test_short_run_writes_artifact_and_resume_is_exact(tmp_path):
    full = train(parse_config(_args(tmp_path, "--iterations", "6", "--run-name", "full", "--checkpoint-every", "3")))
    run_full = tmp_path / "runs" / "full"
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.json", "artifact.ptz"):
        assert (run_full / name).is_file(), name
    assert full["steps"] == 6 and full["artifact_report"]["total_bytes"] == \
        full["artifact_report"]["compressed_bytes"] + full["artifact_report"]["code_bytes"]
    assert abs(full["val_bpb_quant"] - full["val_bpb"]) < 0.05

    halted = train(parse_config(_args(tmp_path, "--iterations", "6", "--run-name", "cut", "--checkpoint-every", "3",
                                      "--halt-after", "3")))
    assert halted["halted_at_step"] == 3
    run_cut = tmp_path / "runs" / "cut"
    assert not (run_cut / "summary.json").exists()
    resumed = train(parse_config(["--resume", str(run_cut), "--progress", "false"]))
    a, b = _train_losses(run_full), _train_losses(run_cut)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # the resumed run takes exactly the steps the uninterrupted run took
        assert b[step] == a[step], (step, a[step], b[step])
    assert resumed["val_bpb"] == full["val_bpb"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(parse_config(["--resume", str(tmp_path)]))


@pytest.mark.parametrize("adapter", ["fomaml:lr=0.01", "metasgd"])
def test_meta_training_artifact_goes_through_the_evaluator(tmp_path, adapter):
    """The adapter meta-trained in the trainer is the one the evaluator runs (MetaSGD rates travel in the artifact)."""
    from metattt.artifact.format import load_artifact
    from metattt.eval.run import main as eval_main

    name = adapter.split(":")[0]
    summary = train(parse_config(_args(tmp_path, "--iterations", "4", "--run-name", name, "--meta.adapter", adapter,
                                       "--meta.every", "2", "--meta.micro-batches", "0")))
    run = tmp_path / "runs" / name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["meta"] for m in metrics if m["kind"] == "train"] == [True, False, True, False]
    extras = load_artifact(run / "artifact.ptz").extras
    if name == "metasgd":
        assert extras and all(k.startswith("ttt.metasgd.log_lr") for k in extras)
        init = torch.log(torch.tensor(0.002))
        assert any(not torch.allclose(v, init.expand_as(v)) for v in extras.values())  # the rates were trained
    rc = eval_main([str(run / "artifact.ptz"), "--protocols", f"sliding,ttt:{name}", "--context", "64",
                    "--stride", "32", "--chunk-tokens", "1024", "--bootstrap", "50", "--wandb", "off", "--quiet"])
    assert rc == 0
    report = json.loads((run / "eval.json").read_text())
    assert f"ttt:{name}" in report["deltas"]
    assert summary["meta_adapter"] == adapter
    if name == "fomaml":  # an artifact without MetaSGD rates cannot be evaluated with ttt:metasgd
        rc = eval_main([str(run / "artifact.ptz"), "--protocols", "sliding,ttt:metasgd", "--context", "64",
                        "--stride", "32", "--wandb", "off", "--quiet"])
        assert rc == 2


def test_missing_data_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("meta_ttt_entry", Path(__file__).parents[1] / "experiments" /
                                                  "meta_ttt.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    rc = entry.main(["--preset", "pg-2026-03-23", "--data", str(tmp_path / "nowhere"), "--run-root",
                     str(tmp_path / "runs"), "--wandb", "off"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no shard files match pattern" in err and "nowhere" in err
    assert not (tmp_path / "runs").exists()


def _entry():
    import importlib.util

    spec = importlib.util.spec_from_file_location("meta_ttt_entry", Path(__file__).parents[1] / "experiments" /
                                                  "meta_ttt.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    return entry


def test_run_name_clash_exits_2_naming_the_flag(tmp_path, capsys):
    """Issue 17: an existing --run-name used to raise FileExistsError (exit 1) with a hint naming exist_ok=True."""
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "notes.txt").write_text("mine")
    rc = _entry().main(_args(tmp_path, "--iterations", "1", "--run-name", "taken"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert "--run-name taken" in lines[0] and "exist_ok" not in lines[0] and "--resume" in lines[0]
    assert sorted(p.name for p in (tmp_path / "runs" / "taken").iterdir()) == ["notes.txt"]
    assert not (tmp_path / "syn").exists()  # nothing written: the clash is found before the data


def test_shared_data_dir_keeps_each_corpus_and_the_evaluator_checks_it(tmp_path, capsys):
    """Issue 17: a second training with another vocab in the same --data-dir silently regenerated the corpus, and
    the first artifact then scored different data (exit 0). Now each spec has its own corpus, the artifact and the
    run directory store the val fingerprint, and the evaluator reproduces the trainer's number on that data."""
    from metattt.artifact.format import load_artifact
    from metattt.eval.run import main as eval_main

    entry = _entry()
    assert entry.main(_args(tmp_path, "--iterations", "2", "--run-name", "a")) == 0
    assert entry.main(_args(tmp_path, "--iterations", "2", "--run-name", "b", "--model.vocab-size", "128")) == 0
    run_a = tmp_path / "runs" / "a"
    summary = json.loads((run_a / "summary.json").read_text())
    rc = eval_main([str(run_a / "artifact.ptz"), "--protocols", "flat", "--bootstrap", "0", "--wandb", "off",
                    "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((run_a / "eval.json").read_text())
    assert rep["protocols"]["flat"]["bpb"] == pytest.approx(summary["val_bpb_quant"], abs=1e-5)
    meta = load_artifact(run_a / "artifact.ptz").meta
    assert meta["val_fingerprint"] == summary["data_fingerprint"]["val_fingerprint"] == rep["meta"]["val_fingerprint"]
    assert meta["val_fingerprint"] != json.loads((tmp_path / "runs" / "b" / "summary.json").read_text()
                                                 )["data_fingerprint"]["val_fingerprint"]
    assert rep["meta"]["data_check"] == "match"



def test_init_from_starts_at_the_artifacts_weights_and_adopts_its_config(tmp_path, capsys):
    from metattt.artifact.format import load_artifact

    train(parse_config(_args(tmp_path, "--iterations", "4", "--run-name", "a")))
    art = tmp_path / "runs" / "a" / "artifact.ptz"
    # zero learning rates (and no EMA): nothing moves, so b's artifact must hold a's weights exactly
    argv = _args(tmp_path, "--iterations", "1", "--run-name", "b", "--init-from", str(art), "--optim.matrix-lr", "0",
                 "--optim.embed-lr", "0", "--optim.scalar-lr", "0", "--optim.head-lr", "0")
    argv[argv.index("--model.model-dim") + 1] = "48"  # the artifact's config wins over the flags, and says so
    train(parse_config(argv))
    assert "the artifact's model config replaces the preset's (model_dim: 48 -> 32" in capsys.readouterr().out
    a_art, b_art = load_artifact(art), load_artifact(tmp_path / "runs" / "b" / "artifact.ptz")
    assert b_art.config == a_art.config
    for k, v in a_art.state_dict.items():
        assert torch.equal(v, b_art.state_dict[k]), k
    assert json.loads((tmp_path / "runs" / "b" / "config.json").read_text())["model"]["model_dim"] == 32


def test_init_from_a_plain_artifact_meta_trains_metasgd_from_its_initial_rates(tmp_path):
    """A MetaSGD run from an artifact trained without a meta step (the ceiling study's section 2): its rates start at
    their init, are learned, and the new artifact carries them; from a MetaSGD artifact they are loaded."""
    from metattt.artifact.format import load_artifact
    from metattt.ttt.metasgd import MetaSGDConfig

    train(parse_config(_args(tmp_path, "--iterations", "2", "--run-name", "a")))
    art = tmp_path / "runs" / "a" / "artifact.ptz"
    assert not any(k.startswith("ttt.metasgd.") for k in load_artifact(art).extras)
    meta = ["--meta.adapter", "metasgd", "--meta.every", "1"]
    train(parse_config(_args(tmp_path, "--iterations", "2", "--run-name", "b", "--init-from", str(art), *meta)))
    b = load_artifact(tmp_path / "runs" / "b" / "artifact.ptz").extras
    rates = {k: v for k, v in b.items() if k.startswith("ttt.metasgd.log_lr.")}
    assert rates
    train(parse_config(_args(tmp_path, "--iterations", "1", "--run-name", "c", "--init-from",
                             str(tmp_path / "runs" / "b" / "artifact.ptz"), *meta, "--meta.meta-lr", "1e-12")))
    c = load_artifact(tmp_path / "runs" / "c" / "artifact.ptz").extras
    init = math.log(MetaSGDConfig().lr_init)
    assert max(float((v - init).abs().max()) for v in rates.values()) > 1e-4  # b learned its rates from the init
    for k, v in rates.items():  # c (meta lr 1e-12) starts from b's rates, not from the init
        assert torch.allclose(c[k], v, atol=1e-8), k


def test_init_from_a_missing_artifact_is_bad_input(tmp_path):
    from metattt.train.cli import main

    assert main(_args(tmp_path, "--iterations", "1", "--run-name", "c", "--init-from", str(tmp_path / "no.ptz"))) == 2
