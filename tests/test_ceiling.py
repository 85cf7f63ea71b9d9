"""The ceiling study (experiments/ceiling.py): config, resumable cells, and a report that says what the runs say."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metattt.study.config import StudyConfigError, load_study, parse_study
from metattt.study.runner import run_study
from report_tables import parse_summary, parse_tables

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import ceiling  # noqa: E402

TRAIN = ["--data-dir", "{study}/data", "--synthetic-train-tokens", "200000", "--synthetic-val-tokens", "12000",
         "--iterations", "4", "--warmdown-iters", "2", "--val-every", "0", "--max-wallclock-s", "0",
         "--seq-len", "128", "--train-batch-tokens", "2048", "--micro-batch-tokens", "2048",
         "--model.num-layers", "2", "--model.model-dim", "32", "--model.num-heads", "2", "--model.num-kv-heads", "1",
         "--model.xsa-layers", "1", "--model.ve-layers", "1", "--progress", "false"]


def _toml(root: Path, chunk: int = 2048, extra_eval: str = "") -> str:
    train = ", ".join(json.dumps(f) for f in TRAIN)
    return f"""
[study]
name = "t"
root = "{root / 'study'}"
report = "{root / 'report.md'}"
plots = "{root / 'plots'}"
[study.sections]
"6" = "tiny"
[[model]]
name = "m"
train = [{train}]
[[eval]]
name = "a"
section = "6"
protocols = ["flat", "sliding", "ttt:sgd", "ttt:small", "oracle:sgd"]
adapter_specs = ["small=sgd:select=norms"]
flags = ["--bootstrap", "50", "--chunk-tokens", "{chunk}", "--quiet"]
{extra_eval}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceiling")
    cfg = root / "study.toml"
    cfg.write_text(_toml(root))
    (root / "report.md").write_text(PREAMBLE)
    assert ceiling.main(["--config", str(cfg)]) == 0
    return root, cfg


def _cell_dir(study_root: Path) -> Path:
    (d,) = [p for p in (study_root / "study" / "cells" / "m").iterdir() if ".incomplete" not in p.name]
    return d


OTHER_BLOCK = "<!-- ceiling:other:1 begin -->\n| protocol | bpb |\n| flat | 1.23456 |\n<!-- ceiling:other:1 end -->\n"
PREAMBLE = "# hand-written title\n\nprose that must survive\n\n" + OTHER_BLOCK + "\nprose after another study's block\n"


def _num(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


def _mismatches(text: str, cell: Path) -> list[str]:
    """Every number of ``cell``'s rows in the report that differs from its eval.json / summary.json / bounds.json."""
    ev = json.loads((cell / "eval.json").read_text())
    rows = parse_tables(text).get(str(cell))
    if rows is None:
        return [f"no table for {cell}"]
    bad = []

    def check(what: str, shown: str, want: float, tol: float = 5e-6) -> None:
        if shown is None or abs(_num(shown) - want) > tol:
            bad.append(f"{what}: report {shown!r}, run dir {want:.6f}")

    if set(rows) != set(ev["protocols"]):
        bad.append(f"protocols: report {sorted(rows)}, run dir {sorted(ev['protocols'])}")
    by_to = {d["to"]: d for d in ev["deltas"].values()}
    flat = ev["protocols"]["flat"]["bpb"]
    for name, p in ev["protocols"].items():
        r = rows.get(name, {})
        check(f"{name} bpb", r.get("main:bpb"), p["bpb"])
        lo, hi = r.get("main:bpb 95% CI", "[nan, nan]").strip("[]").split(",")
        check(f"{name} bpb CI lo", lo, p["ci95"][0])
        check(f"{name} bpb CI hi", hi, p["ci95"][1])
        if name in by_to:
            check(f"{name} Δ", r.get("main:Δ vs base"), by_to[name]["value"])
        if name != "flat":
            check(f"{name} flat − protocol", r.get("main:flat − protocol"), flat - p["bpb"])
        ap = p.get("adapter_params") or {}
        if "adapted_scalars" in ap:
            check(f"{name} adapted scalars", r.get("main:adapted scalars"), ap["adapted_scalars"], 0)
    bd = json.loads((cell / "bounds.json").read_text())
    room = bd["window_bpb"] - bd["bayes_unknown_bpb"]
    summ = json.loads((next(cell.parents[2].glob("models/m-*/summary.json"))).read_text())
    srow = parse_summary(text).get(("m", cell.name.rsplit("-", 1)[0]), {})
    check("summary sliding bpb", srow.get("sliding bpb"), ev["protocols"]["sliding"]["bpb"])
    check("summary steps", srow.get("steps"), summ["steps"], 0)
    check("summary parameters", srow.get("parameters"), summ["num_params"], 0)
    per = ev["per_document"]
    for key, d in ev["deltas"].items():
        if key.startswith(("ttt:", "oracle:")):
            # the fraction: Σ gain / Σ room over documents (= Δ / room on a consistent eval.json)
            share = (sum(per["nats"][d["from"]]) - sum(per["nats"][d["to"]])) / sum(bd["doc_room_nats"])
            check(f"{key} adaptation room", rows.get(key, {}).get("bounds:adaptation room"), room)
            check(f"{key} fraction", rows.get(key, {}).get("bounds:fraction of adaptation room"), share)
            check(f"{key} summary fraction", (srow.get(key) or "nan").split(" ")[0], 100 * share, 0.05)
    return bad


def test_report_numbers_are_those_of_the_run_dirs(study) -> None:
    root, _ = study
    text = (root / "report.md").read_text()
    assert text.startswith(PREAMBLE)
    assert "<!-- ceiling:t:6 begin -->" in text and "<!-- ceiling:t:6 end -->" in text
    tables = parse_tables(text)
    cell = _cell_dir(root)
    ev = json.loads((cell / "eval.json").read_text())
    assert list(tables) == [str(cell)]
    assert set(tables[str(cell)]) == {"flat", "sliding", "ttt:sgd", "ttt:small", "oracle:sgd"}
    assert _mismatches(text, cell) == []
    rows = tables[str(cell)]
    assert int(rows["ttt:small"]["main:adapted scalars"].replace(",", "")) < int(
        rows["ttt:sgd"]["main:adapted scalars"].replace(",", ""))
    assert ev["meta"]["argv"][-4:] == ["--run-dir", str(cell), "--wandb", "off"]
    assert " ".join(ev["meta"]["argv"][1:]) in text  # the exact command of the cell


def test_the_check_fails_when_a_run_dir_changes_and_the_report_follows_it(study) -> None:
    """The comparison above can fail: a changed eval.json is caught until the report is regenerated from it."""
    root, cfg = study
    cell = _cell_dir(root)
    path = cell / "eval.json"
    saved = path.read_text()
    try:
        ev = json.loads(saved)
        d = ev["deltas"]["ttt:sgd"]  # as if the cell had been rerun with another result
        d["value"], d["ci95"] = d["value"] + 0.01, [d["ci95"][0] + 0.01, d["ci95"][1] + 0.01]
        path.write_text(json.dumps(ev))
        text = (root / "report.md").read_text()
        bad = _mismatches(text, cell)
        assert bad and all(b.startswith("ttt:sgd") for b in bad), bad
        assert ceiling.main(["--config", str(cfg), "--report-only"]) == 0
        assert _mismatches((root / "report.md").read_text(), cell) == []
        ev["protocols"]["ttt:sgd"]["bpb"] += 0.01  # a stale bpb column is caught too
        path.write_text(json.dumps(ev))
        assert any(b.startswith("ttt:sgd bpb") for b in _mismatches((root / "report.md").read_text(), cell))
    finally:
        path.write_text(saved)
        assert ceiling.main(["--config", str(cfg), "--report-only"]) == 0
    assert _mismatches((root / "report.md").read_text(), cell) == []


def test_regenerating_keeps_other_studies_blocks_and_prose(study) -> None:
    """The GPU study's sections live in the same file: rewriting ours twice leaves theirs byte for byte."""
    root, cfg = study
    assert ceiling.main(["--config", str(cfg), "--report-only"]) == 0
    text = (root / "report.md").read_text()
    assert text.startswith(PREAMBLE) and text.count(OTHER_BLOCK) == 1
    assert text.count("<!-- ceiling:t:6 begin -->") == 1 and text.count("## 6. tiny") == 1
    edited = text.replace("prose after another study's block", "prose edited by hand")
    (root / "report.md").write_text(edited)
    assert ceiling.main(["--config", str(cfg), "--report-only"]) == 0
    assert (root / "report.md").read_text() == edited


def test_a_section_from_more_cells_than_are_here_is_kept(study, capsys) -> None:
    """Run directories do not travel with the checkout: regenerating where a cell's directory is missing keeps the
    section that was generated from it (and says so), unless --replace-fewer."""
    root, cfg = study
    before = (root / "report.md").read_text()
    cell = _cell_dir(root)
    aside = cell.with_name(cell.name + ".aside")
    cell.rename(aside)
    try:
        assert ceiling.main(["--config", str(cfg), "--report-only"]) == 0
        assert (root / "report.md").read_text() == before
        assert "kept section 6" in capsys.readouterr().out
        assert ceiling.main(["--config", str(cfg), "--report-only", "--replace-fewer"]) == 0
        assert "from 0 of 1 configured cells" in (root / "report.md").read_text()
    finally:
        aside.rename(cell)
        assert ceiling.main(["--config", str(cfg), "--report-only"]) == 0
    assert (root / "report.md").read_text() == before


def test_bounds_table_uses_the_exact_bounds_of_the_evaluated_tokens(study) -> None:
    """The room is exact for sliding's contexts at the cell's stride (protocol_bounds), and the fraction is
    Σ gain / Σ room over the evaluated documents."""
    from metattt.data.synthetic import SyntheticSpec, load_synthetic_val, protocol_bounds
    from metattt.eval.windows import context_starts, sliding_plan

    root, _ = study
    cell = _cell_dir(root)
    ev = json.loads((cell / "eval.json").read_text())
    spec = SyntheticSpec.from_dict(ev["meta"]["artifact_meta"]["synthetic_spec"])
    w, stride = ev["config"]["context"], ev["config"]["stride"]
    data = next(p.parent for p in (root / "study" / "data").rglob("meta.json"))  # a directory per corpus spec
    val = load_synthetic_val(data)[: ev["data"]["n_tokens"]]
    pb = protocol_bounds(spec, val, context_starts(sliding_plan(val.size, w, stride)))
    room = pb["room_bpb"]
    rows = parse_tables((root / "report.md").read_text())[str(cell)]
    assert float(rows["ttt:sgd"]["bounds:adaptation room"]) == pytest.approx(room, abs=5e-6)
    frac = ev["deltas"]["ttt:sgd"]["value"] / room
    assert float(rows["ttt:sgd"]["bounds:fraction of adaptation room"]) == pytest.approx(frac, abs=5e-6)
    doc_room = pb["doc_window_nats"] - pb["doc_document_nats"]
    assert json.loads((cell / "bounds.json").read_text())["doc_room_nats"] == pytest.approx(doc_room.tolist())
    assert (root / "plots" / "t-s6-capacity.png").stat().st_size < 100_000


def test_done_cells_are_skipped_and_a_changed_setting_is_a_new_cell(study, tmp_path) -> None:
    root, cfg = study
    eval_json = _cell_dir(root) / "eval.json"
    before = eval_json.stat().st_mtime_ns
    st = load_study(cfg)
    outcomes = run_study(st, log=lambda s: None)
    assert [o.status for o in outcomes] == ["skipped (done)", "skipped (done)"]
    assert eval_json.stat().st_mtime_ns == before
    changed = tmp_path / "changed.toml"
    changed.write_text(_toml(root, chunk=4096))
    st2 = load_study(changed)
    assert st2.cells()[0].key != st.cells()[0].key and st2.models[0].key == st.models[0].key
    outcomes = run_study(st2, dry_run=True, log=lambda s: None)
    assert [o.status for o in outcomes] == ["skipped (done)", "would run"]


def test_an_incomplete_cell_is_moved_aside_and_rerun(study) -> None:
    root, cfg = study
    cell = _cell_dir(root)
    (cell / "study.json").unlink()  # as if the evaluator had been killed before the record
    outcomes = run_study(load_study(cfg), log=lambda s: None)
    assert [o.status for o in outcomes] == ["skipped (done)", "done"]
    assert (cell.parent / f"{cell.name}.incomplete-1" / "eval.json").is_file()
    assert json.loads((cell / "study.json").read_text())["status"] == "done"


def test_config_errors_are_one_line_exit_2(tmp_path, capsys) -> None:
    base = _toml(tmp_path)
    cases = {
        "sweep = { \"--chunk-tokens\" = [] }": "sweep entry",
        "models = [\"nope\"]": "not defined",
        "colour = 1": "unknown keys",
    }
    for extra, msg in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(base + extra + "\n")
        assert ceiling.main(["--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and err.count("\n") == 1
    (tmp_path / "bad.toml").write_text(base.replace('"6" = "tiny"', '"5" = "tiny"'))
    with pytest.raises(StudyConfigError, match="not in \\[study.sections\\]"):
        load_study(tmp_path / "bad.toml")
    assert ceiling.main(["--config", str(tmp_path / "absent.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "env.toml").write_text(base.replace('"--iterations"', '"$CEILING_TEST_UNSET", "--iterations"'))
    os.environ.pop("CEILING_TEST_UNSET", None)
    assert ceiling.main(["--config", str(tmp_path / "env.toml"), "--dry-run"]) == 2
    assert "CEILING_TEST_UNSET not set" in capsys.readouterr().err


def test_sweep_expands_into_cells_with_their_own_flags(tmp_path) -> None:
    import tomllib

    st = parse_study(tomllib.loads(_toml(tmp_path) + 'sweep = { "--chunk-tokens" = [1024, 2048], "--no-autocast" = [false, true] }\n'))
    names = [c.ev.name for c in st.cells()]
    assert names == ["a.chunk-tokens=1024.no-autocast=false", "a.chunk-tokens=1024.no-autocast=true",
                     "a.chunk-tokens=2048.no-autocast=false", "a.chunk-tokens=2048.no-autocast=true"]
    assert len({c.key for c in st.cells()}) == 4
    assert st.cells()[1].ev.flags[-3:] == ("--chunk-tokens", "1024", "--no-autocast")


def test_shipped_configs_parse_and_their_adapter_specs_exist() -> None:
    from metattt.eval.docttt_spec import is_docttt, parse_docttt
    from metattt.eval.cli import parse_adapter_specs
    from metattt.ttt.registry import adapter_from_spec, builtin_registry

    builtin = builtin_registry().names

    names = sorted(p.name for p in (REPO / "experiments").glob("ceiling_*.toml"))
    assert {"ceiling_cpu.toml", "ceiling_gpu.toml", "ceiling_synth.toml"} <= set(names)
    for name in names:
        st = load_study(REPO / "experiments" / name)
        assert st.cells() and all(c.ev.section in st.sections for c in st.cells())
        for e in st.evals:
            specs = parse_adapter_specs(list(e.adapter_specs))
            for p in e.protocols:
                if is_docttt(p):  # the doc-batched family parses its own options (not registry adapters)
                    parse_docttt(p)
                elif ":" in p:
                    key = p.split(":", 1)[1].split("@")[0]
                    assert key in specs or key in builtin, (name, e.name, p)
            for spec in specs.values():
                adapter_from_spec(spec)


def test_a_replaced_artifact_makes_its_cells_not_done(study, tmp_path) -> None:
    from metattt.study.runner import cell_done

    root, cfg = study
    st = load_study(cfg)
    c = st.cells()[0]
    assert cell_done(st, c)
    art = st.artifact_path(c.model)
    saved = art.read_bytes()
    try:
        art.write_bytes(saved + b"\0")
        assert not cell_done(st, c)
    finally:
        art.write_bytes(saved)
    assert cell_done(st, c)


def test_room_share_interval_resamples_documents_with_their_room() -> None:
    """Each document gains exactly half its own room, rooms differing widely: the share is 0.5 in every resample,
    so its interval is [0.5, 0.5]; scaling Δ's interval by a fixed room would give a wide one."""
    from metattt.study.report import room_share

    rng = np.random.default_rng(0)
    room = rng.gamma(0.5, 40.0, size=60)
    base = rng.uniform(500, 900, size=60)
    ev = {"deltas": {"ttt:x": {"from": "sliding", "to": "ttt:x", "value": 0.0, "ci95": [0.0, 0.0]}},
          "per_document": {"bytes": [1.0] * 60, "nats": {"sliding": base.tolist(), "ttt:x": (base - room / 2).tolist()}},
          "bootstrap": {"n": 300, "seed": 1, "level": 0.95}}
    point, lo, hi = room_share(ev, {"doc_room_nats": room.tolist()}, "ttt:x")
    assert point == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    # gains unrelated to the room: a real interval around Σ gain / Σ room
    ev["per_document"]["nats"]["ttt:x"] = (base - room.mean() / 2).tolist()
    point, lo, hi = room_share(ev, {"doc_room_nats": room.tolist()}, "ttt:x")
    assert point == pytest.approx(0.5) and lo < 0.45 and hi > 0.55
    assert room_share(ev, {"doc_room_nats": [0.0] * 60}, "ttt:x") is None  # no room: no share
