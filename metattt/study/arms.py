"""Arms of a meta-training study (issue 31): each arm against the no-meta reference, over training seeds and
documents, with an equivalence test at a margin fixed in the config, and one verdict word per arm.

Layout (``[arms]`` of the study TOML, e.g. experiments/ceiling_meta.toml): models are named ``ARM.sN`` (arm ARM,
training seed N: a decay branch with ``--branch-seed N``), and the evaluator setting of arm ARM on validation set
V is named ``V-ARM``. ``own`` gives each arm's own TTT protocol (the update it meta-trained for) and the reference
arm's protocol it is compared with (its meta-free counterpart: the same rule at its init); ``common`` protocols are
compared one to one. Every arm's setting scores flat and sliding too.

Quantities (arm − reference, per validation set): the final legal TTT bpb of the arm's own protocol (primary;
negative = the arm scores better), the bpb of each common protocol, Δ_TTT = bpb(sliding) − bpb(own) and
Δ_context = bpb(flat) − bpb(sliding) (positive = the arm gains more). Each cell's per-document nats are the mean
over its document orders (eval.json ``runs.doc_nats_mean``; one order when the evaluator ran one).

Intervals: a hierarchical bootstrap, seeds → documents: each resample draws the arms' seeds with replacement (paired
by seed when both arms have the same seeds: seed N of every arm continues the same checkpoint on the same data
order), then the documents with replacement, shared by every seed and both arms (the same documents); the
estimate is the mean over the drawn seeds of the ratio-of-sums bpb (as ``metattt.eval.stats``). Tests on the same
resamples, Holm-corrected across the arms of one quantity and validation set: equivalence (TOST at ±margin: the
larger of the resamples' shares at or beyond −margin and +margin) and difference (twice the smaller share on
either side of 0). Verdict (primary quantity): ``equivalent`` when TOST rejects, else ``better`` / ``worse`` when
the difference test rejects, else ``unresolved``, with the number of seeds that would resolve it: the bootstrap
variance split into a seed part (seeds resampled, documents fixed) and a document part (documents resampled),
the seed part scaled by S/N for N seeds, and N the smallest count at which a normal-approximation interval at the
Bonferroni level α/k (k arms; Holm needs at most that) would decide either test, the estimate held fixed.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .markdown import link, num, table

LN2 = math.log(2.0)
_SEEDED = re.compile(r"^(?P<arm>.+)\.s(?P<seed>\d+)$")
MAX_SEEDS = 1000  # the seed count estimate looks this far


@dataclass(frozen=True)
class ArmsConfig:
    section: str
    reference: str
    margin_bpb: float
    alpha: float
    valsets: tuple[str, ...]
    own: dict[str, tuple[str, str]]  # arm -> (its own protocol, the reference's counterpart)
    common: tuple[str, ...] = ("ttt:sgd",)
    n_boot: int = 2000
    seed: int = 0
    seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # arm -> its training seeds (from model names)

    @property
    def arms(self) -> list[str]:
        return [a for a in self.own if a != self.reference]


def parse_arms(d: Any, src: str, sections: dict[str, str], models: Sequence[Any], evals: Sequence[Any]) -> ArmsConfig:
    """Validate ``[arms]`` against the models and settings: a ValueError naming the problem (the config loader
    re-raises it as its StudyConfigError; raising that here would make arms and config import each other)."""
    where = f"{src} [arms]"
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must be a table")
    known = {"section", "reference", "margin_bpb", "alpha", "valsets", "own", "common", "bootstrap", "seed"}
    if set(d) - known:
        raise ValueError(f"{where}: unknown keys {sorted(set(d) - known)}; known: {sorted(known)}")
    section = str(d.get("section", ""))
    if section not in sections:
        raise ValueError(f"{where}: section {section!r} is not in [study.sections]")
    margin = d.get("margin_bpb")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin <= 0:
        raise ValueError(f"{where}: margin_bpb must be a positive number fixed before the runs, got {margin!r}")
    alpha = d.get("alpha", 0.05)
    if not isinstance(alpha, float) or not 0 < alpha < 0.5:
        raise ValueError(f"{where}: alpha must be in (0, 0.5), got {alpha!r}")
    own: dict[str, tuple[str, str]] = {}
    for arm, v in (d.get("own") or {}).items():
        pair = (v, v) if isinstance(v, str) else tuple(v) if isinstance(v, list) and len(v) == 2 else None
        if pair is None or not all(isinstance(x, str) for x in pair):
            raise ValueError(f"{where}: own.{arm} must be a protocol or [its protocol, the reference's]")
        own[arm] = pair  # type: ignore[assignment]
    reference = d.get("reference")
    if reference not in own or len(own) < 2:
        raise ValueError(f"{where}: reference {reference!r} and at least one other arm must be in [arms.own]")
    valsets = tuple(d.get("valsets") or ())
    common = tuple(d.get("common", ["ttt:sgd"]))
    seeds: dict[str, list[int]] = {}
    for m in models:
        hit = _SEEDED.match(m.name)
        if hit and hit["arm"] in own:
            seeds.setdefault(hit["arm"], []).append(int(hit["seed"]))
    by_name = {e.name: e for e in evals}
    for arm in own:
        if not seeds.get(arm):
            raise ValueError(f"{where}: arm {arm!r} has no model named {arm}.s<N>")
        for v in valsets:
            e = by_name.get(f"{v}-{arm}")
            if e is None or e.section != section:
                raise ValueError(f"{where}: arm {arm!r} needs an [[eval]] named {v}-{arm} in section {section}")
            need = {"flat", "sliding", own[arm][0], *common}
            if arm == reference:
                need |= {p for _, p in own.values()}
            if need - set(e.protocols):
                raise ValueError(f"{where}: [[eval]] {e.name} lacks protocols {sorted(need - set(e.protocols))}")
    boot = d.get("bootstrap", 2000)
    if not isinstance(boot, int) or boot < 100:
        raise ValueError(f"{where}: bootstrap must be an integer >= 100, got {boot!r}")
    return ArmsConfig(section, reference, float(margin), float(alpha), valsets, own, common, boot,
                      int(d.get("seed", 0)), {a: tuple(sorted(s)) for a, s in seeds.items()})


# ---------------------------------------------------------------- statistics

def cell_nats(ev: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """(bytes per document, protocol -> per-document nats averaged over the cell's runs, runs averaged)."""
    runs = ev.get("runs") or {}
    per = ev["per_document"]
    mean = runs.get("doc_nats_mean")
    nats = mean if mean else per["nats"]
    return (np.asarray(per["bytes"], dtype=np.float64), {k: np.asarray(v, dtype=np.float64) for k, v in nats.items()},
            int(runs.get("n_runs", 1)) if mean else 1)


@dataclass
class Comparison:
    """arm − reference of one quantity: point, interval, tests, and the variance split behind the seed estimate."""

    point: float
    lo: float
    hi: float
    p_tost: float
    p_diff: float
    var_seed: float
    var_doc: float
    n_seeds: int
    p_tost_holm: float = float("nan")
    p_diff_holm: float = float("nan")


def _bpb_samples(a: np.ndarray, b: np.ndarray, nbytes: np.ndarray, paired: bool, rng: np.random.Generator,
                 n: int, seeds: bool = True, docs: bool = True) -> np.ndarray:
    """Resampled bpb(a) − bpb(b) for (S, D) per-document nats: seeds then documents (either may be held fixed)."""
    from metattt.eval.stats import _resample_counts

    d = nbytes.size
    out = np.empty(n)
    block = 256
    for i in range(0, n, block):
        m = min(block, n - i)
        counts = _resample_counts(rng, d, m) if docs else np.ones((m, d))
        denom = counts @ nbytes

        def weights(s: int) -> np.ndarray:
            if not seeds:
                return np.full((m, s), 1.0 / s)
            return rng.multinomial(s, np.full(s, 1.0 / s), size=m).astype(np.float64) / s

        wa = weights(a.shape[0])
        wb = wa if paired else weights(b.shape[0])
        out[i:i + m] = (((wa @ a) - (wb @ b)) * counts).sum(1) / LN2 / denom
    return out


def compare(a: np.ndarray, b: np.ndarray, nbytes: np.ndarray, *, margin: float, paired: bool, n_boot: int = 2000,
            seed: int = 0, level: float = 0.95) -> Comparison:
    """bpb(a) − bpb(b) over seeds (rows) and documents (columns) of per-document nats (or nats gains)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    nbytes = np.asarray(nbytes, dtype=np.float64)
    if paired and a.shape != b.shape:
        raise ValueError(f"paired seeds need equal shapes, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    point = float((a.mean(0) - b.mean(0)).sum() / LN2 / nbytes.sum())
    s = _bpb_samples(a, b, nbytes, paired, rng, n_boot)
    q = (1 - level) / 2
    lo, hi = (float(x) for x in np.quantile(s, [q, 1 - q]))
    n = s.size
    p_tost = max((np.sum(s <= -margin) + 1) / (n + 1), (np.sum(s >= margin) + 1) / (n + 1))
    p_diff = min(1.0, 2 * min((np.sum(s <= 0) + 1) / (n + 1), (np.sum(s >= 0) + 1) / (n + 1)))
    var_seed = float(np.var(_bpb_samples(a, b, nbytes, paired, rng, n_boot, docs=False)))
    var_doc = float(np.var(_bpb_samples(a, b, nbytes, paired, rng, n_boot, seeds=False)))
    return Comparison(point, lo, hi, float(p_tost), float(p_diff), var_seed, var_doc, min(a.shape[0], b.shape[0]))


def holm_adjust(comps: Sequence[Comparison]) -> None:
    """Holm across the arms of one quantity, for both tests (metattt.eval.equivalence.holm)."""
    from metattt.eval.equivalence import holm

    for attr in ("p_tost", "p_diff"):
        for c, p in zip(comps, holm([getattr(c, attr) for c in comps])):
            setattr(c, attr + "_holm", p)


def seeds_to_resolve(c: Comparison, margin: float, alpha: float) -> int | None:
    """The smallest seed count whose normal-approximation interval (seed variance x S/N + document variance)
    would decide TOST or the difference at level ``alpha``, the estimate held fixed; None if none up to
    ``MAX_SEEDS`` would (the documents' part alone is too wide)."""
    from scipy.stats import norm

    z1, z2 = norm.ppf(1 - alpha), norm.ppf(1 - alpha / 2)
    for n in range(c.n_seeds + 1, MAX_SEEDS + 1):
        sd = math.sqrt(c.var_seed * c.n_seeds / n + c.var_doc)
        if abs(c.point) + z1 * sd < margin or abs(c.point) > z2 * sd:
            return n
    return None


def verdict(c: Comparison, margin: float, alpha: float, k: int) -> str:
    """One word per arm on a bpb difference (lower is better): equivalent, better, worse, or unresolved with the
    seeds that would resolve it."""
    if c.p_tost_holm < alpha:
        return "equivalent"
    if c.p_diff_holm < alpha:
        return "better" if c.point < 0 else "worse"
    n = seeds_to_resolve(c, margin, alpha / max(k, 1))
    if n is None:
        return "unresolved (more seeds alone would not resolve it: the documents' spread exceeds the margin)"
    return f"unresolved (≈{n} seeds would resolve it)"


# ---------------------------------------------------------------- gathering the run directories

@dataclass
class ArmCell:
    arm: str
    seed: int
    valset: str
    result: Any  # report.CellResult


def arm_cells(cfg: ArmsConfig, done: Sequence[Any]) -> list[ArmCell]:
    out = []
    for r in done:
        hit = _SEEDED.match(r.cell.model.name)
        if not hit or hit["arm"] not in cfg.own:
            continue
        valset, _, arm = r.cell.ev.name.partition("-")
        if arm == hit["arm"] and valset in cfg.valsets:
            out.append(ArmCell(arm, int(hit["seed"]), valset, r))
    return out


def _stack(cells: list[ArmCell], how) -> tuple[np.ndarray, list[int]]:
    cells = sorted(cells, key=lambda c: c.seed)
    return np.stack([how(cell_nats(c.result.eval)[1]) for c in cells]), [c.seed for c in cells]


def comparisons(cfg: ArmsConfig, cells: list[ArmCell], valset: str) -> dict[str, dict[str, Comparison]]:
    """quantity -> arm -> Comparison on one validation set; quantity ``primary`` (own protocol vs the reference's
    counterpart, bpb), each common protocol's name (bpb), ``ttt`` (Δ_TTT) and ``context`` (Δ_context). Each
    quantity is one Holm family. Arms with no done cell are left out."""
    mine = [c for c in cells if c.valset == valset]
    ref = [c for c in mine if c.arm == cfg.reference]
    if not ref:
        return {}
    nbytes = cell_nats(ref[0].result.eval)[0]
    if any(not np.array_equal(cell_nats(c.result.eval)[0], nbytes) for c in mine):
        raise ValueError(f"arms on {valset}: the cells did not score the same documents")
    out: dict[str, dict[str, Comparison]] = {}
    for arm in cfg.arms:
        ac = [c for c in mine if c.arm == arm]
        if not ac:
            continue
        own, ref_p = cfg.own[arm]
        specs = [("primary", lambda n: n[own], lambda n: n[ref_p])]
        specs += [(p, (lambda n, p=p: n[p]), (lambda n, p=p: n[p])) for p in cfg.common]
        specs += [("ttt", lambda n: n["sliding"] - n[own], lambda n: n["sliding"] - n[ref_p]),
                  ("context", lambda n: n["flat"] - n["sliding"], lambda n: n["flat"] - n["sliding"])]
        for slot, fa, fr in specs:
            a, sa = _stack(ac, fa)
            b, sb = _stack(ref, fr)
            out.setdefault(slot, {})[arm] = compare(a, b, nbytes, margin=cfg.margin_bpb, paired=sa == sb,
                                                    n_boot=cfg.n_boot, seed=cfg.seed)
    for comps in out.values():
        holm_adjust(list(comps.values()))
    return out


# ---------------------------------------------------------------- the report

def _p(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3g}"


def _meta_rows(run: Path) -> list[dict[str, Any]]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [r for r in (json.loads(x) for x in lines if x.strip()) if r.get("kind") == "meta"]


def _model_dir(study, arm: str, seed: int) -> Path:
    return study.model_dir(study.model(f"{arm}.s{seed}"))


def _summary(study, arm: str, seed: int) -> dict[str, Any] | None:
    try:
        return json.loads((_model_dir(study, arm, seed) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def arms_section(study, done: Sequence[Any], report_dir: Path) -> list[str]:
    """The arms' tables (and the meta-objective plot) for the report section of ``study.arms``."""
    cfg: ArmsConfig = study.arms
    cells = arm_cells(cfg, done)
    lines = [f"### Arms against `{cfg.reference}` (issue 31)", "",
             f"Equivalence margin ±{cfg.margin_bpb} bpb and α = {cfg.alpha}, fixed in `{study.source}` before the "
             f"runs. Differences are arm − `{cfg.reference}`: bpb rows negative = the arm scores better, Δ rows "
             "positive = the arm gains more. 95% CI: hierarchical bootstrap, training seeds → documents (paired by "
             f"seed when both arms have the same seeds), n={cfg.n_boot}; per-document nats are each cell's mean over "
             "its document orders. p: TOST at the margin and the two-sided difference, from the same resamples, "
             "Holm-corrected across the arms of each quantity. Verdict on the primary quantity (method: "
             "metattt/study/arms.py).", ""]
    lines += _compute_table(study, cfg, cells)
    for v in cfg.valsets:
        try:
            comps = comparisons(cfg, cells, v)
        except ValueError as e:
            lines += [f"**{v}**: {e}.", ""]
            continue
        if not comps:
            lines += [f"**{v}**: the reference arm has no evaluated cell yet.", ""]
            continue
        k = len(comps["primary"])
        lines += [f"**Validation set `{v}`**", "", *table(
            "| arm | seeds | quantity | arm − reference | 95% CI | p TOST (Holm) | p difference (Holm) | verdict |")]
        for arm in cfg.arms:
            for slot, comp in comps.items():
                c = comp.get(arm)
                if c is None:
                    continue
                label = _label(cfg, arm, slot)
                word = verdict(c, cfg.margin_bpb, cfg.alpha, k) if slot == "primary" else ""
                seeds = len([x for x in cells if x.arm == arm and x.valset == v])
                lines.append(f"| {arm} | {seeds} | {label} | {num(c.point, True)} | [{c.lo:+.5f}, {c.hi:+.5f}] | "
                             f"{_p(c.p_tost_holm)} | {_p(c.p_diff_holm)} | {word} |")
        lines.append("")
    lines += _curve_lines(study, cfg, report_dir)
    lines += _rates_lines(study, cfg)
    return lines


def _label(cfg: ArmsConfig, arm: str, slot: str) -> str:
    own, ref = cfg.own[arm]
    if slot == "primary":
        return f"**final legal TTT bpb**: `{own}` vs `{ref}`"
    if slot == "ttt":
        return f"Δ_TTT: sliding → `{own}` vs → `{ref}`"
    if slot == "context":
        return "Δ_context: flat → sliding"
    return f"bpb `{slot}`"


def _compute_table(study, cfg: ArmsConfig, cells: list[ArmCell]) -> list[str]:
    """Per arm, from the models' summary.json: training steps of the branch, meta steps, counted FLOPs."""
    rows = []
    ref_flops = None
    for arm in [cfg.reference, *cfg.arms]:
        summ = [x for s in cfg.seeds.get(arm, ()) if (x := _summary(study, arm, s)) is not None]
        fl = [x["flops"]["run"] for x in summ if (x.get("flops") or {}).get("run")]
        if not fl:
            rows.append(f"| {arm} | 0 of {len(cfg.seeds.get(arm, ()))} | | | | |")
            continue
        mean = float(np.mean(fl))
        ref_flops = mean if arm == cfg.reference else ref_flops
        steps = np.mean([x["flops"]["steps"] for x in summ if x.get("flops")])
        msteps = np.mean([x["flops"]["meta_steps"] for x in summ if x.get("flops")])
        ratio = f"{mean / ref_flops:.4f}" if ref_flops else "n/a"
        rows.append(f"| {arm} | {len(fl)} of {len(cfg.seeds[arm])} | {steps:.1f} | {msteps:.1f} | {mean:.4g} | {ratio} |")
    return ["Training compute of each arm's decay branches (mean over seeds; counted FLOPs of the branch's own steps, "
            "summary.json `flops.run`):", "",
            *table("| arm | seeds trained | steps | meta steps | FLOPs | FLOPs / reference's |", rows), ""]


def _curve_lines(study, cfg: ArmsConfig, report_dir: Path) -> list[str]:
    """The meta-objective per arm: L_post (after the inner loop) and L_pre − L_post, first and last tenth of the
    meta steps (mean over seeds), and a plot of the curves."""
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for arm in cfg.arms:
        for s in cfg.seeds.get(arm, ()):
            rows = _meta_rows(_model_dir(study, arm, s))
            if rows:
                curves.setdefault(arm, []).append(rows)
    if not curves:
        return []
    lines = ["Meta-objective during meta-training (metrics.jsonl `kind: meta`, one record per meta step; mean over "
             "seeds of the first and the last tenth of the meta steps): L_post is the outer split's loss after the "
             "inner loop (the meta-objective), L_pre before it; gain = L_pre − L_post.", "",
             *table("| arm | seeds | meta steps | L_post first → last | L_pre first → last | "
                    "gain first → last |")]

    def ends(runs, key):
        firsts, lasts = [], []
        for rows in runs:
            v = [r[key] for r in rows if key in r]
            if v:
                t = max(1, len(v) // 10)
                firsts.append(np.mean(v[:t]))
                lasts.append(np.mean(v[-t:]))
        return (f"{np.mean(firsts):.4f} → {np.mean(lasts):.4f}") if firsts else "n/a"

    for arm, runs in curves.items():
        lines.append(f"| {arm} | {len(runs)} | {len(runs[0])} | {ends(runs, 'meta/L_post')} | "
                     f"{ends(runs, 'meta/L_pre')} | {ends(runs, 'meta/gain')} |")
    lines.append("")
    path = meta_curve_plot(curves, Path(study.plots) / f"{study.name}-{cfg.section}-meta-objective.png")
    if path is not None:
        lines += [f"![meta-objective]({link(path, report_dir)})", ""]
    return lines


def meta_curve_plot(curves: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path | None:
    """L_post and the gain L_pre − L_post against the meta step, one line per arm (mean over seeds at each step)."""
    from .plots import SIZE, _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(SIZE[0] * 1.6, SIZE[1]))
    drawn = False
    for arm, runs in curves.items():
        for ax, key in zip(axes, ("meta/L_post", "meta/gain")):
            by: dict[int, list[float]] = {}
            for rows in runs:
                for r in rows:
                    if key in r:
                        by.setdefault(r["step"], []).append(r[key])
            if by:
                xs = sorted(by)
                ax.plot(xs, [np.mean(by[x]) for x in xs], label=arm, lw=1)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(xlabel="step", ylabel="L_post (nats)", title="meta-objective")
    axes[1].set(xlabel="step", ylabel="L_pre − L_post (nats)", title="inner-loop gain")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _rates_lines(study, cfg: ArmsConfig) -> list[str]:
    """Learned rates (summary.json ``meta_params``, ``log_lr.*``) per arm and tensor: geometric mean, min and max
    over seeds of each tensor's geometric-mean rate."""
    rows = []
    for arm in cfg.arms:
        per: dict[str, list[dict[str, Any]]] = {}
        for s in cfg.seeds.get(arm, ()):
            for name, r in ((_summary(study, arm, s) or {}).get("meta_params") or {}).items():
                if r.get("kind") == "rate":
                    per.setdefault(name, []).append(r)
        for name, rs in per.items():
            g = [r["geomean"] for r in rs]
            rows.append(f"| {arm} | `{name[len('log_lr.'):]}` | {rs[0]['init']} | {math.exp(np.mean(np.log(g))):.3g} | "
                        f"{min(r['min'] for r in rs):.3g} | {max(r['max'] for r in rs):.3g} | {len(rs)} |")
    if not rows:
        return []
    return ["Learned inner learning rates at the end of meta-training (summary.json `meta_params`; per tensor the "
            "geometric mean over its slices, then over seeds; min / max over slices and seeds):", "",
            *table("| arm | tensor | init | learned (geometric mean) | min | max | seeds |", rows), ""]
