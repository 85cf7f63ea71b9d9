"""Design by bounds: choose a synthetic corpus from its exact Bayes bounds before any training (issue 30).

For each candidate spec (Dirichlet α, number of content word types |C|, content share range cp) it generates a
small val sample of each length variant, plans the evaluator's sliding windows (context W, stride S) on it and
computes, with ``metattt.data.synthetic`` (no model, no training):

* ``bigram``: the chain with each document's content distribution replaced by its prior mean (no context use);
* ``window``: the Bayes reader of exactly the context each target gets under sliding (W - S + 1 .. W tokens);
* ``document``: the Bayes reader of the whole document prefix;
* ``room`` = window - document (what adapting beyond the window can add) and ``ctx`` = bigram - window (what the
  model must first learn in context).

A candidate is feasible when, on the long variant, room >= --min-room bpb and room >= ctx / 4; the chosen one
has the largest margin min(room / min_room, 4 room / ctx). The table is what experiments/ceiling_synth_gpu.toml's
header records; NAMED_SPECS' ``gpu-*`` designs are the choice.

    python experiments/synth_design.py                       # the recorded search (about a minute, 2 cores)
    python experiments/synth_design.py --alpha 1 --types 765 --cp 0.5-0.8 --tokens 100000   # one candidate
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metattt.data.synthetic import (LENGTH_DISTS, NAMED_SPECS, SyntheticSpec, generate_split, make_chain,  # noqa: E402
                                    protocol_bounds, synthetic_bounds)
from metattt.eval.windows import context_starts, sliding_plan  # noqa: E402

# the two length variants of the GPU corpus (fields besides the design's): FineWeb-like and long documents
VARIANTS = {"long": {k: NAMED_SPECS["gpu-long"][k] for k in ("min_doc_len", "max_doc_len")},
            "fineweb": {k: NAMED_SPECS["gpu-fineweb"][k]
                        for k in ("min_doc_len", "max_doc_len", "length_dist", "length_median", "length_sigma")}}


def _cp(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"content share range must look like 0.5-0.8, got {text!r}") from None
    return lo, hi


def bounds_of(spec: SyntheticSpec, context: int, stride: int) -> dict[str, float]:
    """bigram / window / document bpb and the two rooms on ``spec``'s val stream (its ``n_val_tokens``)."""
    tokens = generate_split(spec, "val", make_chain(spec))
    lo = context_starts(sliding_plan(tokens.size, context, stride))
    pb = protocol_bounds(spec, tokens, lo)
    bigram = synthetic_bounds(spec, tokens)["bigram_bpb"]
    return {"bigram": bigram, "window": pb["window_bpb"], "document": pb["document_bpb"], "room": pb["room_bpb"],
            "ctx": bigram - pb["window_bpb"], "docs": int((tokens == 1).sum())}


def search(alphas, types, cps, long_dists, vocab: int, tokens: int, context: int, stride: int, seed: int,
           min_room: float) -> list[dict]:
    rows = []
    for alpha, ct, (cmin, cmax), long_dist in itertools.product(alphas, types, cps, long_dists):
        design = dict(alpha=alpha, content_types=ct, content_prob_min=cmin, content_prob_max=cmax)
        row = {**design, "long_dist": long_dist}
        for name, fields in VARIANTS.items():
            fields = {**fields, "length_dist": long_dist} if name == "long" else fields
            spec = SyntheticSpec(vocab_size=vocab, n_val_tokens=tokens, seed=seed, **design, **fields)
            row[name] = bounds_of(spec, context, stride)
        long = row["long"]
        row["feasible"] = long["room"] >= min_room and long["room"] >= long["ctx"] / 4
        row["margin"] = min(long["room"] / min_room, 4 * long["room"] / max(long["ctx"], 1e-12))
        rows.append(row)
    return rows


def table(rows: list[dict], chosen: dict | None) -> str:
    head = ("  α     |C|  cp        long length  bigram  window  document  room    ctx    room/ctx | "
            "fineweb: window  room   | feasible")
    lines = [head]
    for r in rows:
        lg, fw = r["long"], r["fineweb"]
        mark = "  <- chosen" if r is chosen else ""
        design = f"{r['alpha']:<5g} {r['content_types']:<4d} {r['content_prob_min']:g}-{r['content_prob_max']:<5g}"
        lines.append(f"  {design}  {r['long_dist']:<10s}   {lg['bigram']:6.3f}  {lg['window']:6.3f}  "
                     f"{lg['document']:6.3f}    {lg['room']:.4f}  {lg['ctx']:.3f}  "
                     f"{lg['room'] / max(lg['ctx'], 1e-12):6.2f}   |          {fw['window']:6.3f}  "
                     f"{fw['room']:.4f} | {'yes' if r['feasible'] else 'no'}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--types", type=int, nargs="+", default=[765, 1000], help="content word types |C|")
    ap.add_argument("--cp", type=_cp, nargs="+", default=[(0.5, 0.8), (0.7, 0.9)], help="content share ranges")
    ap.add_argument("--long-dist", nargs="+", default=["loguniform", "uniform"], choices=LENGTH_DISTS,
                    help="length laws of the long variant (2K-32K)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=120_000, help="val sample per variant and candidate")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-room", type=float, default=0.1, help="bpb the long variant's room must reach")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rows = search(args.alpha, args.types, args.cp, args.long_dist, args.vocab, args.tokens, args.context,
                      args.stride, args.seed, args.min_room)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    feasible = [r for r in rows if r["feasible"]]
    chosen = max(feasible, key=lambda r: r["margin"]) if feasible else None
    print(f"design search: vocab {args.vocab}, context {args.context}, stride {args.stride}, {args.tokens:,} val "
          f"tokens per variant and candidate, seed {args.seed}; bpb")
    print(table(rows, chosen))
    if chosen is None:
        print(f"no candidate reaches room >= {args.min_room} bpb and >= ctx/4 on the long variant")
    else:
        design = {k: chosen[k] for k in ("alpha", "content_types", "content_prob_min", "content_prob_max")}
        design["length_dist"] = chosen["long_dist"]
        named = {k: NAMED_SPECS["gpu-long"].get(k, "uniform") for k in design}
        same = "  (= NAMED_SPECS gpu-*)" if named == design else f"  (NAMED_SPECS gpu-* has {named})"
        print(f"chosen: {design}{same}")
    print(f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
