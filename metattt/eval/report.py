"""The evaluator's report: ``eval.json`` content and the printed table.

Sign convention (stated in the output too): ``delta(A -> B) = bpb(A) - bpb(B)``; a positive delta means the
second protocol B is better (lower bpb). Δ_context = flat - sliding, Δ_TTT(adapter) = sliding - ttt:adapter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from metattt.track.rundir import EVAL_SCHEMA

from ..data.bpb import bpb

from .docttt_spec import DocTTTSpec
from .equivalence import equivalence_table
from .positions import format_per_position, per_position
from .protocols import ORACLE_LABEL, EvalResult
from .stats import bootstrap, hierarchical_bootstrap

SCHEMA = EVAL_SCHEMA
ONE_ORDER = "conditional on one order: paired document bootstrap over one pass"
HIERARCHICAL = "hierarchical bootstrap over {r} runs ({k} document orders x {s} adapter seeds), then documents"
SIGN_CONVENTION = ("delta(A -> B) = bpb(A) - bpb(B) in bits per byte; positive = the second protocol B is better "
                   "(lower bpb). context = flat -> sliding; ttt:X = sliding -> ttt:X (TTT gain beyond context).")


def delta_pairs(names: list[str], specs: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Named deltas computable from the protocols present: key -> (A, B)."""
    out: dict[str, tuple[str, str]] = {}
    if "flat" in names and "sliding" in names:
        out["context"] = ("flat", "sliding")
    if "doc-flat" in names and "doc-sliding" in names:
        out["context@doc"] = ("doc-flat", "doc-sliding")
    if "sliding" in names and "doc-sliding" in names:
        out["doc_isolation"] = ("sliding", "doc-sliding")
    for n in names:
        s = specs[n]
        if s.base is not None and s.base in names:
            out[n] = (s.base, n)
        if s.total_base is not None and s.total_base in names:
            out["total:" + n] = (s.total_base, n)
    return out


def docttt_decomposition(names: list[str], specs: dict[str, Any], deltas: dict[str, Any]) -> dict[str, Any]:
    """Per ``docttt:`` protocol, its chain doc-flat -> doc-chunk (context: chunked doc windows, no adaptation)
    -> docttt (per-document LoRA) -> + phases, each step a paired Δ, and the total."""
    out: dict[str, Any] = {}
    for n in names:
        s = specs[n]
        if s.total_base is None or "total:" + n not in deltas:
            continue
        steps = []
        cur = n
        while cur in deltas and specs[cur].step is not None:
            steps.append({"step": specs[cur].step, **deltas[cur]})
            cur = deltas[cur]["from"]
        out[n] = {"steps": steps[::-1], "total": deltas["total:" + n]}
    return out


def running_delta(a_block_nats: np.ndarray, b_block_nats: np.ndarray, block_bytes: np.ndarray) -> list[float | None]:
    """Cumulative bpb(A) - bpb(B) after each block (same blocks and bytes for both)."""
    cb = np.cumsum(block_bytes)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(cb > 0, bpb(np.cumsum(a_block_nats - b_block_nats), np.where(cb > 0, cb, 1)), np.nan)
    return [float(v) if np.isfinite(v) else None for v in out]


def build_report(ev: EvalResult, meta: dict[str, Any] | None = None,
                 runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything that goes into ``eval.json`` (JSON-ready); ``runs``: the extra document orders / adapter seeds
    (``orders.evaluate_runs``), for the hierarchical intervals."""
    data, cfg = ev.data, ev.cfg
    names = list(ev.results)
    specs = {n: r.spec for n, r in ev.results.items()}
    doc_bytes = data.doc_bytes
    total_bytes = float(data.target_bytes.sum())
    pairs = delta_pairs(names, specs)
    per, diffs = bootstrap({n: r.doc_nats for n, r in ev.results.items()}, doc_bytes, list(pairs.values()),
                           n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    block_bytes = data.block_bytes
    measured_on = data.tokens.device.type
    projects = projection_applies(measured_on, cfg.projection_gpus)
    protocols: dict[str, Any] = {}
    for n, r in ev.results.items():
        s = r.stream
        rate = s.n_scored / max(s.seconds, 1e-12)
        per_gpu = rate / max(r.world, 1)
        proj = cfg.projection_tokens / (per_gpu * cfg.projection_gpus) if projects and per_gpu > 0 else None
        basis = "timed tokens/s (warm-up excluded)"
        if r.projection is not None:  # docttt: the batch-cost model, not a short prefix's tokens/s
            # the model gives the full val's shape (its document lengths, the rank schedule); the measured run on
            # this data sets the scale (doc-chunk's calibration ran 16x slow on an H100 against its own run)
            ratio = r.projection.get("measured_over_modelled")
            proj = r.projection["full_s"] * (ratio or 1.0) if projects else None
            basis = r.projection["model"] + (" x measured/modelled on this data" if ratio else "")
        protocols[n] = {
            "bpb": per[n].point,
            "ci95": [per[n].lo, per[n].hi],
            "nats_per_token": r.nats / max(s.n_scored, 1),
            "legal": r.spec.legal,
            "label": "legal score" if r.spec.legal else ORACLE_LABEL,
            # a diverged adapter (non-finite loss/parameters) stopped at "chunk"; the number is not comparable
            "valid": s.invalid is None,
            "invalid": s.invalid,
            "mode": r.spec.mode,
            "windows": r.spec.windows,
            # docttt with phases: how many ran (none when the stream has too few batches for one)
            **({"phases_run": sum(1 for st in s.adapt_stats if isinstance(st, dict) and "phase" in st
                                  and "skipped" not in st)} if isinstance(r.spec, DocTTTSpec) and r.spec.phases
               else {}),
            **(_compat_entry(r, total_bytes) if r.compat is not None else {}),
            "adapter": r.spec.adapter,
            "n_windows": s.n_windows,
            "n_chunks": len(s.chunks),
            "n_forwards": s.n_forwards,
            "tokens_scored": s.n_scored,
            "wallclock_s": s.seconds,
            "score_s": s.score_seconds,
            "adapt_s": s.adapt_seconds,
            "tokens_per_s": rate,
            "tokens_per_s_per_process": per_gpu,
            "world_size": r.world,
            "projected_full_val_s": proj,
            "projection_basis": basis,
            "projection_model": r.projection,
            "warmup_s": r.warmup_s,
            "cost": {"device_s_per_token": s.seconds * max(r.world, 1) / max(s.n_scored, 1),
                     "flops_per_token": r.flops / max(s.n_scored, 1) if r.flops is not None else None,
                     "flops": "counted model FLOPs (metattt.eval.cost: forwards 2N + attention, backward 2x, "
                              "epochs, docttt phases)",
                     "unit": ("GPU" if measured_on == "cuda" else "CPU") + "-seconds per scored token (timed part; "
                             "warm-up excluded, in warmup_s)"},
            "ci95_kind": ONE_ORDER,
            "ledger": r.ledger,
            "adapter_params": r.adapter_info,
            "adapt_stats_last": _jsonable_stats(s.adapt_stats[-1]) if s.adapt_stats else None,
        }
    deltas = {}
    for key, (a, b) in pairs.items():
        d = diffs[(a, b)]
        deltas[key] = {"from": a, "to": b, "value": d.point, "ci95": [d.lo, d.hi],
                       "legal": specs[a].legal and specs[b].legal,
                       "valid": ev.results[a].stream.invalid is None and ev.results[b].stream.invalid is None,
                       "label": "legal" if specs[a].legal and specs[b].legal else ORACLE_LABEL,
                       "ci95_kind": ONE_ORDER}
    decomposition = docttt_decomposition(names, specs, deltas)
    running = {}
    for key, (a, b) in pairs.items():
        if specs[b].base is None:  # windows only: no running Δ of its own
            continue
        running[key] = {"from": a, "to": b, "block_tokens": data.block_tokens,
                        "chunk": list(range(block_bytes.size)),
                        "delta_bpb": running_delta(ev.results[a].block_nats, ev.results[b].block_nats, block_bytes)}
    adapt_pairs = {k: v for k, v in pairs.items() if specs[v[1]].adapter is not None
                   and specs[v[1]].legal and not k.startswith("total:")}
    doc_nats = {n: r.doc_nats for n, r in ev.results.items()}
    if runs:  # TOST on the per-document terms averaged over every run
        doc_nats = {n: np.stack([v] + [run["doc_nats"][n] for run in runs]) for n, v in doc_nats.items()}
    equivalence = (equivalence_table(doc_nats, doc_bytes, adapt_pairs, cfg.equivalence_margin)
                   if adapt_pairs and data.n_docs >= 2 else None)
    return {
        "schema": SCHEMA,
        "sign_convention": SIGN_CONVENTION,
        **({"meta": meta} if meta else {}),
        "config": cfg.to_dict(),
        "data": {"n_tokens": data.n_tokens, "n_targets": data.n_tokens - 1, "n_bytes": total_bytes,
                 "n_docs": data.n_docs, "bos_id": data.bos_id},
        "bootstrap": {"n": cfg.n_boot, "seed": cfg.seed, "level": cfg.level, "unit": "document",
                      "paired": True, "estimator": "sum(nats)/ln2/sum(bytes) over resampled documents"},
        "projection": {
            "tokens": cfg.projection_tokens, "gpus": cfg.projection_gpus, "measured_on": measured_on,
            "applies": projects,
            "note": (f"PROJECTION, not a measurement: {cfg.projection_tokens:,} tokens (full FineWeb val, taken "
                     f"as 62M) / (measured tokens/s per process x {cfg.projection_gpus}), assuming linear "
                     "scaling" if projects else
                     f"no {cfg.projection_gpus}-GPU projection: throughput was measured on {measured_on}, not a GPU"),
        },
        "protocols": protocols,
        "deltas": deltas,
        **({"docttt_decomposition": decomposition} if decomposition else {}),
        "running_delta": running,
        "per_position": per_position(data, ev.results, pairs, cfg.position_edges, cfg.chunk_tokens, cfg.n_boot,
                                     cfg.seed, cfg.level),
        "runs": _runs_section(ev, runs or [], pairs),
        **({"equivalence": equivalence} if equivalence else {}),
        "per_document": {
            "bytes": doc_bytes.tolist(),
            "nats": {n: r.doc_nats.tolist() for n, r in ev.results.items()},
        } if data.n_docs <= 100_000 else None,
    }


def _runs_section(ev: EvalResult, runs: list[dict[str, Any]], pairs: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The runs beyond the first and the hierarchical intervals (runs -> documents) of every bpb and Δ."""
    cfg = ev.cfg
    k, sd = max(cfg.orders, 1), max(cfg.adapt_seeds, 1)
    out: dict[str, Any] = {"orders": k, "adapt_seeds": sd, "n_runs": 1 + len(runs),
                           "interval": ONE_ORDER if not runs else HIERARCHICAL.format(r=1 + len(runs), k=k, s=sd)}
    if not runs:
        return out
    names = list(ev.results)
    mats = {n: np.stack([ev.results[n].doc_nats] + [r["doc_nats"][n] for r in runs]) for n in names}
    per, diffs = hierarchical_bootstrap(mats, ev.data.doc_bytes, list(pairs.values()), n_boot=cfg.n_boot,
                                        seed=cfg.seed, level=cfg.level)
    nb = float(ev.data.target_bytes.sum())
    out["runs"] = [{"order": 0, "seed": 0}] + [{"order": r["order"], "seed": r["seed"], "seconds": r["seconds"],
                                                "invalid": r["invalid"]} for r in runs]
    out["protocols"] = {n: {"bpb_mean": per[n].point, "ci95": [per[n].lo, per[n].hi],
                            "bpb_per_run": bpb(mats[n].sum(1), nb).tolist()} for n in names}
    out["deltas"] = {key: {"from": a, "to": b, "value": diffs[(a, b)].point,
                           "ci95": [diffs[(a, b)].lo, diffs[(a, b)].hi],
                           "value_per_run": bpb((mats[a] - mats[b]).sum(1), nb).tolist()}
                     for key, (a, b) in pairs.items()}
    # per-document nats averaged over the runs: a study's seeds -> documents bootstrap (metattt/study/arms.py)
    out["doc_nats_mean"] = {n: mats[n].mean(0).tolist() for n in names} if ev.data.n_docs <= 100_000 else None
    return out


def projection_applies(device_type: str, gpus: int) -> bool:
    """Scaling a measured rate to N GPUs means something only when it was measured on a GPU."""
    return device_type == "cuda" and gpus >= 1


def _jsonable_stats(st: Any) -> Any:
    if isinstance(st, dict):
        return {k: (float(v) if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) else v)
                for k, v in st.items()}
    return st


def _fmt_ci(ci: list[float], digits: int = 4) -> str:
    if ci is None or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return "n/a"
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def _compat_entry(r: Any, total_bytes: float) -> dict[str, Any]:
    """``--compat pg-record``: the record's number (its tail re-scorings included) beside ours."""
    from .compat import compat_bpb

    return {"compat": {"mode": "pg-record", "bpb": compat_bpb(r.nats, total_bytes, r.compat), **r.compat}}


def format_report(rep: dict[str, Any]) -> str:
    """The human-readable table printed by the CLI."""
    lines = []
    d = rep["data"]
    lines.append(f"scored {d['n_targets']:,} targets ({d['n_bytes']:,.0f} bytes, {d['n_docs']:,} documents); "
                 f"95% CIs: paired bootstrap over documents, n={rep['bootstrap']['n']}, "
                 f"seed={rep['bootstrap']['seed']}, {ONE_ORDER.split(':')[0]}")
    proj_col = f"proj. {rep['projection']['gpus']} GPU"
    wp = max([26] + [len(n) + 2 for n in rep["protocols"]])  # long protocol names widen the column
    hdr = f"{'protocol':<{wp}}{'bpb':>9}  {'95% CI':<20}{'wall':>9}{'tok/s':>12}{proj_col:>13}{'warm-up':>9}  note"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for n, p in rep["protocols"].items():
        note = "" if p["legal"] else f"** {p['label']} **"
        if p.get("invalid"):
            note += f" ** INVALID: non-finite {p['invalid']['what']} {where_invalid(p['invalid'])} **"
        lines.append(f"{n:<{wp}}{p['bpb']:>9.5f}  {_fmt_ci(p['ci95']):<20}{_fmt_time(p['wallclock_s']):>9}"
                     f"{p['tokens_per_s']:>12,.0f}{_fmt_time(p['projected_full_val_s']):>12}"
                     f"{'*' if p.get('projection_model') else ' '}{_fmt_time(p.get('warmup_s')):>9}  {note}")
    compat = {n: p["compat"] for n, p in rep["protocols"].items() if p.get("compat")}
    if compat:
        lines.append("")
        lines.append("--compat pg-record: the record scripts' numbers (val truncated to whole training windows, "
                     "the sliding tail's re-scorings counted)")
        for n, c in compat.items():
            lines.append(f"  {n:<24}{c['bpb']:>12.8f}   (+{c['tail_targets']:,} re-scored targets in "
                         f"{c['tail_windows']} tail windows)")
    if rep["deltas"]:
        lines.append("")
        lines.append("deltas  (" + rep["sign_convention"] + ")")
        wk = max([24] + [len(k) + 2 for k in rep["deltas"]])
        wft = max([34] + [len(v["from"] + " -> " + v["to"]) + 2 for v in rep["deltas"].values()])
        for k, v in rep["deltas"].items():
            note = "" if v["legal"] else f"** {v['label']} **"
            if not v.get("valid", True):
                note += " ** INVALID (diverged adapter) **"
            lines.append(f"  {k:<{wk}}{v['from'] + ' -> ' + v['to']:<{wft}}{v['value']:>+10.5f}  "
                         f"{_fmt_ci(v['ci95'], 5):<24}{note}".rstrip())
    for n, dec in rep.get("docttt_decomposition", {}).items():
        lines.append("")
        lines.append(f"decomposition of {n} (each step a paired Δ, positive = better):")
        steps = [*dec["steps"], {"step": "total", **dec["total"]}]
        wft = max([60] + [len(st["from"] + " -> " + st["to"]) + 2 for st in steps])
        for st in steps:
            note = ""
            if st["step"] == "phases" and rep["protocols"].get(st["to"], {}).get("phases_run") == 0:
                note = "  (no phase ran: a phase needs a batch after it, and this stream has too few documents)"
            lines.append(f"  {st['step']:<12}{st['from'] + ' -> ' + st['to']:<{wft}}{st['value']:>+10.5f}  "
                         f"{_fmt_ci(st['ci95'], 5)}{note}")
    pp = rep.get("per_position")
    if pp:
        lines.append("")
        shown = [k for k, v in rep["deltas"].items() if k == "context" or (rep["protocols"][v["to"]].get("adapter")
                                                                             and not k.startswith("total:"))]
        lines.extend(format_per_position(pp, shown))
    runs = rep.get("runs") or {}
    if runs.get("protocols"):
        lines.append("")
        lines.append(f"intervals over runs: {runs['interval']}")
        for key, d in runs["deltas"].items():
            lines.append(f"  {key:<24}{d['from'] + ' -> ' + d['to']:<34}{d['value']:>+10.5f}  {_fmt_ci(d['ci95'], 5):<24}"
                         f"per run: " + ", ".join(f"{v:+.5f}" for v in d["value_per_run"]))
    eq = rep.get("equivalence")
    if eq:
        lines.append("")
        lines.append(f"equivalence (TOST, margin ±{eq['margin_bpb']} bpb, Holm over {len(eq['rows'])} adapter Δ, "
                     f"alpha {eq['alpha']}):")
        for k, r in eq["rows"].items():
            lines.append(f"  {k:<40} Δ {r['estimate']:+.5f}  p {r['p']:.3g}  p_holm {r['p_holm']:.3g}  "
                         + ("equivalent to no effect" if r["equivalent"] else "not shown equivalent"))
    for n, p in rep["protocols"].items():
        a = p.get("adapter_params")
        if a and "adapted_scalars" in a:
            lines.append("")
            lines.append(f"{n}: adapter {a['adapter']} adapts {a['adapted_scalars']:,} of {a['model_scalars']:,} "
                         f"scalars (selection {a['selection']!r})")
            if a.get("report"):
                lines.extend("    " + ln for ln in a["report"].splitlines())
    lines.append("")
    lines.append(rep["projection"]["note"])
    warm = (rep.get("meta") or {}).get("scorer_compile_s") or 0.0
    if warm:
        lines.append(f"warm-up of the compiled scorer: {_fmt_time(warm)}, untimed and shared by the windowed protocols "
                     "(their tokens/s and projections exclude it)")
    if any(p.get("projection_model") for p in rep["protocols"].values()):
        lines.append("* docttt: the batch-cost model (metattt.eval.docttt_model: chunk step calibrated per forward length "
                     "in the warm-up, full val resampled from these document lengths) scaled by measured / modelled "
                     "on this data, not a tokens/s extrapolation; phase SGD is not in it")
        for n, p in rep["protocols"].items():
            m = p.get("projection_model")
            if m:
                r = m.get("measured_over_modelled")
                lines.append(f"  {n}: modelled {m['check_s']:.2f}s on this data, measured {p['wallclock_s']:.2f}s"
                             + (f" (measured / modelled {r:.2f}); full val modelled {_fmt_time(m['full_s'])}, "
                                f"x {r:.2f} = {_fmt_time(m['full_s'] * r)}" if r else ""))
    return "\n".join(lines)


def where_invalid(inv: dict[str, Any]) -> str:
    """Where a protocol's adaptation diverged, in words (chunk of ``ttt:``, batch/chunk/phase of ``docttt:``)."""
    if inv.get("phase") is not None:
        return f"in phase {inv['phase']} (after batch {inv['batch']})"
    if "batch" in inv:
        return f"in batch {inv['batch']}" + (f", chunk {inv['chunk']}" if inv.get("chunk") is not None else "")
    return f"at chunk {inv['chunk']}"
