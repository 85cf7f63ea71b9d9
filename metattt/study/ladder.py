"""The ladder sections of the ceiling report (issue 29): Δ_context and Δ_TTT against D/N per model size, and fits
Δ = A·(D/N)^(−γ) + F with intervals, generated from the run directories only.

A ladder cell is an evaluated decay branch (``--branch-from``): its model's ``summary.json`` says which budget
checkpoint it starts from (``branch.budget``: the requested D/N, the N, whether the pass cap moved it) and how
many tokens it trained in all. Points are grouped by size (N) and validation set (the evaluator setting).

Intervals: every cell of one setting scores the same documents, so one bootstrap resample of documents is applied
to every point of a size at once (the points' errors are correlated through the shared documents; resampling them
independently would treat them as independent), the Δs are recomputed from the per-document nats with the
evaluator's estimator (Σ nats / ln 2 / Σ bytes), and the curve is refitted. The percentile intervals of A, γ, F
and of the fitted Δ at D/N = 200 (the records' tokens per parameter) come from those refits; resamples whose fit
fails are counted, not hidden. With three budgets the three-parameter curve interpolates them exactly, so its
interval is the data's, not a check of the functional form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

LN2 = math.log(2.0)
PREDICT_DN = 200.0  # the records' regime: ≈ 5.5B tokens over ≈ 27M parameters


@dataclass
class LadderPoint:
    """One evaluated decay branch."""

    model: str
    setting: str
    n_params: int  # the N of D/N (non-embedding unless the run said otherwise)
    dn_requested: float | None
    dn_checkpoint: float  # tokens at the branch's checkpoint / N (the cap may have moved it)
    dn_trained: float  # tokens the branch trained in all (checkpoint + decay) / N
    capped: bool
    eval: dict[str, Any] = field(repr=False)

    def delta(self, key: str) -> dict[str, Any] | None:
        return self.eval["deltas"].get(key)


def ladder_points(done: Sequence[Any]) -> list[LadderPoint]:
    """Ladder points of the done cells (``report.CellResult``) whose model is a decay branch from a budget."""
    out = []
    for r in done:
        s = r.model_summary or {}
        b = (s.get("branch") or {}).get("budget")
        if not b or not b.get("n_params") or r.eval is None:
            continue
        n = int(b["n_params"])
        out.append(LadderPoint(r.cell.model.name, r.cell.ev.name, n, b.get("dn"), b["tokens"] / n,
                               s["train_tokens"] / n, bool(b.get("capped")), r.eval))
    return sorted(out, key=lambda p: (p.setting, p.n_params, p.dn_trained, p.model))


def delta_keys(points: Sequence[LadderPoint]) -> list[str]:
    """The Δs the points report: ``context`` (flat → sliding) first, then the adapters' in first-seen order."""
    keys: list[str] = []
    for p in points:
        keys += [k for k in p.eval["deltas"] if k not in keys]
    return sorted(keys, key=lambda k: k != "context")


def _gains(p: LadderPoint, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-document nats gain of Δ ``key`` (from − to) and the documents' bytes."""
    d, per = p.delta(key), p.eval.get("per_document")
    if d is None or not per or d["from"] not in per["nats"] or d["to"] not in per["nats"]:
        return None
    return (np.asarray(per["nats"][d["from"]], dtype=np.float64) - np.asarray(per["nats"][d["to"]], dtype=np.float64),
            np.asarray(per["bytes"], dtype=np.float64))


def power_floor(x: np.ndarray, a: float, gamma: float, floor: float) -> np.ndarray:
    return a * np.power(x, -gamma) + floor


GAMMA_GRID = np.linspace(0.0, 4.0, 801)  # γ's range and resolution (0.005) for the profiled least squares


def fit_power_floor(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, None] | None:
    """Least-squares ``y = A·x^(−γ) + F`` with γ in [0, 4]: ((A, γ, F), None), or None with < 3 distinct x.

    Why profiled, not ``curve_fit``: for a fixed γ the model is linear in (A, F), so every γ of a fine grid is
    solved in closed form at once and the best one is refined by a bounded 1-D search. That is exact to the
    grid's refinement, never fails to converge, and costs microseconds, which the joint document bootstrap
    (1,000 refits per size) needs: near γ = 0 (A and F trade off) an iterative fit took seconds per refit."""
    from scipy.optimize import minimize_scalar

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 3:
        return None

    def solve(gammas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = np.power(x[None, :], -gammas[:, None])  # (G, n)
        um, ym = u.mean(1), y.mean()
        du = u - um[:, None]
        var = (du * du).sum(1)
        a = np.where(var > 0, (du * (y - ym)[None, :]).sum(1) / np.where(var > 0, var, 1.0), 0.0)
        f = ym - a * um
        sse = ((a[:, None] * u + f[:, None] - y[None, :]) ** 2).sum(1)
        return a, f, sse

    _, _, sse = solve(GAMMA_GRID)
    i = int(np.argmin(sse))
    lo, hi = GAMMA_GRID[max(i - 1, 0)], GAMMA_GRID[min(i + 1, GAMMA_GRID.size - 1)]
    g = float(GAMMA_GRID[i])
    if hi > lo:
        r = minimize_scalar(lambda t: float(solve(np.array([t]))[2][0]), bounds=(lo, hi), method="bounded",
                            options={"xatol": 1e-6})
        if r.success and r.fun <= sse[i]:
            g = float(r.x)
    a, f, _ = solve(np.array([g]))
    return np.array([a[0], g, f[0]]), None


@dataclass
class PowerFit:
    setting: str
    n_params: int
    key: str
    n_points: int
    params: dict[str, float] | None  # A, gamma, F, pred (the fitted Δ at D/N = PREDICT_DN)
    ci: dict[str, tuple[float, float]]
    n_boot: int
    n_failed: int  # bootstrap refits that did not converge


def fit_size(points: Sequence[LadderPoint], key: str, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> PowerFit | None:
    """Fit Δ ``key`` against D/N (tokens trained) over the points of one size and setting, with a joint document
    bootstrap (module docstring). None when fewer than 3 distinct budgets report this Δ."""
    pts = [p for p in points if _gains(p, key) is not None]
    if len({p.dn_trained for p in pts}) < 3:
        return None
    gains = [_gains(p, key) for p in pts]
    bytes_ = gains[0][1]
    if any(g[1].shape != bytes_.shape or not np.array_equal(g[1], bytes_) for g in gains):
        return None  # not the same documents: no joint resampling
    g = np.stack([x[0] for x in gains])  # (points, docs)
    x = np.array([p.dn_trained for p in pts])

    def deltas(idx: np.ndarray | None) -> np.ndarray:
        if idx is None:
            return g.sum(axis=1) / LN2 / bytes_.sum()
        return g[:, idx].sum(axis=1) / LN2 / bytes_[idx].sum()

    def summary(p: np.ndarray) -> dict[str, float]:
        return {"A": float(p[0]), "gamma": float(p[1]), "F": float(p[2]),
                "pred": float(power_floor(np.array([PREDICT_DN]), *p)[0])}

    fit = fit_power_floor(x, deltas(None))
    base = summary(fit[0]) if fit is not None else None
    rng = np.random.default_rng(seed)
    n_docs = g.shape[1]
    draws, failed = [], 0
    for _ in range(n_boot):
        f = fit_power_floor(x, deltas(rng.integers(n_docs, size=n_docs)))
        if f is None:
            failed += 1
        else:
            draws.append(summary(f[0]))
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    ci = {}
    if draws:
        for name in ("A", "gamma", "F", "pred"):
            v = np.array([d[name] for d in draws])
            ci[name] = (float(np.quantile(v, lo_q)), float(np.quantile(v, hi_q)))
    return PowerFit(pts[0].setting, pts[0].n_params, key, len(pts), base, ci, n_boot, failed)


# ---------------------------------------------------------------- markdown

def _fit_note(p: dict[str, float]) -> str:
    """Where the fit is degenerate, say so: near γ = 0 the curve is A − A·γ·ln(D/N) + F, A and F trade off without
    bound and F is no floor; at γ's upper bound the data fix only the last budget's level."""
    g = p.get("gamma")
    if g is None:
        return "no fit"
    if g < 0.02:
        return "γ ≈ 0: log-like, A and F not identified (F is no floor)"
    if g > 3.98:
        return "γ at its upper bound (4)"
    return ""


def _f(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:+.5f}" if signed else f"{v:.5f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if not ci else f"[{ci[0]:.5f}, {ci[1]:.5f}]"


LADDER_LEAD = ("Ladder points (one decay branch each; N = non-embedding parameters; D/N trained = the branch's "
               "tokens, checkpoint + decay, over N; Δ with the evaluator's paired document-bootstrap 95% CI):")
FIT_LEAD = "Fits Δ = A·(D/N)^(−γ) + F over D/N trained, per size and validation set"


def ladder_tables(done: Sequence[Any]) -> list[str]:
    """The ladder table and the fit table of one report section (empty when it holds no ladder points); the fits
    resample as many times as the cells' own bootstrap did."""
    points = ladder_points(done)
    if not points:
        return []
    n_boot = min(int(p.eval["bootstrap"]["n"]) for p in points)
    keys = delta_keys(points)
    head = ("| model | setting | N | D/N requested | D/N trained | capped | flat bpb | sliding bpb | "
            + " | ".join(f"Δ {k} | Δ {k} 95% CI" for k in keys) + " | Δ_TTT / Δ_context (ttt:sgd) |")
    lines = [LADDER_LEAD, "", head, "|" + "---|" * head.count(" |")]
    for p in points:
        cells = []
        for k in keys:
            d = p.delta(k)
            cells += [_f(d["value"], True), _ci(d["ci95"])] if d else ["", ""]
        ctx, sgd = p.delta("context"), p.delta("ttt:sgd")
        ratio = (f"{sgd['value'] / ctx['value']:.3f}" if ctx and sgd and ctx["value"] else "n/a")
        prot = p.eval["protocols"]
        lines.append(f"| {p.model} | {p.setting} | {p.n_params:,} | "
                     f"{'' if p.dn_requested is None else f'{p.dn_requested:g}'} | {p.dn_trained:.1f} | "
                     f"{'yes' if p.capped else 'no'} | {_f(prot.get('flat', {}).get('bpb'))} | "
                     f"{_f(prot.get('sliding', {}).get('bpb'))} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append("")
    fits = [f for f in (fit_size([p for p in points if (p.setting, p.n_params) == grp], k, n_boot=n_boot)
                        for grp in dict.fromkeys((p.setting, p.n_params) for p in points) for k in keys)
            if f is not None]
    groups = len(dict.fromkeys((p.setting, p.n_params) for p in points))
    lines += [f"{FIT_LEAD} ({len(fits)} fits; a size needs >= 3 distinct budgets, {groups} setting × size groups "
              f"here; intervals: 95% percentile of refits under a joint document bootstrap, n={n_boot}; "
              f"Δ at D/N {PREDICT_DN:g} is the fitted curve there):", ""]
    if not fits:
        return lines + ["No size has three budgets yet.", ""]
    fh = ("| setting | N | Δ | points | A | A 95% CI | γ | γ 95% CI | F | F 95% CI | "
          f"Δ at D/N {PREDICT_DN:g} | Δ at D/N {PREDICT_DN:g} 95% CI | failed refits | note |")
    lines += [fh, "|" + "---|" * fh.count(" |")]
    for f in fits:
        p = f.params or {}
        lines.append(f"| {f.setting} | {f.n_params:,} | {f.key} | {f.n_points} | {_f(p.get('A'), True)} | "
                     f"{_ci(f.ci.get('A'))} | {_f(p.get('gamma'))} | {_ci(f.ci.get('gamma'))} | "
                     f"{_f(p.get('F'), True)} | {_ci(f.ci.get('F'))} | {_f(p.get('pred'), True)} | "
                     f"{_ci(f.ci.get('pred'))} | {f.n_failed} of {f.n_boot} | {_fit_note(p)} |")
    return lines + [""]
