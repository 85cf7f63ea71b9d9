"""The black-box future-perturbation audit (metattt/eval/audit.py, issue 28): honest built-ins, the example plug-in
and every protocol family pass it; cheats the ledger cannot see (they reach the stream through the evaluator's
frames, tests/audit_cheats.py) are refused with exit 3, in-process and through the CLI; oracle: fails it as
documented; a RoPE base taken from a forward's own length (the old rule) is caught, the window rule passes."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from audit_cheats import ChunkPeekDocLoRA, NextChunkAdapt, NextDocDocLoRA, SelfTrainDocLoRA
from metattt.artifact.model_io import save_model_artifact
from metattt.data.loaders import load_val_tokens
from metattt.data.synthetic import SyntheticSpec, make_synthetic_dataset, synthetic_lut
from metattt.eval import docttt, docttt_spec
from metattt.eval.audit import (AuditConfig, AuditError, AuditInconclusive, audit_protocol, before_mask, perturb,
                                pick_points, run_audit, sub_stream)
from metattt.eval.ledger import Ledger
from metattt.eval.protocols import EvalConfig, build_plan, evaluate, parse_protocols, prepare_stream, run_protocol
from metattt.eval.run import EXIT_ILLEGAL, main
from metattt.model.gpt import BankedGPT
from metattt.ttt.registry import make_adapter
from metattt.ttt.sgd import SGDAdapter
from tiny import tiny_config, trained_tiny

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "examples" / "signsgd_norms.py")
SPEC = SyntheticSpec(vocab_size=64, n_train_tokens=120_000, n_val_tokens=3000, min_doc_len=60, max_doc_len=400,
                     alpha=0.02, content_prob_min=0.4, content_prob_max=0.7)
DOC = "chunk=16/docs=4/window=48"
LORA = "rank=4/lr=0.01"
EVAL = EvalConfig(seq_len=48, context=48, stride=16, chunk_tokens=256, batch_tokens=4096, n_boot=0)
SGD = dict(lr=0.03, epochs=1, momentum=0.0, schedule="constant")
CLI = ["--max-tokens", "1500", "--context", "48", "--stride", "16", "--chunk-tokens", "256", "--batch-tokens", "4096",
       "--bootstrap", "0", "--wandb", "off", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("audit_world")
    meta = make_synthetic_dataset(root / "data", SPEC)
    model = trained_tiny(meta["train_pattern"], 64, 80)
    lut = synthetic_lut(SPEC)
    art = root / "run" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, model, meta={"lut": lut.to_dict(), "val_pattern": meta["val_pattern"], "seq_len": 48},
                        allow_over_budget=True)
    data = prepare_stream(load_val_tokens(meta["val_pattern"]), lut, "cpu", 256)
    yield {"model": model, "data": data, "meta": meta, "artifact": art, "root": root}
    torch.set_num_threads(threads)


def _cli(world, tmp_path, *extra):
    return main([str(world["artifact"]), "--run-dir", str(tmp_path / "ev"), *CLI, *extra])


def _write(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


# ------------------------------------------------------------------------------------------------ pieces
def test_points_perturbation_and_the_compared_set():
    toks = np.array([1, 5, 6, 7, 8, 9, 1, 4, 4, 4, 4, 1, 3, 3], dtype=np.int64)
    rng = np.random.default_rng(0)
    for q, a, e in pick_points(toks, 1, 6, rng):
        assert toks[a] == 1 and a + 2 <= q < e and not (toks[a + 1:e] == 1).any()
    pert = perturb(toks, 3, 6, "tokens", 1, 64, np.random.default_rng(1))
    assert (pert[:3] == toks[:3]).all() and (pert[6:] == toks[6:]).all() and pert[3] != toks[3]
    assert not (pert[3:6] == 1).any()  # no BOS written: the documents stay as they were
    assert (perturb(toks, 3, 6, "boundary", 1, 64, rng) == np.r_[toks[:3], 1, toks[4:]]).all()
    # steps per target 1..5: chunk [1,3) at step 1, [3,6) at step 3; q = 4 -> targets 1, 2 and 3 (same step, below q)
    steps = np.array([1, 1, 3, 3, 3])
    assert before_mask(steps, 4).tolist() == [True, True, True, False, False]


# ------------------------------------------------------------------------------------------------ honest
def test_honest_builtins_pass_and_oracle_fails_as_documented(world):
    m, data = world["model"], world["data"]
    specs = parse_protocols(f"flat,sliding,doc,ttt:sgd,ttt:sgd@doc-sliding,oracle:sgd,docttt:doclora@{DOC}/{LORA},"
                            f"docttt:doclora@{DOC}/phases=2/{LORA}")
    sgd = make_adapter("sgd", **SGD).bind(m)
    out = run_audit(m, data, specs, {"sgd": sgd}, EVAL, AuditConfig(points=2))
    recs = out["protocols"]
    assert set(recs) == {s.name for s in specs}
    for name, r in recs.items():
        if name.startswith("oracle:"):
            assert r["status"].startswith("fail (expected") and r["max_diff"] > 0.01, r
            continue
        assert r["status"] == "pass", (name, r)
        assert r["targets_compared"] > 0 and len(r["checks"]) >= 2
        assert all(c["changed"] == 0 for c in r["checks"])
        assert [c["kind"] for c in r["checks"]].count("boundary") == (0 if name.startswith("docttt:") else 1)
    phased = recs[f"docttt:doclora@{DOC}/phases=2/{LORA}"]
    assert "boundary_skipped" in phased and phased["audited_as"].endswith("phase_docs=4/" + LORA)
    # tokens perturbations on CPU: bit for bit (tolerance 0)
    assert all(c["max_diff"] == 0 for r in recs.values() if not r["status"].startswith("fail")
               for c in r["checks"] if c["kind"] == "tokens")


def test_cli_records_the_audit_and_the_example_plugin_passes(world, tmp_path, capsys):
    rc = _cli(world, tmp_path, "--protocols", f"sliding,ttt:signsgd,oracle:sgd,docttt:doclora@{DOC}/{LORA}",
              "--adapter-module", EXAMPLE, "--adapter-spec", "signsgd:lr=0.003", "--adapter-spec",
              "sgd:lr=0.03,epochs=1,momentum=0.0,schedule=constant")
    assert rc == 0, capsys.readouterr().err
    audit = json.loads((tmp_path / "ev" / "eval.json").read_text())["meta"]["audit"]
    assert audit["ran"] and audit["config"]["points"] == 4  # a plug-in: the stronger default
    assert audit["protocols"]["ttt:signsgd"]["status"] == "pass"
    assert audit["protocols"]["oracle:sgd"]["status"].startswith("fail (expected")
    assert all(len(r["checks"]) == (4 if n.startswith("docttt:") else 5) and r["prefix_tokens"] > 0
               for n, r in audit["protocols"].items())
    rc = _cli(world, tmp_path, "--protocols", "sliding", "--no-audit")
    assert rc == 0 and not json.loads((tmp_path / "ev" / "eval.json").read_text())["meta"]["audit"]["ran"]
    assert "--no-audit" in capsys.readouterr().err
    assert _cli(world, tmp_path, "--protocols", "sliding", "--audit-points", "-1") == 2


# ------------------------------------------------------------------------------------------------ cheats
@pytest.mark.parametrize("cls", [ChunkPeekDocLoRA, SelfTrainDocLoRA, NextDocDocLoRA])
def test_doc_batched_cheats_pass_the_ledger_but_not_the_audit(world, cls):
    m, data = world["model"], sub_stream(world["data"], world["data"].tokens_np[:1500])
    spec = docttt_spec.parse_docttt(f"docttt:doclora@{DOC}/{LORA}")
    ledger = Ledger(spec.name)
    res = docttt.run_docttt(spec, m, data.tokens, data.tokens_np, data.bos_id, ledger,
                            make_adapter=lambda s: cls(s.make_adapter().cfg))
    assert ledger.verify()["legal"]  # the ledger sees only the loop's plan
    if "honest_docttt" not in world:
        world["honest_docttt"] = docttt.run_docttt(spec, m, data.tokens, data.tokens_np, data.bos_id,
                                                   Ledger(spec.name)).token_nll
    assert res.token_nll.sum() != world["honest_docttt"].sum()  # the cheat did change the scores
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(docttt, "make_doc_adapter", lambda s, model=None, extras=None: cls(s.make_adapter().cfg))
        with pytest.raises(AuditError, match=r"ILLEGAL evaluation 'docttt:doclora@.*q=\d+.*scored before q"):
            run_audit(m, data, [spec], {}, EVAL, AuditConfig(points=4))


def test_ttt_cheats_pass_the_ledger_but_not_the_audit(world, monkeypatch):
    m, data = world["model"], world["data"]
    ad = NextChunkAdapt(SGDAdapter.Config(**SGD)).bind(m)
    specs = parse_protocols("ttt:cheat")
    ev = evaluate(m, data, specs, {"cheat": ad}, EVAL)  # the ledger passes it
    assert ev.results["ttt:cheat"].ledger["legal"]
    with pytest.raises(AuditError, match="ILLEGAL evaluation 'ttt:cheat'"):
        run_audit(m, data, specs, {"cheat": ad}, EVAL)
    # monkeypatching: an adapter that asks for the next chunk, with the ledger's update record patched away
    from metattt.eval import ledger as ledger_mod

    class Peek(SGDAdapter):
        def training_positions(self, chunk_index):
            return chunk_index + 1

    monkeypatch.setattr(ledger_mod.Ledger, "record_update", lambda self, *a, **k: None)
    peek = Peek(SGDAdapter.Config(**SGD)).bind(m)
    assert evaluate(m, data, specs, {"cheat": peek}, EVAL).results["ttt:cheat"].ledger["legal"]
    with pytest.raises(AuditError, match="tokens replaced at q="):
        run_audit(m, data, specs, {"cheat": peek}, EVAL)


DOC_PLUGIN = """
    import metattt.eval.docttt as D
    from metattt.ttt.sgd import SGDAdapter
    from audit_cheats import {cls}

    class Unused(SGDAdapter):  # a plug-in module must define an adapter
        name = "unused_{tag}"

    def _cheat(spec, model=None, extras=None):  # replaces the doc-batched adapter factory
        return None if spec.adapter is None else {cls}(spec.make_adapter().cfg)

    D.make_doc_adapter = _cheat
    """


def test_cli_refuses_a_plugin_that_replaces_the_doc_batched_adapter(world, tmp_path, capsys, monkeypatch,
                                                                    cls="NextDocDocLoRA"):
    monkeypatch.setattr(docttt, "make_doc_adapter", docttt.make_doc_adapter)  # undone after the test
    plug = _write(tmp_path, "docplug.py", DOC_PLUGIN.format(cls=cls, tag=cls.lower()))
    rc = _cli(world, tmp_path, "--protocols", f"docttt:doclora@{DOC}/{LORA}", "--adapter-module", plug)
    err = capsys.readouterr().err
    assert rc == EXIT_ILLEGAL, err
    assert "REFUSED" in err and "audit of 'docttt:doclora@" in err and "q=" in err
    assert not (tmp_path / "ev" / "eval.json").exists()


def test_cli_refuses_a_ttt_plugin_that_trains_on_the_next_chunk(world, tmp_path, capsys):
    plug = _write(tmp_path, "nextchunk.py", """
        from audit_cheats import NextChunkAdapt

        class NextChunkPlugin(NextChunkAdapt):
            name = "nextchunk"
        """)
    rc = _cli(world, tmp_path, "--protocols", "sliding,ttt:nextchunk", "--adapter-module", plug)
    err = capsys.readouterr().err
    assert rc == EXIT_ILLEGAL and "audit of 'ttt:nextchunk'" in err, err
    assert not (tmp_path / "ev" / "eval.json").exists()


@pytest.mark.parametrize("ret", ["(chunk_index, chunk_index)", "-1", "10 ** 6", "True", "float(chunk_index)"])
def test_cli_bad_training_positions_exit_3_not_a_traceback(world, tmp_path, capsys, ret):
    plug = _write(tmp_path, "badpos.py", f"""
        from metattt.ttt.sgd import SGDAdapter

        class BadPos(SGDAdapter):
            name = "badpos"

            def training_positions(self, chunk_index):
                return {ret}
        """)
    rc = _cli(world, tmp_path, "--protocols", "ttt:badpos", "--adapter-module", plug)
    err = capsys.readouterr().err
    assert rc == EXIT_ILLEGAL, err
    assert "REFUSED" in err and "training_positions(" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ RoPE
def test_rope_base_from_a_forwards_own_length_is_caught(world, monkeypatch):
    """Dynamic NTK RoPE (rope_ntk_len 16 < window 48): with the old rule (base of the forward's own length), the
    exact shapes' last chunk of a document takes its base from where the document ends, a BOS not yet scored;
    the audit's moved BOS catches it. With the protocol's window length (the fix) it passes."""
    m0 = world["model"]
    m = BankedGPT(tiny_config(rope_ntk_len=16))
    m.load_state_dict(m0.state_dict())
    m.eval()
    data = world["data"]
    spec = docttt_spec.parse_docttt("doc-chunk@chunk=16/docs=1/window=48")
    acfg = AuditConfig(points=0, boundary_points=6, prefix_tokens=1500)
    out = run_audit(m, data, [spec], {}, EVAL, acfg)["protocols"][spec.name]
    assert out["status"] == "pass" and out["max_diff"] <= 1e-5
    fixed_rope = BankedGPT._rope
    monkeypatch.setattr(BankedGPT, "_rope", lambda self, t, device, rope_len=None: fixed_rope(self, t, device))
    with pytest.raises(AuditError, match=r"a BOS written at q=\d+"):
        run_audit(m, data, [spec], {}, EVAL, acfg)


def test_rerun_noise_above_the_tolerance_is_inconclusive_not_illegal(world):
    """Where re-runs are not exact (CUDA), an honest protocol whose unperturbed re-run already moves scores past the
    tolerance cannot be judged: the audit says so (AuditInconclusive) instead of calling it illegal, and passes
    once the tolerance sits above the noise. Noise added to an honest CPU run stands in for the GPU's."""
    m, data = world["model"], world["data"]
    spec = next(s for s in parse_protocols("sliding") if s.name == "sliding")
    rng = np.random.default_rng(0)

    def noisy(s, d):
        res = run_protocol(s, m, d, build_plan(s.windows, d, EVAL), EVAL)
        res.stream.token_nll = res.stream.token_nll + rng.uniform(0, 4e-3, res.stream.token_nll.size).astype(np.float32)
        return res

    cuda = torch.device("cuda")  # only picks the CUDA tolerance and the re-run; the data stay on the CPU
    with pytest.raises(AuditInconclusive, match=r"inconclusive, not a legality finding.*above the tolerance 0.001"):
        audit_protocol(spec, noisy, data, EVAL, cuda, AuditConfig(points=1, boundary_points=0))
    rec = audit_protocol(spec, noisy, data, EVAL, cuda, AuditConfig(points=1, boundary_points=0, tol=0.01))
    assert rec["status"] == "pass" and 1e-3 < rec["rerun_max_diff"] < 4e-3


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
def test_audit_on_cuda_bf16(world):
    """On CUDA (bf16 autocast; re-runs are not bit-exact): honest protocols stay within the stated tolerance, with
    the re-run noise recorded; a cheat is still caught. Prints what it measured."""
    m = BankedGPT(tiny_config()).cuda()
    m.load_state_dict(world["model"].state_dict())
    m.eval()
    data = prepare_stream(world["data"].tokens_np, synthetic_lut(SPEC), "cuda", 256)
    specs = parse_protocols(f"flat,sliding,ttt:sgd,docttt:doclora@{DOC}/phases=2/{LORA}")
    sgd = make_adapter("sgd", **SGD).bind(m)
    out = run_audit(m, data, specs, {"sgd": sgd}, EVAL, AuditConfig(points=3))
    for name, r in out["protocols"].items():
        print("cuda audit", name, r["status"], "rerun noise", r["rerun_max_diff"], "max diff", r["max_diff"])
        assert r["status"] == "pass" and r["tolerance"] > 0 and "rerun_max_diff" in r
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(docttt, "make_doc_adapter",
                   lambda s, model=None, extras=None: ChunkPeekDocLoRA(s.make_adapter().cfg))
        with pytest.raises(AuditError):
            run_audit(m, data, [docttt_spec.parse_docttt(f"docttt:doclora@{DOC}/{LORA}")], {}, EVAL)
