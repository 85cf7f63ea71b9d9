#!/usr/bin/env python
"""Does a speed lever change what training learns? Its loss curve against the seed-to-seed spread (issue 33).

A lever that changes numerics (the bf16 residual stream, FP8 GEMMs) may become a default only if a run with it
stays within the spread two seeds of the plain run show: at equal steps, on the same data. This trains the base
configuration at two seeds and each lever at the same two seeds with the trainer (``experiments/meta_ttt.py``, one
process per arm, run directories ``RUNS/lq-ARM-sSEED``), then compares:

- the **curve**: the mean |Δ train loss| over the log points of the second half of training, lever vs base at the
  same seed (what the lever moves), against base seed 1 vs base seed 2 (what a seed moves);
- the **end**: the flat val bpb after the int6 round trip (``summary.json``'s ``val_bpb_quant``), the same pairs.

A lever passes when both of its same-seed differences (averaged over the two seeds) are at most the seed spread.
Two seeds give a spread, not a distribution: the verdict says "within one seed's spread", nothing finer.

    python benchmarks/lever_quality.py --lever bf16="--runtime.residual-dtype bfloat16" \\
        --lever fp8="--runtime.residual-dtype bfloat16 --runtime.fp8 on" --steps 500 -- \\
        --preset pg-2026-03-23 --train-batch-tokens 196608 --data data/pg --tokenizer TOK --val-pattern VAL
    python benchmarks/lever_quality.py --compare-only --lever bf16= --lever fp8=     # re-read RUNS/lq-*

Everything after ``--`` goes to every arm's trainer; ``--base`` adds flags to the base arm only. Run again, it keeps
the finished arms and trains the rest (an unfinished run directory is moved aside), so a study larger than one
device call's limit is the same command in chained calls.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    name: str
    flags: tuple[str, ...]


def parse_lever(text: str) -> Arm:
    """``NAME=FLAGS`` -> Arm; NAME must be a plain word (it names run directories)."""
    name, sep, flags = text.partition("=")
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum() or name == "base":
        raise ValueError(f"--lever {text!r}: expected NAME=FLAGS with NAME a word other than 'base'")
    return Arm(name, tuple(shlex.split(flags)))


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / f"lq-{arm}-s{seed}"


def read_run(path: Path) -> tuple[dict[int, float], float]:
    """(step -> logged train loss, val_bpb_quant) of one finished run; ValueError naming what is missing."""
    summary, metrics = path / "summary.json", path / "metrics.jsonl"
    if not summary.is_file() or not metrics.is_file():
        raise ValueError(f"{path}: not a finished run (needs summary.json and metrics.jsonl)")
    curve = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("kind") == "train":
            curve[int(rec["step"])] = float(rec["train_loss"])
    return curve, float(json.loads(summary.read_text())["val_bpb_quant"])


def curve_gap(a: dict[int, float], b: dict[int, float]) -> float:
    """Mean |a - b| over the log points both have in the second half of training."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise ValueError("the two runs share no logged step")
    late = [s for s in steps if s > steps[-1] / 2] or steps[-1:]
    return sum(abs(a[s] - b[s]) for s in late) / len(late)


def compare(runs: Path, levers: list[Arm], seeds: tuple[int, int]) -> dict:
    base = {s: read_run(run_dir(runs, "base", s)) for s in seeds}
    spread = {"curve": curve_gap(base[seeds[0]][0], base[seeds[1]][0]),
              "end": abs(base[seeds[0]][1] - base[seeds[1]][1])}
    out = {"seeds": list(seeds), "seed_spread": spread, "base_end": {s: base[s][1] for s in seeds}, "levers": {}}
    for arm in levers:
        lev = {s: read_run(run_dir(runs, arm.name, s)) for s in seeds}
        curve = sum(curve_gap(lev[s][0], base[s][0]) for s in seeds) / 2
        end = sum(lev[s][1] - base[s][1] for s in seeds) / 2  # signed: a lever that is worse shows +
        out["levers"][arm.name] = {"curve": curve, "end": end, "end_by_seed": {s: lev[s][1] for s in seeds},
                                   "within": curve <= spread["curve"] and abs(end) <= spread["end"]}
    return out


def show(res: dict) -> str:
    s1, s2 = res["seeds"]
    sp = res["seed_spread"]
    lines = [f"seed spread (base s{s1} vs s{s2}): curve {sp['curve']:.4f} nats, end {sp['end']:.5f} bpb "
             f"(int6 round trip: {res['base_end'][s1]:.5f}, {res['base_end'][s2]:.5f})",
             f"{'lever':<12}{'curve gap':>11}{'end Δ bpb':>12}  verdict"]
    for name, r in res["levers"].items():
        verdict = "within one seed's spread" if r["within"] else "OUTSIDE the seed spread"
        lines.append(f"{name:<12}{r['curve']:>11.4f}{r['end']:>+12.5f}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lever", action="append", default=[], help="NAME=FLAGS (trainer flags of that arm); repeat")
    ap.add_argument("--base", default="", help="trainer flags of the base arm only")
    ap.add_argument("--seeds", default="1,2", help="the two seeds every arm runs at")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--runs", default="runs", help="where the run directories go (RUNS/lq-ARM-sSEED)")
    ap.add_argument("--compare-only", action="store_true", help="train nothing; compare the runs already there")
    ap.add_argument("--out", default="", help="write the comparison as JSON here")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        levers = [parse_lever(t) for t in args.lever]
        seeds = tuple(int(s) for s in args.seeds.split(","))
        if len(seeds) != 2 or seeds[0] == seeds[1]:
            raise ValueError(f"--seeds {args.seeds!r}: give two different seeds")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not levers:
        print("error: give at least one --lever NAME=FLAGS", file=sys.stderr)
        return 2
    runs = Path(args.runs)
    if not args.compare_only:
        arms = [Arm("base", tuple(shlex.split(args.base)))] + levers
        for arm in arms:
            for s in seeds:
                d = run_dir(runs, arm.name, s)
                if (d / "summary.json").is_file():
                    print(f"{d}: finished before, kept", flush=True)
                    continue
                if d.exists():  # cut short by a call's time limit: kept aside, the arm trains again from the start
                    aside = next(d.with_name(f"{d.name}.interrupted{i}") for i in range(1, 10**6)
                                 if not d.with_name(f"{d.name}.interrupted{i}").exists())
                    d.rename(aside)
                    print(f"{d}: unfinished, moved to {aside.name}", flush=True)
                cmd = [sys.executable, str(ROOT / "experiments" / "meta_ttt.py"), *extra, *arm.flags,
                       "--iterations", str(args.steps), "--seed", str(s), "--final-eval", "off",
                       "--run-root", str(runs), "--run-name", d.name, "--wandb", "off"]
                print("$ " + shlex.join(cmd), flush=True)
                if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                    print(f"error: arm {arm.name} seed {s} failed ({shlex.join(cmd)})", file=sys.stderr)
                    return 1
    try:
        res = compare(runs, levers, seeds)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(show(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
