"""The main job's last step: the legal evaluator's decomposition (flat → sliding → TTT) of the artifact just
written, beside the analytic room TTT has on the synthetic corpus.

Why here and in-process: a newcomer's one command should show what the project is for, not only a training bpb.
``short`` (the tiny preset's default) scores a prefix of the val stream in small chunks so that the whole main
job stays within a few minutes on a 2-core CPU; ``full`` uses the evaluator's own defaults; ``off`` skips it.
The room is the window bound − bayes_unknown on exactly the scored tokens, the window bound exact for the contexts
sliding windows (context W, stride S) give each target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..track.jsonio import restore_nonfinite
from .config import TrainConfig


@dataclass(frozen=True)
class FinalEvalPlan:
    """How much of the evaluator runs after training (None = the evaluator's default)."""

    max_tokens: int | None
    chunk_tokens: int | None
    bootstrap: int = 1000


# short: 65,536 val tokens (~30 documents of the synthetic corpus) in 2,048-token chunks, so the TTT adapter
# updates several times inside each document (with 32,768-token chunks it would only see past documents)
FINAL_EVAL_PLANS: dict[str, FinalEvalPlan | None] = {
    "short": FinalEvalPlan(max_tokens=65_536, chunk_tokens=2048),
    "full": FinalEvalPlan(max_tokens=None, chunk_tokens=None),
    "off": None,
}
META_KEY = "meta"  # protocol key of the meta-trained adapter (ttt:meta), so it never shadows a registry name
DOC_KEY = "doc"  # protocol key of TrainConfig.final_eval_adapter (ttt:doc)


def check_mode(mode: str) -> FinalEvalPlan | None:
    if mode not in FINAL_EVAL_PLANS:
        raise ValueError(f"--final-eval must be one of {', '.join(FINAL_EVAL_PLANS)}, got {mode!r}")
    return FINAL_EVAL_PLANS[mode]


def evaluator_argv(cfg: TrainConfig, artifact: str, plan: FinalEvalPlan) -> list[str]:
    """The evaluator's command line for this run's artifact (its run directory receives eval.json)."""
    protocols = "flat,sliding,ttt:sgd"
    argv = [artifact, "--bootstrap", str(plan.bootstrap), "--device", cfg.device, "--quiet"]
    argv += [a for m in cfg.meta.adapter_modules for a in ("--adapter-module", m)]  # its plug-ins
    if cfg.meta.per_document:  # batched: docttt:NAME; a learned init (init=meta) beside the random one, same options
        opts = [o.strip() for o in cfg.meta.adapter.partition(":")[2].split(",")
                if o.strip() and not o.strip().startswith("init=")]
        head = f",docttt:{cfg.meta.adapter_name}@" + "/".join([f"window={cfg.seq_len}", *opts])  # the trained context
        protocols += (head + "/init=meta" if "init" in cfg.meta.make_adapter().cfg.to_dict() else "") + head
    elif cfg.meta.adapter:
        protocols += f",ttt:{META_KEY}"
        argv += ["--adapter-spec", f"{META_KEY}={cfg.meta.adapter}"]
    if cfg.final_eval_adapter:
        protocols += f",ttt:{DOC_KEY}"
        argv += ["--adapter-spec", f"{DOC_KEY}={cfg.final_eval_adapter}"]
    argv += ["--protocols", protocols]
    if plan.max_tokens is not None:
        argv += ["--max-tokens", str(plan.max_tokens)]
    if plan.chunk_tokens is not None:
        argv += ["--chunk-tokens", str(plan.chunk_tokens)]
    if cfg.wandb:
        argv += ["--wandb", cfg.wandb]
    return argv


def analytic_room(artifact_meta: dict[str, Any], n_tokens: int, context: int,
                  stride: int | None = None) -> dict[str, Any] | None:
    """``bayes_window − bayes_unknown`` on the first ``n_tokens`` val tokens (synthetic data only).

    With ``stride`` the window bound is exact for the sliding protocol scored: each target's Bayes reader sees
    exactly the tokens its window feeds (``context - stride + 1`` to ``context``, fewer at a document's start;
    ``metattt.data.synthetic.protocol_bounds``). Without it, every target sees ``context`` tokens: the corpus's
    meta.json bounds (stored in the artifact) are used when they cover exactly the scored stream and this window;
    otherwise the same function that wrote them computes them for the scored prefix."""
    if artifact_meta.get("data") != "synthetic" or "synthetic_spec" not in artifact_meta:
        return None
    key = f"bayes_window{context}_bpb"
    bounds = artifact_meta.get("bounds") or {}
    source = "meta.json"
    if stride is not None or bounds.get("n_tokens") != n_tokens or key not in bounds:
        from ..data.loaders import load_val_tokens
        from ..data.synthetic import SyntheticSpec, protocol_bounds, synthetic_bounds

        spec = SyntheticSpec.from_dict(artifact_meta["synthetic_spec"])
        tokens = load_val_tokens(artifact_meta["val_pattern"], vocab_size=spec.vocab_size)[:n_tokens].numpy()
        source = "computed for the scored prefix"
        if stride is not None:
            from ..eval.windows import context_starts, sliding_plan

            pb = protocol_bounds(spec, tokens, context_starts(sliding_plan(tokens.size, context, stride)))
            bounds = {key: pb["window_bpb"], "bayes_unknown_bpb": pb["document_bpb"]}
            source = (f"exact for sliding's {max(1, context - stride + 1)}..{context}-token contexts, " + source)
        else:
            bounds = synthetic_bounds(spec, tokens, windows=(context,))
    room = bounds[key] - bounds["bayes_unknown_bpb"]
    return {"window": context, "stride": stride, "bayes_window_bpb": bounds[key],
            "bayes_unknown_bpb": bounds["bayes_unknown_bpb"], "room_bpb": room, "source": source}


def _ci(ci: list[Any]) -> list[float | None]:
    return restore_nonfinite(list(ci))  # eval.json spells a non-finite bound (one scored document) "NaN"


def decomposition(report: dict[str, Any]) -> dict[str, Any]:
    """Per protocol: bpb, CI, the gain over the protocol it builds on, and (TTT) the share of the room."""
    from ..eval.protocols import parse_protocol

    am = report.get("meta", {}).get("artifact_meta", {})
    stride = report["config"].get("stride")  # absent: every target is taken to see the whole context
    room = analytic_room(am, report["data"]["n_tokens"], int(report["config"]["context"]),
                         None if stride is None else int(stride))
    rows = []
    for name, p in report["protocols"].items():
        adapts = parse_protocol(name).adapts
        row: dict[str, Any] = {"protocol": name, "bpb": p["bpb"], "ci95": _ci(p["ci95"]), "legal": p["legal"],
                               "adapts": adapts}
        key = "context" if name == "sliding" else name
        d = report["deltas"].get(key)
        if d is not None:
            row["gain"], row["gain_ci95"] = d["value"], _ci(d["ci95"])
            if adapts and room is not None and room["room_bpb"] > 0:
                row["share"] = d["value"] / room["room_bpb"]
                row["share_ci95"] = [None if v is None else v / room["room_bpb"] for v in row["gain_ci95"]]
        rows.append(row)
    return {"rows": rows, "room": room}


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_decomposition(dec: dict[str, Any], report: dict[str, Any], plan_name: str,
                         trainer: dict[str, Any] | None = None) -> str:
    """The decomposition table; ``trainer`` (its summary) labels how this flat differs from the trainer's."""
    d = report["data"]
    lines = [f"\n== the decomposition: legal score-first evaluator, {plan_name} (the first {d['n_tokens']:,} val "
             f"tokens: {d['n_targets']:,} scored targets, {d['n_docs']:,} documents; 95% CIs: paired document "
             "bootstrap) =="]
    w = max([10] + [len(r["protocol"]) + 2 for r in dec["rows"]])
    lines.append(f"  {'protocol':<{w}}{'bpb':>8}  {'95% CI':<18}  {'gain over previous':<30}  share of the room")
    for r in dec["rows"]:
        ci = f"[{_num(r['ci95'][0], '.4f')}, {_num(r['ci95'][1], '.4f')}]"
        gain = ""
        if "gain" in r:
            what = "TTT" if r.get("adapts", r["protocol"] != "sliding") else "context"
            gain = (f"{what} {r['gain']:+.4f} [{_num(r['gain_ci95'][0], '+.4f')}, "
                    f"{_num(r['gain_ci95'][1], '+.4f')}]")
        share = ""
        if "share" in r:
            lo, hi = r["share_ci95"]
            share = f"{100 * r['share']:.1f}% [{_num(None if lo is None else 100 * lo, '.1f')}%, " \
                    f"{_num(None if hi is None else 100 * hi, '.1f')}%]"
        if r["protocol"] == "flat" and not gain:  # not the trainer's flat number: say on which targets, on its line
            gain = f"on these {d['n_targets']:,} targets only"
            if trainer and "val_bpb_quant" in trainer and "val_tokens" in trainer:
                gain += (f" (the trainer's flat {trainer['val_bpb_quant']:.4f} above: all "
                         f"{int(trainer['val_tokens']):,} val targets)")
        label = r["protocol"] + ("" if r["legal"] else " (not legal)")
        lines.append(f"  {label:<{w}}{r['bpb']:>8.4f}  {ci:<18}  {gain:<30}  {share}".rstrip())
    room = dec["room"]
    if room is not None:
        w = room["window"]
        lines.append(f"  analytic room beyond a {w}-token context: bayes_window{w} {room['bayes_window_bpb']:.4f} "
                     f"- bayes_unknown {room['bayes_unknown_bpb']:.4f} = {room['room_bpb']:.4f} bpb "
                     f"(on the same {d['n_targets']:,} targets; {room['source']})")
        lines.append("  share = TTT gain / room: the part of what adapting beyond the window can add (for a "
                     "Bayes reader) that the protocol captured")
        sliding = next((r["bpb"] for r in dec["rows"] if r["protocol"] == "sliding"), None)
        if sliding is not None and sliding - room["bayes_window_bpb"] > room["room_bpb"]:
            lines.append(f"  caution: sliding is {sliding - room['bayes_window_bpb']:.4f} bpb above bayes_window{w}, "
                         "more than the room: an undertrained model also gains from TTT by plain further learning, "
                         "so its share mixes that in")
    if plan_name == "short":
        lines.append("  (a val prefix in 2,048-token chunks; --final-eval full runs the evaluator's full-size "
                     "protocols, off skips this)")
    paths = report.get("_paths") or {}
    if paths.get("eval_json"):
        lines.append(f"  eval.json: {paths['eval_json']}")
    return "\n".join(lines)


def run_final_eval(cfg: TrainConfig, artifact: str, out: Callable[[str], None] = print,
                   trainer: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Evaluate ``artifact`` as ``cfg.final_eval`` says and print the decomposition; returns it (None: off).
    ``trainer``: the training summary (its flat bpb is named beside this one, which scores other targets).

    Raises the evaluator's errors (``EvalInputError``, ``LegalityError``) for the caller to map to exit codes."""
    plan = check_mode(cfg.final_eval)
    if plan is None:
        return None
    from ..eval.cli import build_parser
    from ..eval.run import run

    args = build_parser().parse_args(evaluator_argv(cfg, artifact, plan))
    what = "the first {:,} val tokens".format(plan.max_tokens) if plan.max_tokens else "the whole val stream"
    out(f"\nevaluating {artifact} ({args.protocols}) on {what} ...")
    report = run(args, out=out)
    dec = decomposition(report)
    out(format_decomposition(dec, report, cfg.final_eval, trainer))
    return {"report": report, **dec}
