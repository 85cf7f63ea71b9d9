"""The doc-batched LoRA's meta-learned init (``init=meta``): A0 broadcast to every document, its first-order
meta-gradient, the trainer learning it (``--meta.adapter doclora``), the artifact carrying it, and the evaluator
using it (``docttt:doclora@init=meta``) or refusing an artifact without it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT
from metattt.train.cli import parse_config
from metattt.train.loop import train
from metattt.ttt.doclora import EXTRA_PREFIX, DocLoRA, DocLoRAConfig
from metattt.ttt.meta import MetaConfig, meta_loss
from test_train import _args
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> BankedGPT:
    torch.manual_seed(seed)
    m = BankedGPT(tiny_config())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_meta_init_starts_every_document_at_a0_and_round_trips() -> None:
    m = _model()
    ad = DocLoRA(DocLoRAConfig(rank=3, init="meta")).bind(m)
    assert set(ad.A0) == {"q", "k", "v", "out", "mlp", "head"}
    with torch.no_grad():
        for p in ad.A0.values():
            p.normal_()
    with torch.no_grad():
        tr = ad.start(dict(m.named_parameters()), 4)
    for t, a0 in ad.A0.items():
        assert tr[f"A.{t}"].shape[0] == 4 and all(torch.equal(tr[f"A.{t}"][i], a0) for i in range(4))
        assert not tr[f"B.{t}"].any()
    tr["A.q"].add_(1.0)  # documents own copies: adapting one never writes A0
    assert not torch.equal(tr["A.q"][0], ad.A0["q"])
    other = DocLoRA(DocLoRAConfig(rank=3, init="meta")).bind(m)
    other.load_artifact_extras(ad.artifact_extras())
    assert all(torch.equal(other.A0[t], ad.A0[t]) for t in ad.A0)
    with pytest.raises(ValueError, match="no learned A0"):
        DocLoRA(DocLoRAConfig(rank=3, init="meta")).bind(m).load_artifact_extras({})
    with pytest.raises(ValueError, match="shape"):
        DocLoRA(DocLoRAConfig(rank=2, init="meta")).bind(m).load_artifact_extras(ad.artifact_extras())


def test_meta_gradient_is_the_outer_gradient_at_the_adapted_factors_summed_over_documents() -> None:
    """First order: d L_outer / d A0 = sum over rows of d L_outer / d A_row at the adapted factors (the inner
    update itself is checked against the evaluator below); the base weights get the outer loss's plain gradient."""
    m = _model()
    cfg = MetaConfig(adapter="doclora:rank=2,lr=0.01,chunk=4", split="seq-half")
    ad = cfg.make_adapter()
    ad.bind(m)
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(3))
    y = torch.roll(x, -1, dims=1)
    loss, stats = meta_loss(m, ad, x, y, cfg)
    loss.backward()
    assert set(stats) == {"meta/L_inner", "meta/L_post"}
    got = {t: p.grad.clone() for t, p in ad.meta_parameters().items()}
    base_grad = m.qo_bank.grad.clone()
    assert len(ad.batches(x[:, :8], y[:, :8])) == 2  # two 4-token chunks in the 8-token first half: two steps
    adapted, _ = ad.inner_loop(m, dict(m.named_parameters()), x[:, :8], y[:, :8], passes=1, create_graph=False)
    leaves = {n: v.detach().requires_grad_(True) for n, v in adapted.items()}
    out = ad.loss(m, x, y, leaves, reduction="none")[:, 8:].mean()
    g = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()))))
    for t in ad.A0:
        torch.testing.assert_close(got[f"A0.{t}"], g[f"A.{t}"].sum(0), rtol=1e-5, atol=1e-7)
        assert got[f"A0.{t}"].abs().sum() > 0
    assert base_grad.abs().sum() > 0


@pytest.mark.parametrize("passes", [1, 2])
def test_meta_inner_loop_is_the_doc_batched_evaluators_update_bit_for_bit(passes: int) -> None:
    """The default doclora meta step (``Adapter.inner_loop`` over doclora's ``batches``, one step per chunk)
    adapts each row's factors exactly as the doc-batched evaluator (``docttt_batch.run_batch``) adapts the same
    documents: the same forwards, losses and ``take_step``; so the factors are equal bit for bit (CPU), and the
    outer loss is taken at exactly those factors. ``inner_steps`` (here 2) is an explicit override: more sweeps,
    no longer the evaluator's update."""
    from metattt.eval.docttt_batch import run_batch
    from metattt.eval.docttt_spec import DocTTTSpec
    from metattt.eval.ledger import Ledger

    assert DocLoRAConfig().chunk == DocTTTSpec().chunk
    m = _model()
    chunk, n_chunks, docs = 3, 3, 3  # 3: 1/chunk is inexact, so the loss must be formed as the evaluator does
    spec = "doclora:rank=2,lr=0.01,weight_decay=0.1,beta1=0.9" + f",chunk={chunk}"
    cfg = MetaConfig(adapter=spec, split="seq-half", inner_steps=None if passes == 1 else passes)
    ad = cfg.make_adapter().bind(m)
    with torch.no_grad():
        for p in ad.meta_parameters().values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    assert cfg.inner_passes(ad) == passes and cfg.inner_summary(ad)["chunk"] == chunk
    # documents of n_chunks * chunk + 1 targets: the evaluator trains their first n_chunks chunks (a document's last
    # chunk, here its last target, is scored only); the meta rows are the same documents, 2 * n_chunks chunks long
    span, row = n_chunks * chunk + 1, 2 * n_chunks * chunk
    tokens = torch.randint(1, 64, (docs * (row + 1),), generator=torch.Generator().manual_seed(7))
    a = np.arange(docs) * (row + 1)
    x = torch.stack([tokens[s:s + row] for s in a])
    y = torch.stack([tokens[s + 1:s + row + 1] for s in a])
    h = row // 2
    tr, _ = ad.inner_loop(m, dict(m.named_parameters()), x[:, :h], y[:, :h], passes=cfg.inner_passes(ad),
                          create_graph=False)
    base = {k: v.detach() for k, v in m.named_parameters()}
    t0 = ad.start(base, docs)
    proto = DocTTTSpec(adapter="doclora", chunk=chunk, adapter_opts=(("rank", "2"), ("lr", "0.01"),
                                                                      ("weight_decay", "0.1"), ("beta1", "0.9")))
    out = run_batch(m, tokens, a, a + span, proto, ad, None, Ledger(), init=(t0, ad.init(t0)), autocast=False)
    assert out.train_steps == n_chunks
    same = all(torch.equal(tr[k], out.trainables[k]) for k in tr)
    assert same == (passes == 1), "the default meta step must be (only) the evaluated update"
    if passes == 1:
        assert not any(torch.equal(tr[k], t0[k]) for k in tr if k.startswith("B."))  # it moved
        _, stats = meta_loss(m, ad, x, y, cfg)  # the outer loss at exactly the evaluator's factors
        with torch.no_grad():
            at_evaluated = ad.loss(m, x, y, ad.materialize(base, out.trainables), reduction="none")[:, h:].mean()
        assert torch.equal(stats["meta/L_post"], at_evaluated)
    with pytest.raises(ValueError, match="whole chunks"):
        ad.inner_loop(m, base, x[:, :chunk - 1], y[:, :chunk - 1], passes=1, create_graph=False)


def test_meta_config_needs_seq_half_and_first_order(tmp_path) -> None:
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        MetaConfig(adapter="doclora:rank=2,chunk=0", split="seq-half").make_adapter()
    bad = parse_config(_args(tmp_path, "--meta.adapter", "doclora:chunk=40", "--meta.split", "seq-half"))
    with pytest.raises(ValueError, match="no whole chunk of 40 tokens"):  # seq-len 64: a 32-token first half
        bad.check_budgets()
    with pytest.raises(ValueError, match="seq-half"):
        MetaConfig(adapter="doclora", split="same-batch")
    with pytest.raises(ValueError, match="first-order"):
        MetaConfig(adapter="doclora:rank=2", split="seq-half", order="second")
    with pytest.raises(ValueError, match="init must be 'meta'"):
        MetaConfig(adapter="doclora:init=random", split="seq-half").make_adapter()


def test_a_per_document_plugin_gets_the_per_document_treatment(tmp_path) -> None:
    """``MetaConfig.per_document`` asks the registry (the class's flag), so a per-document plug-in
    (examples/docsgd_head.py) needs seq-half and first order, learns its init, reports its chunk and is evaluated
    as docttt:NAME with its module; a plug-in that is not per-document is not."""
    from metattt.train.final_eval import FINAL_EVAL_PLANS, evaluator_argv

    repo = Path(__file__).resolve().parents[1]
    doc_mod, sign_mod = str(repo / "examples" / "docsgd_head.py"), str(repo / "examples" / "signsgd_norms.py")
    assert not MetaConfig(adapter="signsgd", adapter_modules=(sign_mod,)).per_document
    assert not MetaConfig(adapter="sgd").per_document and MetaConfig(adapter="doclora", split="seq-half").per_document
    with pytest.raises(ValueError, match="adapter docsgd is per-document .* needs split 'seq-half'"):
        MetaConfig(adapter="docsgd", adapter_modules=(doc_mod,))
    with pytest.raises(ValueError, match="first-order"):
        MetaConfig(adapter="docsgd", adapter_modules=(doc_mod,), split="seq-half", order="second")
    cfg = MetaConfig(adapter="docsgd:chunk=8", adapter_modules=(doc_mod,), split="seq-half")
    ad = cfg.make_adapter()
    assert cfg.per_document and cfg.doc_chunk == 8 and ad.cfg.to_dict()["init"] == "meta"
    assert cfg.inner_summary(ad)["chunk"] == 8
    tcfg = parse_config(_args(tmp_path, "--meta.adapter", "docsgd:lr=0.1", "--meta.split", "seq-half",
                              "--adapter-module", doc_mod))
    argv = evaluator_argv(tcfg, "a.ptz", FINAL_EVAL_PLANS["short"])
    protos = argv[argv.index("--protocols") + 1].split(",")
    assert {"docttt:docsgd@window=64/lr=0.1/init=meta", "docttt:docsgd@window=64/lr=0.1"} <= set(protos)
    assert argv[argv.index("--adapter-module") + 1] == doc_mod


def test_trainer_learns_a0_and_the_evaluator_uses_it(tmp_path, capsys) -> None:
    from metattt.artifact.format import load_artifact
    from metattt.eval.run import main as eval_main

    meta = ["--meta.adapter", "doclora:rank=2,lr=0.01", "--meta.split", "seq-half", "--meta.every", "1",
            "--meta.meta-lr", "0.05"]
    train(parse_config(_args(tmp_path, "--iterations", "3", "--run-name", "m", "--final-eval", "off", *meta)))
    art = tmp_path / "runs" / "m" / "artifact.ptz"
    extras = load_artifact(art).extras
    a0 = {k: v for k, v in extras.items() if k.startswith(EXTRA_PREFIX)}
    assert sorted(a0) == sorted(EXTRA_PREFIX + t for t in ("q", "k", "v", "out", "mlp", "head"))
    fresh = DocLoRA(DocLoRAConfig(rank=2, init="meta")).bind(BankedGPT(ModelConfig.from_dict(load_artifact(art).config)))
    assert any(not torch.equal(v, fresh.A0[k[len(EXTRA_PREFIX):]]) for k, v in a0.items())  # learned
    opts = "docs=4/window=64/rank=2/lr=0.01"
    rc = eval_main([str(art), "--protocols", f"docttt:doclora@{opts}/init=meta,docttt:doclora@{opts}",
                    "--max-tokens", "1500", "--bootstrap", "0", "--wandb", "off", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "runs" / "m" / "eval.json").read_text())
    names = list(rep["protocols"])
    assert any("init=meta" in n for n in names) and "doc-chunk@docs=4/window=64" in names
    meta_bpb = next(v["bpb"] for n, v in rep["protocols"].items() if "init=meta" in n)
    rand_bpb = rep["protocols"][f"docttt:doclora@{opts}"]["bpb"]
    assert meta_bpb != rand_bpb  # a different init, a different adaptation
    # an artifact trained without the doclora meta step carries no A0: exit 2, one line naming the protocol
    train(parse_config(_args(tmp_path, "--iterations", "1", "--run-name", "p", "--final-eval", "off")))
    capsys.readouterr()
    rc = eval_main([str(tmp_path / "runs" / "p" / "artifact.ptz"), "--protocols", f"docttt:doclora@{opts}/init=meta",
                    "--max-tokens", "1500", "--bootstrap", "0", "--wandb", "off", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no learned A0" in err, err


def test_final_eval_runs_the_learned_init_beside_the_random_one(tmp_path) -> None:
    from metattt.train.final_eval import FINAL_EVAL_PLANS, META_KEY, evaluator_argv

    cfg = parse_config(_args(tmp_path, "--meta.adapter", "doclora:rank=2,lr=0.01", "--meta.split", "seq-half"))
    argv = evaluator_argv(cfg, "a.ptz", FINAL_EVAL_PLANS["short"])
    protos = argv[argv.index("--protocols") + 1].split(",")
    assert "docttt:doclora@window=64/rank=2/lr=0.01/init=meta" in protos
    # doclora is evaluated as docttt protocols, not as a ttt: adapter key (the preset's ttt:doc spec may be there)
    assert "docttt:doclora@window=64/rank=2/lr=0.01" in protos and not any(a.startswith(f"{META_KEY}=") for a in argv)


def test_final_eval_calls_doc_chunk_context_and_gives_it_no_share_of_the_room() -> None:
    from metattt.train.final_eval import decomposition, format_decomposition

    def proto(bpb: float, mode: str) -> dict:
        return {"bpb": bpb, "ci95": [bpb - 0.01, bpb + 0.01], "legal": True, "mode": mode}

    report = {"meta": {"artifact_meta": {}}, "data": {"n_tokens": 100, "n_targets": 99, "n_docs": 2},
              "config": {"context": 64},
              "protocols": {"doc-flat": proto(9.0, "score"), "doc-chunk": proto(8.9, "docttt"),
                            "docttt:doclora": proto(8.5, "docttt")},
              "deltas": {"doc-chunk": {"value": 0.1, "ci95": [0.05, 0.15]},
                         "docttt:doclora": {"value": 0.4, "ci95": [0.3, 0.5]}}}
    rows = {r["protocol"]: r for r in decomposition(report)["rows"]}
    assert not rows["doc-chunk"]["adapts"] and rows["docttt:doclora"]["adapts"]
    text = format_decomposition(decomposition(report), report, "short")
    assert "context +0.1000" in text and "TTT +0.4000" in text
