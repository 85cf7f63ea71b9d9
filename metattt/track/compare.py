"""Ablation comparison across run directories: ``python -m metattt compare RUN_DIR... [options]``.

Per group of runs (``--by`` dotted config fields; default: the config leaves that differ between runs, minus
per-run bookkeeping): n, mean ± Student-t CI over seeds; with ``--baseline``, Δ to the baseline group paired on
the seed, its t-CI and paired t-test. A malformed or metric-less run is named on stderr and in the footer, never
averaged in. Lookup rules: :func:`find_field` (grouping fields), :func:`metric_value` and ``--help`` (metrics).
Outputs (written by the command, :mod:`metattt.track.compare_cli`): markdown on stdout; ``--out DIR`` adds
compare.md/.csv/.json, runs.csv and PNG plots. ``--wandb-project`` reads the online wandb API only (METRIC_HELP).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from metattt.track.rundir import READABLE_EVAL_SCHEMAS, MalformedRunDir, RunDir, is_run_dir
from metattt.track.stats import MeanCI, PairedTest, mean_ci, paired_ttest

#: Aliases tried (in order) after the exact ``--metric`` name; METRIC_HELP documents the names users type.
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    "context_delta": ("deltas.context",),
    "bpb": ("val_bpb_quant", "val_bpb"),
    "quant_gap": ("quant_gap_bpb",),
}
METRIC_HELP = """metric names (--metric):
  ttt_delta           the run's single TTT gain deltas["ttt:<adapter>"].value in eval.json (positive = TTT better)
  ttt_delta:ADAPTER   deltas["ttt:ADAPTER"].value (when eval.json holds several TTT protocols)
  bpb:PROTOCOL        protocols[PROTOCOL].bpb in eval.json (bpb:sliding, bpb:flat, bpb:ttt:sgd)
  context_delta       deltas.context.value (flat -> sliding)
  runs.deltas.KEY.value  the mean over document orders / adapter seeds (eval.json schema 2, --orders/--adapt-seeds)
  bpb                 summary.json val_bpb_quant (after the artifact round trip), else val_bpb
  any dotted path     into eval.json, then summary.json, then the last metrics.jsonl record holding it

runs from wandb (--wandb-project) need the online API; for offline runs pass their run directories
(wandb has no public reader for offline .wandb files; the run directory holds the same data)."""

#: When a metric resolves to an object, the first of these fields is the number.
VALUE_FIELDS = ("mean", "value", "estimate", "point")
#: Learning-curve keys tried in validation records of metrics.jsonl when --curve-key is not given.
CURVE_KEYS = ("val_bpb", "bpb", "val_loss", "loss")
#: eval.json fields holding running Δ_TTT curves: the evaluator's ``{"ttt:X": {"chunk", "delta_bpb",
#: "block_tokens"}}`` (curves whose key starts with "ttt:" are plotted), or a list of numbers, a list of
#: [x, y], or {"x": [], "y": []}.
RUNNING_DELTA_KEYS = ("running_delta", "ttt.running_delta", "curves.running_delta", "delta_curve")
#: Config leaves never used for automatic grouping (seed is the pairing key; the rest differ per run).
AUTO_BY_EXCLUDE = ("seed", "name", "dir", "path", "time", "wandb", "tag", "note", "date", "host", "run_id")

_MISSING: Any = object()


class CompareError(Exception):
    """A usage problem that stops the whole comparison (bad option, ambiguous field)."""


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    """Everything compare needs from one run, whether read from a run directory or the wandb API."""

    name: str
    path: Path | None
    config: dict[str, Any]
    summary: dict[str, Any]
    eval: dict[str, Any]
    metrics: list[dict[str, Any]]
    source: str = "dir"


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


def load_run(path: Path | str) -> RunRecord:
    """Read one run directory completely (MalformedRunDir on any unreadable part)."""
    rd = RunDir.open(path)
    assert rd.path is not None
    schema = (rd.eval or {}).get("schema")
    if schema is not None and schema not in READABLE_EVAL_SCHEMAS:  # /2 adds sections; every /1 field stays
        raise MalformedRunDir(rd.path, f"eval.json schema {schema!r} is not one this version reads "
                                       f"({', '.join(READABLE_EVAL_SCHEMAS)}); use the metattt version that wrote it")
    return RunRecord(name=rd.path.name or str(rd.path), path=rd.path, config=rd.config or {},
                     summary=rd.summary or {}, eval=rd.eval or {}, metrics=rd.metrics())


def expand_run_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Each path as given, except a non-run directory whose children include run dirs → those children."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not is_run_dir(p):
            children = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c))
            if children:
                out.extend(children)
                continue
        out.append(p)
    return out


def load_runs(paths: Iterable[Path | str]) -> tuple[list[RunRecord], list[Skipped]]:
    runs: list[RunRecord] = []
    skipped: list[Skipped] = []
    for p in expand_run_paths(paths):
        try:
            runs.append(load_run(p))
        except MalformedRunDir as e:
            skipped.append(Skipped(str(p), e.reason))
    return runs, skipped


# ---------------------------------------------------------------------------------------------- lookup
def get_path(obj: Any, dotted: str) -> Any:
    """Value at a dotted path; a key that itself contains dots (``{"bpb.sliding": x}``) is found too."""

    def rec(cur: Any, parts: list[str]) -> Any:
        if not parts:
            return cur
        for i in range(len(parts), 0, -1):
            key = ".".join(parts[:i])
            if isinstance(cur, Mapping) and key in cur:
                r = rec(cur[key], parts[i:])
                if r is not _MISSING:
                    return r
            elif isinstance(cur, list) and i == 1 and key.lstrip("-").isdigit() and -len(cur) <= int(key) < len(cur):
                r = rec(cur[int(key)], parts[1:])
                if r is not _MISSING:
                    return r
        return _MISSING

    return rec(obj, dotted.split(".")) if dotted else _MISSING


def leaf_paths(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """All (dotted path, value) leaves of nested dicts (lists are leaves)."""
    if isinstance(obj, Mapping) and obj:
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out.extend(leaf_paths(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, obj)] if prefix else []


def suffix_matches(obj: Any, dotted: str) -> list[tuple[str, Any]]:
    """Nested paths (leaves or sub-objects) ending with ``.dotted``."""
    found: list[tuple[str, Any]] = []

    def walk(cur: Any, prefix: str) -> None:
        if not isinstance(cur, Mapping):
            return
        for k, v in cur.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            if p.endswith("." + dotted):
                found.append((p, v))
            walk(v, p)

    walk(obj, "")
    return found


def find_field(sources: Sequence[tuple[str, Mapping[str, Any]]], dotted: str) -> tuple[Any, str | None]:
    """Look ``dotted`` up in each (label, dict) source: exact path first, then a unique suffix match.

    Returns (value, "label:path") or (_MISSING, None); an ambiguous suffix raises CompareError.
    """
    for label, src in sources:
        v = get_path(src, dotted)
        if v is not _MISSING:
            return v, f"{label}:{dotted}"
    for label, src in sources:
        hits = suffix_matches(src, dotted)
        if len(hits) == 1:
            return hits[0][1], f"{label}:{hits[0][0]}"
        if len(hits) > 1:
            paths = ", ".join(p for p, _ in hits)
            raise CompareError(f"field {dotted!r} is ambiguous in {label} ({paths}); pass one of these dotted paths")
    return _MISSING, None


def _as_number(v: Any) -> Any:
    if isinstance(v, Mapping):
        for f in VALUE_FIELDS:
            if f in v:
                return _as_number(v[f])
        return _MISSING
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _MISSING
    return float(v)


def _metric_names(run: RunRecord, metric: str) -> list[str]:
    """Candidate dotted paths for ``metric`` in this run (exact, static aliases, evaluator-schema forms)."""
    names = [metric, *METRIC_ALIASES.get(metric, ())]
    m = re.fullmatch(r"(bpb|ttt_delta)[:.](.+)", metric, re.S)  # bpb:PROTOCOL, ttt_delta:ADAPTER (or with a dot)
    if m:
        kind, rest = m.groups()
        names += [f"protocols.{rest}.bpb"] if kind == "bpb" else [f"deltas.ttt:{rest}", f"deltas.{rest}"]
    if metric == "ttt_delta":
        deltas = run.eval.get("deltas")
        ttt = sorted(k for k in deltas if str(k).startswith("ttt:")) if isinstance(deltas, Mapping) else []
        if len(ttt) > 1:
            choices = ", ".join("ttt_delta:" + k[len("ttt:"):] for k in ttt)
            raise CompareError(f"run {run.name}: eval.json has several TTT deltas; pick one with --metric ({choices})")
        names += [f"deltas.{k}" for k in ttt]
    return names


def _last_record_with(records: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    return next((rec for rec in reversed(records) if get_path(rec, name) is not _MISSING), {})  # the latest wins


def metric_value(run: RunRecord, metric: str) -> tuple[float, str]:
    """(value, where it came from) for ``metric``; KeyError with a reason when absent or not a number.

    Order: eval.json then summary.json (exact name, then aliases), then the last metrics.jsonl record
    holding the name (exact, then aliases), then a unique suffix match in eval.json / summary.json.
    Final files win over the log because they hold the authoritative (e.g. post-quantization) numbers.
    """
    names = _metric_names(run, metric)
    finals = (("eval.json", run.eval), ("summary.json", run.summary))
    candidates = [(label, src, n) for n in names for label, src in finals]
    candidates += [("metrics.jsonl", _last_record_with(run.metrics, n), n) for n in names]
    found = next(((get_path(src, name), f"{label}:{name}") for label, src, name in candidates
                  if get_path(src, name) is not _MISSING), None) or find_field(finals, metric)
    raw, where = found
    if raw is _MISSING:
        raise KeyError(f"metric {metric!r} not found in eval.json, summary.json or metrics.jsonl")
    num = _as_number(raw)
    if num is _MISSING:
        raise KeyError(f"metric {metric!r} at {where} is not a number ({_short(raw)})")
    return num, str(where)


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _fmt_value(v: Any) -> str:
    if v is _MISSING or v is None:
        return "(missing)"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return repr(v)
    return json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)


def _sort_key(v: Any) -> tuple[int, Any]:
    if v is _MISSING or v is None:
        return (2, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v))
    return (1, _fmt_value(v))


def auto_group_fields(runs: Sequence[RunRecord]) -> list[str]:
    """Config leaves whose values differ between runs, minus per-run bookkeeping (see AUTO_BY_EXCLUDE)."""
    per_run = [dict(leaf_paths(r.config)) for r in runs]
    keys = sorted({k for d in per_run for k in d})
    out = []
    for k in keys:
        last = k.split(".")[-1].lower()
        if any(x in last for x in AUTO_BY_EXCLUDE):
            continue
        vals = {json.dumps(d.get(k, "__missing__"), sort_keys=True, default=str) for d in per_run}
        if len(vals) > 1:
            out.append(k)
    return out


# ---------------------------------------------------------------------------------------------- compare
@dataclass
class RunValue:
    run: RunRecord
    group: str
    seed: Any
    value: float
    source: str


@dataclass
class GroupResult:
    label: str
    key: tuple[Any, ...]
    runs: list[RunValue]
    ci: MeanCI
    seeds: list[Any]
    is_baseline: bool = False
    paired: PairedTest | None = None
    unpaired_delta: float | None = None  # difference of means when no seed is shared with the baseline

    @property
    def delta(self) -> float | None:
        return self.paired.mean_diff if self.paired is not None else self.unpaired_delta


@dataclass
class Comparison:
    metric: str
    by: list[str]
    seed_key: str
    level: float
    groups: list[GroupResult]
    baseline: str | None
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def values(self) -> list[RunValue]:
        return [rv for g in self.groups for rv in g.runs]


def _by_value(run: RunRecord, f: str) -> Any:
    v, _ = find_field([("config.json", run.config), ("eval.json", run.eval), ("summary.json", run.summary)], f)
    return v


def _label(by: Sequence[str], key: Sequence[Any]) -> str:
    if not by:
        return "all"
    return ", ".join(f"{b}={_fmt_value(v)}" for b, v in zip(by, key))


def _resolve_baseline(baseline: str, groups: Sequence[GroupResult], by: Sequence[str]) -> GroupResult:
    for g in groups:
        if baseline == g.label:
            return g
    for g in groups:  # values only: "none" or "sgd,0.01"
        vals = [_fmt_value(v) for v in g.key]
        if baseline in (",".join(vals), ", ".join(vals)):
            return g
    bpath = Path(baseline)
    for g in groups:
        for rv in g.runs:
            if rv.run.name == baseline or (rv.run.path is not None and bpath.exists() and rv.run.path.resolve() == bpath.resolve()):
                return g
    labels = "; ".join(g.label for g in groups)
    raise CompareError(f"baseline {baseline!r} matches no group label, group value or run (groups: {labels})")


def compare_runs(runs: Sequence[RunRecord], *, metric: str = "ttt_delta", by: Sequence[str] | None = None,
                 baseline: str | None = None, seed_key: str = "seed", level: float = 0.95,
                 skipped: Sequence[Skipped] = ()) -> Comparison:
    """Group runs, compute per-group t-CIs and paired deltas to the baseline group (pure function)."""
    skipped = list(skipped)
    warnings: list[str] = []
    kept: list[tuple[RunRecord, float, str]] = []
    for run in runs:
        try:
            value, source = metric_value(run, metric)
        except KeyError as e:
            skipped.append(Skipped(run.name, str(e.args[0])))
            continue
        if not math.isfinite(value):
            skipped.append(Skipped(run.name, f"metric {metric!r} is {value} ({source})"))
            continue
        kept.append((run, value, source))
    by = list(by) if by is not None else auto_group_fields([r for r, _, _ in kept])
    grouped: dict[tuple[str, ...], list[RunValue]] = {}
    keys: dict[tuple[str, ...], tuple[Any, ...]] = {}
    for run, value, source in kept:
        key = tuple(_by_value(run, f) for f in by)
        skey = tuple(json.dumps(_fmt_value(v)) for v in key)
        seed = get_path(run.config, seed_key)  # exact path only: a nested "seed" may be e.g. a bootstrap seed
        if seed is _MISSING or seed is None:
            seed = None
            warnings.append(f"run {run.name}: no {seed_key!r} in config.json; it cannot be paired")
        elif isinstance(seed, (list, dict)):
            seed = json.dumps(seed, sort_keys=True)  # hashable pairing key
        grouped.setdefault(skey, []).append(RunValue(run, _label(by, key), seed, value, source))
        keys[skey] = key

    groups: list[GroupResult] = []
    for skey, rvs in grouped.items():
        key = keys[skey]
        seeds = [rv.seed for rv in rvs]
        dup = sorted({_fmt_value(s) for s in seeds if s is not None and seeds.count(s) > 1})
        if dup:
            warnings.append(f"group {_label(by, key)}: seeds {', '.join(dup)} occur more than once "
                            "(missing a --by field?); duplicates are averaged for pairing")
        groups.append(GroupResult(_label(by, key), key, rvs, mean_ci([rv.value for rv in rvs], level), seeds))
    groups.sort(key=lambda g: tuple(_sort_key(v) for v in g.key))

    base: GroupResult | None = None
    if baseline is not None:
        if not groups:
            raise CompareError(f"baseline {baseline!r} given but no run has metric {metric!r}")
        base = _resolve_baseline(baseline, groups, by)
        base.is_baseline = True
        groups.remove(base)
        groups.insert(0, base)
        base_by_seed = _per_seed(base)
        for g in groups:
            if g is base:
                continue
            mine = _per_seed(g)
            common = sorted((s for s in mine if s in base_by_seed), key=_sort_key)
            if common:
                g.paired = paired_ttest([mine[s] for s in common], [base_by_seed[s] for s in common], level)
            else:
                g.unpaired_delta = g.ci.mean - base.ci.mean
                warnings.append(f"group {g.label}: no seed shared with the baseline; Δ is a difference of means, untested")
    return Comparison(metric, by, seed_key, level, groups, base.label if base else None, skipped, warnings)


def _per_seed(g: GroupResult) -> dict[Any, float]:
    acc: dict[Any, list[float]] = {}
    for rv in g.runs:
        if rv.seed is not None:
            acc.setdefault(rv.seed, []).append(rv.value)
    return {s: math.fsum(v) / len(v) for s, v in acc.items()}


# ---------------------------------------------------------------------------------------------- render
def _f(x: float | None, prec: int) -> str:
    return "—" if x is None else f"{x:.{prec}f}"


def _pm(x: float | None, half_width: float | None, prec: int) -> str:
    return _f(x, prec) if half_width is None else f"{_f(x, prec)} ± {_f(half_width, prec)}"


def _p(p: float | None) -> str:
    return "—" if p is None else "<1e-6" if p < 1e-6 else f"{p:.3g}"


def _seeds_str(seeds: Sequence[Any]) -> str:
    return ",".join(_fmt_value(s) for s in sorted(seeds, key=_sort_key)) if any(s is not None for s in seeds) else "—"


def to_markdown(cmp: Comparison, precision: int = 4) -> str:
    pct = f"{100 * cmp.level:g}%"
    head = ["group", "n", "seeds", f"{cmp.metric} mean ± {pct} CI"]
    if cmp.baseline is not None:
        head += [f"Δ vs baseline ± {pct} CI", "pairs", "p (paired t)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in cmp.groups:
        mean = _pm(g.ci.mean, g.ci.half_width, precision) + (" (n=1)" if g.ci.half_width is None else "")
        label = f"{g.label} (baseline)" if g.is_baseline else g.label
        row = [label, str(g.ci.n), _seeds_str(g.seeds), mean]
        if cmp.baseline is not None:
            if g.is_baseline:
                row += ["—", "—", "—"]
            elif g.paired is not None:
                pt = g.paired
                row += [_pm(pt.mean_diff, pt.half_width, precision) + (" (n=1)" if pt.n == 1 else ""), str(pt.n),
                        _p(pt.p_value)]
            else:
                row += [f"{_f(g.unpaired_delta, precision)} (unpaired)", "0", "—"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    by = ", ".join(cmp.by) if cmp.by else "(none: one group)"
    lines.append(f"Metric `{cmp.metric}`; groups by {by}; CI: two-sided {pct} Student t over runs (none for n=1).")
    if cmp.baseline is not None:
        lines.append(f"Δ = group − baseline `{cmp.baseline}`, paired on `{cmp.seed_key}` (seeds in both groups); "
                     "p: two-sided paired t-test (needs ≥ 2 pairs).")
    lines += [f"- warning: {w}" for w in cmp.warnings]
    if cmp.skipped:
        lines.append(f"Skipped runs ({len(cmp.skipped)}):")
        lines += [f"- `{s.name}`: {s.reason}" for s in cmp.skipped]
    else:
        lines.append("Skipped runs: none.")
    return "\n".join(lines) + "\n"


def group_record(cmp: Comparison, g: GroupResult) -> dict[str, Any]:
    """One group as a flat record (a compare.csv row; compare.json adds its runs). None = not applicable."""
    pt = g.paired
    return {"group": g.label, **{b: _fmt_value(v) for b, v in zip(cmp.by, g.key)},
            "is_baseline": int(g.is_baseline), "n": g.ci.n, "seeds": _seeds_str(g.seeds), "mean": g.ci.mean,
            "sd": g.ci.sd, "ci_half": g.ci.half_width, "ci_lo": g.ci.lo, "ci_hi": g.ci.hi,
            "delta": None if g.is_baseline else g.delta, "delta_sd": pt and pt.sd_diff,
            "delta_ci_half": pt and pt.half_width, "n_pairs": pt and pt.n, "t": pt and pt.t, "df": pt and pt.df,
            "p_value": pt and pt.p_value, "runs": ";".join(rv.run.name for rv in g.runs)}


def _csv(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buf = io.StringIO()  # csv writes None as "" and floats at full precision (repr)
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_csv(cmp: Comparison) -> str:
    rows = [group_record(cmp, g) for g in cmp.groups]
    return _csv(rows, list(rows[0]) if rows else ["group", *cmp.by])


def runs_csv(cmp: Comparison) -> str:
    rows = [{"run": rv.run.name, "group": rv.group, "seed": _fmt_value(rv.seed), "value": rv.value,
             "source": rv.source, "path": str(rv.run.path or "")} for rv in cmp.values]
    rows += [{"run": s.name, "group": "(skipped)", "source": s.reason} for s in cmp.skipped]
    return _csv(rows, ["run", "group", "seed", "value", "source", "path"])


def to_json(cmp: Comparison) -> dict[str, Any]:
    groups = [{**group_record(cmp, g), "key": [None if v is _MISSING else v for v in g.key],
               "runs": [{"name": rv.run.name, "seed": rv.seed, "value": rv.value, "source": rv.source}
                        for rv in g.runs]} for g in cmp.groups]
    return {"metric": cmp.metric, "by": cmp.by, "seed_key": cmp.seed_key, "level": cmp.level,
            "baseline": cmp.baseline, "groups": groups,
            "skipped": [{"name": s.name, "reason": s.reason} for s in cmp.skipped], "warnings": cmp.warnings}


# ---------------------------------------------------------------------------------------------- wandb
def load_wandb_runs(project: str, *, entity: str | None = None, group: str | None = None) -> list[RunRecord]:
    """Read finished/online runs through the wandb public API (guarded: clear errors when impossible)."""
    from metattt.track.wandb_log import INSTALL_HINT, _import_wandb, api_key_configured

    wandb = _import_wandb()
    if wandb is None:
        raise CompareError(f"--wandb-project needs wandb: {INSTALL_HINT}")
    if not api_key_configured():
        raise CompareError("--wandb-project reads the wandb API, which needs an API key (wandb login or "
                           "WANDB_API_KEY); for offline runs pass their run directories instead (wandb has no public "
                           "reader for offline .wandb files; our run directories hold the same data)")
    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    filters = {"group": group} if group else None
    out: list[RunRecord] = []
    for r in api.runs(path, filters=filters):
        config = {k: v for k, v in dict(r.config).items() if not str(k).startswith("_")}
        summary = dict(getattr(r.summary, "_json_dict", None) or {})
        history = [{"step": rec.get("_step"), **{k: v for k, v in rec.items() if not str(k).startswith("_")}}
                   for rec in r.scan_history()]
        out.append(RunRecord(name=str(r.name), path=None, config=config, summary=summary, eval={},
                             metrics=history, source="wandb"))
    return out
