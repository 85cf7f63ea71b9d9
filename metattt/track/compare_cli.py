"""The ``python -m metattt compare`` command: reads runs, compares them (:mod:`metattt.track.compare`), prints the
markdown table and writes the output files and plots (:mod:`metattt.track.plots`). It sits above both, so that the
plots can take the comparison's types without the comparison importing its plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from metattt.track import jsonio
from metattt.track import plots as P
from metattt.track.compare import (CURVE_KEYS, METRIC_HELP, CompareError, Comparison, compare_runs, load_runs,
                                   load_wandb_runs, runs_csv, to_csv, to_json, to_markdown)


def write_outputs(cmp: Comparison, out: Path, *, precision: int = 4, plots: bool = True,
                  curve_key: str | None = None) -> list[Path]:
    """Write compare.md/.csv/.json, runs.csv and (when there is data for them) the PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("compare.md", to_markdown(cmp, precision)), ("compare.csv", to_csv(cmp)),
                       ("runs.csv", runs_csv(cmp)), ("compare.json", jsonio.dumps(to_json(cmp), indent=2) + "\n")):
        jsonio.write_atomic(out / name, text)
        written.append(out / name)
    if plots:
        written += [p for p in (P.plot_learning_curves(cmp, out / "learning_curves.png", key=curve_key),
                                P.plot_running_delta(cmp, out / "ttt_delta_curves.png"),
                                P.plot_metric_bars(cmp, out / "metric_bars.png")) if p is not None]
    return written


def build_parser(prog: str = "python -m metattt compare") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, epilog=METRIC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Compare runs: per-group mean ± t-CI over seeds, paired deltas to a "
                                            "baseline, plots.")
    p.add_argument("runs", nargs="*", type=Path, help="run directories (or directories of run directories)")
    p.add_argument("--by", default=None, help="comma-separated grouping fields (dotted paths into config.json)")
    p.add_argument("--metric", default="ttt_delta", help="metric name or dotted path (default: ttt_delta)")
    p.add_argument("--baseline", default=None, help="baseline group label, its value(s), or a run name/path")
    p.add_argument("--seed-key", default="seed", help="config field pairing runs across groups (default: seed)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default: 0.95)")
    p.add_argument("--precision", type=int, default=4, help="decimals in the markdown table (default: 4)")
    p.add_argument("--out", type=Path, default=None, help="directory for compare.md/.csv/.json, runs.csv, PNGs")
    p.add_argument("--curve-key", default=None, help=f"learning-curve key in metrics.jsonl (default: first of {', '.join(CURVE_KEYS)})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--wandb-project", default=None, help="also read runs from this wandb project (online API)")
    p.add_argument("--wandb-entity", default=None)
    p.add_argument("--wandb-group", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.level < 1.0:
        print(f"error: --level must be in (0, 1), got {args.level}", file=sys.stderr)
        return 2
    if not args.runs and not args.wandb_project:
        print("error: give run directories and/or --wandb-project", file=sys.stderr)
        return 2
    missing = [str(r) for r in args.runs if not r.exists()]
    if args.runs and len(missing) == len(args.runs) and not args.wandb_project:
        print(f"error: {' '.join(missing)} matched no run directory (no such path: a shell glob that matches "
              "nothing is passed on unexpanded)", file=sys.stderr)
        return 2
    try:
        runs, skipped = load_runs(args.runs)
        if args.wandb_project:
            runs += load_wandb_runs(args.wandb_project, entity=args.wandb_entity, group=args.wandb_group)
        for s in skipped:
            print(f"skipping {s.name}: {s.reason}", file=sys.stderr)
        by = [b.strip() for b in args.by.split(",") if b.strip()] if args.by else None
        cmp = compare_runs(runs, metric=args.metric, by=by, baseline=args.baseline, seed_key=args.seed_key,
                           level=args.level, skipped=skipped)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in cmp.skipped[len(skipped):]:
        print(f"skipping {s.name}: {s.reason}", file=sys.stderr)
    for w in cmp.warnings:
        print(f"warning: {w}", file=sys.stderr)
    sys.stdout.write(to_markdown(cmp, args.precision))
    if args.out is not None:
        for p in write_outputs(cmp, args.out, precision=args.precision, plots=not args.no_plots, curve_key=args.curve_key):
            print(f"wrote {p}", file=sys.stderr)
    if not cmp.groups:
        print(f"error: no run had a usable {args.metric!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
