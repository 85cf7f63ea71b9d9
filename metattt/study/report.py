"""The ceiling report: markdown sections and plots generated from the study's run directories only.

Each study owns marked blocks ``<!-- ceiling:STUDY:SECTION begin -->`` … ``<!-- ceiling:STUDY:SECTION end -->`` in
the report file; everything between a pair is rewritten, everything outside is hand-written prose and kept.
Every number printed comes from a cell's ``eval.json`` (bpb, CIs, the Δ the evaluator computed) or is derived
from its per-document nats with the evaluator's own paired bootstrap (flat − ttt, the "seed's own delta");
on the synthetic corpus the exact bounds are recomputed for the evaluated tokens and context (``bounds.json``).
The tests read the tables back (tests/report_tables.py) to hold the report to the run directories.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import Cell, StudyConfig
from .ladder import ladder_tables
from .markdown import ci as _ci, link, num as _f, table
from .runner import RECORD, cell_done, model_done, read_json as _read

BOUNDS_FILE = "bounds.json"


@dataclass
class CellResult:
    cell: Cell
    dir: Path
    eval: dict[str, Any] | None  # None: not done
    record: dict[str, Any] | None
    model_summary: dict[str, Any] | None
    model_record: dict[str, Any] | None


def collect(study: StudyConfig) -> list[CellResult]:
    out = []
    for c in study.cells():
        d = study.cell_dir(c)
        done = cell_done(study, c, recorded=True)
        md = study.model_dir(c.model) if c.model.train is not None else None
        summ = _read(md / "summary.json") if md and model_done(study, c.model, recorded=True) else None
        out.append(CellResult(c, d, _read(d / "eval.json") if done else None, _read(d / RECORD) if done else None,
                              summ, _read(md / RECORD) if md else None))
    return out


# ---------------------------------------------------------------- numbers derived from one eval.json

def gain_over(ev: dict[str, Any], base: str, name: str) -> tuple[float, float, float] | None:
    """bpb(base) − bpb(name) with the cell's paired document bootstrap (the n, seed and level of its eval.json):
    flat − protocol is the seed's own delta, sliding − protocol the zero-room control's column."""
    per = ev.get("per_document")
    if not per or base not in per["nats"] or name not in per["nats"]:
        return None
    d = _paired(per["bytes"], ev["bootstrap"], np.asarray(per["nats"][base]), np.asarray(per["nats"][name]))
    return d.point, d.lo, d.hi


BOUNDS_VERSION = 2  # 2: the window bound of sliding's exact contexts at the cell's stride, per-document rooms


def _val_corpus_spec(pattern: str) -> dict[str, Any] | None:
    """The synthetic spec of the corpus the val pattern lies in (its meta.json), when it is one: a model may be
    evaluated on another variant of its corpus (``--val ... --allow-other-data``), whose bounds are the val's."""
    meta = _read(Path(pattern).parent / "meta.json")
    return meta["spec"] if meta and meta.get("format") == "metattt-synthetic" and "spec" in meta else None


def synthetic_bounds_for(cr: CellResult) -> dict[str, Any] | None:
    """Exact synthetic-corpus bounds for the tokens this cell evaluated (cached in the cell's ``bounds.json``):
    the chain, the Bayes reader of exactly the context sliding gives each target at the cell's context and stride
    (``window_bpb``, ``metattt.data.synthetic.protocol_bounds``), the reader of the whole document prefix, and
    each document's room (window − document, nats) so a share's interval can resample documents with their room."""
    ev = cr.eval
    am = (ev or {}).get("meta", {}).get("artifact_meta", {})
    if not ev or am.get("data") != "synthetic" or "synthetic_spec" not in am:
        return None
    n_tokens, context = int(ev["data"]["n_tokens"]), int(ev["config"]["context"])
    stride = int(ev["config"]["stride"])
    val_spec = _val_corpus_spec(ev["meta"]["val"])
    spec_dict = val_spec or am["synthetic_spec"]
    cache = _read(cr.dir / BOUNDS_FILE)
    # a cell brought back from another machine keeps its bounds even where its val corpus is not at hand
    if cache and (cache.get("n_tokens"), cache.get("context"), cache.get("stride"), cache.get("version")) == \
            (n_tokens, context, stride, BOUNDS_VERSION) and cache.get("spec") == (val_spec or cache.get("spec")):
        return cache
    from metattt.atomic import atomic_write

    # the same val tokens, context and stride give the same bounds in every cell: the val corpus's directory keeps
    # one copy (seconds to a minute of CPU for a long stream), best effort
    shared = Path(ev["meta"]["val"]).parent / f"bounds_c{context}_s{stride}_n{n_tokens}.json"
    out = _read(shared)
    if not out or (out.get("version"), out.get("spec")) != (BOUNDS_VERSION, spec_dict):
        out = _compute_bounds(ev["meta"]["val"], spec_dict, n_tokens, context, stride)
        if out is None:
            return None
        try:
            atomic_write(shared, json.dumps(out))
        except OSError:
            pass
    atomic_write(cr.dir / BOUNDS_FILE, json.dumps(out, indent=2))
    return out


def _compute_bounds(val: str, spec_dict: dict[str, Any], n_tokens: int, context: int, stride: int
                    ) -> dict[str, Any] | None:
    from metattt.data.loaders import load_val_tokens
    from metattt.data.synthetic import SyntheticSpec, protocol_bounds, synthetic_bounds
    from metattt.eval.windows import context_starts, sliding_plan

    spec = SyntheticSpec.from_dict(spec_dict)
    try:
        tokens = np.asarray(load_val_tokens(val, vocab_size=spec.vocab_size))[:n_tokens]
        b = synthetic_bounds(spec, tokens)
        pb = protocol_bounds(spec, tokens, context_starts(sliding_plan(tokens.size, context, stride)))
    except (FileNotFoundError, ValueError):
        return None
    return {"version": BOUNDS_VERSION, "spec": spec_dict, "n_tokens": n_tokens, "context": context, "stride": stride,
            "bigram_bpb": b["bigram_bpb"], "window_bpb": pb["window_bpb"], "bayes_unknown_bpb": pb["document_bpb"],
            "bayes_known_bpb": b["bayes_known_bpb"], "unigram_bpb": b["unigram_bpb"], "n_docs": b["n_docs"],
            "doc_room_nats": (pb["doc_window_nats"] - pb["doc_document_nats"]).tolist()}


ADAPTED = ("ttt:", "oracle:", "docttt:", "bayes-cache")  # protocols whose gain over sliding is set against the room


def _adapted(ev: dict[str, Any]) -> list[str]:
    return [n for n in ev["protocols"] if n.startswith(ADAPTED)] if "sliding" in ev["protocols"] else []


def room_share(ev: dict[str, Any], bd: dict[str, Any], name: str, base: str = "sliding"
               ) -> tuple[float, float, float] | None:
    """Share of the adaptation room that protocol ``name`` captures over ``base``, with the cell's bootstrap
    settings: Σ_d (base_d − name_d) / Σ_d room_d over documents (nats), each resample drawing documents *with their
    room* (the room varies per document: long documents hold most of it), so the interval carries the room's
    sampling variance too. None without per-document nats or a positive room."""
    from metattt.eval.stats import _resample_counts

    per = ev.get("per_document")
    room = np.asarray(bd.get("doc_room_nats", ()), dtype=np.float64)
    if not per or name not in per["nats"] or base not in per["nats"] or room.size != len(per["bytes"]) \
            or room.sum() <= 0:
        return None
    gain = np.asarray(per["nats"][base], dtype=np.float64) - np.asarray(per["nats"][name], dtype=np.float64)
    point = float(gain.sum() / room.sum())
    b = ev["bootstrap"]
    if b["n"] <= 0 or room.size < 2:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(b["seed"])
    parts = []
    for done in range(0, int(b["n"]), 128):  # blocks of resamples: (128, documents) counts at a time
        counts = _resample_counts(rng, room.size, min(128, int(b["n"]) - done))
        den = counts @ room
        parts.append((counts @ gain)[den > 0] / den[den > 0])
    samples = np.concatenate(parts)
    q = (1 - b["level"]) / 2
    return point, float(np.quantile(samples, q)), float(np.quantile(samples, 1 - q))


# ---------------------------------------------------------------- markdown

def _model_line(cr: CellResult) -> str:
    m = cr.cell.model
    if m.artifact is not None:
        meta = (cr.eval or {}).get("meta", {}).get("artifact_meta", {})
        steps = meta.get("steps")
        return f"artifact `{m.artifact}`" + (f" ({steps} training steps recorded in it)" if steps else "")
    s = cr.model_summary or {}
    cmd = (cr.model_record or {}).get("command", "?")
    seed = _flag_value(m.train or (), "--seed") or "1337 (trainer default)"
    return (f"trained: {s.get('steps', '?')} steps, {s.get('train_tokens', 0):,} tokens in "
            f"{s.get('train_time_s', 0):.0f} s, seed {seed}, {s.get('num_params', 0):,} parameters, flat val bpb "
            f"{_f(s.get('val_bpb_quant'))} after the artifact round trip; `{cmd}`")


def _flag_value(flags: tuple[str, ...], name: str) -> str | None:
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            return flags[i + 1]
        if f.startswith(name + "="):
            return f.split("=", 1)[1]
    return None


def _numerics(cfg: dict[str, Any], meta: dict[str, Any]) -> str:
    if not cfg.get("autocast"):
        return "float32 (--no-autocast)"
    return "bf16 autocast" if str(meta.get("device", "")).startswith("cuda") else "float32 (autocast applies on CUDA only)"


def cell_table(cr: CellResult) -> list[str]:
    ev = cr.eval
    assert ev is not None
    c, d, b, cfg = cr.cell, ev["data"], ev["bootstrap"], ev["config"]
    meta = ev.get("meta", {})
    lines = [f"#### `{c.ev.name}` on `{c.model.name}`", "",
             f"run dir: `{cr.dir}`", "",
             f"Model: {_model_line(cr)}.", "",
             # the val as the config writes it ($METATTT_DATA unexpanded), not eval.json's path on the cell's machine
             f"Evaluated {d['n_targets']:,} targets ({d['n_bytes']:,.0f} bytes, {d['n_docs']:,} documents) on "
             f"`{_flag_value(c.ev.flags, '--val') or _shown_path(meta.get('val', '?'))}`, "
             f"device {meta.get('device', '?')}, {_numerics(cfg, meta)}; context {cfg['context']}, "
             f"stride {cfg['stride']}, flat windows {cfg['seq_len']}, TTT chunks {cfg['chunk_tokens']:,} tokens"
             + (f", schedules indexed to a {cfg['schedule_horizon']:,}-token stream (--schedule-horizon)"
                if cfg.get("schedule_horizon") else "") + ". "
             f"95% CIs: paired bootstrap over documents, n={b['n']}, seed {b['seed']}. "
             "Δ vs base: flat → sliding is Δ_context, sliding → ttt:X is Δ_TTT (positive = second better); "
             "flat − protocol is the seed's own delta (context + adaptation).", "",
             *table("| protocol | bpb | bpb 95% CI | Δ vs base | Δ 95% CI | flat − protocol | "
                    "flat − protocol 95% CI | adapted scalars | tokens/s | legal |")]
    by_to = {v["to"]: v for v in ev["deltas"].values()}
    for name, p in ev["protocols"].items():
        dl = by_to.get(name)
        fm = gain_over(ev, "flat", name) if name != "flat" else None
        ap = p.get("adapter_params") or {}
        scal = f"{ap['adapted_scalars']:,}" if "adapted_scalars" in ap else ""
        lines.append(
            f"| {name} | {_f(p['bpb'])} | {_ci(*p['ci95'])} | {_f(dl['value'], True) if dl else ''} | "
            f"{_ci(*dl['ci95']) if dl else ''} | {_f(fm[0], True) if fm else ''} | {_ci(fm[1], fm[2]) if fm else ''} "
            f"| {scal} | {p['tokens_per_s']:,.0f} | {'yes' if p['legal'] else 'no (oracle)'} |")
    lines += instrument_lines(ev)
    bounds = synthetic_bounds_for(cr)
    if bounds:
        lines += [""] + bounds_table(ev, bounds)
    specs = meta.get("adapter_specs") or {}
    if specs:
        lines += ["", "Adapter specs: " + "; ".join(f"`{k}` = `{v}`" for k, v in specs.items())]
    cmd = (cr.record or {}).get("command") or " ".join(shlex.quote(a) for a in meta.get("argv", []))
    lines += ["", "```", cmd, "```", ""]
    return lines


def instrument_lines(ev: dict[str, Any]) -> list[str]:
    """eval.json schema 2's additions (issue 26), each when present (a schema-1 cell has none of them): which
    interval the CIs above carry, the hierarchical intervals over document orders / adapter seeds, Δ per
    position in document and per stream decile, what is carried across documents (and zeros that hold by
    construction), the equivalence table."""
    from metattt.eval.report import ONE_ORDER

    runs = ev.get("runs")
    if runs is None:
        return []
    lines = ["", f"Interval of the table above: {ONE_ORDER}."]
    if runs.get("deltas"):
        lines += ["", f"Δ over {runs['n_runs']} runs ({runs['interval']}):", "",
                  *table("| Δ | from → to | mean over runs | 95% CI (runs → documents) | per run |")]
        for k, d in runs["deltas"].items():
            lines.append(f"| {k} | {d['from']} → {d['to']} | {_f(d['value'], True)} | {_ci(*d['ci95'])} | "
                         + ", ".join(_f(v, True) for v in d["value_per_run"]) + " |")
    pp = ev.get("per_position") or {}
    keys = [k for k, v in ev["deltas"].items() if (ev["protocols"].get(v["to"]) or {}).get("adapter")
            and not k.startswith("total:")]
    for cut, title in (("doc_position", "position in document (target offset from its BOS)"),
                       ("stream_decile", "stream decile")):
        c = pp.get(cut) or {}
        rows = [(k, c["delta"][k]) for k in keys if k in (c.get("delta") or {})]
        if not rows:
            continue
        lines += ["", f"Δ by {title}, bits per byte within each bucket (share of the total Δ in brackets):", "",
                  *table("| Δ | " + " | ".join(c["labels"]) + " |")]
        for k, d in rows:
            lines.append(f"| {k} | " + " | ".join(f"{_f(v, True)} ({_f(sh, True)})"
                                                 for v, sh in zip(d["value"], d["share"])) + " |")
    for c in pp.get("carried") or []:
        lines += ["", f"Carried across documents: bpb({c['within_doc']}) − bpb({c['never']}) = "
                      f"{_f(c['carried'], True)} {_ci(*c['ci95'])} ({c['within_doc_updates']} within-document updates)."]
    for n, note in (pp.get("zero_by_construction") or {}).items():
        lines += ["", f"`{n}`: {note}."]
    costs = [(n, p["cost"], p["bpb"]) for n, p in ev["protocols"].items()
             if p.get("cost") and p.get("legal") and p.get("valid", True)]
    if costs:
        from .plots import pareto_front

        front = pareto_front([(c["device_s_per_token"], b) for _, c, b in costs])
        ffront = pareto_front([(c.get("flops_per_token") or float("inf"), b) for _, c, b in costs])
        unit = costs[0][1]["unit"].split(" ", 1)[0]
        lines += ["", f"Cost per scored token (timed part; warm-up excluded) and counted model FLOPs per scored token; "
                      "* = on the Pareto front of bpb against that cost:", "",
                  *table(f"| protocol | bpb | {unit} per token | GFLOPs per token | warm-up s |")]
        for (n, c, b), f, g in zip(costs, front, ffront):
            fl = c.get("flops_per_token")
            lines.append(f"| {n} | {_f(b)} | {c['device_s_per_token']:.3g}{' *' if f else ''} | "
                         f"{'n/a' if fl is None else f'{fl / 1e9:.3g}'}{' *' if g and fl is not None else ''} | "
                         f"{ev['protocols'][n].get('warmup_s', 0.0):.1f} |")
    eq = ev.get("equivalence")
    if eq and eq.get("rows"):
        lines += ["", f"Equivalence to no effect (TOST, margin ±{eq['margin_bpb']} bpb, Holm over the "
                      f"{len(eq['rows'])} adapters of this table, α = {eq['alpha']}):", "",
                  *table("| Δ | estimate | p (TOST) | p (Holm) | verdict |")]
        for k, r in eq["rows"].items():
            lines.append(f"| {k} | {_f(r['estimate'], True)} | {r['p']:.3g} | {r['p_holm']:.3g} | "
                         f"{'equivalent' if r['equivalent'] else 'not shown equivalent'} |")
    return lines


def bounds_table(ev: dict[str, Any], bd: dict[str, Any]) -> list[str]:
    """Section 6: the fractions of the exact context and adaptation rooms that model and adapters capture."""
    w, ad_room = bd["context"], bd["window_bpb"] - bd["bayes_unknown_bpb"]
    ctx_room = bd["bigram_bpb"] - bd["window_bpb"]
    sl = ev["protocols"].get("sliding", {}).get("bpb")
    ctx = _context_captured(sl, bd)
    lines = [f"Exact bounds on these {bd['n_tokens']:,} tokens: global chain {_f(bd['bigram_bpb'])}, Bayes reader of "
             f"each target's sliding context ({w}-token windows) {_f(bd['window_bpb'])}, Bayes reader of the whole "
             "document "
             f"{_f(bd['bayes_unknown_bpb'])} (θ known {_f(bd['bayes_known_bpb'])}). Context room (chain − window) "
             f"{_f(ctx_room)}; adaptation room (window − whole document) {_f(ad_room)}. The sliding model captures "
             f"{ctx or 'n/a'} of the context room "
             f"((chain − sliding) / room); its own gap to the window bound is {_f(sl - bd['window_bpb'] if sl else None)}."
             f" The window bound is exact for sliding's contexts at stride {bd.get('stride', '?')}; the fraction is "
             "Σ gain / Σ room over documents, its CI a document bootstrap that resamples each document with its "
             "room." + _caution(sl, bd), "",
             *table("| protocol | Δ_TTT | adaptation room | fraction of adaptation room | fraction 95% CI | "
                    "context captured by the model |")]
    for key in _adapted(ev):
        share, g = room_share(ev, bd, key), gain_over(ev, "sliding", key)
        fr, lo, hi = share if share else (float("nan"), None, None)
        lines.append(f"| {key} | {_f(g[0] if g else None, True)} | {_f(ad_room)} | {_f(fr, True)} | "
                     f"{_ci(lo, hi)} | {ctx or ''} |")
    return lines


def _paired(nbytes: list, bs: dict, a_nats: np.ndarray, b_nats: np.ndarray):
    """bpb(a) − bpb(b) of two per-document nats vectors on the same documents, with the cells' bootstrap."""
    from metattt.eval.stats import bootstrap

    _, diffs = bootstrap({"a": a_nats, "b": b_nats}, np.asarray(nbytes), [("a", "b")], n_boot=bs["n"],
                         seed=bs["seed"], level=bs["level"])
    return diffs[("a", "b")]


def _same_docs(r: CellResult, ref: CellResult) -> tuple[dict, dict] | None:
    per, per_ref = (x.eval.get("per_document") if x.eval else None for x in (r, ref))
    if not per or not per_ref or per["bytes"] != per_ref["bytes"]:
        return None  # not the same documents: nothing to pair
    return per, per_ref


def _delta_rows(r: CellResult, ref: CellResult, label: str) -> list[str]:
    """Each Δ (from → to) of ``r`` minus the same Δ of ``ref``, paired over documents."""
    both = _same_docs(r, ref)
    if both is None:
        return []
    per, per_ref = both
    rows = []
    for key, dl in r.eval["deltas"].items():
        rd = ref.eval["deltas"].get(key)
        a, b = dl["from"], dl["to"]
        if rd is None or (rd["from"], rd["to"]) != (a, b) or b not in per_ref["nats"]:
            continue
        gains = [np.asarray(pd["nats"][a]) - np.asarray(pd["nats"][b]) for pd in (per, per_ref)]
        d = _paired(per["bytes"], r.eval["bootstrap"], *gains)
        rows.append(f"| {label} | {a} → {b} | {_f(dl['value'], True)} | {_f(rd['value'], True)} | "
                    f"{_f(d.point, True)} | {_ci(d.lo, d.hi)} |")
    return rows


def cross_model_table(done: list[CellResult]) -> list[str]:
    """For the models of one section scored with the same evaluator flags (one setting, or several, e.g. a
    model-specific protocol list): each model's Δ minus the group's first model's, paired over documents (the
    same documents, one bootstrap). Per-cell CIs cannot answer "does the model (its meta-training, say) change
    Δ_TTT?": they ignore that both models were scored on the same documents."""
    groups: dict[tuple[str, tuple[str, ...]], list[CellResult]] = {}
    for r in done:
        groups.setdefault((r.cell.ev.section, tuple(r.cell.ev.flags)), []).append(r)
    lines: list[str] = []
    head = "| model vs reference | delta | Δ (model) | Δ (reference) | difference | difference 95% CI |"
    for rs in groups.values():
        ref = rs[0]
        rows = [row for r in rs[1:] if r.cell.model.name != ref.cell.model.name
                for row in _delta_rows(r, ref, f"`{r.cell.model.name}` vs `{ref.cell.model.name}`")]
        if rows:
            names = ", ".join(f"`{n}`" for n in dict.fromkeys(r.cell.ev.name for r in rs))
            lines += [f"**{names}: each model's Δ minus `{ref.cell.model.name}`'s, paired over the same documents** "
                      f"(positive = the model gains more; CI: document bootstrap, n={ref.eval['bootstrap']['n']}).",
                      "", *table(head, rows), ""]
    return lines


def cross_setting_table(done: list[CellResult]) -> list[str]:
    """For the settings of one sweep (``name.flag=value``) on one model: each setting's bpb per protocol and its
    Δs minus the sweep's first setting's, paired over documents (e.g. float32 − bf16 with a CI)."""
    by: dict[tuple[str, str], list[CellResult]] = {}
    for r in done:
        if "." in r.cell.ev.name:
            by.setdefault((r.cell.model.name, r.cell.ev.name.split(".", 1)[0]), []).append(r)
    lines: list[str] = []
    head = "| setting vs reference | quantity | value | reference | difference | difference 95% CI |"
    for (model, family), rs in by.items():
        ref = rs[0]
        rows = []
        for r in rs[1:]:
            both = _same_docs(r, ref)
            if both is None:
                continue
            per, per_ref = both
            label = f"`{r.cell.ev.name.split('.', 1)[1]}` vs `{ref.cell.ev.name.split('.', 1)[1]}`"
            for p, pv in r.eval["protocols"].items():
                rp = ref.eval["protocols"].get(p)
                if rp is None or p not in per["nats"] or p not in per_ref["nats"]:
                    continue
                d = _paired(per["bytes"], r.eval["bootstrap"], np.asarray(per["nats"][p]),
                            np.asarray(per_ref["nats"][p]))
                rows.append(f"| {label} | bpb {p} | {_f(pv['bpb'])} | {_f(rp['bpb'])} | {_f(d.point, True)} | "
                            f"{_ci(d.lo, d.hi)} |")
            rows += _delta_rows(r, ref, label)
        if rows:
            lines += [f"**`{family}` on `{model}`: each setting minus `{ref.cell.ev.name.split('.', 1)[1]}`, paired "
                      f"over the same documents** (bpb rows: positive = the setting scores worse; Δ rows: "
                      f"positive = it gains more; CI: document bootstrap, n={ref.eval['bootstrap']['n']}).",
                      "", *table(head, rows), ""]
    return lines


def _caution(sliding: float | None, bd: dict[str, Any]) -> str:
    """Said whenever the model's gap to the window bound exceeds the adaptation room (as in the trainer's report)."""
    gap, room = _gap_over_room(sliding, bd)
    if gap is None or room <= 0 or gap <= 1:
        return ""
    return (f" Caution: that gap is {gap:.1f}× the adaptation room, so an adapter can also gain by plain further "
            "learning of what the window already shows; fractions near or above 1 mean exactly that.")


def _gap_over_room(sliding: float | None, bd: dict[str, Any]) -> tuple[float | None, float]:
    room = bd["window_bpb"] - bd["bayes_unknown_bpb"]
    if sliding is None or room <= 0:
        return None, room
    return (sliding - bd["window_bpb"]) / room, room


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _context_captured(sliding: float | None, bd: dict[str, Any]) -> str | None:
    """The share of the context room (chain − window) that sliding captures, in percent; None without a room."""
    room = bd["bigram_bpb"] - bd["window_bpb"]
    return _pct((bd["bigram_bpb"] - sliding) / room) if sliding is not None and room > 0 else None


SUMMARY_LEAD = ("Across cells (synthetic bounds; fraction of the adaptation room each protocol captures over "
                "sliding, Σ gain / Σ room over documents, 95% CI of a document bootstrap that resamples each "
                "document with its room, in brackets; a zero-room cell shows its gain over sliding in bpb):")


def summary_table(done: list[CellResult]) -> list[str]:
    """Section 6 at a glance: one row per cell, so the fractions can be read against model size and training."""
    rows = []
    keys: list[str] = []
    for r in done:
        bd = synthetic_bounds_for(r)
        if not bd:
            continue
        rows.append((r, bd))
        keys += [k for k in _adapted(r.eval) if k not in keys]
    if not rows:
        return []
    head = ("| model | setting | parameters | steps | train tokens | sliding bpb | context captured | "
            "(sliding − window) / adaptation room | " + " | ".join(keys) + " |")
    lines = [SUMMARY_LEAD, "", *table(head)]
    for r, bd in rows:
        ev, s = r.eval, r.model_summary or {}
        sl = ev["protocols"].get("sliding", {}).get("bpb")
        ctx = _context_captured(sl, bd) or "n/a"
        gap, room = _gap_over_room(sl, bd)
        cells = []
        for k in keys:
            if k not in ev["protocols"]:
                cells.append("")
            elif room <= 0:  # the zero-room control: no room to share, so the gain over sliding itself (bpb)
                g = gain_over(ev, "sliding", k)
                cells.append("" if g is None else f"Δ {_f(g[0], True)} {_ci(g[1], g[2])} (room 0)")
            else:
                share = room_share(ev, bd, k)
                cells.append("" if share is None else f"{_pct(share[0])} [{_pct(share[1])}, {_pct(share[2])}]")
        lines.append(f"| {r.cell.model.name} | {r.cell.ev.name} | {s.get('num_params', 0):,} | {s.get('steps', '?')} | "
                     f"{s.get('train_tokens', 0):,} | {_f(sl)} | {ctx} | {'n/a' if gap is None else f'{gap:.1f}'} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def render_section(study: StudyConfig, section: str, results: list[CellResult], plots: list[Path],
                   report_dir: Path) -> list[str]:
    mine = [r for r in results if r.cell.ev.section == section]
    done = [r for r in mine if r.eval is not None]
    missing = [r for r in mine if r.eval is None]
    cfg = study.source or "CONFIG"
    lines = [f"_Generated by `python experiments/ceiling.py --config {cfg}` from {len(done)} of {len(mine)} "
             f"configured cells (study `{study.name}`, root `{study.root}`); edit only outside the markers._", ""]
    if missing:
        lines += missing_list(missing, cfg)
    lines += summary_table(done)
    if study.arms is not None and study.arms.section == section:  # decay branches too, but arms, not a ladder
        from .arms import arms_section

        lines += arms_section(study, done, report_dir)
    else:
        lines += ladder_tables(done)
    for r in done:
        lines += cell_table(r)
    lines += cross_model_table(done) + cross_setting_table(done)
    for p in plots:
        lines += [f"![{p.stem}]({link(p, report_dir)})", ""]
    return lines


def missing_list(missing: list[CellResult], cfg: str) -> list[str]:
    """The configured cells without a complete run directory, by model, each with the command that runs them
    (``--only MODEL`` trains what the model needs and evaluates its cells; done cells are skipped)."""
    by: dict[str, list[str]] = {}
    for r in missing:
        by.setdefault(r.cell.model.name, []).append(r.cell.ev.name)
    lines = [f"**Still missing** ({len(missing)} configured cells without a complete run directory; each command "
             "runs that model's missing cells and skips the done ones):", ""]
    lines += [f"- `{m}`: {', '.join(f'`{e}`' for e in evs)} — "
              f"`python experiments/ceiling.py --config {cfg} --only {m}`" for m, evs in by.items()]
    return lines + [""]


def _shown_path(path: str) -> str:
    """A path under the working directory is shown relative to it, so the report does not name this machine."""
    try:
        return Path(path).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path


def markers(study: StudyConfig, section: str) -> tuple[str, str]:
    tag = f"ceiling:{study.name}:{section}"
    return f"<!-- {tag} begin -->", f"<!-- {tag} end -->"


def splice(text: str, begin: str, end: str, body: list[str], title: str) -> str:
    """Replace the block between ``begin`` and ``end`` (appended, with a heading, when absent)."""
    block = "\n".join([begin, *body, end])
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        return pre + block + post
    sep = "" if text.endswith("\n") or not text else "\n"
    return f"{text}{sep}\n## {title}\n\n{block}\n"


def cells_behind(text: str, begin: str, end: str) -> int | None:
    """How many complete cells the block between the markers was generated from (its first line says), if any."""
    if begin not in text or end not in text:
        return None
    m = re.search(r"^_Generated by .*? from (\d+) of \d+ configured cells", text.split(begin, 1)[1].split(end, 1)[0],
                  re.M)
    return int(m.group(1)) if m else None


def write_report(study: StudyConfig, log=print, replace_fewer: bool = False) -> dict[str, list[str]]:
    """Regenerate this study's sections in ``study.report`` and its plots; returns section -> body lines.

    Run directories live in the ignored ``runs/`` of the machine that made them; a section generated from more
    complete cells than this machine holds is kept (with a note in the log), not overwritten by a poorer one, unless
    ``replace_fewer``: a report regenerated on a fresh checkout would otherwise silently drop measured results."""
    from .plots import section_plots

    results = collect(study)
    report = study.report
    text = report.read_text(encoding="utf-8") if report.is_file() else "# The ceiling study\n"
    bodies = {}
    for section, title in study.sections.items():
        mine = [r for r in results if r.cell.ev.section == section and r.eval is not None]
        begin, end = markers(study, section)
        before = cells_behind(text, begin, end)
        if not replace_fewer and before is not None and before > len(mine):
            log(f"kept section {section} of {report}: it was generated from {before} complete cells and only "
                f"{len(mine)} are under {study.root} (run --report-only with --replace-fewer to regenerate it anyway)")
            continue
        bounds = [synthetic_bounds_for(r) for r in mine]
        plots = section_plots(study.plots, f"{study.name}-s{section}", mine, bounds)
        body = render_section(study, section, results, plots, report.parent)
        text = splice(text, begin, end, body, f"{section}. {title}")
        bodies[section] = body
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")
    log(f"wrote {report} ({', '.join(study.sections)})")
    return bodies
