#!/usr/bin/env python
"""Evaluator throughput: target tokens scored per second for sliding and ttt:<adapter>, and the projection to
the full FineWeb val on 8 GPUs.

    python benchmarks/eval_throughput.py                         # fresh pg-2026-03-23 model, random docs
    python benchmarks/eval_throughput.py runs/X/artifact.ptz --val '/data/fineweb_val_*.bin'
    python benchmarks/eval_throughput.py --batch-tokens 32768,65536,131072 --variants eager,compile
    python benchmarks/eval_throughput.py --protocols doc-chunk,docttt:doclora   # doc-batched LoRA TTT: rank 96,
                                          # chunk 32, 64 documents per batch, window 2048 (docttt.py defaults)

Tokens are the first --tokens of the val data when given (or of the artifact's stored val pattern), else
random ids cut into documents of ~1,000 tokens: throughput does not depend on the values. One chunk of every
configuration is run first as warm-up (CUDA init, autotuning, compilation) and not timed.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metattt.data.bpb import ByteLUT  # noqa: E402
from metattt.eval.protocols import EvalConfig, parse_protocol, prepare_stream, run_protocol, build_plan  # noqa: E402

FULL_VAL_TOKENS = 62_000_000


def _model_and_tokens(args, device):
    meta: dict = {}
    extras: dict = {}
    if args.artifact:
        from metattt.artifact.model_io import load_model_artifact

        model, loaded = load_model_artifact(args.artifact, device=device)
        meta, extras = dict(loaded.meta or {}), dict(loaded.extras or {})
    else:
        from metattt.model.config import pg_2026_03_23
        from metattt.model.gpt import BankedGPT

        torch.manual_seed(0)
        model = BankedGPT(pg_2026_03_23()).to(device)
    vocab = model.cfg.vocab_size
    val = args.val or meta.get("val_pattern")
    if val:
        from metattt.data.loaders import load_val_tokens

        tokens = load_val_tokens(val, vocab_size=vocab)[: args.tokens]
        source = f"val {val}"
    else:
        rng = np.random.default_rng(0)
        tokens = rng.integers(4, vocab, size=args.tokens)
        tokens[:: 1000] = 1  # BOS every 1,000 tokens
        tokens = torch.from_numpy(tokens)
        source = "random ids, 1,000-token documents"
    lut = ByteLUT.from_dict(meta["lut"]) if isinstance(meta.get("lut"), dict) else ByteLUT.uniform(vocab)
    return model.eval(), tokens, lut, source, extras


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", nargs="?", default=None)
    ap.add_argument("--val", default=None)
    ap.add_argument("--tokens", type=int, default=1 << 19, help="tokens to score per protocol (default 524,288)")
    ap.add_argument("--protocols", default="sliding,ttt:sgd")
    ap.add_argument("--adapter-spec", default="sgd", help="spec of the adapter used by ttt:* (default: sgd defaults)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=32768)
    ap.add_argument("--batch-tokens", default=str(32 * 2048), help="comma list to sweep")
    ap.add_argument("--variants", default="eager", help="comma list of eager, compile")
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    model, tokens, lut, source, extras = _model_and_tokens(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} params; data: {tokens.numel():,} tokens ({source}); device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    specs = [parse_protocol(p) for p in args.protocols.split(",") if p.strip()]
    rows = []
    for variant in args.variants.split(","):
        scorer = torch.compile(model, dynamic=False) if variant == "compile" else None
        for bt in (int(b) for b in args.batch_tokens.split(",")):
            cfg = EvalConfig(seq_len=args.context, context=args.context, stride=args.stride,
                             chunk_tokens=args.chunk_tokens, batch_tokens=bt, autocast=not args.no_autocast,
                             n_boot=0)
            data = prepare_stream(tokens, lut, device, cfg.chunk_tokens, vocab_size=model.cfg.vocab_size)
            warm = prepare_stream(tokens[: args.chunk_tokens + args.context + 1], lut, device, cfg.chunk_tokens)
            for spec in specs:
                adapter = None
                family = spec.mode == "docttt"  # builds its own document queue and adapter from the spec

                if family:  # the compile variant compiles docttt's core (fixed shapes), not a separate scorer
                    cfg = replace(cfg, docttt_compile=variant == "compile")

                def plan(d):
                    return None if family else build_plan(spec.windows, d, cfg)

                if spec.adapter is not None and not family:
                    from metattt.ttt.registry import adapter_from_spec

                    adapter = adapter_from_spec(args.adapter_spec).bind(model)
                    prefix = f"ttt.{adapter.name}."
                    mine = {k: v for k, v in extras.items() if k.startswith(prefix)}
                    adapter.load_artifact_extras(mine, strict=bool(mine))
                run_protocol(spec, model, warm, plan(warm), cfg, adapter, scorer=scorer)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                r = run_protocol(spec, model, data, plan(data), cfg, adapter, scorer=scorer)
                wall = time.perf_counter() - t0
                rate = r.stream.n_scored / r.stream.seconds
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                rows.append((variant, bt, spec.name, r.stream.n_scored, r.stream.seconds, wall, rate,
                             r.stream.score_seconds, r.stream.adapt_seconds, FULL_VAL_TOKENS / (rate * 8), mem))
                print(f"  {variant} batch_tokens={bt} {spec.name}: {rate:,.0f} tok/s", flush=True)
    hdr = (f"{'variant':<8}{'batch_tok':>10}  {'protocol':<12}{'tokens':>10}{'loop s':>9}{'tok/s':>12}"
           f"{'score s':>9}{'adapt s':>9}{'proj 62M/8GPU':>15}{'peak GiB':>10}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for v, bt, name, n, s, wall, rate, ss, as_, proj, mem in rows:
        print(f"{v:<8}{bt:>10}  {name:<12}{n:>10,}{s:>9.2f}{rate:>12,.0f}{ss:>9.2f}{as_:>9.2f}{proj:>14.1f}s"
              f"{mem:>10.2f}")
    print(f"\nproj 62M/8GPU: PROJECTION = {FULL_VAL_TOKENS:,} tokens / (measured single-process tok/s x 8), "
          "assuming linear scaling; 'loop s' excludes plan building and bootstrap.")


if __name__ == "__main__":
    main()
