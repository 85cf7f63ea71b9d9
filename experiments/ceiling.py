#!/usr/bin/env python
"""The ceiling study: ``python experiments/ceiling.py --config experiments/ceiling_cpu.toml``.

Trains the configured models that are not trained yet, evaluates every (model × evaluator setting) cell that
has no complete run directory yet (resumable: done cells are skipped, a changed setting is a new cell), then
regenerates this study's sections of the report (docs/ceiling.md) and its plots from the run directories.
Exit codes: 0 all cells done; 1 some cell failed or is blocked (the report shows what is missing); 2 bad config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from metattt.study.config import StudyConfigError, load_study  # noqa: E402


def _stop_on_sigterm() -> None:
    """`timeout` and schedulers send SIGTERM: turn it into SystemExit so the runner stops its child processes."""
    import signal

    def stop(signum, frame):  # noqa: ANN001, ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ceiling.py", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="study TOML (see metattt/study/config.py)")
    ap.add_argument("--root", default=None, help="override [study].root (where run directories go)")
    ap.add_argument("--nproc", type=int, default=None, help="processes per trainer/evaluator (torchrun when > 1)")
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help="run only cells of this model, evaluator setting or report section, or one cell as "
                         "MODEL/SETTING (repeatable; shell-style wildcards, e.g. 'ladder-2m.*' or "
                         "'ladder-0.6m.dn*/*-horizon')")
    ap.add_argument("--dry-run", action="store_true", help="print what would run; write nothing")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the report from the run dirs")
    ap.add_argument("--no-report", action="store_true", help="run cells but leave the report alone")
    ap.add_argument("--replace-fewer", action="store_true",
                    help="regenerate a report section even when it was generated from more complete cells than "
                         "the run root now holds (by default such a section is kept)")
    args = ap.parse_args(argv)
    try:
        study = load_study(args.config, args.root)
    except StudyConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.nproc is not None and args.nproc < 1:
        print("error: --nproc must be positive", file=sys.stderr)
        return 2
    rc = 0
    if not args.report_only:
        from metattt.study.runner import run_study

        try:
            outcomes = run_study(study, nproc=args.nproc, dry_run=args.dry_run,
                                 only=set(args.only) if args.only else None)
        except StudyConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for o in outcomes:
            print(f"  {o.what:<48} {o.status}" + (f" ({o.seconds:.0f}s)" if o.seconds else ""))
        bad = [o for o in outcomes if o.status.startswith(("failed", "blocked"))]
        rc = 1 if bad else 0
    if not args.dry_run and not args.no_report:
        from metattt.study.report import write_report

        write_report(study, replace_fewer=args.replace_fewer)
    return rc


if __name__ == "__main__":
    _stop_on_sigterm()
    raise SystemExit(main())
