"""Document-batched TTT (``doc-chunk`` / ``docttt:doclora``): the per-row LoRA forward, the batched AdamW,
batched == one document at a time, lr 0 == chunked doc-window scoring bit for bit, legality refusals (a cheating
adapter, a cheating phase), the decomposition in the report, and 2-process gloo agreement."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metattt.data.loaders import load_val_tokens
from metattt.data.synthetic import SyntheticSpec, make_synthetic_dataset, synthetic_lut
from metattt.eval import docttt, docttt_batch, docttt_model, docttt_spec
from metattt.eval.ledger import Ledger, LegalityError
from metattt.eval.protocols import EvalConfig, evaluate, parse_protocols, prepare_stream
from metattt.eval.report import build_report, format_report
from metattt.eval.scoring import ScoreConfig, run_stream
from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT, Runtime
from metattt.ttt import make_adapter
from metattt.ttt.doclora import DocLoRA, DocLoRAConfig
from tiny import tiny_config, trained_tiny

SPEC = SyntheticSpec(vocab_size=64, n_train_tokens=120_000, n_val_tokens=3000, min_doc_len=60, max_doc_len=400,
                     alpha=0.02, content_prob_min=0.4, content_prob_max=0.7)
OPTS = "chunk=16/docs=4/window=48"  # canonical order (as names print them)
LORA = "rank=4/lr=0.01"
EVAL = EvalConfig(seq_len=48, context=48, stride=16, chunk_tokens=256, batch_tokens=4096, n_boot=200)




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic corpus + a tiny model trained for ~1 s (documents reuse content words: adaptation can help)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("docttt_world")
    meta = make_synthetic_dataset(root / "data", SPEC)
    model = trained_tiny(meta["train_pattern"], 64, 80)
    data = prepare_stream(load_val_tokens(meta["val_pattern"]), synthetic_lut(SPEC), "cpu", 256)
    yield {"model": model, "data": data, "meta": meta, "root": root}
    torch.set_num_threads(threads)


def _rand_lora(cfg: ModelConfig, n: int, r: int, gen: torch.Generator, kinds=("q", "k", "v", "out", "mlp")):
    d, kv = cfg.model_dim, cfg.kv_dim
    out_dim = {"q": d, "k": kv, "v": kv, "out": d, "mlp": d}
    lora = {}
    for k in kinds:
        for layer in range(cfg.num_layers):
            lora[f"{k}.{layer}"] = (torch.randn(n, r, d, generator=gen) * 0.3,
                                    torch.randn(n, out_dim[k], r, generator=gen) * 0.3)
    return lora


# ------------------------------------------------------------------------------------------------ model
def test_lora_none_and_zero_b_are_the_plain_forward_bitwise(one_thread):
    torch.manual_seed(0)
    m = BankedGPT(tiny_config())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(0, 64, (3, 20))
    ref = m(x)
    full = _rand_lora(m.cfg, 3, 4, torch.Generator().manual_seed(1))
    lora = {k: (a, torch.zeros_like(b)) for k, (a, b) in full.items()}
    assert torch.equal(m(x, lora=None), ref)
    assert torch.equal(m(x, lora=lora), ref)
    assert not torch.equal(m(x, lora=full), ref)


@pytest.mark.parametrize("runtime", [Runtime(), Runtime(fused_qkv=False, fold_gains=False)])
def test_per_row_lora_equals_materialised_per_row_weights(runtime, one_thread):
    """Row b with factors (A_b, B_b) on q/k/v/out and the head == the model with W + B_b @ A_b for that row."""
    torch.manual_seed(0)
    cfg = tiny_config(tie_embeddings=False)
    m = BankedGPT(cfg, runtime)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    gen = torch.Generator().manual_seed(2)
    n, r, L = 3, 4, cfg.num_layers
    lora = _rand_lora(cfg, n, r, gen, kinds=("q", "k", "v", "out"))
    lora["head"] = (torch.randn(n, r, cfg.model_dim, generator=gen) * 0.3,
                    torch.randn(n, cfg.vocab_size, r, generator=gen) * 0.3)
    x = torch.randint(0, 64, (n, 17))
    got = m(x, lora=lora)
    for b in range(n):
        qo, kv = m.qo_bank.detach().clone(), m.kv_bank.detach().clone()
        for layer in range(L):
            dd = {k: lora[f"{k}.{layer}"][1][b] @ lora[f"{k}.{layer}"][0][b] for k in ("q", "k", "v", "out")}
            qo[layer] += dd["q"]
            qo[L + layer] += dd["out"]
            kv[layer] += dd["k"]
            kv[L + layer] += dd["v"]
        head = m.lm_head.detach() + lora["head"][1][b] @ lora["head"][0][b]
        want = m(x[b:b + 1], params={"qo_bank": qo, "kv_bank": kv, "lm_head": head})
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-4, atol=1e-4)


def test_mlp_branch_same_with_and_without_folded_gains(one_thread):
    """The parallel MLP branch is scaled like the MLP output whether mlp_scale is folded into W or not."""
    torch.manual_seed(0)
    cfg = tiny_config()
    fold, plain = BankedGPT(cfg, Runtime()), BankedGPT(cfg, Runtime(fold_gains=False))
    with torch.no_grad():
        for p in fold.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for blk in fold.blocks:
            blk.mlp_scale.uniform_(0.5, 2.0)
            blk.attn_scale.uniform_(0.5, 2.0)
    plain.load_state_dict(fold.state_dict())
    lora = _rand_lora(cfg, 2, 4, torch.Generator().manual_seed(3), kinds=("mlp", "out"))
    x = torch.randint(0, 64, (2, 15))
    out = fold(x, lora=lora)
    torch.testing.assert_close(out, plain(x, lora=lora), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, fold(x), atol=1e-3)


# ------------------------------------------------------------------------------------------------ adapter
def test_doclora_step_is_torch_adamw_per_document(one_thread):
    """Each document's factors follow torch.optim.AdamW (weight decay, eps, bias correction) exactly as if
    optimised alone; documents left out of a step (active=False) are untouched."""
    cfg = tiny_config()
    m = BankedGPT(cfg)
    ad = DocLoRA(DocLoRAConfig(rank=3, lr=0.01, beta1=0.5, eps=1e-6, weight_decay=0.5, targets="q+head")).bind(m)
    params = dict(m.named_parameters())
    tr = ad.start(params, 2)
    st = ad.init(tr)
    ref = {k: torch.nn.Parameter(v[0].clone()) for k, v in tr.items()}
    opt = torch.optim.AdamW(ref.values(), lr=0.01, betas=(0.5, 0.999), eps=1e-6, weight_decay=0.5)
    gen = torch.Generator().manual_seed(1)
    frozen = {k: v[1].clone() for k, v in tr.items()}
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in tr.items()}
        tr, st = ad.step(tr, st, grads, active=torch.tensor([True, False]))
        for k, p in ref.items():
            p.grad = grads[k][0].clone()
        opt.step()
    for k in tr:
        torch.testing.assert_close(tr[k][0], ref[k].detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(tr[k][1], frozen[k])
    assert ad.adapted_count == 3 * (cfg.num_layers * (32 + 32) + 32 + 64)
    # documents at different step counts in one step (runs of rows, each with its own bias correction), and
    # gradients for only the first rows of the batch
    tr = ad.start(params, 4, key=2)
    st = ad.init(tr)
    refs = [{k: torch.nn.Parameter(v[b].clone()) for k, v in tr.items()} for b in range(3)]
    opts = [torch.optim.AdamW(r.values(), lr=0.01, betas=(0.5, 0.999), eps=1e-6, weight_decay=0.5) for r in refs]
    last = {k: v[3].clone() for k, v in tr.items()}
    for pattern in ([1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1]):
        grads = {k: torch.randn((3,) + v.shape[1:], generator=gen) for k, v in tr.items()}
        tr, st = ad.step(tr, st, grads, active=torch.tensor(pattern, dtype=torch.bool))
        for b, on in enumerate(pattern):
            if on:
                for k, p in refs[b].items():
                    p.grad = grads[k][b].clone()
                opts[b].step()
    assert st["t"].tolist() == [3, 3, 3, 0]
    for b in range(3):
        for k in tr:
            torch.testing.assert_close(tr[k][b], refs[b][k].detach(), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(tr[k][3], last[k]) for k in tr)


def test_doclora_step_takes_autograd_gradients_with_transposed_strides(one_thread):
    """The head factors' autograd gradients have transposed strides; CUDA's fused AdamW refuses a gradient whose
    strides differ from its parameter's (this failed on the H200), so the step makes them contiguous and checks
    the kernel's precondition on every device. The result equals the same step with contiguous gradients."""
    cfg = tiny_config()
    m = BankedGPT(cfg)
    ad = DocLoRA(DocLoRAConfig(rank=3, lr=0.01)).bind(m)
    tr = ad.start(dict(m.named_parameters()), 2)
    st = ad.init(tr)
    tr = {k: v + 0.01 for k, v in tr.items()}  # B != 0, so every factor gets a gradient
    leaves = {k: v.detach().requires_grad_(True) for k, v in tr.items()}
    out = ad.loss(m, torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)), None,
                  ad.materialize({}, leaves))
    grads = dict(zip(leaves, torch.autograd.grad(out.float().square().mean(), list(leaves.values()))))
    assert not grads["A.head"].is_contiguous()  # what autograd gives (the case the kernel refused)
    a_tr, a_st = ad.step({k: v.clone() for k, v in tr.items()}, {k: v.clone() for k, v in st.items()}, grads)
    b_tr, _ = ad.step({k: v.clone() for k, v in tr.items()}, {k: v.clone() for k, v in st.items()},
                      {k: g.contiguous() for k, g in grads.items()})
    for k in tr:
        assert torch.equal(a_tr[k], b_tr[k]), k
        assert not torch.equal(a_tr[k], tr[k]), k


def test_keep_a_carries_a_and_resets_b_and_state(one_thread):
    cfg = tiny_config()
    m = BankedGPT(cfg)
    params = dict(m.named_parameters())
    for keep in (False, True):
        ad = DocLoRA(DocLoRAConfig(rank=2, keep_a=keep, alpha=4.0)).bind(m)
        assert ad.carries() == keep
        tr = ad.start(params, 3)
        grads = {k: torch.ones_like(v) for k, v in tr.items()}
        tr, st = ad.step(tr, ad.init(tr), grads)
        tr2 = ad.start(params, 3, key=1, carry=tr)
        st2 = ad.init(tr2)
        assert torch.equal(tr2["A.q"], tr["A.q"]) == keep
        assert not tr2["B.q"].any() and not st2["m.B.q"].any() and not st2["t"].any()
        torch.testing.assert_close(ad.materialize({}, tr)["B.q"], 2.0 * tr["B.q"])  # scale alpha / rank


def test_doclora_options_parse_and_fail_clearly():
    cfg = make_adapter("doclora", rank="8", keep_a="true", alpha="16").cfg
    assert isinstance(cfg, DocLoRAConfig) and cfg.rank == 8 and cfg.keep_a and cfg.scale == 2.0
    assert docttt_spec.parse_docttt("docttt:doclora@chunk=8/rank=2").make_adapter().cfg.chunk == 8  # the protocol's
    with pytest.raises(ValueError, match="no option 'rnk'"):
        make_adapter("doclora", rnk="8")
    with pytest.raises(ValueError, match="targets"):
        make_adapter("doclora", targets="q+zz")
    with pytest.raises(ValueError, match="epochs must be 1"):
        parse_protocols("docttt:doclora@epochs=2")
    with pytest.raises(ValueError, match="is not a int"):
        parse_protocols("docttt:doclora@rank=big")
    with pytest.raises(ValueError, match="not key=value"):
        parse_protocols("docttt:doclora@chunk")
    with pytest.raises(ValueError, match="'sgd' is not a per-document adapter"):
        parse_protocols("docttt:sgd")


# ------------------------------------------------------------------------------------------------ protocol core
def test_batched_equals_one_document_at_a_time(world):
    """The same factors and optimiser run on 4 documents in one batch or on each document alone give the same
    nats and the same final factors (float tolerance: padding changes the GEMM shapes)."""
    m, data = world["model"], world["data"]
    spec = docttt_spec.parse_docttt(f"docttt:doclora@{OPTS}/{LORA}")
    queue = docttt_model.doc_queue(data.tokens_np, data.bos_id, 4)
    idx = queue.batches[1]
    a, e = queue.a[idx], queue.e[idx]
    assert len(set((e - a).tolist())) > 1  # documents of different lengths: different numbers of chunks
    ad = docttt.make_doc_adapter(spec, m)
    t0 = ad.start(dict(m.named_parameters()), len(idx))
    init = (t0, ad.init(t0))
    batched = docttt_batch.run_batch(m, data.tokens, a, e, spec, ad, None, Ledger(), init)
    got = dict(batched.nll)
    assert batched.train_steps > 0
    for b in range(len(idx)):
        one = docttt_batch.run_batch(m, data.tokens, a[b:b + 1], e[b:b + 1], spec, ad, None, Ledger(),
                               tuple({k: v[b:b + 1] for k, v in t.items()} for t in init))
        for lo, v in one.nll:
            np.testing.assert_allclose(got[lo], v, rtol=1e-4, atol=1e-5)
        for k, t in one.trainables.items():
            torch.testing.assert_close(batched.trainables[k][b:b + 1], t, rtol=1e-4, atol=1e-6)
    # and adaptation did something: later chunks differ from the unadapted model's
    base = docttt_batch.run_batch(m, data.tokens, a, e, docttt_spec.parse_docttt(f"doc-chunk@{OPTS}"), None, None, Ledger())
    assert not np.array_equal(np.concatenate([v for _, v in base.nll]), np.concatenate([v for _, v in batched.nll]))


def test_lr0_equals_chunked_doc_window_scoring_bitwise(world):
    """docttt with lr 0 == doc-chunk (adaptation off) == run_stream on the stream-order plan of the same
    windows (each document's last <= window tokens ending at each chunk): bit for bit on CPU."""
    m, data = world["model"], world["data"]
    ev = evaluate(m, data, parse_protocols(f"docttt:doclora@{OPTS}/rank=4/lr=0"), {},
                  EvalConfig(**{**EVAL.to_dict(), "n_boot": 0}))
    base, lr0 = ev.results[f"doc-chunk@{OPTS}"], ev.results[f"docttt:doclora@{OPTS}/rank=4/lr=0"]
    plan = docttt_batch.chunk_plan(data.tokens_np, data.bos_id, 16, 48)
    ref = run_stream(m, data.tokens, plan, ScoreConfig(batch_tokens=4096, chunk_tokens=256))
    assert lr0.ledger["n_updates"] > 0  # it did take (zero-size) steps
    assert np.array_equal(base.stream.token_nll, ref.token_nll)
    assert np.array_equal(lr0.stream.token_nll, ref.token_nll)
    # the plan has windows longer than a chunk and windows cut to `window` tokens
    assert plan.length.max() == 48 and (plan.score_from > 0).any()
    # same targets as doc-flat (paired), and not trivially the same numbers
    flat = ev.results["doc-flat"].stream.token_nll
    assert flat.shape == ref.token_nll.shape and not np.array_equal(flat, ref.token_nll)


def test_fixed_shapes_score_the_same(world):
    """``chunk`` (lengths min((c+1)*chunk, window): the CUDA default) and ``batch`` (also one row per document,
    finished ones dummies) change only padding: the same nats as ``exact`` to float tolerance, and the same
    ledger."""
    m, data = world["model"], world["data"]
    spec = docttt_spec.parse_docttt(f"docttt:doclora@{OPTS}/phases=1/phase_docs=6/{LORA}")
    out, ledgers = {}, {}
    for shapes in docttt_batch.SHAPES:
        ledgers[shapes] = ledger = Ledger(spec.name)
        out[shapes] = docttt.run_docttt(spec, m, data.tokens, data.tokens_np, data.bos_id, ledger, shapes=shapes)
        assert ledger.verify()["legal"]
    for shapes in ("chunk", "batch"):
        np.testing.assert_allclose(out[shapes].token_nll, out["exact"].token_nll, rtol=1e-4, atol=1e-5)
        assert ledgers[shapes].verify() == ledgers["exact"].verify()
    assert not np.array_equal(out["exact"].token_nll, docttt.run_docttt(
        docttt_spec.parse_docttt(f"doc-chunk@{OPTS}"), m, data.tokens, data.tokens_np, data.bos_id, Ledger()).token_nll)


def test_batch_plan_shapes_and_positions():
    """The plan's index arithmetic: chunk c of a document scores targets a+1+c*chunk.., once each; windows are
    the document's last <= window tokens; forward lengths by ``shapes``; the last chunk is never trained."""
    a, e = np.array([100, 0, 40]), np.array([170, 37, 50])  # 70, 37, 10 targets; chunk 16, window 24
    plans = {s: docttt_batch.batch_plan(a, e, 16, 24, s) for s in docttt_batch.SHAPES}
    p = plans["exact"]
    assert p.n_chunks == 5 and p.active.tolist() == [3, 2, 2, 1, 1]
    for b in range(3):
        act = p.count[:, b] > 0
        got = np.concatenate([np.arange(lo, hi) for lo, hi in zip(p.lo[act, b], p.hi[act, b])])
        assert got.tolist() == list(range(a[b] + 1, e[b] + 1))  # every target once, in order
        assert np.all(p.start[act, b] >= a[b]) and np.all(p.length[act, b] <= 24)
        assert np.all(p.start[act, b] + p.length[act, b] == p.hi[act, b] - 1)  # window ends at the chunk's end
        assert p.train[act, b].tolist() == [True] * (act.sum() - 1) + [False]
    assert p.length[:, 0].tolist() == [16, 24, 24, 24, 24] and p.start[4, 0] == 170 - 24  # cut to the window
    assert all(q.t.tolist() == [16, 24, 24, 24, 24] for q in plans.values())
    assert p.rows.tolist() == [3, 2, 2, 1, 1]
    assert plans["chunk"].rows.tolist() == [3, 2, 2, 2, 2]  # at least MIN_ROWS: a finished document pads
    assert plans["chunk"].active.tolist() == [3, 2, 2, 1, 1] and plans["chunk"].count[3:, 1].tolist() == [0, 0]
    assert plans["batch"].rows.tolist() == [3] * 5
    assert docttt_batch.batch_plan(a[:1], e[:1], 16, 24, "chunk").rows.tolist() == [1] * 5  # one document: one row
    e2 = a + np.array([37, 20, 10])  # the longest document's last chunk is shorter than the window
    t = {s: docttt_batch.batch_plan(a, e2, 16, 48, s).t.tolist() for s in docttt_batch.SHAPES}
    assert t == {"exact": [16, 32, 37], "chunk": [16, 32, 48], "batch": [16, 32, 48]}
    assert not docttt_batch.batch_plan(a, e, 16, 24, train=False).train.any()
    with pytest.raises(ValueError, match="sorted by length"):
        docttt_batch.batch_plan(a[::-1], e[::-1], 16, 24)
    with pytest.raises(ValueError, match="shapes must be one of"):
        docttt_batch.batch_plan(a, e, 16, 24, "fixed")


def test_adaptation_helps_and_report_decomposes(world):
    m, data = world["model"], world["data"]
    name = f"docttt:doclora@{OPTS}/phases=2/phase_docs=6/phase_lr=0.01/{LORA}"
    ev = evaluate(m, data, parse_protocols(name), {}, EVAL)
    rep = build_report(ev)
    assert [n for n in rep["protocols"] if n.startswith("doc")] == [
        "doc-flat", f"doc-chunk@{OPTS}", f"docttt:doclora@{OPTS}/{LORA}", name]
    dec = rep["docttt_decomposition"][name]
    assert [s["step"] for s in dec["steps"]] == ["context", "adaptation", "phases"]
    assert dec["steps"][0]["from"] == "doc-flat" and dec["steps"][-1]["to"] == name
    assert sum(s["value"] for s in dec["steps"]) == pytest.approx(dec["total"]["value"], abs=1e-12)
    p = rep["protocols"]
    assert dec["steps"][1]["value"] == pytest.approx(p[f"doc-chunk@{OPTS}"]["bpb"] - p[f"docttt:doclora@{OPTS}/{LORA}"]
                                                     ["bpb"], abs=1e-12)
    assert dec["steps"][1]["value"] > 0 and dec["steps"][1]["ci95"][0] > 0  # per-document LoRA TTT helps here
    assert dec["steps"][2]["value"] != 0  # the phases changed the base
    assert all(p[n]["ledger"]["legal"] for n in p)
    assert "decomposition of " + name in format_report(rep)


def test_cli_runs_the_family_and_rejects_bad_options(world, tmp_path, capsys):
    from metattt.artifact.model_io import save_model_artifact
    from metattt.eval.run import EXIT_BAD_INPUT, main

    art = tmp_path / "run" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, world["model"], meta={"lut": synthetic_lut(SPEC).to_dict(), "seq_len": 48,
                                                   "val_pattern": world["meta"]["val_pattern"]}, allow_over_budget=True)
    common = [str(art), "--bootstrap", "20", "--quiet", "--wandb", "off", "--max-tokens", "1500"]
    assert main([*common, "--protocols", "docttt:doclora@rank=0"]) == EXIT_BAD_INPUT
    assert "rank must be a positive integer" in capsys.readouterr().err
    assert main([*common, "--protocols", "docttt:doclora@chunks=16"]) == EXIT_BAD_INPUT
    assert "no option 'chunks'" in capsys.readouterr().err
    # per-document: not on the window evaluator's rows
    assert main([*common, "--protocols", "ttt:doclora", "--stride", "16"]) == EXIT_BAD_INPUT
    assert "evaluate it as docttt:doclora" in capsys.readouterr().err
    name = f"docttt:doclora@{OPTS}/{LORA}"
    assert main([*common, "--protocols", name]) == 0, capsys.readouterr().err
    rep = json.loads((art.parent / "eval.json").read_text())
    assert rep["protocols"][name]["ledger"]["legal"] and rep["protocols"][name]["tokens_scored"] == 1499
    assert [s["step"] for s in rep["docttt_decomposition"][name]["steps"]] == ["context", "adaptation"]


def test_a_per_document_plugin_runs_as_docttt_by_its_registry_name(world, tmp_path, capsys):
    """``docttt:NAME`` for any per-document adapter of the run's registry: the plug-in ``examples/docsgd_head.py``
    (--adapter-module) is scored legally (the ledger), its options through the registry's grammar; a plug-in that
    is not per-document, an unknown name and a per-document plug-in without ``chunk`` are clear errors (exit 2)."""
    from metattt.artifact.model_io import save_model_artifact
    from metattt.eval.run import EXIT_BAD_INPUT, main
    from metattt.ttt.registry import PluginError, Registry

    repo = Path(__file__).resolve().parents[1]
    doc_mod, sign_mod = str(repo / "examples" / "docsgd_head.py"), str(repo / "examples" / "signsgd_norms.py")
    art = tmp_path / "run" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, world["model"], meta={"lut": synthetic_lut(SPEC).to_dict(), "seq_len": 48,
                                                   "val_pattern": world["meta"]["val_pattern"]}, allow_over_budget=True)
    common = [str(art), "--bootstrap", "20", "--quiet", "--wandb", "off", "--max-tokens", "1500"]
    name = f"docttt:docsgd@{OPTS}/lr=0.1/rank=2"
    assert main([*common, "--protocols", name]) == EXIT_BAD_INPUT  # not registered without its module
    assert "unknown adapter 'docsgd'" in capsys.readouterr().err
    assert main([*common, "--adapter-module", sign_mod, "--protocols", "docttt:signsgd"]) == EXIT_BAD_INPUT
    assert "'signsgd' is not a per-document adapter (run it as ttt:signsgd)" in capsys.readouterr().err
    assert main([*common, "--adapter-module", doc_mod, "--protocols", f"{name}/lr=fast"]) == EXIT_BAD_INPUT
    assert "adapter 'docsgd' option lr='fast' is not a float" in capsys.readouterr().err
    assert main([*common, "--adapter-module", doc_mod, "--protocols", name]) == 0, capsys.readouterr().err
    rep = json.loads((art.parent / "eval.json").read_text())
    got = rep["protocols"][name]
    assert got["ledger"]["legal"] and got["tokens_scored"] == 1499 and got["adapter"] == "docsgd"
    cfg = got["adapter_params"]["config"]
    assert (cfg["lr"], cfg["rank"], cfg["chunk"], cfg["targets"]) == (0.1, 2, 16, "head")
    assert got["bpb"] < rep["protocols"][f"doc-chunk@{OPTS}"]["bpb"]  # it adapted (and helped here)
    bad = tmp_path / "nochunk.py"
    bad.write_text("from dataclasses import dataclass\nfrom metattt.ttt import Adapter, AdapterConfig\n"
                   "class Doc(Adapter):\n    name = 'nochunk'\n    per_document = True\n")
    with pytest.raises(PluginError, match="per-document adapter 'nochunk' .* has no 'chunk' option"):
        Registry.build([str(bad)])


def test_cli_on_real_val_prefix(tmp_path, capsys):
    """Real FineWeb val documents (BOS-opened): every target scored once, paired with doc-flat, legal."""
    from metattt.artifact.model_io import save_model_artifact
    from metattt.eval.run import main

    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not shared.is_dir():
        shared = Path("/work/shared/data")
    tok = shared / "tokenizers" / "fineweb_1024_bpe.model"
    val = shared / "fineweb_sp1024_valprefix" / "fineweb_val_000000.bin"
    if not (tok.is_file() and val.is_file()):
        pytest.skip(f"shared data not found under {shared} (sp1024 tokenizer and val prefix shard)")
    torch.manual_seed(0)
    art = tmp_path / "real" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, BankedGPT(tiny_config(vocab_size=1024)),
                        meta={"val_pattern": str(val), "tokenizer": str(tok), "seq_len": 128}, allow_over_budget=True)
    name = "docttt:doclora@docs=8/window=128/phases=1/phase_docs=8/rank=4"  # chunk 32: the default
    rc = main([str(art), "--protocols", name, "--max-tokens", "12000", "--bootstrap", "20", "--quiet",
               "--wandb", "off"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((art.parent / "eval.json").read_text())
    assert rep["data"]["n_docs"] > 5
    for n in ("doc-flat", "doc-chunk@docs=8/window=128", name):
        assert rep["protocols"][n]["tokens_scored"] == 11999 and rep["protocols"][n]["ledger"]["legal"], n
    assert [s["step"] for s in rep["docttt_decomposition"][name]["steps"]] == ["context", "adaptation", "phases"]


# ------------------------------------------------------------------------------------------------ cheaters
class CheatingDocLoRA(DocLoRA):
    adapts_before_scoring = True  # trains on each chunk, then scores it


def test_cheating_batched_adapter_is_refused(world):
    m, data = world["model"], world["data"]
    spec = docttt_spec.parse_docttt(f"docttt:doclora@{OPTS}/{LORA}")
    with pytest.raises(LegalityError, match="only scored later"):
        ledger = Ledger(spec.name)
        docttt.run_docttt(spec, m, data.tokens, data.tokens_np, data.bos_id, ledger,
                          make_adapter=lambda s: CheatingDocLoRA(s.make_adapter().cfg))
        ledger.verify()


def test_batch_costs_and_the_longest_first_schedule():
    """Batch cost = window lengths over every document's chunks + a host floor per step (hand-computed); the
    schedule gives each batch, in queue order, to the least-loaded rank of its segment (phases cut segments), so
    a heavy first batch's rank does not also get the next heavy ones as round-robin would."""
    f = docttt_model.STEP_FLOOR_TOKENS
    n = np.array([70, 37, 10])  # chunk 16, window 24: windows 16, 24, 24, ... -> 16 + 4*24, 16 + 2*24, 0 + 16
    got = docttt_model.batch_costs(n, [np.array([0, 1]), np.array([2])], 16, 24)
    assert got.tolist() == [112 + 64 + 5 * f, 16 + 1 * f]
    costs = np.array([10.0, 9, 8, 1, 1, 1])
    owner = docttt_model.batch_schedule(costs, 2)
    assert owner.tolist() == [0, 1, 1, 0, 0, 0]
    assert max(costs[owner == r].sum() for r in (0, 1)) == 17 < max(costs[0::2].sum(), costs[1::2].sum())  # RR: 19
    # a phase after batch 1: the second segment starts from empty loads
    assert docttt_model.batch_schedule(costs, 2, [(1, 5)]).tolist() == [0, 1, 0, 1, 1, 1]
    assert docttt_model.batch_schedule(costs, 1, [(1, 5)]).tolist() == [0] * 6
    assert np.array_equal(docttt_model.batch_schedule(costs, 3), docttt_model.batch_schedule(costs.copy(), 3))


def test_phases_train_only_on_fully_scored_documents(world, monkeypatch):
    m, data = world["model"], world["data"]
    spec = docttt_spec.parse_docttt(f"docttt:doclora@{OPTS}/phases=2/phase_docs=6/{LORA}")
    queue = docttt_model.doc_queue(data.tokens_np, data.bos_id, 4)
    assert docttt_model.phase_boundaries(queue, 2, 6) == [(0, 3), (1, 6)]
    assert docttt_model.phase_boundaries(queue, 1, 10_000) == []  # it would end after the last batch
    ledger = Ledger(spec.name)
    docttt.run_docttt(spec, m, data.tokens, data.tokens_np, data.bos_id, ledger)
    assert ledger.verify()["legal"]
    phase = [u for u in ledger.updates if u.label.startswith("phase")]
    assert phase and {a for u in phase for a, _ in u.ranges} >= {int(queue.a[0]) + 1}
    # a phase that also trains on the next (not yet scored) batch's documents is refused
    monkeypatch.setattr(docttt, "phase_documents", lambda k: np.arange(min(k + 4, queue.a.size)))
    bad = Ledger(spec.name)
    docttt.run_docttt(spec, m, data.tokens, data.tokens_np, data.bos_id, bad)
    with pytest.raises(LegalityError, match="phase sgd"):
        bad.verify()


# ------------------------------------------------------------------------------------------------ distributed
def _dist_worker(rank: int, world_size: int, init_file: str, state: str, val: str, out: str, name: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = BankedGPT(tiny_config())
        model.load_state_dict(torch.load(state))
        model.eval()
        data = prepare_stream(load_val_tokens(val), synthetic_lut(SPEC), "cpu", 256)
        ev = evaluate(model, data, parse_protocols(name), {}, EvalConfig(**{**EVAL.to_dict(), "n_boot": 0}))
        if rank == 0:
            Path(out).write_text(json.dumps({n: r.stream.token_nll.tolist() for n, r in ev.results.items()}))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(world, tmp_path):
    m, data = world["model"], world["data"]
    name = f"docttt:doclora@{OPTS}/phases=1/phase_docs=6/phase_lr=0.01/{LORA}"
    single = evaluate(m, data, parse_protocols(name), {}, EvalConfig(**{**EVAL.to_dict(), "n_boot": 0}))
    torch.save(m.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "dist.json"
    mp.start_processes(_dist_worker, args=(2, tempfile.mktemp(dir=tmp_path), str(tmp_path / "m.pt"),
                                           world["meta"]["val_pattern"], str(out), name),
                       nprocs=2, join=True, start_method="fork")
    got = json.loads(out.read_text())
    for n, r in single.results.items():
        np.testing.assert_allclose(np.asarray(got[n], dtype=np.float32), r.stream.token_nll, rtol=1e-5,
                                   atol=1e-6, err_msg=n)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_docttt_on_cuda_bf16(world):
    """The CUDA path (bf16 autocast, device generator, LoRA under autocast): legal, finite, and lr 0 matches the
    no-adaptation baseline."""
    m = BankedGPT(tiny_config()).cuda()
    m.load_state_dict(world["model"].state_dict())
    m.eval()
    data = prepare_stream(world["data"].tokens_np, synthetic_lut(SPEC), "cuda", 256)
    name = f"docttt:doclora@{OPTS}/phases=1/phase_docs=6/{LORA}"
    ev = evaluate(m, data, parse_protocols(f"{name},docttt:doclora@{OPTS}/rank=4/lr=0"), {}, EVAL)
    rep = build_report(ev)
    assert all(p["ledger"]["legal"] and np.isfinite(p["bpb"]) for p in rep["protocols"].values())
    np.testing.assert_allclose(ev.results[f"docttt:doclora@{OPTS}/rank=4/lr=0"].stream.token_nll,
                               ev.results[f"doc-chunk@{OPTS}"].stream.token_nll, rtol=1e-3, atol=1e-3)
    assert rep["docttt_decomposition"][name]["steps"][1]["value"] > 0
    # the compiled core (inductor, dynamic rows and lengths) scores as the eager one does, in few graphs: traced,
    # one per protocol kind (doc-chunk without LoRA, docttt with) and one more each for a 1-document batch (as the
    # CPU test counts them; on the H200 in session 10 a 5th came from the Q/K/V kernel's backward buffer of size 1)
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    comp = evaluate(m, data, parse_protocols(name), {}, EvalConfig(**{**EVAL.to_dict(), "n_boot": 0,
                                                                       "docttt_compile": True}))
    got, want = comp.results[name].stream.token_nll, ev.results[name].stream.token_nll
    assert abs(float(got.mean()) - float(want.mean())) < 2e-3  # bf16: same function, other kernels
    assert comp.results[name].ledger["legal"]
    singles = any(len(b) == 1 for b in docttt_model.doc_queue(data.tokens_np, data.bos_id, 4).batches)
    print("docttt compiled graphs", dict(counters["stats"]), "1-document batch:", singles)
    assert counters["stats"]["unique_graphs"] == 2 * (1 + singles), dict(counters["stats"])
    dynamo.reset()


@pytest.mark.gpu
def test_docttt_chunk_loop_waits_for_the_device_once_per_batch(world):
    """The chunk loop never synchronises with the GPU (no .cpu()/.item() per chunk, pinned plan upload): the
    number of synchronising calls of a batch does not grow with its chunks; and the CUDA default shapes
    (``chunk``) score like ``exact``."""
    import warnings

    m = BankedGPT(tiny_config()).cuda()
    m.load_state_dict(world["model"].state_dict())
    m.eval()
    data = prepare_stream(world["data"].tokens_np, synthetic_lut(SPEC), "cuda", 256)
    queue = docttt_model.doc_queue(data.tokens_np, data.bos_id, 4)
    spec = docttt_spec.parse_docttt(f"docttt:doclora@{OPTS}/{LORA}")
    ad = docttt.make_doc_adapter(spec, m)
    params = {k: v.detach() for k, v in m.named_parameters()}
    syncs, nll = {}, {}
    for b in (0, len(queue.batches) - 1):  # the longest and the shortest batch: many and few chunks
        idx = queue.batches[b]
        t0 = ad.start(params, len(idx))
        init = (t0, ad.init(t0))
        docttt_batch.run_batch(m, data.tokens, queue.a[idx], queue.e[idx], spec, ad, None, Ledger(), init,
                         shapes="chunk")  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = docttt_batch.run_batch(m, data.tokens, queue.a[idx], queue.e[idx], spec, ad, None, Ledger(), init,
                                       shapes="chunk")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[b] = (sum("synchroniz" in str(w.message) for w in caught), out.plan.n_chunks, out.train_steps)
        nll[b] = dict(out.nll)
    (first, n_first, k_first), (last, n_last, k_last) = syncs[0], syncs[len(queue.batches) - 1]
    assert n_first > n_last and k_last > 0, syncs  # more chunks in the first batch, both train
    assert first <= 4 and last <= 4, syncs  # bounded per batch: 25 chunks cost no more waits than 4
    idx = queue.batches[0]
    t0 = ad.start(params, len(idx))
    init = (t0, ad.init(t0))
    exact = docttt_batch.run_batch(m, data.tokens, queue.a[idx], queue.e[idx], spec, ad, None, Ledger(), init,
                             shapes="exact")
    for lo, v in exact.nll:
        np.testing.assert_allclose(nll[0][lo], v, rtol=2e-2, atol=2e-2)  # bf16: other shapes, other sums


def test_attention_backend_of_the_chunk_loop():
    """``auto`` on CUDA under bf16 is SDPA's FLASH kernel (no kernel build per new shape) unless flash-attn is
    installed; float32, CPU and an explicit choice are left alone; the evaluator passes ``--attn`` through."""
    from metattt.model.attention import flash_available

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert docttt_batch.resolve_attn("auto", cuda, True) == ("auto" if flash_available() else "sdpa-flash")
    assert docttt_batch.resolve_attn("auto", cuda, False) == "auto"
    assert docttt_batch.resolve_attn("auto", cpu, True) == "auto"
    assert docttt_batch.resolve_attn("sdpa", cuda, True) == "sdpa"
    assert EvalConfig(attn="math").score_config().attn == "math"
    from metattt.eval.cli import build_parser

    assert build_parser().parse_args(["a.ptz", "--attn", "sdpa-flash"]).attn == "sdpa-flash"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["a.ptz", "--attn", "cudnn-please"])


def test_compiled_core_traces_the_whole_run_into_one_graph(world, monkeypatch):
    """``docttt_compile``: Dynamo (``aot_eager`` backend here: the same tracing, guards and recompiles as the
    GPU's inductor, eager kernels) traces a run whose forward shape changes at every chunk into one graph with
    dynamic rows and lengths, plus one for the 1-document batch (Dynamo specialises size 1); a second run (RoPE
    tables already built, the 1-row graph cached) compiles nothing. Both score exactly as the eager loop does."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    m = BankedGPT(tiny_config())
    m.load_state_dict(world["model"].state_dict())
    m.eval()
    rng = np.random.default_rng(0)
    docs = [np.concatenate(([1], rng.integers(4, 64, size=int(n) - 1))) for n in rng.integers(20, 300, size=9)]
    toks = np.concatenate(docs + [np.array([1])]).astype(np.int64)
    spec = docttt_spec.parse_docttt("docttt:doclora@chunk=16/docs=4/window=128/rank=4/lr=0.01")
    queue = docttt_model.doc_queue(toks, 1, spec.docs)
    assert [len(b) for b in queue.batches] == [4, 4, 1]
    shapes = set()
    for idx in queue.batches:
        plan = docttt_batch.batch_plan(queue.a[idx], queue.e[idx], spec.chunk, spec.window, "chunk")
        shapes |= set(zip(plan.rows.tolist(), plan.t.tolist()))
    eager = docttt.run_docttt(spec, m, torch.from_numpy(toks), toks, 1, Ledger(spec.name), shapes="chunk")
    compile_core = m.compile_core
    monkeypatch.setattr(m, "compile_core", lambda **kw: compile_core(backend="aot_eager", **kw))
    dynamo.reset()
    counters.clear()
    for run in range(2):
        comp = docttt.run_docttt(spec, m, torch.from_numpy(toks), toks, 1, Ledger(spec.name), compile=True,
                                 shapes="chunk")
        assert len(shapes) >= 12  # many forward shapes ...
        assert counters["stats"]["unique_graphs"] == 2, (run, len(shapes), dict(counters["stats"]))  # ... 2 graphs
        np.testing.assert_array_equal(comp.token_nll, eager.token_nll)
    dynamo.reset()
