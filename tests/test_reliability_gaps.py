"""Issue 28, the reliability gaps of the evaluator and `compare` (the trainer's are in test_train_signals.py):
diverging doc-batched runs, contexts beyond the trained length, unwritable and shared run directories,
interrupts, bad adapter specs, a compare glob that matched nothing.

A tiny *untrained* model is enough (none of this is about the model's quality)."""
from __future__ import annotations

import json
import os
import re
import signal
import threading

import pytest
import torch

from metattt.artifact.model_io import save_model_artifact
from metattt.data.fingerprint import tokens_fingerprint
from metattt.data.loaders import load_val_tokens
from metattt.data.synthetic import SyntheticSpec, make_synthetic_dataset, synthetic_lut
from metattt.eval.run import EXIT_BAD_INPUT, EXIT_INVALID, EXIT_OK, main
from metattt.model.gpt import BankedGPT
from tiny import tiny_config

SPEC = SyntheticSpec(vocab_size=64, n_train_tokens=2000, n_val_tokens=3000, min_doc_len=200, max_doc_len=600)
CTX, STRIDE, CHUNK = 64, 16, 512


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gaps")
    meta = make_synthetic_dataset(root / "data", SPEC)
    torch.manual_seed(0)
    model = BankedGPT(tiny_config()).eval()
    fp = tokens_fingerprint(load_val_tokens(meta["val_pattern"]))
    art = root / "run" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, model, meta={"lut": synthetic_lut(SPEC).to_dict(), "val_pattern": meta["val_pattern"],
                                          "seq_len": CTX, "val_fingerprint": fp}, allow_over_budget=True)
    yield {"art": art, "val": meta["val_pattern"]}
    torch.set_num_threads(threads)


def _cli(art, run_dir, *extra, context=True):
    ctx = ["--context", str(CTX)] if context else []
    return main([str(art), *ctx, "--stride", str(STRIDE), "--chunk-tokens", str(CHUNK),
                 "--batch-tokens", "4096", "--bootstrap", "20", "--run-dir", str(run_dir), "--quiet", "--wandb", "off",
                 *extra])


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ diverging docttt
@pytest.mark.parametrize("proto", [
    "docttt:doclora@lr=nan/rank=2/docs=4",
    "docttt:doclora@lr=1e6/rank=8/docs=4",
    "docttt:doclora@rank=2/docs=2/phases=2/phase_lr=1e30/phase_clip=0",  # 1e6 stays finite here
    "docttt:doclora@rank=2/docs=2/phases=2/phase_lr=nan",  # the phase itself: undone, named
])
def test_diverging_docttt_is_invalid_exit_4(world, tmp_path, capsys, proto):
    """Used to report NaN bpb with ``valid: true`` and exit 0."""
    rc = _cli(world["art"], tmp_path / "ev", "--protocols", proto, "--max-tokens", "1200")
    err = capsys.readouterr().err
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    p = rep["protocols"]
    name = next(n for n in p if n.startswith("docttt:") and "lr=" in n)
    assert rc == EXIT_INVALID and f"INVALID: {name}" in err, err
    inv = p[name]["invalid"]
    assert not p[name]["valid"] and inv["what"] and "batch" in inv
    assert ("phase" in inv["what"] or inv.get("phase") is not None) == ("phases" in proto)
    assert all(v["valid"] for n, v in p.items() if n != name)  # the baselines are unaffected
    assert not rep["deltas"][next(k for k, d in rep["deltas"].items() if d["to"] == name)]["valid"]


def test_honest_docttt_stays_valid(world, tmp_path, capsys):
    assert _cli(world["art"], tmp_path / "ev", "--protocols", "docttt:doclora@rank=2/docs=4/phases=1",
                "--max-tokens", "1200") == EXIT_OK
    p = json.loads((tmp_path / "ev" / "eval.json").read_text())["protocols"]
    assert all(v["valid"] for v in p.values())


# ------------------------------------------------------------------------------------------------ longer context
@pytest.mark.parametrize("args", [["--context", str(2 * CTX)], ["--seq-len", str(2 * CTX)],
                                  ["--train-seq-len", str(2 * CTX)],
                                  ["--protocols", f"docttt:doclora@window={2 * CTX}"]])
def test_context_beyond_the_trained_length_is_refused(world, tmp_path, capsys, args):
    run_dir = tmp_path / "ev"
    extra = args if "--protocols" in args else ["--protocols", "sliding", *args]
    rc = _cli(world["art"], run_dir, *extra, context="--context" not in args)
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_BAD_INPUT and f"trained at ({CTX} tokens)" in line and "--allow-longer-context" in line
    assert not run_dir.exists()
    rc = _cli(world["art"], run_dir, *extra, "--allow-longer-context", "--max-tokens", "800",
              context="--context" not in args)
    assert rc == EXIT_OK and "--allow-longer-context" in capsys.readouterr().err  # a warning, not silence


# ------------------------------------------------------------------------------------------------ run directory
def test_unwritable_run_dir_is_refused_before_scoring(world, tmp_path, capsys, monkeypatch):
    """A path under a regular file cannot be created even by root (chmod does not stop root)."""
    import metattt.eval.run as run_mod

    def no_scoring(*a, **k):
        raise AssertionError("scored although the results could not be written")

    monkeypatch.setattr(run_mod, "evaluate", no_scoring)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = _cli(world["art"], blocker / "ev", "--protocols", "flat")
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_BAD_INPUT and "--run-dir" in line and str(blocker) in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions; the path-under-a-file test covers root")
def test_read_only_run_dir_is_refused_before_scoring(world, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = _cli(world["art"], ro / "ev", "--protocols", "flat")
        line = _one_line(capsys.readouterr().err)
        assert rc == EXIT_BAD_INPUT and "--run-dir" in line
    finally:
        ro.chmod(0o755)


def test_two_evaluations_on_one_run_dir_both_kept(world, tmp_path, monkeypatch):
    """Two evaluator processes reach the write step together: without a lock both saw no eval.json and one
    overwrote the other. The barrier lets them meet when nothing serialises them; under the lock the second waits
    for the first to finish writing (the barrier then times out for the first one, which carries on). Processes,
    as in use (forked, so they share the barrier and the patch; threads would also trip CPython 3.11's
    non-thread-safe compiler)."""
    import multiprocessing

    import metattt.eval.results as results

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2, timeout=3)
    real = results.archive_previous

    def meet_then_archive(path):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        return real(path)

    monkeypatch.setattr(results, "archive_previous", meet_then_archive)
    run_dir = tmp_path / "ev"

    def evaluate(protocols: str) -> None:
        try:
            rc = _cli(world["art"], run_dir, "--protocols", protocols)
        except BaseException:  # noqa: BLE001 - any failure is a non-zero exit code
            rc = 99
        os._exit(rc)

    procs = [ctx.Process(target=evaluate, args=(p,)) for p in ("flat", "sliding")]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(timeout=300)
    assert [pr.exitcode for pr in procs] == [EXIT_OK, EXIT_OK]
    evals = [json.loads(p.read_text()) for p in run_dir.glob("eval*.json")]
    assert len(evals) == 2 and {frozenset(e["protocols"]) for e in evals} == {frozenset({"flat"}),
                                                                             frozenset({"flat", "sliding"})}


# ------------------------------------------------------------------------------------------------ interrupts
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_evaluation_exits_with_one_line(world, tmp_path, capsys, monkeypatch, sig, code):
    import metattt.eval.run as run_mod

    def interrupted(*a, **k):
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not stop the evaluation")

    monkeypatch.setattr(run_mod, "evaluate", interrupted)
    old = signal.getsignal(signal.SIGTERM)
    rc = _cli(world["art"], tmp_path / "ev", "--protocols", "flat")
    line = _one_line(capsys.readouterr().err)
    assert rc == code and "interrupted" in line and "nothing was written" in line
    assert not (tmp_path / "ev").exists()
    assert signal.getsignal(signal.SIGTERM) == old  # the handler is the CLI's only while it runs


def test_interrupt_after_the_results_are_written_says_where(world, tmp_path, capsys, monkeypatch):
    import metattt.eval.run as run_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "format_report", interrupted)
    rc = _cli(world["art"], tmp_path / "ev", "--protocols", "flat")
    line = _one_line(capsys.readouterr().err)
    assert rc == 130 and "already written" in line and str(tmp_path / "ev" / "eval.json") in line
    assert (tmp_path / "ev" / "eval.json").is_file()


# ------------------------------------------------------------------------------------------------ adapter specs
@pytest.mark.parametrize("spec, what", [("", "empty"), ("sgd:lr=-1", "lr"), ("fast=sgd:grad_clip=-1", "grad_clip")])
def test_bad_adapter_spec_exits_2(world, tmp_path, capsys, spec, what):
    proto = "ttt:fast" if spec.startswith("fast=") else "ttt:sgd"
    rc = _cli(world["art"], tmp_path / "ev", "--protocols", proto, "--adapter-spec", spec)
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_BAD_INPUT and what in line
    assert not (tmp_path / "ev").exists()


# ------------------------------------------------------------------------------------------------ compare
def test_compare_on_a_glob_that_matched_nothing_exits_2(tmp_path, capsys):
    from metattt.track.compare_cli import main as compare_main

    rc = compare_main([str(tmp_path / "runs" / "*")])  # the shell passes an unmatched glob through as it is
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    assert "matched no run directory" in _one_line(out.err)


# ------------------------------------------------------------------------------------------------ printing
def test_docttt_report_fits_long_names_and_says_no_phase_ran(world, tmp_path, capsys):
    rc = main([str(world["art"]), "--protocols", "docttt:doclora@rank=2/docs=4/phases=3", "--max-tokens", "1200",
               "--bootstrap", "20", "--run-dir", str(tmp_path / "ev"), "--wandb", "off"])
    out = capsys.readouterr().out
    assert rc == EXIT_OK
    phases = next(ln for ln in out.splitlines() if ln.strip().startswith("phases"))
    assert "no phase ran" in phases
    # in the deltas table and in each decomposition, the value column starts at the same place on every row,
    # however long the protocol names (they used to push it out of line)
    blocks = [b.splitlines()[1:] for b in out.split("\n\n") if b.startswith(("deltas", "decomposition of"))]
    assert len(blocks) == 3
    for rows in blocks:
        at = {re.search(r" [+-]\d\.\d{5} ", ln).start() for ln in rows}
        assert len(at) == 1, rows


def test_docttt_progress_counts_chunk_steps_within_batches(world, monkeypatch):
    """A doc-batched CPU run showed nothing for over ten minutes inside one batch: progress counts chunk steps."""
    from metattt.eval import docttt, docttt_model, docttt_spec
    from metattt.eval.ledger import Ledger

    seen = {}

    class Recorder:
        def __init__(self, total, desc="", enabled=True, **kw):
            seen["total"], seen["n"], seen["desc"] = total, 0, desc

        def update(self, n=1):
            seen["n"] += n

        def close(self):
            seen["closed"] = True

    monkeypatch.setattr(docttt, "progress_bar", Recorder)
    tokens = load_val_tokens(world["val"])[:1200]
    model = BankedGPT(tiny_config()).eval()
    spec = docttt_spec.parse_docttt("docttt:doclora@rank=2/docs=4/chunk=32")
    q = docttt_model.doc_queue(tokens.numpy(), model.cfg.bos_id, spec.docs)
    steps = sum(int(-(-q.n_targets[idx].max() // spec.chunk)) for idx in q.batches)
    docttt.run_docttt(spec, model, tokens, tokens.numpy(), model.cfg.bos_id, Ledger(spec.name), progress=True)
    assert seen["total"] == steps > len(q.batches) and seen["n"] == steps and seen["closed"]
    assert "chunk steps" in seen["desc"]


def test_final_eval_labels_its_targets_and_the_trainers(tmp_path):
    from metattt.train.final_eval import format_decomposition

    report = {"data": {"n_tokens": 65_536, "n_targets": 65_535, "n_docs": 31}, "_paths": {}}
    rows = [{"protocol": "flat", "bpb": 6.69, "ci95": [6.6, 6.7], "legal": True, "adapts": False},
            {"protocol": "sliding", "bpb": 6.66, "ci95": [6.5, 6.7], "legal": True, "adapts": False,
             "gain": 0.03, "gain_ci95": [0.02, 0.04]}]
    room = {"window": 256, "bayes_window_bpb": 5.05, "bayes_unknown_bpb": 4.98, "room_bpb": 0.07,
            "source": "computed for the scored prefix"}
    out = format_decomposition({"rows": rows, "room": room}, report, "short",
                               trainer={"val_bpb_quant": 6.7066, "val_tokens": 199_999})
    flat = next(ln for ln in out.splitlines() if ln.strip().startswith("flat"))
    assert "65,535 targets only" in flat and "6.7066" in flat and "199,999" in flat
    room_line = next(ln for ln in out.splitlines() if "analytic room" in ln)
    assert "same 65,535 targets" in room_line
    assert "65,536" not in out.replace("the first 65,536 val tokens", "")  # tokens named once, as tokens
