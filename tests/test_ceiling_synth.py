"""experiments/ceiling_synth_cpu.toml, the CPU-sized variant of the GPU analytic-ceiling study (issue 30), run once
as its header says: models trained on the synthetic stream, budget branches, both length variants, the protocol
family, the zero-room control; the report's shares are those of the run directories and the exact bounds."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CORPORA = {"long": ("ci-long", "4096"), "zero": ("ci-long-zero-room", "4096"), "fineweb": ("ci-fineweb", "10")}


@pytest.fixture(scope="module")
def synth_study(tmp_path_factory):
    from metattt.data.__main__ import main as data_main

    sys.path.insert(0, str(REPO / "experiments"))
    import ceiling

    root = tmp_path_factory.mktemp("synth_ceiling")
    for d, (named, train) in CORPORA.items():
        assert data_main(["synthetic", "--named", named, "--vocab-size", "68", "--n-train-tokens", train,
                          "--n-val-tokens", "12000", "--out", str(root / "study" / "data" / d)]) == 0
    text = (REPO / "experiments" / "ceiling_synth_cpu.toml").read_text()
    for key, value in (("root", root / "study"), ("report", root / "report.md"), ("plots", root / "plots")):
        text = text.replace(f'{key} = "', f'{key} = "{value}" # was "', 1)
    cfg = root / "study.toml"
    cfg.write_text(text)
    assert ceiling.main(["--config", str(cfg)]) == 0
    return root, (root / "report.md").read_text()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _cells(root: Path) -> dict[tuple[str, str], Path]:
    return {(p.parent.name, p.name.rsplit("-", 1)[0]): p for p in (root / "study" / "cells").glob("*/*")
            if (p / "eval.json").is_file()}


def test_models_train_from_the_stream_and_branch(synth_study) -> None:
    root, _ = synth_study
    models = {p.name.rsplit("-", 1)[0]: p for p in (root / "study" / "models").iterdir() if p.is_dir()}
    assert sorted(models) == ["s.t40960", "s.t81920", "s.wsd", "zero.t81920", "zero.wsd"]
    wsd = _json(models["s.wsd"] / "summary.json")
    # 40 steps of 2,048 tokens from a corpus whose training shard holds 4,096: the stream supplied them
    assert wsd["train_tokens"] == 81920 and wsd["train_passes"] == pytest.approx(1.0)
    assert _json(models["s.wsd"] / "config.json")["loader_mode"] == "stream"
    for name, label in (("s.t40960", "t40960"), ("s.t81920", "t81920")):
        br = _json(models[name] / "summary.json")["branch"]
        assert br["budget"]["label"] == label and Path(br["parent_run"]) == models["s.wsd"]


def test_every_cell_ran_with_its_protocols(synth_study) -> None:
    root, _ = synth_study
    cells = _cells(root)
    assert sorted(cells) == sorted([("s.t40960", "long"), ("s.t81920", "long"), ("s.t81920", "fineweb"),
                                    ("s.t81920", "family"), ("zero.t81920", "zero-room")])
    fam = _json(cells[("s.t81920", "family")] / "eval.json")["protocols"]
    assert {"ttt:dyneval", "ttt:lora", "oracle:sgd"} <= set(fam) and any(k.startswith("docttt:") for k in fam)
    for key in (("s.t81920", "long"), ("zero.t81920", "zero-room")):
        ev = _json(cells[key] / "eval.json")
        assert "bayes-cache" in ev["protocols"] and ev["meta"]["data_check"] == "match"


def test_bounds_are_exact_for_the_val_corpus_and_stride(synth_study) -> None:
    """bounds.json: the window bound of sliding's contexts at the cell's stride, on the val corpus's own spec (the
    FineWeb-like cells: ci-fineweb's, not the artifact's), and the per-document rooms summing to the room."""
    from metattt.data.loaders import load_val_tokens
    from metattt.data.synthetic import SyntheticSpec, protocol_bounds
    from metattt.eval.windows import context_starts, sliding_plan

    root, _ = synth_study
    for (model, setting), cell in _cells(root).items():
        ev, bd = _json(cell / "eval.json"), _json(cell / "bounds.json")
        corpus = {"long": "long", "family": "long", "fineweb": "fineweb", "zero-room": "zero"}[setting]
        meta = _json(root / "study" / "data" / corpus / "meta.json")
        assert bd["spec"] == meta["spec"]
        spec = SyntheticSpec.from_dict(meta["spec"])
        val = np.asarray(load_val_tokens(ev["meta"]["val"], vocab_size=68))[: ev["data"]["n_tokens"]]
        pb = protocol_bounds(spec, val, context_starts(sliding_plan(val.size, ev["config"]["context"],
                                                                    ev["config"]["stride"])))
        assert bd["window_bpb"] == pytest.approx(pb["window_bpb"], rel=1e-12)
        assert bd["bayes_unknown_bpb"] == pytest.approx(pb["document_bpb"], rel=1e-12)
        room_nats = float(np.sum(bd["doc_room_nats"]))
        assert room_nats / np.log(2) / pb["n_bytes"] == pytest.approx(pb["room_bpb"], rel=1e-9, abs=1e-12)
        if setting == "zero-room":
            assert pb["room_bpb"] == 0.0
        else:
            assert pb["room_bpb"] > 0


def test_report_shares_are_those_of_the_run_dirs(synth_study) -> None:
    """The summary's share per protocol is Σ gain / Σ room over the cell's documents, its interval around it; the
    zero-room control shows its gain in bpb (there is no room to share)."""
    from metattt.study.report import ADAPTED, SUMMARY_LEAD
    from report_tables import parse_summary

    root, report = synth_study
    rows = parse_summary(report[report.index(SUMMARY_LEAD):].split("\n\n")[1])  # the summary (the ladder table follows)
    cells = _cells(root)
    assert set(rows) == set(cells)
    seen = set()
    for key, cell in cells.items():
        ev, bd, row = _json(cell / "eval.json"), _json(cell / "bounds.json"), rows[key]
        nats = ev["per_document"]["nats"]
        for name in (n for n in ev["protocols"] if n.startswith(ADAPTED)):
            shown, seen = row[name], seen | {name.split(":")[0]}
            gain = sum(nats["sliding"]) - sum(nats[name])
            if key[1] == "zero-room":
                bpb = gain / np.log(2) / sum(ev["per_document"]["bytes"])
                assert shown.startswith(f"Δ {bpb:+.5f}") and shown.endswith("(room 0)"), shown
                continue
            share = gain / sum(bd["doc_room_nats"])
            assert float(shown.split("%")[0]) == pytest.approx(100 * share, abs=0.051), (key, name)
            lo, hi = (float(v.strip(" %")) for v in shown.split("[")[1].rstrip("]").split(","))
            assert lo <= 100 * share + 0.051 and hi >= 100 * share - 0.051
    assert seen == {"ttt", "oracle", "docttt", "bayes-cache"}
