"""PNG plots for ``compare``: learning curves, running Δ_TTT curves, metric per group with CIs.

Uses matplotlib's object API with the Agg canvas (no pyplot): no global backend switch, no display
needed, safe inside other programs and tests. Each function returns the written path, or None when the
runs hold no data for that plot.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from metattt.track.compare import CURVE_KEYS, RUNNING_DELTA_KEYS, Comparison, get_path, _MISSING

_X_KEYS = ("x", "tokens", "scored_tokens", "docs", "documents", "step", "position")
_Y_KEYS = ("y", "delta", "running_delta", "value", "mean")


def _figure(width: float = 7.5, height: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _group_colors(cmp: Comparison) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {g.label: cmap(i % 10) for i, g in enumerate(cmp.groups)}


def _save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve_points(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` from validation records (all records when none carries a ``kind``)."""
    has_kind = any("kind" in r for r in records)
    xs: list[float] = []
    ys: list[float] = []
    for i, r in enumerate(records):
        if has_kind and r.get("kind") != "val":
            continue
        y = get_path(r, key)
        if y is _MISSING or not _is_num(y):
            continue
        step = r.get("step", i)
        xs.append(float(step) if _is_num(step) else float(i))
        ys.append(float(y))
    return xs, ys


def plot_learning_curves(cmp: Comparison, out: Path, key: str | None = None) -> Path | None:
    key = key or next((k for k in CURVE_KEYS if any(curve_points(rv.run.metrics, k)[0] for rv in cmp.values)), None)
    if key is None:
        return None
    colors = _group_colors(cmp)
    fig = _figure()
    ax = fig.add_subplot()
    seen: set[str] = set()
    plotted = 0
    for rv in cmp.values:
        xs, ys = curve_points(rv.run.metrics, key)
        if not xs:
            continue
        label = rv.group if rv.group not in seen else None
        seen.add(rv.group)
        ax.plot(xs, ys, color=colors[rv.group], alpha=0.85, lw=1.4, marker="o" if len(xs) < 15 else None, ms=3, label=label)
        plotted += 1
    if not plotted:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{key} vs step ({plotted} runs, one line each, colour = group)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def _num_or_nan(v: Any) -> float:
    return float(v) if _is_num(v) else math.nan


def running_curves(ev: dict[str, Any]) -> list[tuple[str, list[float], list[float], str]]:
    """Running Δ_TTT curves of one eval.json as (name, xs, ys, x label); [] when it holds none.

    Accepted: the evaluator's ``{"ttt:X": {"chunk": [...], "delta_bpb": [...], "block_tokens": n}}`` (only
    "ttt:" keys when any exist; x = target tokens scored), a plain list of numbers, a list of [x, y], or
    ``{"x": [...], "y": [...]}``. ``None`` values (no bytes yet) become gaps.
    """
    raw = next((v for v in (get_path(ev, k) for k in RUNNING_DELTA_KEYS) if v is not _MISSING), _MISSING)
    if raw is _MISSING or not raw:
        return []
    if isinstance(raw, list):
        if all(_is_num(v) or v is None for v in raw):
            return [("", [float(i) for i in range(len(raw))], [_num_or_nan(v) for v in raw], "evaluation chunk")]
        if all(isinstance(v, list) and len(v) == 2 and _is_num(v[0]) for v in raw):
            return [("", [float(v[0]) for v in raw], [_num_or_nan(v[1]) for v in raw], "position")]
        return []
    if not isinstance(raw, dict):
        return []
    xk = next((k for k in _X_KEYS if isinstance(raw.get(k), list)), None)
    yk = next((k for k in _Y_KEYS if isinstance(raw.get(k), list)), None)
    if xk and yk and len(raw[xk]) == len(raw[yk]):
        return [("", [_num_or_nan(v) for v in raw[xk]], [_num_or_nan(v) for v in raw[yk]], xk)]
    named = {k: v for k, v in raw.items() if isinstance(v, dict) and isinstance(v.get("delta_bpb"), list)}
    ttt = {k: v for k, v in named.items() if str(k).startswith("ttt:")}
    out = []
    for key, cur in sorted((ttt or named).items()):
        ys = [_num_or_nan(v) for v in cur["delta_bpb"]]
        chunk = cur.get("chunk") if isinstance(cur.get("chunk"), list) else list(range(len(ys)))
        block = cur.get("block_tokens")
        if _is_num(block) and block > 0:
            xs, label = [(float(c) + 1.0) * float(block) for c in chunk], "target tokens scored"
        else:
            xs, label = [float(c) for c in chunk], "chunk index"
        if len(xs) == len(ys):
            out.append((str(key), xs, ys, label))
    return out


def plot_running_delta(cmp: Comparison, out: Path) -> Path | None:
    colors = _group_colors(cmp)
    per_run = [(rv, running_curves(rv.run.eval)) for rv in cmp.values]
    per_run = [(rv, cs) for rv, cs in per_run if cs]
    if not per_run:
        return None
    curve_names = sorted({name for _, cs in per_run for name, *_ in cs})
    styles = ["-", "--", ":", "-."]
    fig = _figure()
    ax = fig.add_subplot()
    seen: set[str] = set()
    xlabel = "position"
    one_each = all(len(cs) == 1 for _, cs in per_run)  # then colour alone tells runs apart
    for rv, curves in per_run:
        for name, xs, ys, xlabel in curves:
            tag = rv.group if one_each else f"{rv.group} [{name}]"
            ls = "-" if one_each else styles[curve_names.index(name) % len(styles)]
            ax.plot(xs, ys, color=colors[rv.group], ls=ls, alpha=0.85, lw=1.4, label=tag if tag not in seen else None)
            seen.add(tag)
    ax.axhline(0.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    evaluator_form = any(name.startswith("ttt:") for name in curve_names)
    ax.set_ylabel("cumulative Δ bpb (base − TTT; > 0 = TTT better)" if evaluator_form else "running Δ_TTT (bpb)")
    ax.set_title(f"running Δ_TTT ({len(per_run)} runs, colour = group)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_metric_bars(cmp: Comparison, out: Path) -> Path | None:
    """Bar per group (mean) with t-CI error bars and each run as a dot; baseline bar hatched."""
    if not cmp.groups:
        return None
    colors = _group_colors(cmp)
    fig = _figure(max(5.0, 1.2 * len(cmp.groups) + 2.5), 4.5)
    ax = fig.add_subplot()
    xs = list(range(len(cmp.groups)))
    means = [g.ci.mean for g in cmp.groups]
    errs = [g.ci.half_width or 0.0 for g in cmp.groups]
    ax.bar(xs, means, yerr=errs, capsize=6, color=[colors[g.label] for g in cmp.groups], alpha=0.55,
           edgecolor="black", hatch=None, error_kw={"elinewidth": 1.4})
    for x, g in zip(xs, cmp.groups):
        if g.is_baseline:
            ax.bar([x], [g.ci.mean], color="none", edgecolor="black", hatch="//", lw=1.2)
        n = len(g.runs)
        for j, rv in enumerate(g.runs):
            off = 0.0 if n == 1 else (j / (n - 1) - 0.5) * 0.3
            ax.plot(x + off, rv.value, "o", color="black", ms=3.5, zorder=3)
    lo = min(min(rv.value for rv in g.runs) if g.runs else g.ci.mean for g in cmp.groups)
    lo = min(lo, *(m - e for m, e in zip(means, errs)))
    hi = max(max(rv.value for rv in g.runs) for g in cmp.groups)
    hi = max(hi, *(m + e for m, e in zip(means, errs)))
    span = hi - lo  # all of one sign and close together (e.g. bpb): zoom in, say so
    note = (" — y axis does not start at 0" if lo > 0 and span < 0.2 * hi else
            " — y axis does not end at 0" if hi < 0 and span < 0.2 * abs(lo) else "")
    if note:
        pad = max(span, 1e-12) * 0.25
        ax.set_ylim(lo - pad, hi + pad)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(xs, [g.label + ("\n(baseline)" if g.is_baseline else "") for g in cmp.groups],
                  rotation=20 if max(len(g.label) for g in cmp.groups) > 14 else 0, fontsize=8)
    ax.set_ylabel(cmp.metric)
    pct = f"{100 * cmp.level:g}%"
    ax.set_title(f"{cmp.metric}: mean ± {pct} t-CI over seeds, dots = runs{note}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if not all(math.isfinite(v) for v in means):  # pragma: no cover - compare_runs filters these
        return None
    return _save(fig, out)
