"""Evaluator on a tiny trained BankedGPT over the synthetic document corpus: protocol equalities, gains,
legality refusals, the CLI end to end, bad inputs, and 2-process gloo agreement."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metattt.artifact.model_io import save_model_artifact
from metattt.data.loaders import load_val_tokens
from metattt.data.shards import write_shard
from metattt.data.synthetic import SyntheticSpec, make_synthetic_dataset, synthetic_lut
from metattt.eval.ledger import LegalityError
from metattt.eval.protocols import EvalConfig, evaluate, parse_protocol, parse_protocols, prepare_stream
from metattt.eval.report import SIGN_CONVENTION, build_report
from metattt.eval.run import EXIT_BAD_INPUT, EXIT_ILLEGAL, main
from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT
from metattt.ttt.registry import make_adapter
from metattt.ttt.sgd import SGDAdapter
from tiny import tiny_config, trained_tiny

SPEC = SyntheticSpec(vocab_size=64, n_train_tokens=200_000, n_val_tokens=6000, min_doc_len=300, max_doc_len=800,
                     alpha=0.02, content_prob_min=0.4, content_prob_max=0.7)
CTX, STRIDE, CHUNK = 64, 8, 256
EVAL = EvalConfig(seq_len=CTX, context=CTX, stride=STRIDE, chunk_tokens=CHUNK, batch_tokens=4096, n_boot=200)
SGD = dict(lr=0.03, epochs=1, momentum=0.0, schedule="constant")




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic corpus + a tiny model trained for ~2 s + its artifact (meta: LUT, val pattern, seq_len)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_world")
    meta = make_synthetic_dataset(root / "data", SPEC)
    model = trained_tiny(meta["train_pattern"], 128, 110)
    lut = synthetic_lut(SPEC)
    art = root / "run" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, model, meta={"lut": lut.to_dict(), "val_pattern": meta["val_pattern"], "seq_len": CTX},
                        allow_over_budget=True)
    data = prepare_stream(load_val_tokens(meta["val_pattern"]), lut, "cpu", CHUNK)
    yield {"model": model, "meta": meta, "artifact": art, "lut": lut, "data": data, "root": root}
    torch.set_num_threads(threads)


def _sgd(model, **kw):
    return make_adapter("sgd", **{**SGD, **kw}).bind(model)


# ------------------------------------------------------------------------------------------------ protocol core
def test_ttt_none_reproduces_sliding_bitwise(world):
    m, data = world["model"], world["data"]
    none = make_adapter("none").bind(m)
    ev = evaluate(m, data, parse_protocols("sliding,ttt:none,doc,ttt:none@doc"), {"none": none}, EVAL)
    r = ev.results
    assert np.array_equal(r["ttt:none"].stream.token_nll, r["sliding"].stream.token_nll)
    assert np.array_equal(r["ttt:none@doc-sliding"].stream.token_nll, r["doc-sliding"].stream.token_nll)
    # not trivially equal: doc isolation changes the numbers
    assert not np.array_equal(r["sliding"].stream.token_nll, r["doc-sliding"].stream.token_nll)


class _CallRecorder(torch.nn.Module):
    """Stands in for a compiled scorer: records (input shape, scored with params=?) of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, **kw):
        self.calls.append((tuple(x.shape), kw.get("params") is not None))
        return self.inner(x, **kw)


def test_scorer_warm_up_covers_every_graph_before_the_protocols(world):
    """With a (compiled) scorer every graph the protocols will need -- each batch shape, and the adapter's
    params= forward of ttt:/oracle: -- runs once in the warm-up, so no compile lands in a protocol's time."""
    m, data = world["model"], world["data"]
    rec, marks = _CallRecorder(m), []
    cfg = EvalConfig(**{**EVAL.to_dict(), "n_boot": 0, "fixed_shapes": True})
    ev = evaluate(m, data, parse_protocols("flat,sliding,ttt:sgd,oracle:sgd"), {"sgd": _sgd(m)}, cfg,
                  log=lambda msg: marks.append((msg, len(rec.calls))), scorer=rec)
    n_warm = next(n for msg, n in marks if msg.startswith("compiled scorer warmed up"))
    warm, rest = set(rec.calls[:n_warm]), set(rec.calls[n_warm:])
    assert ev.scorer_compile_s > 0 and any(p for _, p in warm) and any(not p for _, p in warm)
    assert rest <= warm, rest - warm  # nothing new after the warm-up
    assert n_warm == len(warm)  # one forward per graph


def test_context_and_ttt_gains_on_synthetic_corpus(world):
    """Documents reuse a few content words: more context helps, and adapting to the stream helps beyond it;
    adapting on a chunk before scoring it (oracle) bounds the legal gain from above."""
    m, data = world["model"], world["data"]
    ev = evaluate(m, data, parse_protocols("flat,sliding,ttt:sgd,oracle:sgd"), {"sgd": _sgd(m)}, EVAL)
    rep = build_report(ev)
    d = rep["deltas"]
    assert d["context"]["from"] == "flat" and d["context"]["to"] == "sliding"
    assert d["context"]["value"] > 0.01 and d["context"]["ci95"][0] > 0
    assert d["ttt:sgd"]["value"] > 0.005 and d["ttt:sgd"]["ci95"][0] > 0
    assert d["oracle:sgd"]["value"] >= d["ttt:sgd"]["value"]
    assert not rep["protocols"]["oracle:sgd"]["legal"] and "upper bound" in rep["protocols"]["oracle:sgd"]["label"]
    assert rep["protocols"]["ttt:sgd"]["ledger"]["legal"]
    # the delta is exactly the difference of the two reported bpb values
    p = rep["protocols"]
    assert d["ttt:sgd"]["value"] == pytest.approx(p["sliding"]["bpb"] - p["ttt:sgd"]["bpb"], abs=1e-12)
    # running delta ends at the overall delta
    rd = rep["running_delta"]["ttt:sgd"]["delta_bpb"]
    assert rd[-1] == pytest.approx(d["ttt:sgd"]["value"], rel=1e-9)
    assert rep["protocols"]["ttt:sgd"]["adapter_params"]["adapted_scalars"] == sum(x.numel() for x in m.parameters())


def test_selection_slices_reported(world):
    m, data = world["model"], world["data"]
    ad = _sgd(m, selection="banks[q,v]:layers>=1")
    ev = evaluate(m, data, [parse_protocol("ttt:sgd"), parse_protocol("sliding")], {"sgd": ad},
                  EvalConfig(**{**EVAL.to_dict(), "n_boot": 0}))
    info = build_report(ev)["protocols"]["ttt:sgd"]["adapter_params"]
    d = 32
    assert info["adapted_scalars"] == d * d + 16 * d  # q1 (d x d) + v1 (kv_dim x d), kv_dim = 16
    assert info["tensors"]["qo_bank"]["slices"] == ["q1"] and info["tensors"]["kv_bank"]["slices"] == ["v1"]


class SwapAdapter:
    """After its first update it scores with a much better model's weights: Δ_TTT is known to be positive.
    Written against the evaluator's seam only (``metattt.eval.scoring.AdapterLike``), not the Adapter class."""

    name = "swap"
    cfg = SimpleNamespace(reset="never")

    def __init__(self, better):
        self.better = {n: p.detach() for n, p in better.named_parameters()}
        self.on = False

    def reset(self):
        self.on = False

    def params(self):
        return dict(self.better) if self.on else {}

    def adapt(self, model, x, y, progress, autocast=True):
        self.on = True
        return {"steps": 1}

    def training_positions(self, c):
        return c


def test_sign_convention_known_answer(world):
    torch.manual_seed(1)
    untrained = BankedGPT(tiny_config()).eval()
    data = world["data"]
    ev = evaluate(untrained, data, parse_protocols("ttt:swap"), {"swap": SwapAdapter(world["model"])},
                  EvalConfig(**{**EVAL.to_dict(), "n_boot": 100}))
    rep = build_report(ev)
    assert "positive = the second protocol B is better" in rep["sign_convention"] == SIGN_CONVENTION
    p, d = rep["protocols"], rep["deltas"]["ttt:swap"]
    assert p["ttt:swap"]["bpb"] < p["sliding"]["bpb"] - 0.5  # trained weights are far better than random
    assert d["from"] == "sliding" and d["to"] == "ttt:swap"
    assert d["value"] > 0.5 and d["ci95"][0] > 0


def test_doc_reset_mode_is_legal_and_differs(world):
    m, data = world["model"], world["data"]
    never = _sgd(m)
    per_doc = _sgd(m, reset="doc")
    ev = evaluate(m, data, parse_protocols("ttt:never@doc,ttt:doc@doc"), {"never": never, "doc": per_doc},
                  EvalConfig(**{**EVAL.to_dict(), "n_boot": 0}))
    a, b = ev.results["ttt:never@doc-sliding"], ev.results["ttt:doc@doc-sliding"]
    assert b.ledger["legal"] and b.ledger["n_updates"] < a.ledger["n_updates"]
    assert not np.array_equal(a.stream.token_nll, b.stream.token_nll)
    # with document windows and per-document resets, chunks never straddle documents
    docs = data.doc_of_target
    assert len({int(c.doc) for c in b.stream.chunks}) == data.n_docs
    for c in b.stream.chunks:
        assert docs[c.lo - 1] == docs[c.hi - 2] == c.doc


# ------------------------------------------------------------------------------------------------ cheaters
class PeekNextChunk(SGDAdapter):
    """Asks to train on the chunk *after* the one just scored."""

    def training_positions(self, chunk_index):
        return chunk_index + 1


class PeekNowAndThen(SGDAdapter):
    """Honest on odd chunks, peeks at the next (unscored) chunk after even ones: intermittent cheating."""

    def training_positions(self, chunk_index):
        return chunk_index + 1 if chunk_index % 2 == 0 else chunk_index


@pytest.mark.parametrize("cls", [PeekNextChunk, PeekNowAndThen])
def test_cheating_adapters_are_caught_by_the_api(world, cls):
    m, data = world["model"], world["data"]
    ad = cls(SGDAdapter.Config(**SGD)).bind(m)
    with pytest.raises(LegalityError, match=r"ILLEGAL evaluation 'ttt:cheat'.*update #0 .*only scored later"):
        evaluate(m, data, parse_protocols("ttt:cheat"), {"cheat": ad}, EVAL)


def _cheat_factory(cls):
    def factory(model, specs, extras):
        return lambda key: cls(SGDAdapter.Config(**SGD)).bind(model)
    return factory


def _cli(world, tmp_path, *extra, factory=None):
    args = [str(world["artifact"]), "--context", str(CTX), "--stride", str(STRIDE), "--chunk-tokens", str(CHUNK),
            "--batch-tokens", "4096", "--bootstrap", "100", "--run-dir", str(tmp_path / "ev"), "--quiet",
            "--wandb", "off", *extra]
    return main(args, adapter_factory=factory)


@pytest.mark.parametrize("cls", [PeekNextChunk, PeekNowAndThen])
def test_cheating_adapters_make_the_cli_refuse(world, tmp_path, capsys, cls):
    rc = _cli(world, tmp_path, "--protocols", "sliding,ttt:cheat", factory=_cheat_factory(cls))
    err = capsys.readouterr().err
    assert rc == EXIT_ILLEGAL
    assert "REFUSED" in err and "update #0" in err and "positions [" in err
    assert not (tmp_path / "ev" / "eval.json").exists()


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_end_to_end_writes_eval_json_and_plot(world, tmp_path, capsys):
    rc = _cli(world, tmp_path, "--protocols", "flat,sliding,doc,ttt:sgd,oracle:sgd",
              "--adapter-spec", "sgd:lr=0.03,epochs=1,momentum=0.0,schedule=constant")
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(rep["protocols"]) == {"flat", "sliding", "doc-sliding", "ttt:sgd", "oracle:sgd"}
    assert rep["meta"]["lut"].startswith("artifact:")  # LUT and val pattern came from the artifact
    for p in rep["protocols"].values():
        assert p["tokens_scored"] == SPEC.n_val_tokens - 1 and p["tokens_per_s"] > 0
        assert p["projected_full_val_s"] is None  # measured on a CPU: no 8-GPU projection
    assert rep["projection"]["tokens"] == 62_000_000 and rep["projection"]["applies"] is False
    assert "measured on cpu, not a GPU" in rep["projection"]["note"] and "PROJECTION" not in rep["projection"]["note"]
    assert rep["deltas"]["context"]["value"] > 0
    rd = rep["running_delta"]["ttt:sgd"]
    assert len(rd["delta_bpb"]) == len(rd["chunk"]) == math.ceil((SPEC.n_val_tokens - 1) / CHUNK)
    assert (tmp_path / "ev" / "eval_running_delta.png").stat().st_size > 1000
    assert len(rep["per_document"]["bytes"]) == rep["data"]["n_docs"]
    assert rep["meta"]["compiled_scorer"] is False  # --compile defaults to on only for CUDA devices


def test_cli_compiled_scorer_then_ttt_matches_eager(world, tmp_path, capsys):
    """--compile (the CUDA default): the compiled scorer runs under inference mode, then the adapter trains the
    same model; this crashed on an H100 before RoPE tables were kept out of inference mode. Same bpb as eager."""
    spec = ("--protocols", "sliding,ttt:sgd", "--max-tokens", "3000",
            "--adapter-spec", "sgd:lr=0.03,epochs=1,momentum=0.0,schedule=constant")
    reps = {}
    for flag in ("--compile", "--no-compile"):
        assert _cli(world, tmp_path / flag, *spec, flag) == 0, capsys.readouterr().err
        reps[flag] = json.loads((tmp_path / flag / "ev" / "eval.json").read_text())
    assert reps["--compile"]["meta"]["compiled_scorer"] and not reps["--no-compile"]["meta"]["compiled_scorer"]
    # compilation happens in a warm-up before the protocols, not inside the first protocol's timed loop
    assert reps["--compile"]["meta"]["scorer_compile_s"] > 0 and reps["--no-compile"]["meta"]["scorer_compile_s"] == 0
    for name in ("sliding", "ttt:sgd"):
        a, b = (reps[f]["protocols"][name]["bpb"] for f in ("--compile", "--no-compile"))
        assert abs(a - b) < 1e-4, (name, a, b)


def test_cli_bad_inputs_exit_nonzero(world, tmp_path, capsys):
    art = world["artifact"]
    # corrupted artifact: flip a byte in the payload
    bad = tmp_path / "bad.ptz"
    raw = bytearray(art.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    assert main([str(bad), "--run-dir", str(tmp_path / "x"), "--quiet"]) == EXIT_BAD_INPUT
    assert "cannot load artifact" in capsys.readouterr().err
    # wrong config expectation
    assert _cli(world, tmp_path, "--expect", "vocab_size=1024", "--protocols", "flat") == EXIT_BAD_INPUT
    assert "vocab_size" in capsys.readouterr().err
    # val shard with a bad header
    shard = tmp_path / "val_000000.bin"
    write_shard(shard, np.arange(1, 60) % 64)
    blob = bytearray(shard.read_bytes())
    blob[0:4] = (12345).to_bytes(4, "little")
    shard.write_bytes(bytes(blob))
    assert _cli(world, tmp_path, "--val", str(shard), "--protocols", "flat") == EXIT_BAD_INPUT
    assert "bad magic" in capsys.readouterr().err
    # tokens outside the model's vocab (data from another tokenizer)
    big = tmp_path / "big_000000.bin"
    write_shard(big, np.array([1, 5, 900, 7] * 20))
    assert _cli(world, tmp_path, "--val", str(big), "--protocols", "flat") == EXIT_BAD_INPUT
    assert "900" in capsys.readouterr().err
    # the artifact's stored byte LUT does not cover the model's vocab
    lut_bad = tmp_path / "lutbad" / "artifact.ptz"
    lut_bad.parent.mkdir()
    save_model_artifact(lut_bad, world["model"], meta={"lut": synthetic_lut(SyntheticSpec(vocab_size=128)).to_dict(),
                                                      "val_pattern": world["meta"]["val_pattern"]},
                        allow_over_budget=True)
    assert main([str(lut_bad), "--protocols", "flat", "--quiet", "--wandb", "off"]) == EXIT_BAD_INPUT
    assert "covers 128 tokens but its model has vocab 64" in capsys.readouterr().err
    # unknown protocol
    assert _cli(world, tmp_path, "--protocols", "sliding,bogus") == EXIT_BAD_INPUT
    assert "unknown protocol" in capsys.readouterr().err


def test_cli_tokenizer_vocab_mismatch(world, tmp_path, capsys):
    tok = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers" / "fineweb_1024_bpe.model"
    if not tok.is_file():
        pytest.skip(f"sp1024 tokenizer not found at {tok}")
    assert _cli(world, tmp_path, "--tokenizer", str(tok), "--protocols", "flat") == EXIT_BAD_INPUT
    assert "1024 pieces" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ distributed
def _dist_worker(rank: int, world_size: int, init_file: str, art: str, val: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from metattt.artifact.model_io import load_model_artifact

        model, _ = load_model_artifact(art)
        model.eval()
        data = prepare_stream(load_val_tokens(val), synthetic_lut(SPEC), "cpu", CHUNK)
        ev = evaluate(model, data, parse_protocols("sliding,ttt:sgd"), {"sgd": _sgd(model, batch_seqs=3)},
                      EvalConfig(**{**EVAL.to_dict(), "n_boot": 0}))
        if rank == 0:
            rep = build_report(ev)
            Path(out).write_text(json.dumps({n: p["bpb"] for n, p in rep["protocols"].items()}))
    finally:
        dist.destroy_process_group()


def _start_method() -> str:
    if os.environ.get("METATTT_TEST_SPAWN") or torch.cuda.is_initialized() or sys.platform != "linux":
        return "spawn"
    return "fork"


def test_two_process_gloo_matches_single_process(world, tmp_path):
    from metattt.artifact.model_io import load_model_artifact

    m, _ = load_model_artifact(world["artifact"])  # the ranks score the (quantized) artifact too
    m.eval()
    data = world["data"]
    # 4 training rows per chunk in mini-batches of 3: each mini-batch is split over the 2 ranks (2+1, then 1+0)
    single = build_report(evaluate(m, data, parse_protocols("sliding,ttt:sgd"), {"sgd": _sgd(m, batch_seqs=3)},
                                   EvalConfig(**{**EVAL.to_dict(), "n_boot": 0})))
    init = tempfile.mktemp(dir=tmp_path)
    out = tmp_path / "dist.json"
    mp.start_processes(_dist_worker, args=(2, init, str(world["artifact"]), world["meta"]["val_pattern"], str(out)),
                       nprocs=2, join=True, start_method=_start_method())
    got = json.loads(out.read_text())
    for name in ("flat", "sliding", "ttt:sgd"):
        assert got[name] == pytest.approx(single["protocols"][name]["bpb"], rel=1e-5), name
    assert got["ttt:sgd"] < got["sliding"]



def test_cli_on_real_val_prefix_with_sentencepiece_lut(tmp_path, capsys):
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    tok = shared / "tokenizers" / "fineweb_1024_bpe.model"
    val = shared / "fineweb_sp1024_valprefix" / "fineweb_val_000000.bin"
    if not (tok.is_file() and val.is_file()):
        pytest.skip(f"shared data not found under {shared} (sp1024 tokenizer and val prefix shard)")
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_config().to_dict(), "vocab_size": 1024})
    art = tmp_path / "real" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, BankedGPT(cfg), meta={"val_pattern": str(val), "tokenizer": str(tok), "seq_len": 128},
                        allow_over_budget=True)
    rc = main([str(art), "--protocols", "flat,sliding,doc", "--context", "128", "--stride", "32",
               "--chunk-tokens", "4096", "--max-tokens", "20000", "--bootstrap", "50", "--quiet", "--wandb", "off"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((art.parent / "eval.json").read_text())
    d = rep["data"]
    assert d["n_targets"] == 19999 and d["n_docs"] > 5
    assert 2.0 < d["n_bytes"] / d["n_targets"] < 3.0  # sp1024 on FineWeb: ~0.415 tokens per byte
    assert rep["meta"]["lut"].startswith("tokenizer:")
    # an untrained model is near-uniform over 1024 ids: ~10 bits per token
    assert 3.0 < rep["protocols"]["flat"]["bpb"] < 5.0


def test_projection_only_for_gpu_throughput(world, tmp_path, capsys):
    from metattt.eval.report import format_report, projection_applies

    assert projection_applies("cuda", 8) and not projection_applies("cpu", 8)
    assert not projection_applies("cuda", 0) and not projection_applies("cuda", -1)  # never a division by zero
    rc = _cli(world, tmp_path, "--protocols", "flat", "--projection-gpus", "4")
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    table = format_report(rep).splitlines()
    hdr = next(ln for ln in table if ln.startswith("protocol"))
    row = next(ln for ln in table if ln.startswith("flat"))
    assert "proj. 4 GPU" in hdr and row[hdr.index("proj. 4 GPU"):].split()[0] == "n/a"


@pytest.mark.gpu
def test_projection_from_gpu_throughput(world, tmp_path, capsys):
    rc = _cli(world, tmp_path, "--protocols", "flat", "--device", "cuda", "--projection-gpus", "8")
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    p = rep["protocols"]["flat"]
    assert rep["projection"]["applies"] and "PROJECTION" in rep["projection"]["note"]
    assert p["projected_full_val_s"] == pytest.approx(62_000_000 / (p["tokens_per_s_per_process"] * 8), rel=1e-9)


def test_every_protocol_spec_answers_the_one_spec_type():
    """Parsing, running and the report ask a protocol's ``Spec`` (never its family's name): what each family
    answers, and the run order and requirements ``parse_protocols`` derives from the answers alone."""
    from metattt.eval.spec import Spec

    specs = parse_protocols("oracle:sgd,ttt:sgd@doc,docttt:doclora@phases=2/docs=4,bayes-cache")
    assert all(isinstance(s, Spec) for s in specs)
    by = {s.name: s for s in specs}
    assert list(by) == ["flat", "sliding", "doc-flat", "doc-sliding", "doc-chunk@docs=4", "docttt:doclora@docs=4",
                        "docttt:doclora@docs=4/phases=2", "bayes-cache", "ttt:sgd@doc-sliding", "oracle:sgd"]
    assert [n for n, s in by.items() if s.adapts] == ["docttt:doclora@docs=4", "docttt:doclora@docs=4/phases=2",
                                                      "bayes-cache", "ttt:sgd@doc-sliding", "oracle:sgd"]
    assert [n for n, s in by.items() if not s.legal] == ["oracle:sgd"]
    assert {n: s.base for n, s in by.items()} == {
        "flat": None, "sliding": None, "doc-flat": None, "doc-sliding": None, "doc-chunk@docs=4": "doc-flat",
        "docttt:doclora@docs=4": "doc-chunk@docs=4", "docttt:doclora@docs=4/phases=2": "docttt:doclora@docs=4",
        "bayes-cache": "sliding", "ttt:sgd@doc-sliding": "doc-sliding", "oracle:sgd": "sliding"}
    assert [s.step for s in specs if s.step] == ["context", "adaptation", "phases"]
    assert [n for n, s in by.items() if s.total_base] == ["docttt:doclora@docs=4", "docttt:doclora@docs=4/phases=2"]
    from metattt.train.final_eval import decomposition

    rows = decomposition({"meta": {}, "config": {"context": 64}, "data": {"n_tokens": 100}, "deltas": {},
                          "protocols": {n: {"bpb": 1.0, "ci95": [1.0, 1.0], "legal": s.legal} for n, s in by.items()}
                          })["rows"]
    assert {r["protocol"]: r["adapts"] for r in rows} == {n: s.adapts for n, s in by.items()}
