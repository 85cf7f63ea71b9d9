"""Small PNGs for the ceiling report, drawn from the cells' eval.json (and, for ``fraction``, the synthetic bounds
the report computes and hands in: drawing reads no data files of its own).

* ``capacity``: Δ_TTT (with its 95% CI) against the number of adapted scalars, log x; a flat line would mean
  the adaptation gain does not grow with what may adapt.
* ``running``: cumulative Δ_TTT along the validation stream; rising = still learning from the stream.
* ``fraction`` (synthetic corpus): the fraction of the exact adaptation room each adapter (and the oracle)
  captures.
* ``cost``: bpb of every legal protocol against its cost per scored token, measured device-seconds (timed part)
  and counted model FLOPs, with the Pareto front of each marked: "A beats sliding at equal budget" is a
  statement about the front, not about one row (eval.json schema 2).
* ``ladder``: Δ against D/N per model size, with the fitted curves (points and fits: metattt/study/ladder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .ladder import PREDICT_DN, delta_keys, fit_power_floor, ladder_points, point_delta, power_floor

DPI = 80
SIZE = (6.0, 3.4)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _axes(ax, xlabel: str, ylabel: str, xlog: bool = False, **grid: Any) -> None:
    """What the Δ panels share, drawn after their data: log x (sizes, D/N), the zero line, labels, a light grid."""
    if xlog:
        ax.set_xscale("log")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, **grid)


def _ttt_points(ev: dict[str, Any]) -> list[tuple[str, int, float, float, float]]:
    out = []
    for key, d in ev["deltas"].items():
        if not key.startswith("ttt:"):
            continue
        ap = ev["protocols"][key].get("adapter_params") or {}
        if "adapted_scalars" in ap and ap["adapted_scalars"] > 0:
            out.append((key, int(ap["adapted_scalars"]), d["value"], d["ci95"][0], d["ci95"][1]))
    return out


def capacity_plot(results: list, path: Path) -> Path | None:
    series = []
    for r in results:
        pts = sorted(_ttt_points(r.eval), key=lambda t: t[1])
        if len(pts) >= 2:
            series.append((f"{r.cell.model.name}/{r.cell.ev.name}", pts))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    for label, pts in series:
        xs = [p[1] for p in pts]
        ys = [p[2] for p in pts]
        # a point may sit just outside its percentile CI; matplotlib refuses negative error bars
        err = [[max(0.0, p[2] - p[3]) for p in pts], [max(0.0, p[4] - p[2]) for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    _axes(ax, "adapted scalars", "Δ_TTT = sliding − ttt (bpb)", xlog=True)
    ax.legend(fontsize=7)
    return _save(fig, path)


def running_plot(results: list, path: Path) -> Path | None:
    """One panel per model (their scales differ by orders of magnitude: an untrained model gains ~1 bpb)."""
    by_model: dict[str, list] = {}
    for r in results:
        for key, rd in (r.eval.get("running_delta") or {}).items():
            if key.startswith("ttt:") and len(rd["delta_bpb"]) >= 2:
                by_model.setdefault(r.cell.model.name, []).append((f"{r.cell.ev.name}/{key}", rd))
    if not by_model:
        return None
    plt = _plt()
    n = len(by_model)
    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(SIZE[0] * cols * 0.8, SIZE[1] * rows), squeeze=False)
    for ax, (model, lines) in zip(axes.flat, by_model.items()):
        for label, rd in lines[:24]:
            ys = [float("nan") if v is None else v for v in rd["delta_bpb"]]
            xs = [(i + 1) * rd["block_tokens"] for i in range(len(ys))]
            ax.plot(xs, ys, label=label, linewidth=1.0)
        _axes(ax, "scored tokens", "cumulative Δ_TTT (bpb)")
        ax.set_title(model, fontsize=8)
        ax.legend(fontsize=5, ncol=2)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return _save(fig, path)


def fraction_plot(results: list, bounds: list, path: Path) -> Path | None:
    """``bounds[i]``: the synthetic bounds of ``results[i]`` (None: not a synthetic cell)."""
    bars = []
    for r, bd in zip(results, bounds):
        if not bd:
            continue
        room = bd["window_bpb"] - bd["bayes_unknown_bpb"]
        if room <= 0:
            continue
        for key, d in r.eval["deltas"].items():
            if key.startswith(("ttt:", "oracle:")):  # the oracle (not legal) as the reference bar
                label = key[4:] if key.startswith("ttt:") else key
                bars.append((f"{r.cell.model.name}\n{label}", d["value"] / room, d["ci95"][0] / room,
                             d["ci95"][1] / room))
    if not bars:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(SIZE[0], 0.45 * len(bars)), SIZE[1] + 0.4))
    xs = range(len(bars))
    err = [[max(0.0, b[1] - b[2]) for b in bars], [max(0.0, b[3] - b[1]) for b in bars]]
    ax.bar(xs, [b[1] for b in bars], yerr=err, capsize=2)
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=6, rotation=90)
    _axes(ax, "", "Δ_TTT / adaptation room", axis="y")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")  # the whole room
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (cost, bpb) points no other point beats in both (lower cost and lower bpb, one strictly)."""
    return [not any(c2 <= c and b2 <= b and (c2 < c or b2 < b) for c2, b2 in points) for c, b in points]


def cost_points(results: list) -> list[tuple[str, float | None, float | None, float]]:
    """(label, device-seconds per token, FLOPs per token, bpb) of every legal, valid protocol with a cost."""
    out = []
    for r in results:
        for name, p in r.eval["protocols"].items():
            c = p.get("cost")
            if c and p.get("legal") and p.get("valid", True):
                out.append((f"{r.cell.model.name}/{name}", c.get("device_s_per_token"), c.get("flops_per_token"),
                            p["bpb"]))
    return out


def cost_plot(results: list, path: Path) -> Path | None:
    pts = cost_points(results)
    if len(pts) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(SIZE[0] * 1.6, SIZE[1]))
    for ax, col, xlabel in ((axes[0], 1, "device-seconds per scored token (timed)"),
                            (axes[1], 2, "model FLOPs per scored token (counted)")):
        mine = [(p[0], p[col], p[3]) for p in pts if p[col]]
        if not mine:
            ax.set_visible(False)
            continue
        front = pareto_front([(x, y) for _, x, y in mine])
        ax.scatter([x for _, x, _ in mine], [y for _, _, y in mine], s=12)
        fr = sorted((x, y) for (_, x, y), f in zip(mine, front) if f)
        ax.plot([x for x, _ in fr], [y for _, y in fr], "r.-", label="Pareto front")
        for (lab, x, y), f in zip(mine, front):
            if f:
                ax.annotate(lab.split("/", 1)[1][:24], (x, y), fontsize=5)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel("bpb")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def ladder_plot(results: Sequence[Any], path) -> Any:
    """Δ against D/N trained (log x), one panel per Δ (context first, at most four), one series per size with
    the cells' 95% CIs (hierarchical where the cell ran several orders) and, where a size has three budgets, its
    fitted curve (point fit). None without points."""
    points = ladder_points(results)
    if not points:
        return None
    keys = delta_keys(points)[:4]
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(SIZE[0] * 0.7 * len(keys), SIZE[1]), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for (setting, n) in dict.fromkeys((p.setting, p.n_params) for p in points):
            pts = [(p, d) for p in points if (p.setting, p.n_params) == (setting, n)
                   and (d := point_delta(p, key)) is not None]
            if not pts:
                continue
            x = np.array([p.dn_trained for p, _ in pts])
            y = np.array([d[0] for _, d in pts])
            err = np.array([[max(0.0, v - d[1][0]), max(0.0, d[1][1] - v)] if d[1] else [0.0, 0.0]
                            for (_, d), v in zip(pts, y)]).T
            line = ax.errorbar(x, y, yerr=err, fmt="o", markersize=3, capsize=2, label=f"N={n:,} {setting}")
            fit = fit_power_floor(x, y)
            if fit is not None:
                xs = np.geomspace(x.min(), max(x.max(), PREDICT_DN), 50)
                ax.plot(xs, power_floor(xs, *fit), linewidth=0.8, color=line[0].get_color())
        _axes(ax, "D/N (tokens trained / non-embedding parameters)", "Δ (bpb)", xlog=True)
        ax.set_title(f"Δ {key}", fontsize=8)
    axes[0][0].legend(fontsize=5)
    return _save(fig, path)


def section_plots(plots: Path, stem: str, results: list, bounds: list) -> list[Path]:
    """Draw this section's plots (those with data) into ``plots`` as ``{stem}-{kind}.png``; stale ones are removed.
    ``bounds[i]``: the synthetic bounds of ``results[i]`` or None (the report computes them)."""
    out = []
    for kind, fn in (("capacity", capacity_plot), ("running", running_plot),
                     ("fraction", lambda res, path: fraction_plot(res, bounds, path)), ("cost", cost_plot),
                     ("ladder", ladder_plot)):
        path = plots / f"{stem}-{kind}.png"
        got = fn(results, path) if results else None
        if got is not None:
            out.append(got)
        elif path.exists():
            path.unlink()
    return out
