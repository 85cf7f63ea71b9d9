"""Measure the synthetic stream's generation speed (tokens/s) against what a trainer consumes (issue 30).

Consumes ``--tokens`` training tokens from ``SyntheticStream`` as fast as possible (no model), for each
``--workers`` value, and prints tokens/s: from the first batch on (spawning the workers and the first blocks
included) and in steady state (after the first batch). Compare with the trainer's tokens/s on the same machine
(small models: 2-7M tokens/s on one H100, compiled); the stream keeps up when steady-state tokens/s is above it.

    python experiments/synth_stream_bench.py --spec gpu-long --workers 0 2 --tokens 8000000
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metattt.data.synthetic import NAMED_SPECS, named_spec  # noqa: E402
from metattt.data.synthetic_stream import SyntheticStream  # noqa: E402


def measure(spec, seq_len: int, batch_tokens: int, tokens: int, workers: int, block_tokens: int) -> dict:
    stream = SyntheticStream(spec, seq_len, batch_tokens, seed=0, block_tokens=block_tokens, workers=workers)
    try:
        t0 = time.perf_counter()
        stream.next_batch()
        t1 = time.perf_counter()
        n = batch_tokens
        while n < tokens:
            stream.next_batch()
            n += batch_tokens
        t2 = time.perf_counter()
    finally:
        stream.close()
    return {"workers": workers, "tokens": n, "seconds": t2 - t0, "all": n / (t2 - t0),
            "steady": (n - batch_tokens) / max(t2 - t1, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="gpu-long", choices=sorted(NAMED_SPECS))
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=131_072, help="tokens per next_batch (one micro-batch)")
    ap.add_argument("--tokens", type=int, default=8_000_000)
    ap.add_argument("--block-tokens", type=int, default=1 << 23)
    ap.add_argument("--workers", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    try:
        spec = named_spec(args.spec, vocab_size=args.vocab)
        if args.batch_tokens % args.seq_len or min(args.tokens, args.block_tokens, *args.workers, 0) < 0:
            raise ValueError("--batch-tokens must be a multiple of --seq-len; sizes and workers must be >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"synthetic stream: spec {args.spec}, vocab {args.vocab}, seq {args.seq_len}, batches of "
          f"{args.batch_tokens:,} tokens, blocks of {args.block_tokens:,}; {os.cpu_count()} CPUs")
    for w in args.workers:
        r = measure(spec, args.seq_len, args.batch_tokens, args.tokens, w, args.block_tokens)
        print(f"  workers {w}: {r['tokens']:,} tokens in {r['seconds']:.1f} s: {r['all'] / 1e6:.2f}M tokens/s "
              f"(steady state after the first batch {r['steady'] / 1e6:.2f}M tokens/s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
