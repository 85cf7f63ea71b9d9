"""The ladder sections of the ceiling report (issue 29): Δ_context and Δ_TTT against D/N per model size, where the
gain sits, fits Δ = A·(D/N)^(−γ) + F with intervals, the continued-training account of Δ_TTT and the reading at
the records' D/N, generated from the run directories only.

A ladder cell is an evaluated decay branch (``--branch-from``): its model's ``summary.json`` says which budget
checkpoint it starts from (``branch.budget``: the requested D/N, the N, whether the pass cap moved it) and how
many tokens it trained in all. Points are grouped by size (N) and validation set (the evaluator setting).

A point's numbers are the means over the cell's runs (``--orders K``) where it ran several, with the evaluator's
hierarchical interval (runs → documents), else order 0's with its document interval; the table says which.

Intervals of the fits: every cell of one setting scores the same documents in the same K orders, so one bootstrap
resample of documents (and one of runs) is applied to every point of a size at once (the points' errors are
correlated through the shared documents; resampling them independently would treat them as independent), the Δs
are recomputed from order 0's per-document nats with the evaluator's estimator (Σ nats / ln 2 / Σ bytes) and moved
by the resampled runs' mean deviation from order 0 (``_Series``), and the curve is refitted. The percentile intervals of A, γ, F
and of the fitted Δ at D/N = 200 (the records' tokens per parameter) come from those refits; resamples whose fit
fails are counted, not hidden. With three budgets the three-parameter curve interpolates them exactly, so its
interval is the data's, not a check of the functional form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .markdown import num as _f, table

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
    parent_run: str | None = None  # the constant-lr run the branch starts from (its metrics.jsonl: the curve)

    def delta(self, key: str) -> dict[str, Any] | None:
        return self.eval["deltas"].get(key)


def ladder_points(done: Sequence[Any]) -> list[LadderPoint]:
    """Ladder points of the done cells (``report.CellResult``) whose model is a decay branch from a budget."""
    out = []
    for r in done:
        s = r.model_summary or {}
        br = s.get("branch") or {}
        b = br.get("budget")
        if not b or not b.get("n_params") or r.eval is None:
            continue
        n = int(b["n_params"])
        out.append(LadderPoint(r.cell.model.name, r.cell.ev.name, n, b.get("dn"), b["tokens"] / n,
                               s["train_tokens"] / n, bool(b.get("capped")), r.eval, br.get("parent_run")))
    return sorted(out, key=lambda p: (p.setting, p.n_params, p.dn_trained, p.model))


def delta_keys(points: Sequence[LadderPoint]) -> list[str]:
    """The Δs the points report: ``context`` (flat → sliding) first, then the adapters' in first-seen order."""
    keys: list[str] = []
    for p in points:
        keys += [k for k in p.eval["deltas"] if k not in keys]
    return sorted(keys, key=lambda k: k != "context")


# ---------------------------------------------------------------- one point's numbers

def _f64(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.float64)


def _gain(nats: dict[str, Any], d: dict[str, Any], sl: slice = slice(None)) -> np.ndarray | None:
    """Per-document (or per-bucket) nats of a Δ's ``from`` minus its ``to``; None when either is absent."""
    if d["from"] not in nats or d["to"] not in nats:
        return None
    return _f64(nats[d["from"]])[sl] - _f64(nats[d["to"]])[sl]


def _runs(p: LadderPoint) -> dict[str, Any] | None:
    """eval.json ``runs`` when the cell ran several document orders / adapter seeds, else None."""
    r = p.eval.get("runs")
    return r if r and int(r.get("n_runs", 1)) > 1 else None


def point_delta(p: LadderPoint, key: str) -> tuple[float, Sequence[float] | None, str] | None:
    """(Δ, 95% CI, interval kind) of one point: with several runs the mean over runs and the hierarchical interval
    (runs → documents: it holds the order variance of a stateful adapter), else order 0's value and its
    document-bootstrap interval (conditional on that one order)."""
    d = p.delta(key)
    if d is None:
        return None
    r = _runs(p)
    rd = (r or {}).get("deltas", {}).get(key)
    if rd is not None:
        return float(rd["value"]), rd.get("ci95"), f"runs → documents ({r['n_runs']} runs)"
    return float(d["value"]), d.get("ci95"), "documents, one order"


def point_bpb(p: LadderPoint, proto: str) -> float | None:
    """bpb of one protocol: the mean over runs where there are several (as :func:`point_delta`), else order 0's."""
    rp = (_runs(p) or {}).get("protocols", {}).get(proto)
    if rp is not None:
        return float(rp["bpb_mean"])
    v = p.eval["protocols"].get(proto, {}).get("bpb")
    return None if v is None else float(v)


OFFSET_SPLIT = 128  # a gain at offsets below this cannot be adaptation to the document being read (issue 26)


def position_split(p: LadderPoint, key: str) -> dict[str, float] | None:
    """Δ ``key`` (bits per byte within each part, order 0's pass) at document offsets < 128 and ≥ 128, and in the
    first and second half of the stream (deciles 1–5, 6–10); None without the evaluator's ``per_position``."""
    pp, d = p.eval.get("per_position") or {}, p.delta(key)
    dp, sd = pp.get("doc_position"), pp.get("stream_decile")
    if d is None or not dp or OFFSET_SPLIT not in dp.get("edges", ()):
        return None

    def part(block: dict[str, Any], sl: slice) -> float | None:
        g, b = _gain(block["nats"], d, sl), _f64(block["bytes"])[sl].sum()
        return float(g.sum() / LN2 / b) if g is not None and b > 0 else None

    i = list(dp["edges"]).index(OFFSET_SPLIT)
    out = {"early": part(dp, slice(0, i)), "late": part(dp, slice(i, None))}
    if sd and len(sd.get("bytes", ())) >= 2:
        h = len(sd["bytes"]) // 2
        out.update(first_half=part(sd, slice(0, h)), second_half=part(sd, slice(h, None)))
    return None if out["early"] is None else out


def adapter_tokens(p: LadderPoint, key: str) -> tuple[int, int] | None:
    """(tokens the adapter of protocol ``key`` trained on, epochs over them): the ledger's update positions
    (every training sequence's positions, once) and the adapter config's ``epochs``. None for a protocol that
    took no update or records no ledger (e.g. the doc-batched family)."""
    pr = p.eval["protocols"].get(key) or {}
    n = (pr.get("ledger") or {}).get("n_update_positions")
    if not n:
        return None
    cfg = ((pr.get("adapter_params") or {}).get("config") or {})
    return int(n), int(cfg.get("epochs", 1) or 1)


# ---------------------------------------------------------------- joint bootstrap over points

@dataclass
class _Series:
    """One quantity of one point as the bootstrap resamples it: per-document nats (a protocol's, or a Δ's gain
    from − to) over the documents' bytes, and the quantity's value in each run (order 0 first) when there are
    several. Its estimate is order 0's document ratio moved by (mean over runs − order 0's value), i.e. the
    mean over runs; a resample moves order 0's resampled ratio by (mean over resampled runs − order 0's)."""

    num: np.ndarray
    bytes: np.ndarray
    per_run: np.ndarray | None

    def value(self, idx: np.ndarray | None = None, u: np.ndarray | None = None) -> float:
        sel = slice(None) if idx is None else idx
        v = self.num[sel].sum() / LN2 / self.bytes[sel].sum()
        if self.per_run is not None:
            k = self.per_run.size
            runs = self.per_run if u is None else self.per_run[np.minimum((u[:k] * k).astype(int), k - 1)]
            v += runs.mean() - self.per_run[0]
        return float(v)


def _series(p: LadderPoint, kind: str, name: str) -> _Series | None:
    """``kind`` "delta" (Δ ``name``) or "bpb" (protocol ``name``) of one point; None when its nats are absent."""
    per = p.eval.get("per_document")
    if not per:
        return None
    nats, runs = per["nats"], _runs(p) or {}
    if kind == "delta":
        d = p.delta(name)
        num = None if d is None else _gain(nats, d)
        pr = runs.get("deltas", {}).get(name, {}).get("value_per_run")
    else:
        num = _f64(nats[name]) if name in nats else None
        pr = runs.get("protocols", {}).get(name, {}).get("bpb_per_run")
    return None if num is None else _Series(num, _f64(per["bytes"]), None if not pr else np.asarray(pr, float))


def _joint(series: Sequence[_Series], n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Estimates (m,) and ``n_boot`` joint resamples (n_boot, m) of the series: one draw of documents and one of
    runs per resample, shared by every series (why: the module's "Intervals of the fits"). None when the series
    do not share their documents."""
    b0 = series[0].bytes
    if any(s.bytes.shape != b0.shape or not np.array_equal(s.bytes, b0) for s in series):
        return None
    est = np.array([s.value() for s in series])
    rng = np.random.default_rng(seed)
    k = max((s.per_run.size for s in series if s.per_run is not None), default=1)
    boots = np.empty((n_boot, len(series)))
    for i in range(n_boot):
        idx, u = rng.integers(b0.size, size=b0.size), rng.random(k)
        boots[i] = [s.value(idx, u) for s in series]
    return est, boots


def _interval(v: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    return float(np.quantile(v, (1 - level) / 2)), float(np.quantile(v, 1 - (1 - level) / 2))


def power_floor(x: np.ndarray, a: float, gamma: float, floor: float) -> np.ndarray:
    return a * np.power(x, -gamma) + floor


GAMMA_GRID = np.linspace(0.0, 4.0, 801)  # γ's range and resolution (0.005) for the profiled least squares


def fit_power_floor(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Least-squares ``y = A·x^(−γ) + F`` with γ in [0, 4]: (A, γ, F), or None with < 3 distinct x.

    Why profiled, not ``curve_fit``: for a fixed γ the model is linear in (A, F), so every γ of a fine grid is
    solved in closed form at once and the best one is refined by a bounded 1-D search. That is exact to the
    grid's refinement, never fails to converge, and costs microseconds, which the joint document bootstrap
    (1,000 refits per size) needs: near γ = 0 (A and F trade off) an iterative fit took seconds per refit."""
    from scipy.optimize import minimize_scalar

    x, y = _f64(x), _f64(y)
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
    return np.array([a[0], g, f[0]])


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
    interval: str = "documents"  # what the bootstrap resampled
    pred_draws: np.ndarray | None = field(default=None, repr=False)  # the bootstrap refits' Δ at PREDICT_DN


def _group(points: Sequence[LadderPoint], key: Callable[[LadderPoint], Any]) -> dict[Any, list[LadderPoint]]:
    """The points by ``key``, in first-seen order."""
    out: dict[Any, list[LadderPoint]] = {}
    for p in points:
        out.setdefault(key(p), []).append(p)
    return out


def _groups(points: Sequence[LadderPoint]) -> list[list[LadderPoint]]:
    """The points by (setting, size), in order."""
    return list(_group(points, lambda p: (p.setting, p.n_params)).values())


def fit_size(points: Sequence[LadderPoint], key: str, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> PowerFit | None:
    """Fit Δ ``key`` against D/N (tokens trained) over the points of one size and setting, with the joint
    bootstrap of :func:`_joint` (documents, and runs where the cells ran several orders). None when fewer than 3
    distinct budgets report this Δ or the points do not share their documents."""
    pairs = [(p, s) for p in points if (s := _series(p, "delta", key)) is not None]
    if len({p.dn_trained for p, _ in pairs}) < 3:
        return None
    pts, ser = [p for p, _ in pairs], [s for _, s in pairs]
    j = _joint(ser, n_boot, seed)
    if j is None:
        return None  # not the same documents: no joint resampling
    est, boots = j
    x = np.array([p.dn_trained for p in pts])

    def summary(p: np.ndarray) -> dict[str, float]:
        return {"A": float(p[0]), "gamma": float(p[1]), "F": float(p[2]),
                "pred": float(power_floor(np.array([PREDICT_DN]), *p)[0])}

    fit = fit_power_floor(x, est)
    base = summary(fit) if fit is not None else None
    refits = [fit_power_floor(x, row) for row in boots]
    draws = [summary(f) for f in refits if f is not None]
    failed = len(refits) - len(draws)
    ci = {k: _interval(np.array([d[k] for d in draws]), level) for k in ("A", "gamma", "F", "pred") if draws}
    runs = max((s.per_run.size for s in ser if s.per_run is not None), default=1)
    kind = f"runs ({runs} orders) and documents" if runs > 1 else "documents (one order)"
    return PowerFit(pts[0].setting, pts[0].n_params, key, len(pts), base, ci, n_boot, failed, kind,
                    np.array([d["pred"] for d in draws]) if len(draws) == n_boot else None)


RECORD_N = 26_076_251  # non-embedding parameters of the records' block design (the pg-2026-03-23 preset)


def size_extrapolation(fits: Sequence[PowerFit], level: float = 0.95
                       ) -> list[tuple[str, str, int, float, tuple[float, float] | None]]:
    """Per (setting, Δ) with fits at >= 3 sizes: (setting, key, sizes, Δ at D/N PREDICT_DN extrapolated to
    :data:`RECORD_N` by least squares Δ = a + b·ln N, interval). The interval refits the line to each bootstrap
    draw, paired by index across sizes (every size resamples the same documents with the same seed, so draw i is
    one resample of all of them); None when some size has no complete set of draws."""
    out = []
    for setting, key in dict.fromkeys((f.setting, f.key) for f in fits):
        fs = [f for f in fits if (f.setting, f.key) == (setting, key) and f.params]
        if len({f.n_params for f in fs}) < 3:
            continue
        x = np.log([f.n_params for f in fs])

        def at_record(y: np.ndarray) -> float:
            b, a = np.polyfit(x, y, 1)
            return float(a + b * math.log(RECORD_N))

        est = at_record(np.array([f.params["pred"] for f in fs]))
        ci = None
        if all(f.pred_draws is not None for f in fs) and len({f.pred_draws.size for f in fs}) == 1:
            draws = np.stack([f.pred_draws for f in fs], axis=1)
            ci = _interval(np.array([at_record(row) for row in draws]), level)
        out.append((setting, key, len(fs), est, ci))
    return out


# ---------------------------------------------------------------- the continued-training account

KAPPA = 1.0  # training tokens one test-time training token is taken to be worth (see continued_training)


def parent_curve(parent_run: str | Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(training tokens, training loss in nats per token) of a constant-lr parent run, from its metrics.jsonl
    (the trainer's periodic ``train_loss``) and its summary's tokens per step; None where absent."""
    import json

    if not parent_run:
        return None
    d = Path(parent_run)
    try:
        summ = json.loads((d / "summary.json").read_text())
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    per_step = summ.get("train_tokens", 0) / max(1, summ.get("steps", 0) or 1)
    pts = [(r["step"] * per_step, r["train_loss"]) for r in rows
           if r.get("kind") == "train" and r.get("train_loss") is not None and not r.get("meta")]
    if len(pts) < 3 or per_step <= 0:
        return None
    t, l = np.array(pts, dtype=np.float64).T
    return t, l


def curve_drop(tokens: np.ndarray, loss: np.ndarray, at: float, extra: float) -> float | None:
    """L(at) − L(at + extra) of the curve ``loss(tokens)``, from a fit L = A·T^(−γ) + F to its points between at/2
    and 2·at (local: the drop over ``extra`` ≪ ``at`` is the curve's slope there); None with < 3 such points."""
    m = (tokens >= at / 2) & (tokens <= 2 * at)
    if m.sum() < 3:
        return None
    scale = 1e6  # tokens in millions: x^(−γ) stays in range
    f = fit_power_floor(tokens[m] / scale, loss[m])
    if f is None:
        return None
    x = np.array([at, at + extra]) / scale
    v = power_floor(x, *f)
    return float(v[0] - v[1])


@dataclass
class Account:
    """The continued-training account of one point's Δ_TTT (see :func:`continued_training`)."""

    point: LadderPoint
    key: str
    tokens: int  # S: tokens the adapter trained on (once)
    epochs: int
    delta: float  # the measured Δ (mean over runs where several)
    drop: float | None  # ΔL for κ·S·epochs more training tokens, from the branches' own curve
    drop_ci: tuple[float, float] | None
    drop_unique: float | None  # the same for κ·S (each test-time token counted once)
    remaining: float | None  # Δ − drop: what continued training does not account for
    remaining_ci: tuple[float, float] | None
    drop_parent: float | None  # ΔL from the parent's training-loss curve, in bpb of this setting's text


def continued_training(points: Sequence[LadderPoint], key: str = "ttt:sgd", level_proto: str = "sliding",
                       kappa: float = KAPPA, n_boot: int = 1000, seed: int = 0) -> list[Account]:
    """How much of Δ ``key`` more ordinary training would give (issue 29's continued-training account; the method
    is :data:`ACCOUNT_LEAD`'s). Why: test-time SGD at 32,768-token chunks is next-token training on the scored
    stream, so part of its gain is what κ·S more training tokens would give the base model anyway; a few passes
    over repeated tokens are worth nearly as much as fresh ones (data-constrained scaling), so κ = 1 per pass is
    the generous end and ``drop_unique`` the sparing one. Level and Δ come from the same joint resamples, so
    ``remaining`` = Δ − ΔL has its own interval; the parent's curve is converted with the set's tokens per byte."""
    out: list[Account] = []
    for grp in _groups(points):
        rows = [(p, lv, g, st) for p in grp if (lv := _series(p, "bpb", level_proto)) is not None
                and (g := _series(p, "delta", key)) is not None and (st := adapter_tokens(p, key)) is not None]
        if len({p.dn_trained for p, *_ in rows}) < 3:
            continue
        j = _joint([lv for _, lv, _, _ in rows] + [g for _, _, g, _ in rows], n_boot, seed)
        if j is None:
            continue
        est, boots = j
        m = len(rows)
        x = np.array([p.dn_trained for p, *_ in rows])
        n = rows[0][0].n_params
        extra = np.array([kappa * s * e / n for *_, (s, e) in rows])
        extra1 = np.array([kappa * s / n for *_, (s, _e) in rows])

        def drops(levels: np.ndarray, ext: np.ndarray) -> np.ndarray | None:
            f = fit_power_floor(x, levels)
            return None if f is None else power_floor(x, *f) - power_floor(x + ext, *f)

        d0, d1 = drops(est[:m], extra), drops(est[:m], extra1)
        bd = [drops(b[:m], extra) for b in boots]
        bd_ok = np.array([v for v in bd if v is not None])
        brem = np.array([b[m:] - v for b, v in zip(boots, bd) if v is not None])
        for i, (p, _lv, _g, (s, e)) in enumerate(rows):
            gain = float(est[m + i])
            curve = parent_curve(p.parent_run)
            dp = None
            if curve is not None:
                dn = curve_drop(*curve, p.dn_checkpoint * n, kappa * s * e)
                data = p.eval.get("data") or {}
                tpb = data.get("n_targets", 0) / data["n_bytes"] if data.get("n_bytes") else None
                dp = None if dn is None or tpb is None else dn * tpb / LN2
            out.append(Account(p, key, s, e, gain, None if d0 is None else float(d0[i]),
                               _interval(bd_ok[:, i]) if bd_ok.size else None,
                               None if d1 is None else float(d1[i]),
                               None if d0 is None else gain - float(d0[i]),
                               _interval(brem[:, i]) if brem.size else None, dp))
    return out


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


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if not ci else f"[{ci[0]:.5f}, {ci[1]:.5f}]"


def _dn(v: float | None, missing: str = "") -> str:
    return missing if v is None else f"{v:g}"


LADDER_LEAD = ("Ladder points (one decay branch each; N = non-embedding parameters; D/N trained = the branch's "
               "tokens, checkpoint + decay, over N). bpb and Δ are means over the cell's runs (document orders) where "
               "it ran several, with the hierarchical 95% interval (runs → documents); else order 0's value with the "
               "paired document-bootstrap interval, conditional on that order. The interval column says which. "
               "capped: the budget hit the pass cap and was saved there.")
POSITION_LEAD = ("Where the gain sits (order 0's pass, eval.json per_position; bits per byte within each part): Δ at "
                 f"document offsets < {OFFSET_SPLIT} (the first tokens after BOS: a gain there cannot be adaptation to "
                 "that document) against ≥ {OFFSET_SPLIT}, and in the first against the second half of the stream (a "
                 "gain that grows along the stream is learning carried across documents):").replace(
                     "{OFFSET_SPLIT}", str(OFFSET_SPLIT))
FIT_LEAD = "Fits Δ = A·(D/N)^(−γ) + F over D/N trained, per size and validation set"
RECORDS = {"context": ("0.0235 ± 0.0002", 0.0233, 0.0237), "ttt:sgd": ("0.0017–0.0028", 0.0017, 0.0028)}


def points_table(points: Sequence[LadderPoint], keys: Sequence[str]) -> list[str]:
    """One row per point: bpb of flat, sliding and the first adapter, each Δ with its interval and kind."""
    adapters = [k for k in keys if k != "context"]
    protos = ["flat", "sliding"] + adapters[:1]
    head = ("| model | setting | N | D/N requested | D/N trained | capped | "
            + " | ".join(f"{p} bpb" for p in protos) + " | "
            + " | ".join(f"Δ {k} | Δ {k} 95% CI" for k in keys)
            + " | interval | Δ_TTT / Δ_context (ttt:sgd) |")
    lines = [LADDER_LEAD, "", *table(head)]
    for p in points:
        cells, kinds = [], []
        for k in keys:
            d = point_delta(p, k)
            if d is None:
                cells += ["", ""]
                continue
            cells += [_f(d[0], True), _ci(d[1])]
            kinds.append((k, d[2]))
        ctx, sgd = point_delta(p, "context"), point_delta(p, "ttt:sgd")
        ratio = f"{sgd[0] / ctx[0]:.3f}" if ctx and sgd and ctx[0] else "n/a"
        same = len({kd for _, kd in kinds}) == 1
        kind = kinds[0][1] if same else "; ".join(f"{k}: {kd}" for k, kd in kinds) if kinds else "n/a"
        lines.append(f"| {p.model} | {p.setting} | {p.n_params:,} | "
                     f"{_dn(p.dn_requested)} | {p.dn_trained:.1f} | "
                     f"{'yes' if p.capped else 'no'} | " + " | ".join(_f(point_bpb(p, q)) for q in protos) + " | "
                     + " | ".join(cells) + f" | {kind} | {ratio} |")
    return lines + [""]


def position_table(points: Sequence[LadderPoint], keys: Sequence[str]) -> list[str]:
    rows = []
    for p in points:
        for k in keys:
            sp = position_split(p, k)
            if sp is None:
                continue
            rows.append(f"| {p.setting} | {p.model} | {k} | {_f(sp['early'], True)} | {_f(sp['late'], True)} | "
                        f"{_f(sp.get('first_half'), True)} | {_f(sp.get('second_half'), True)} |")
    if not rows:
        return []
    head = (f"| setting | model | Δ | offset < {OFFSET_SPLIT} | offset ≥ {OFFSET_SPLIT} | stream first half | "
            "stream second half |")
    return [POSITION_LEAD, "", *table(head), *rows, ""]


def fit_table(fits: Sequence[PowerFit], groups: int, n_boot: int) -> list[str]:
    kinds = ", ".join(dict.fromkeys(f.interval for f in fits)) or "documents"
    lines = [f"{FIT_LEAD} ({len(fits)} fits; a size needs >= 3 distinct budgets, {groups} setting × size groups "
             f"here; intervals: 95% percentile of refits under a joint bootstrap of {kinds}, one draw shared by "
             f"every point of a size, n={n_boot}; Δ at D/N {PREDICT_DN:g} is the fitted curve there):", ""]
    if not fits:
        return lines + ["No size has three budgets yet.", ""]
    lines += table("| setting | N | Δ | points | A | A 95% CI | γ | γ 95% CI | F | F 95% CI | "
                   f"Δ at D/N {PREDICT_DN:g} | Δ at D/N {PREDICT_DN:g} 95% CI | failed refits | note |")
    for f in fits:
        p = f.params or {}
        lines.append(f"| {f.setting} | {f.n_params:,} | {f.key} | {f.n_points} | {_f(p.get('A'), True)} | "
                     f"{_ci(f.ci.get('A'))} | {_f(p.get('gamma'))} | {_ci(f.ci.get('gamma'))} | "
                     f"{_f(p.get('F'), True)} | {_ci(f.ci.get('F'))} | {_f(p.get('pred'), True)} | "
                     f"{_ci(f.ci.get('pred'))} | {f.n_failed} of {f.n_boot} | {_fit_note(p)} |")
    return lines + [""]


ACCOUNT_LEAD = ("Continued-training account (issue 29): how much of Δ_TTT (`ttt:sgd`) ordinary training would "
                "give anyway. S = tokens the adapter trained on (the ledger's update positions), × its epochs; "
                "κ = {kappa:g}: one test-time token-pass counted as one fresh training token (repeated tokens are "
                "worth at most fresh ones, so this is the generous end; the 'κ·S once' column counts each token "
                "once). ΔL(κ·S) = L(D/N) − L(D/N + κ·S/N) from the size's own curve: sliding bpb of its decay "
                "branches on these documents, fitted as A·(D/N)^(−γ) + F (the same joint bootstrap as the fits, "
                "so Δ_TTT − ΔL has its interval). 'parent curve': the same drop from the constant-lr parent's "
                "training-loss curve (metrics.jsonl, training text) at the checkpoint, in this set's bits per "
                "byte. What remains is adaptation to the scored text (on a set the model did not train on it "
                "includes domain adaptation). A size needs >= 3 budgets.")


def account_table(accounts: Sequence[Account], kappa: float = KAPPA) -> list[str]:
    head = ("| setting | model | D/N trained | S (tokens) | epochs | Δ_TTT | ΔL(κ·S·epochs) | ΔL 95% CI | "
            "ΔL(κ·S once) | ΔL parent curve | Δ_TTT − ΔL | Δ_TTT − ΔL 95% CI |")
    rows = [f"| {a.point.setting} | {a.point.model} | {a.point.dn_trained:.1f} | {a.tokens:,} | "
            f"{a.epochs} | {_f(a.delta, True)} | {_f(a.drop, True)} | {_ci(a.drop_ci)} | "
            f"{_f(a.drop_unique, True)} | {_f(a.drop_parent, True)} | {_f(a.remaining, True)} | "
            f"{_ci(a.remaining_ci)} |" for a in accounts]
    return [ACCOUNT_LEAD.format(kappa=kappa), "", *table(head, rows), ""] if rows else []


def prediction_table(fits: Sequence[PowerFit]) -> list[str]:
    """The records' regime on the D/N axis: each size's fitted Δ at D/N 200 (the records' ≈ 5.5B tokens over
    ≈ 27M parameters) and its floor F, beside the records' logged Δs."""
    rows = [f for f in fits if f.key in RECORDS and f.params]
    sizes = sorted({f.n_params for f in fits})
    lines = [f"Prediction for the records' regime. Axis: D/N at fixed size — the records sit at D/N ≈ 200 "
             f"(≈ 5.5B tokens / ≈ 27M parameters), so each size's fit is read at D/N {PREDICT_DN:g}, with its "
             "floor F (D/N → ∞), beside the records' logged Δ. With fits at >= 3 sizes, a last row per Δ "
             f"extrapolates the value at D/N {PREDICT_DN:g} to the records' N = {RECORD_N:,} (least squares in "
             "ln N, interval from the same bootstrap draws; a factor of "
             f"{RECORD_N / max(sizes or [1]):.0f} in N beyond the largest size fitted). "
             f"Sizes with a fit here: {len(sizes)}"
             + (f" (N = {', '.join(f'{n:,}' for n in sizes)})" if sizes else "") + "."
             + (" **One size only: this is a statement about that size at the records' D/N, not a prediction for "
                "the records' 27M-parameter model.**" if len(sizes) == 1 else ""), ""]
    if not rows:
        return lines + ["No fit of Δ_context or Δ_TTT (ttt:sgd) yet.", ""]

    def records(key: str, ci: Sequence[float] | None) -> str:
        text, lo, hi = RECORDS[key]
        where = "n/a" if not ci else "records above" if lo > ci[1] else "records below" if hi < ci[0] else "overlap"
        return f"{text} | {where}"

    lines += table(f"| setting | N | Δ | fitted Δ at D/N {PREDICT_DN:g} | 95% CI | floor F | F 95% CI | records | "
                   "records vs interval |")
    for f in rows:
        free = f.params["gamma"] < 0.02  # log-like: A and F trade off, F is no floor (_fit_note)
        floor = "not identified (γ ≈ 0) | n/a" if free else f"{_f(f.params['F'], True)} | {_ci(f.ci.get('F'))}"
        lines.append(f"| {f.setting} | {f.n_params:,} | {f.key} | {_f(f.params['pred'], True)} | "
                     f"{_ci(f.ci.get('pred'))} | {floor} | {records(f.key, f.ci.get('pred'))} |")
    for setting, key, k, est, ci in size_extrapolation(fits):
        if key in RECORDS:
            lines.append(f"| {setting} | {RECORD_N:,} (extrapolated from {k} sizes, linear in ln N) | {key} | "
                         f"{_f(est, True)} | {_ci(ci)} | n/a | n/a | {records(key, ci)} |")
    return lines + [""]


def ladder_tables(done: Sequence[Any]) -> list[str]:
    """The ladder tables of one report section (empty when it holds no ladder points): points, where the gain sits,
    fits, the continued-training account and the prediction; the bootstraps resample as many times as the cells'
    own did."""
    points = ladder_points(done)
    if not points:
        return []
    n_boot = min(int(p.eval["bootstrap"]["n"]) for p in points)
    keys = delta_keys(points)
    groups = _groups(points)
    fits = [f for f in (fit_size(g, k, n_boot=n_boot) for g in groups for k in keys) if f is not None]
    lines = points_table(points, keys) + position_table(points, keys)
    lines += fit_table(fits, len(groups), n_boot)
    lines += account_table(continued_training(points, n_boot=n_boot))
    lines += prediction_table(fits)
    lines += ceiling_table(ceilings(points, n_boot=n_boot))
    return lines + flatness_table(flatness(points, n_boot=n_boot))


# ---------------------------------------------------------------- the ceiling (operational definition)

CEILING_TIME_MULTIPLE = 3.0  # the evaluation budget: an adapter may cost at most this many times sliding's time
# Why 3: the records' legal TTT (chunked SGD) cost 2.7× sliding's time on pg-mixed (docs/ceiling.md, conclusion 7),
# so the budget admits the record recipe and anything no dearer; the unrestricted best is reported beside it.

CEILING_LEAD = (
    "**The ceiling (operational definition).** Per branch (size N, budget D/N) and validation set: the largest "
    "legal Δ_TTT = bpb(sliding) − bpb(adapter) over every adapter protocol (ttt:, docttt:, with a non-null "
    "adapter) evaluated in that branch's cells on that set (the core, horizon, -ext and -ext-doc settings), each "
    "against the sliding of its own cell, i.e. on the same documents (for the docttt family this includes its "
    "document windows' difference from sliding: the score with adaptation against the score without), "
    "restricted to adapters whose measured evaluation time is at most {m:g}× sliding's in the same cell "
    "(eval.json cost.device_s_per_token: the timed part of the primary run, warm-up and tuning excluded; {m:g}× "
    "admits the records' chunked SGD, 2.7× sliding on pg-mixed). Δ is the mean over the cell's document orders "
    "where it ran several. Its 95% interval is the attaining adapter's: the evaluator's own for a ttt: adapter "
    "(the points table's: runs → documents where the cell ran several orders), else (the docttt family, whose "
    "recorded Δ starts from doc-chunk) a bootstrap of the cell's documents (and runs); it is not corrected for "
    "choosing the best of several adapters, so it leans high by the selection. Where the attaining cell also ran "
    "an illegal oracle protocol (oracle:), the ceiling is given as a fraction of the oracle's Δ over the same "
    "sliding (the same bootstrap draws), else the table says no oracle ran. 'best at any cost' drops the time "
    "limit. An adapter that hurts counts too: a negative ceiling means no adapter within budget helped.")
FLAT_LEAD = (
    "**Is the ceiling flat across sizes?** At a matched budget (the same requested D/N) and validation set, over "
    "the adapters evaluated at every size there (the same setting and protocol; the time limit applied per "
    "size): the ceiling against ln N, the least-squares slope per doubling of N, and the paired difference "
    "largest − smallest size, with 95% percentile intervals from bootstrap draws of the attaining adapters "
    "(one joint draw of documents and runs shared by all sizes where they scored the same documents, else "
    "independent draws per size). A slope whose interval includes 0 is not evidence of flatness, only of no "
    "resolved trend.")


@dataclass
class Candidate:
    """One adapter protocol of one cell as the ceiling sees it: its gain over the cell's sliding."""

    point: LadderPoint
    proto: str
    legal: bool  # legal and valid (no stream invalidated)
    oracle: bool
    time_ratio: float | None  # seconds per scored token over sliding's, same cell
    series: _Series  # per-document gain sliding − proto (and per run)

    @property
    def value(self) -> float:
        return self.series.value()

    @property
    def label(self) -> str:
        return f"{self.proto} ({self.point.setting})"


def _s_per_token(entry: dict[str, Any]) -> float | None:
    c = (entry.get("cost") or {}).get("device_s_per_token")
    if c:
        return float(c)
    w, n = entry.get("wallclock_s"), entry.get("tokens_scored")
    return float(w) / float(n) if w and n else None


def candidates(p: LadderPoint) -> list[Candidate]:
    """The adapter protocols of one cell (those with a non-null ``adapter``: ttt:, oracle:, docttt: with an
    adapter), each with its per-document gain over the cell's sliding; none without per-document nats."""
    per, protos = p.eval.get("per_document"), p.eval.get("protocols", {})
    if not per or "sliding" not in per["nats"] or "sliding" not in protos:
        return []
    nats, runs = per["nats"], (_runs(p) or {}).get("protocols", {})
    base_t = _s_per_token(protos["sliding"])
    base = _f64(nats["sliding"])
    out = []
    for name, e in protos.items():
        if not e.get("adapter") or name not in nats:
            continue
        pr = None
        if name in runs and "sliding" in runs:
            a, b = runs["sliding"].get("bpb_per_run"), runs[name].get("bpb_per_run")
            if a and b and len(a) == len(b):
                pr = _f64(a) - _f64(b)
        t = _s_per_token(e)
        out.append(Candidate(p, name, bool(e.get("legal")) and e.get("invalid") is None,
                             e.get("mode") == "oracle" or name.startswith("oracle:"),
                             None if t is None or not base_t else t / base_t,
                             _Series(base - _f64(nats[name]), _f64(per["bytes"]), pr)))
    return out


def _val_set(p: LadderPoint) -> str:
    m = p.eval.get("meta") or {}
    return str(m.get("val_fingerprint") or m.get("val") or p.setting)


def _eligible(c: Candidate, multiple: float) -> bool:
    return c.legal and not c.oracle and c.time_ratio is not None and c.time_ratio <= multiple


@dataclass
class Ceiling:
    """The ceiling of one branch on one validation set (see :data:`CEILING_LEAD`)."""

    model: str
    n_params: int
    dn_requested: float | None
    dn_trained: float
    settings: list[str]  # the cells (evaluator settings) of this branch on this set
    n_adapters: int  # legal adapter protocols seen
    best: Candidate | None  # within the time limit
    ci: tuple[float, float] | None
    best_any: Candidate | None  # at any cost
    too_slow: list[Candidate]  # legal adapters over the time limit (or without a timing)
    oracle: Candidate | None  # the best oracle of the attaining cell
    fraction: float | None
    fraction_ci: tuple[float, float] | None


def ceilings(points: Sequence[LadderPoint], multiple: float = CEILING_TIME_MULTIPLE, n_boot: int = 1000,
             seed: int = 0, only: set[tuple[str, str]] | None = None) -> list[Ceiling]:
    """The ceiling per branch and validation set; ``only`` restricts the adapters to these (setting, protocol)."""
    out = []
    for grp in _group(points, lambda p: (p.model, _val_set(p))).values():  # per branch and validation set
        cands = [c for p in grp for c in candidates(p) if only is None or (p.setting, c.proto) in only]
        legal = [c for c in cands if c.legal and not c.oracle]
        ok = [c for c in legal if _eligible(c, multiple)]
        best = max(ok, key=lambda c: c.value, default=None)
        best_any = max(legal, key=lambda c: c.value, default=None)
        oracle = ci = frac = frac_ci = None
        if best is not None:
            oracles = [c for c in cands if c.oracle and c.point is best.point]
            oracle = max(oracles, key=lambda c: c.value, default=None)
            j = _joint([best.series] + ([oracle.series] if oracle else []), n_boot, seed)
            own = best.point.delta(best.proto)
            pd = point_delta(best.point, best.proto) if own is not None and own.get("from") == "sliding" else None
            if pd is not None and pd[1]:  # the evaluator's own interval, as the points table gives it
                ci = (float(pd[1][0]), float(pd[1][1]))
            if j is not None:
                ci = ci or _interval(j[1][:, 0])
                if oracle is not None and oracle.value > 0:
                    frac = best.value / oracle.value
                    with np.errstate(divide="ignore", invalid="ignore"):
                        fr = np.where(j[1][:, 1] > 0, j[1][:, 0] / j[1][:, 1], np.nan)
                    frac_ci = _interval(fr)
        p0 = grp[0]
        out.append(Ceiling(p0.model, p0.n_params, p0.dn_requested, p0.dn_trained, sorted({p.setting for p in grp}),
                           len(legal), best, ci, best_any, [c for c in legal if not _eligible(c, multiple)],
                           oracle, frac, frac_ci))
    return sorted(out, key=lambda c: (c.settings[0], c.n_params, c.dn_trained, c.model))


def _own_draws(s: _Series, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap draws of one series alone (one series always shares its own documents)."""
    j = _joint([s], n_boot, seed)
    assert j is not None
    return j[1][:, 0]


@dataclass
class Flatness:
    """The ceiling against size at one matched budget and validation set."""

    settings: list[str]
    dn_requested: float | None
    rows: list[Ceiling]  # one per size, by N
    n_adapters: int  # adapters (setting, protocol) evaluated at every size
    slope: float | None  # per doubling of N
    slope_ci: tuple[float, float] | None
    diff: float | None  # largest − smallest size
    diff_ci: tuple[float, float] | None
    paired: bool  # one joint draw across sizes (the same documents)


def flatness(points: Sequence[LadderPoint], multiple: float = CEILING_TIME_MULTIPLE, n_boot: int = 1000,
             seed: int = 0) -> list[Flatness]:
    """Per validation set and requested D/N: the ceiling of each size over the adapters every size ran, its slope
    in ln N (per doubling) and the largest − smallest difference, with bootstrap intervals (see :data:`FLAT_LEAD`).
    A budget held by one size only gives a row with no slope."""
    out = []
    for (_vs, dn), grp in _group(points, lambda p: (_val_set(p), p.dn_requested)).items():
        # one branch per size (a second seed is another branch of the same size: keep the first model name)
        per_size: dict[int, str] = {}
        for p in sorted(grp, key=lambda q: q.model):
            per_size.setdefault(p.n_params, p.model)
        grp = [p for p in grp if per_size[p.n_params] == p.model]
        common: set[tuple[str, str]] | None = None
        for n in per_size:
            have = {(p.setting, c.proto) for p in grp if p.n_params == n for c in candidates(p)
                    if c.legal and not c.oracle}
            common = have if common is None else common & have
        rows = [c for c in ceilings(grp, multiple, n_boot, seed, only=common or set()) if c.best is not None]
        rows.sort(key=lambda c: c.n_params)
        slope = slope_ci = diff = diff_ci = None
        paired = False
        ser = [r.best.series for r in rows if r.best is not None]
        if len(ser) >= 2:
            j = _joint(ser, n_boot, seed)
            if j is not None:
                est, boots = j
                paired = True
            else:  # different documents: independent draws per size (different seeds)
                est = np.array([s.value() for s in ser])
                boots = np.stack([_own_draws(s, n_boot, seed + 1 + i) for i, s in enumerate(ser)], axis=1)
            x = np.log2([r.n_params for r in rows])
            slope = float(np.polyfit(x, est, 1)[0])
            slope_ci = _interval(np.array([np.polyfit(x, b, 1)[0] for b in boots]))
            diff = float(est[-1] - est[0])
            diff_ci = _interval(boots[:, -1] - boots[:, 0])
        out.append(Flatness(sorted({p.setting for p in grp}), dn, rows, len(common or ()), slope, slope_ci,
                            diff, diff_ci, paired))
    return sorted(out, key=lambda f: (f.settings[0], -(f.dn_requested or 0)))


def _ratio(c: Candidate | None) -> str:
    return "n/a" if c is None or c.time_ratio is None else f"{c.time_ratio:.2f}×"


def ceiling_table(cs: Sequence[Ceiling], multiple: float = CEILING_TIME_MULTIPLE) -> list[str]:
    if not cs:
        return []
    head = (f"| model | N | D/N requested | cells | legal adapters | ceiling (≤ {multiple:g}× sliding) | 95% CI | "
            "attained by | time / sliding | over the limit | best at any cost | oracle | ceiling / oracle Δ | "
            "95% CI |")
    lines = [CEILING_LEAD.format(m=multiple), "", *table(head)]
    for c in cs:
        slow = ", ".join(f"{s.label} {_ratio(s)}" for s in c.too_slow) or "none"
        anyc = "n/a" if c.best_any is None else f"{_f(c.best_any.value, True)} ({c.best_any.label})"
        if c.best is None:
            orc, fr, frci = "n/a", "n/a", "n/a"
        elif c.oracle is None:
            orc, fr, frci = f"none ran in {c.best.point.setting}", "n/a", "n/a"
        else:
            orc = f"{c.oracle.proto} {_f(c.oracle.value, True)}"
            fr = "n/a (oracle Δ ≤ 0)" if c.fraction is None else f"{c.fraction:.3f}"
            frci = _ci(c.fraction_ci) if c.fraction is not None else "n/a"
        lines.append(f"| {c.model} | {c.n_params:,} | {_dn(c.dn_requested)} | "
                     f"{', '.join(c.settings)} | {c.n_adapters} | "
                     + ("none within the limit | n/a | n/a | n/a" if c.best is None else
                        f"{_f(c.best.value, True)} | {_ci(c.ci)} | {c.best.label} | {_ratio(c.best)}")
                     + f" | {slow} | {anyc} | {orc} | {fr} | {frci} |")
    return lines + [""]


def flatness_table(fs: Sequence[Flatness]) -> list[str]:
    if not fs:
        return []
    lines = [FLAT_LEAD, ""]
    if all(len(f.rows) < 2 for f in fs):
        sizes = ", ".join(f"D/N {_dn(f.dn_requested, '?')} ({', '.join(f.settings)}):"
                          f" {len(f.rows)}" for f in fs)
        return lines + [f"Fewer than 2 sizes at every matched budget (sizes with a ceiling per budget: {sizes}): "
                        "no slope or difference yet.", ""]
    head = ("| cells | D/N requested | sizes | adapters compared | ceiling per size (N: Δ [95% CI] adapter) | "
            "slope per doubling of N | 95% CI | largest − smallest | 95% CI | draws | reading |")
    lines += table(head)
    for f in fs:
        per = "; ".join(f"{r.n_params:,}: {_f(r.best.value, True)} {_ci(r.ci)} {r.best.proto}" for r in f.rows
                        if r.best is not None)
        dn = _dn(f.dn_requested)
        if len(f.rows) < 2:
            lines.append(f"| {', '.join(f.settings)} | {dn} | {len(f.rows)} | {f.n_adapters} | {per or 'n/a'} | "
                         "fewer than 2 sizes | n/a | n/a | n/a | n/a | n/a |")
            continue
        ci = f.diff_ci
        reading = ("n/a" if ci is None else "falls with N" if ci[1] < 0 else "rises with N" if ci[0] > 0
                   else "no trend resolved (interval includes 0)")
        lines.append(f"| {', '.join(f.settings)} | {dn} | {len(f.rows)} | {f.n_adapters} | {per} | "
                     f"{_f(f.slope, True)} | {_ci(f.slope_ci)} | {_f(f.diff, True)} | {_ci(f.diff_ci)} | "
                     f"{'paired (same documents)' if f.paired else 'independent per size'} | {reading} |")
    return lines + [""]
