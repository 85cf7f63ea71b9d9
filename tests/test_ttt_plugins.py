"""Adapters as plug-ins: the worked example (examples/signsgd_norms.py, outside the package) through the registry,
the trainer's meta step and the evaluator's ttt: protocol; name clashes; entry points; a cheating plug-in is
still refused by the ledger."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metattt.eval.run import EXIT_ILLEGAL
from metattt.eval.run import main as eval_main
from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT
from metattt.train.cli import parse_config
from metattt.train.loop import train
from metattt.ttt import ADAPTERS, PluginError, Registry
from metattt.ttt import registry as registry_mod

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "examples" / "signsgd_norms.py")
TINY = ["--model.num-layers", "2", "--model.model-dim", "32", "--model.num-heads", "2", "--model.num-kv-heads", "1",
        "--model.xsa-layers", "1", "--model.ve-layers", "1", "--model.ve-dim", "8", "--model.bigram-vocab", "64",
        "--model.bigram-dim", "8", "--model.rope-dims", "8", "--seq-len", "64", "--train-batch-tokens", "1024",
        "--micro-batch-tokens", "512", "--synthetic-train-tokens", "60000", "--synthetic-val-tokens", "4000",
        "--val-every", "0", "--max-wallclock-s", "0", "--progress", "false", "--wandb", "off", "--warmdown-iters", "3"]
EVAL = ["--context", "64", "--stride", "32", "--chunk-tokens", "1024", "--bootstrap", "0", "--wandb", "off", "--quiet"]


def _write(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


def test_registry_is_built_per_run_and_names_clash_loudly(tmp_path, monkeypatch) -> None:
    reg = Registry.build([EXAMPLE])
    assert reg.names[: len(ADAPTERS)] == ADAPTERS and "signsgd" in reg.names
    assert "signsgd" not in Registry.build().names  # nothing leaked into a shared table
    a = reg.from_spec("signsgd:lr=0.01,select=norms:layers>=1")
    assert a.cfg.lr == 0.01 and a.selection.spec == "norms:layers>=1"
    clash = _write(tmp_path, "clash.py", """
        from metattt.ttt.sgd import SGDAdapter
        class MySGD(SGDAdapter):
            pass  # inherits name 'sgd'
        """)
    with pytest.raises(PluginError, match=r"name clash: 'sgd' is defined by metattt \(built-in\) and by module"):
        Registry.build([clash])
    with pytest.raises(PluginError, match="name clash: 'signsgd'"):
        Registry.build([EXAMPLE, _write(tmp_path, "copy.py", Path(EXAMPLE).read_text())])
    with pytest.raises(PluginError, match="defines no Adapter subclass"):
        Registry.build([_write(tmp_path, "empty.py", "from metattt.ttt.sgd import SGDAdapter\n")])
    with pytest.raises(PluginError, match="no such file"):
        Registry.build([str(tmp_path / "missing.py")])
    with pytest.raises(PluginError, match="cannot import"):
        Registry.build(["no_such_pkg.adapters"])
    # an installed package's entry point (group metattt.adapters) is found the same way
    mod = registry_mod.load_module(EXAMPLE)
    ep = SimpleNamespace(name="signsgd", value="pkg:SignSGDNorms", load=lambda: mod.SignSGDNorms)
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: [ep] if group == "metattt.adapters" else [])
    assert "entry point 'signsgd'" in Registry.build().sources["signsgd"]
    assert Registry.build([EXAMPLE]).classes["signsgd"] is mod.SignSGDNorms  # the same class twice is no clash
    with pytest.raises(PluginError, match=r"name clash: 'signsgd' is defined by entry point"):
        Registry.build([str(tmp_path / "copy.py")])


def test_plugin_inner_loop_is_its_evaluation_update() -> None:
    torch.manual_seed(0)
    m = BankedGPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                              rope_dims=8, xsa_layers=(), ve_layers=(), bigram_vocab=0))
    seq = torch.randint(0, 64, (5, 17), generator=torch.Generator().manual_seed(2))
    x, y = seq[:, :-1], seq[:, 1:]
    a = Registry.build([EXAMPLE]).from_spec("signsgd:lr=0.01,epochs=2,batch_seqs=2,momentum=0.5").bind(m)
    a.adapt(m, x, y, progress=0.0)
    inner, _ = a.inner_loop(m, dict(m.named_parameters()), x, y, passes=2, create_graph=False)
    named = dict(m.named_parameters())
    assert set(inner) == set(a.params()) and all(named[n].ndim <= 2 for n in inner)
    for n, t in a.params().items():
        assert torch.equal(t, inner[n]), n
    assert sum(not torch.equal(t, named[n]) for n, t in a.params().items()) >= 2  # sign steps moved the gains


def test_plugin_through_trainer_meta_step_and_evaluator(tmp_path, capsys) -> None:
    """The example file, outside the package: meta-trained by the trainer (stats logged), evaluated by ttt:."""
    summary = train(parse_config([*TINY, "--data-dir", str(tmp_path / "syn"), "--run-root", str(tmp_path / "runs"),
                                  "--iterations", "2", "--run-name", "plug", "--adapter-module", EXAMPLE,
                                  "--meta.adapter", "signsgd:lr=0.002", "--meta.every", "1"]))
    run = tmp_path / "runs" / "plug"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert train_recs and all(r["meta"] for r in train_recs)
    assert all(r["meta/L_post"] > 0 and "meta/gain" in r for r in train_recs)  # same-batch: L_pre is free
    assert json.loads((run / "config.json").read_text())["meta"]["adapter_modules"] == [EXAMPLE]
    assert summary["meta_adapter"] == "signsgd:lr=0.002"
    art = str(run / "artifact.ptz")
    rc = eval_main([art, "--protocols", "sliding,ttt:signsgd", "--adapter-module", EXAMPLE,
                    "--adapter-spec", "signsgd:lr=0.003", *EVAL])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((run / "eval.json").read_text())
    p = rep["protocols"]["ttt:signsgd"]
    assert p["ledger"]["legal"] and p["ledger"]["n_updates"] > 0 and "ttt:signsgd" in rep["deltas"]
    assert p["adapter_params"]["selection"] == "norms"
    # without the module the name is unknown: a clear bad-input error
    assert eval_main([art, "--protocols", "ttt:signsgd", *EVAL]) == 2
    assert "unknown adapter 'signsgd'" in capsys.readouterr().err
    # a plug-in that cheats (trains on the chunk it has not scored yet) is refused, whatever file it comes from
    cheat = _write(tmp_path, "cheat.py", """
        from metattt.ttt.sgd import SGDAdapter

        class Peeker(SGDAdapter):
            name = "peek"

            def training_positions(self, chunk_index):
                return chunk_index + 1
        """)
    rc = eval_main([art, "--protocols", "sliding,ttt:peek", "--adapter-module", cheat, *EVAL])
    err = capsys.readouterr().err
    assert rc == EXIT_ILLEGAL and "REFUSED" in err and "update #0" in err


def test_bad_plugin_is_a_clear_error_before_any_run_dir(tmp_path, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("meta_ttt_entry", REPO / "experiments" / "meta_ttt.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    broken = _write(tmp_path, "broken.py", "raise RuntimeError('boom')\n")
    for mod in (str(tmp_path / "nope.py"), broken):
        rc = entry.main(["--adapter-module", mod, "--meta.adapter", "signsgd", "--run-root", str(tmp_path / "runs"),
                         "--wandb", "off"])
        assert rc == 2
    err = capsys.readouterr().err
    assert "nope.py': no such file" in err and "failed to import: RuntimeError: boom" in err
    assert not (tmp_path / "runs").exists()
