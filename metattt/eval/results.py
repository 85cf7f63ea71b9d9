"""Where an evaluation's results go: one file per evaluation in the run directory, written before any report step.

``RUN/eval.json`` is always the latest evaluation (what ``python -m metattt compare`` reads). An evaluation
never replaces an earlier one silently: before the new ``eval.json`` is written, the previous one and its plot
are renamed to ``eval-<id>.json`` / ``eval_running_delta-<id>.png`` (``<id>`` = that evaluation's
``meta.eval_id``), so a plot always sits beside the evaluation it belongs to. Should building the report fail,
the raw per-protocol numbers are written to ``eval-<id>.raw.json`` before the error propagates. The evaluator
archives, writes and plots under the run directory's lock (``rundir.locked``), so evaluations that finish together
on one directory are all kept, each with its own plot.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable

from metattt.track import jsonio

from ..data.bpb import bpb

from .protocols import EvalResult
from .report import build_report, where_invalid

EVAL_JSON = "eval.json"
PLOT_NAME = "eval_running_delta.png"
_ID_OK = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def new_eval_id() -> str:
    """``YYYYmmdd-HHMMSS-<6 hex>``: sortable by time, unique across concurrent evaluations."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _previous_id(path: Path) -> str:
    try:
        old = jsonio.loads(path.read_text(encoding="utf-8"))
        eid = str(old.get("meta", {}).get("eval_id", ""))
    except (OSError, ValueError, AttributeError):
        eid = ""
    if not _ID_OK.match(eid):  # evaluations written before ids existed: their file time
        eid = _dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S-") + "old"
    return eid


def archive_previous(run_path: Path) -> str | None:
    """Rename an existing eval.json (and its plot) to per-evaluation names; the new name, or None."""
    cur = run_path / EVAL_JSON
    if not cur.is_file():
        return None
    eid = _previous_id(cur)
    name, n = f"eval-{eid}.json", 1
    while (run_path / name).exists():
        n += 1
        name = f"eval-{eid}-{n}.json"
    stem = name[len("eval-"):-len(".json")]
    plot = run_path / PLOT_NAME
    if plot.is_file():
        os.replace(plot, run_path / f"{Path(PLOT_NAME).stem}-{stem}.png")
    os.replace(cur, run_path / name)
    return name


def raw_results(ev: EvalResult, meta: dict[str, Any]) -> dict[str, Any]:
    """The scored numbers without any statistics: enough to rebuild the report by hand."""
    total_bytes = float(ev.data.target_bytes.sum())
    return {"schema": "metattt.eval-raw/1", "meta": meta, "config": ev.cfg.to_dict(), "n_bytes": total_bytes,
            "doc_bytes": ev.data.doc_bytes.tolist(),
            "protocols": {n: {"bpb": bpb(r.nats, total_bytes), "doc_nats": r.doc_nats.tolist(),
                              "invalid": r.stream.invalid} for n, r in ev.results.items()}}


def write_results(run_dir: Any, ev: EvalResult, meta: dict[str, Any], warn: Callable[[str], None],
                  runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build the report and write it as ``run_dir/eval.json`` (earlier evaluations kept, see module doc);
    ``runs``: further document orders / adapter seeds (``orders.evaluate_runs``)."""
    run_path = Path(run_dir.path)
    try:
        report = build_report(ev, meta, runs)
    except Exception:
        raw = run_path / f"eval-{meta.get('eval_id', new_eval_id())}.raw.json"
        run_dir.write_json(raw.name, raw_results(ev, meta))
        warn(f"error: building the report failed; the scored results are in {raw}")
        raise
    kept = archive_previous(run_path)
    if kept:
        report.setdefault("meta", {})["previous_evaluation"] = kept
        warn(f"note: the previous evaluation in {run_path} is kept as {kept}")
    path = run_dir.write_eval(report)
    report["_paths"] = {"eval_json": str(path) if path else None, "plot": None}
    return report


def invalid_protocols(report: dict[str, Any]) -> dict[str, str]:
    """Protocol name -> why it is invalid, for every reported protocol marked invalid."""
    out = {}
    for name, p in (report.get("protocols") or {}).items():
        inv = p.get("invalid")
        if inv:
            if "batch" in inv:  # the doc-batched family (metattt.eval.docttt)
                out[name] = (f"non-finite {inv['what']} {where_invalid(inv)}; adaptation stopped there and later "
                             "batches were scored without it (result not comparable)")
            else:
                out[name] = (f"non-finite {inv['what']} at chunk {inv['chunk']}; adaptation stopped there and the "
                             "rest was scored with the trained weights (result not comparable)")
    return out

