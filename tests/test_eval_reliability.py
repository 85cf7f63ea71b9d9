"""Issue 17, evaluator side: bad input exits 2 before anything is scored or written, scored results are never
lost to a reporting step, one file per evaluation, validation-data fingerprints, diverged adapters (exit 4).

A tiny *untrained* model is enough here (none of these checks is about the model's quality), so the fixture
costs a fraction of a second."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch

from metattt.artifact.model_io import save_model_artifact
from metattt.data.fingerprint import tokens_fingerprint
from metattt.data.loaders import load_val_tokens
from metattt.data.shards import write_shard
from metattt.data.synthetic import SyntheticSpec, generate_split, make_synthetic_dataset, synthetic_lut
from metattt.eval.protocols import EvalConfig, evaluate, parse_protocols, prepare_stream
from metattt.eval.run import EXIT_BAD_INPUT, EXIT_INVALID, EXIT_OK, main
from metattt.model.gpt import BankedGPT
from tiny import tiny_config

SPEC = SyntheticSpec(vocab_size=64, n_train_tokens=2000, n_val_tokens=3000, min_doc_len=200, max_doc_len=600)
CTX, STRIDE, CHUNK = 64, 16, 512




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reliab")
    meta = make_synthetic_dataset(root / "data", SPEC)
    torch.manual_seed(0)
    model = BankedGPT(tiny_config()).eval()
    lut = synthetic_lut(SPEC)
    fp = tokens_fingerprint(load_val_tokens(meta["val_pattern"]))
    base = {"lut": lut.to_dict(), "val_pattern": meta["val_pattern"], "seq_len": CTX}
    arts = {}
    for name, extra in (("fp", {"val_fingerprint": fp, "val_n_tokens": SPEC.n_val_tokens}), ("old", {})):
        arts[name] = root / name / "artifact.ptz"
        arts[name].parent.mkdir()
        save_model_artifact(arts[name], model, meta={**base, **extra}, allow_over_budget=True)
    # other data of the same vocabulary: the val split of another seed
    other = root / "other" / "val_000000.bin"
    write_shard(other, generate_split(SyntheticSpec(**{**SPEC.to_dict(), "seed": 5}), "val"))
    yield {"model": model, "meta": meta, "art": arts["fp"], "old_art": arts["old"], "fp": fp, "other": other,
           "lut": lut}
    torch.set_num_threads(threads)


def _cli(art, run_dir, *extra):
    return main([str(art), "--context", str(CTX), "--stride", str(STRIDE), "--chunk-tokens", str(CHUNK),
                 "--batch-tokens", "4096", "--bootstrap", "20", "--run-dir", str(run_dir), "--quiet", "--wandb", "off",
                 *extra])


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ bad input: exit 2
def test_directory_as_artifact_is_bad_input(world, tmp_path, capsys):
    rc = _cli(world["art"].parent, tmp_path / "ev", "--protocols", "flat")
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_BAD_INPUT and "is a directory" in line and "artifact.ptz" in line
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("args, flag", [
    (["--stride", "-32"], "--stride"),
    (["--context", "32", "--stride", "64"], "--stride 64 exceeds the sliding context 32"),
    (["--context", "0"], "--context"),
    (["--bootstrap", "-1"], "--bootstrap"),
    (["--projection-gpus", "0"], "--projection-gpus"),
    (["--protocols", "sliding,ttt:sgd", "--adapter-spec", "fsat=sgd:lr=0.1"], "--adapter-spec fsat"),
])
def test_bad_options_exit_2_before_anything_is_written(world, tmp_path, capsys, args, flag):
    run_dir = tmp_path / "ev"
    rc = _cli(world["art"], run_dir, *(["--protocols", "sliding"] if "--protocols" not in args else []), *args)
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_BAD_INPUT and line.startswith("error: ") and flag in line
    assert not run_dir.exists()


def test_malformed_eval_json_is_refused_before_scoring(world, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "ev"
    run_dir.mkdir()
    (run_dir / "eval.json").write_text('{"protocols": {')
    import metattt.eval.run as run_mod

    def no_scoring(*a, **k):
        raise AssertionError("scored although the run directory is malformed")

    monkeypatch.setattr(run_mod, "evaluate", no_scoring)
    rc = _cli(world["art"], run_dir, "--protocols", "flat")
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_BAD_INPUT and "eval.json is not valid JSON" in line and "--run-dir" in line
    assert (run_dir / "eval.json").read_text() == '{"protocols": {'  # nothing replaced


# ------------------------------------------------------------------------------------------------ results first
@pytest.mark.parametrize("step", ["plot", "table"])
def test_a_failing_report_step_never_loses_the_results(world, tmp_path, capsys, monkeypatch, step):
    import metattt.eval.plot as plot_mod
    import metattt.eval.run as run_mod

    def boom(*a, **k):
        raise RuntimeError(f"{step} exploded")

    if step == "plot":
        monkeypatch.setattr(plot_mod, "plot_running_delta", boom)
    else:
        monkeypatch.setattr(run_mod, "format_report", boom)
    run_dir = tmp_path / "ev"
    rc = _cli(world["art"], run_dir, "--protocols", "sliding,ttt:sgd")
    err = capsys.readouterr().err
    assert rc == EXIT_OK and f"{step} exploded" in err and "results are in" in err
    rep = json.loads((run_dir / "eval.json").read_text())
    assert set(rep["protocols"]) == {"flat", "sliding", "ttt:sgd"}


def test_each_evaluation_keeps_its_own_file_and_plot(world, tmp_path, capsys):
    run_dir = tmp_path / "ev"
    assert _cli(world["art"], run_dir, "--protocols", "sliding,ttt:sgd") == EXIT_OK
    first = json.loads((run_dir / "eval.json").read_text())
    first_png = (run_dir / "eval_running_delta.png").read_bytes()
    assert _cli(world["art"], run_dir, "--protocols", "flat") == EXIT_OK
    assert "previous evaluation" in capsys.readouterr().err
    second = json.loads((run_dir / "eval.json").read_text())
    assert set(second["protocols"]) == {"flat"}
    eid = first["meta"]["eval_id"]
    assert second["meta"]["previous_evaluation"] == f"eval-{eid}.json"
    assert json.loads((run_dir / f"eval-{eid}.json").read_text()) == first
    # the first evaluation's plot went with it: no stale PNG beside an evaluation that has none
    assert not (run_dir / "eval_running_delta.png").exists()
    assert (run_dir / f"eval_running_delta-{eid}.png").read_bytes() == first_png


def test_plot_is_written_atomically(world, tmp_path, monkeypatch):
    import matplotlib.figure

    from metattt.eval.plot import plot_running_delta

    rep = {"running_delta": {"ttt:x": {"from": "sliding", "to": "ttt:x", "block_tokens": 8, "chunk": [0, 1],
                                       "delta_bpb": [0.1, 0.2]}}, "deltas": {}}
    path = tmp_path / "p.png"
    plot_running_delta(rep, path)
    good = path.read_bytes()

    def half_then_fail(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        plot_running_delta(rep, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


# ------------------------------------------------------------------------------------------------ data fingerprints
def test_other_validation_data_is_refused_naming_both_fingerprints(world, tmp_path, capsys):
    other_fp = tokens_fingerprint(load_val_tokens(str(world["other"])))
    assert other_fp != world["fp"]
    rc = _cli(world["art"], tmp_path / "ev", "--protocols", "flat", "--val", str(world["other"]))
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_BAD_INPUT and world["fp"] in line and other_fp in line and "--allow-other-data" in line
    assert not (tmp_path / "ev").exists()
    rc = _cli(world["art"], tmp_path / "ev", "--protocols", "flat", "--val", str(world["other"]), "--allow-other-data")
    assert rc == EXIT_OK and "--allow-other-data" in capsys.readouterr().err
    meta = json.loads((tmp_path / "ev" / "eval.json").read_text())["meta"]
    assert meta["val_fingerprint"] == other_fp and meta["data_check"].startswith("other data allowed")


def test_matching_data_passes_and_an_old_artifact_only_warns(world, tmp_path, capsys):
    assert _cli(world["art"], tmp_path / "a", "--protocols", "flat") == EXIT_OK
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["meta"]["data_check"] == "match"
    # an artifact written before fingerprints existed: a warning, not a refusal (even on other data)
    assert _cli(world["old_art"], tmp_path / "b", "--protocols", "flat", "--val", str(world["other"])) == EXIT_OK
    assert "warning: the artifact stores no validation-data fingerprint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ diverging adapters
def test_diverging_ttt_is_invalid_exit_4_other_protocols_kept(world, tmp_path, capsys):
    """Issue 17: lr 1e30 used to report bpb nan, '+nan' delta, legal, exit 0."""
    rc = _cli(world["art"], tmp_path / "ev", "--protocols", "sliding,ttt:sgd",
              "--adapter-spec", "sgd:lr=1e30,grad_clip=0,schedule=constant,epochs=1")
    err = capsys.readouterr().err
    assert rc == EXIT_INVALID and "INVALID: ttt:sgd" in err
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    p = rep["protocols"]
    assert p["flat"]["valid"] and p["sliding"]["valid"] and not p["ttt:sgd"]["valid"]
    inv = p["ttt:sgd"]["invalid"]
    assert 0 <= inv["chunk"] < p["ttt:sgd"]["n_chunks"] - 1 and inv["what"]
    assert math.isfinite(p["ttt:sgd"]["bpb"]) and not rep["deltas"]["ttt:sgd"]["valid"]
    assert rep["deltas"]["context"]["valid"]


class NaNAfter:
    """Honest score-first adapter whose ``k``-th update leaves a NaN parameter, or reports a NaN loss."""

    name = "nanafter"
    cfg = SimpleNamespace(reset="never")  # the evaluator seam reads cfg.reset

    def __init__(self, model, k: int, via: str):
        self.k, self.via, self.n, self.bad = k, via, 0, False
        self.emb = dict(model.named_parameters())["tok_emb"].detach()

    def reset(self):
        self.bad = False

    def params(self):
        return {"tok_emb": torch.full_like(self.emb, float("nan"))} if self.bad and self.via == "params" else {}

    def adapt(self, model, x, y, progress, autocast=True):
        self.n += 1
        if self.n == self.k:
            self.bad = True
            return {"loss_last": float("nan") if self.via == "loss" else 1.0}
        return {"loss_last": 1.0}

    def training_positions(self, c):
        return c


@pytest.mark.parametrize("via, what", [("params", "parameter tok_emb"), ("loss", "loss_last (nan)")])
def test_run_stream_stops_adapting_at_the_diverged_chunk(world, via, what):
    m = world["model"]
    data = prepare_stream(load_val_tokens(world["meta"]["val_pattern"]), world["lut"], "cpu", CHUNK)
    ad = NaNAfter(m, k=2, via=via)
    ev = evaluate(m, data, parse_protocols("ttt:nan"), {"nan": ad},
                  EvalConfig(seq_len=CTX, context=CTX, stride=STRIDE, chunk_tokens=CHUNK, n_boot=0))
    r = ev.results["ttt:nan"]
    assert r.stream.invalid == {"chunk": 1, "what": what}  # the 2nd update follows chunk 1
    assert ad.n == 2  # never adapted again
    # reset to the trained weights: every target scored finite, exactly as the trained model scores it
    assert np.isfinite(r.stream.token_nll).all()
    assert np.array_equal(r.stream.token_nll, ev.results["sliding"].stream.token_nll)
    assert ev.results["sliding"].stream.invalid is None
