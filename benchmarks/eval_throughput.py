#!/usr/bin/env python
"""Evaluator throughput: target tokens scored per second for sliding and ttt:<adapter>, and the projection to
the full FineWeb val on 8 GPUs.

    python benchmarks/eval_throughput.py                         # fresh pg-2026-03-23 model, random docs
    python benchmarks/eval_throughput.py runs/X/artifact.ptz --val '/data/fineweb_val_*.bin'
    python benchmarks/eval_throughput.py --batch-tokens 32768,65536,131072 --variants eager,compile
    python benchmarks/eval_throughput.py --protocols doc-chunk,docttt:doclora   # doc-batched LoRA TTT: rank 96,
                                          # chunk 32, 64 documents per batch, window 2048 (docttt.py defaults)
    python benchmarks/eval_throughput.py A.ptz --protocols docttt:doclora --variants compile \
        --profile 15 --progress                 # + a torch.profiler table of one batch, progress on stderr

Tokens are the first --tokens of the val data when given (or of the artifact's stored val pattern), else
random ids cut into documents of ~1,000 tokens: throughput does not depend on the values. One chunk of every
configuration is run first as warm-up (CUDA init, autotuning, compilation) and not timed.

Variants: ``eager`` or ``compile``, for the docttt family optionally ``+shapes=exact|chunk|batch`` (forward
shapes, ``docttt_batch.BatchPlan``; default: chunk on CUDA), and ``+attn=BACKEND`` (``model.attention``). For the docttt family the full-val time is not a tokens/s
extrapolation (a short prefix holds few documents, so its length-sorted batches mix lengths and its time is
dominated by few-row tail chunks): the chunk step is timed as a function of context length at full and at one
row, the full val is modelled as documents resampled from the prefix's lengths, sorted into batches and dealt
over the ranks as the protocol does, and the same model predicts the measured prefix run as a check. The
calibration and its projection print before the protocol run, so a run stopped by a time limit still leaves them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metattt.data.bpb import ByteLUT  # noqa: E402
from metattt.eval.protocols import EvalConfig, parse_protocol, prepare_stream, run_protocol, build_plan  # noqa: E402
from metattt.eval.docttt_model import (calib_batch, project_docttt, resample_lengths,  # noqa: E402
                                      step_model)

FULL_VAL_TOKENS = 62_000_000


def parse_variant(text: str) -> dict:
    """``eager`` | ``compile``, then ``+shapes=exact|chunk|batch`` (docttt only) and ``+attn=BACKEND``."""
    from metattt.eval.docttt_batch import SHAPES
    from metattt.model.attention import ATTN_BACKENDS

    head, *rest = text.strip().split("+")
    if head not in ("eager", "compile"):
        raise SystemExit(f"unknown variant {text!r}: start with eager or compile")
    out = {"compile": head == "compile", "shapes": "auto", "attn": "auto"}
    allowed = {"shapes": SHAPES, "attn": ATTN_BACKENDS}
    for tok in rest:
        k, _, v = tok.partition("=")
        if k not in allowed or v not in allowed[k]:
            raise SystemExit(f"unknown variant token {tok!r} in {text!r} (shapes={'|'.join(SHAPES)}, "
                             f"attn={'|'.join(ATTN_BACKENDS)})")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ docttt model
# (the model itself lives in metattt.eval.docttt_model, shared with the evaluator's projection)


def profile_batch(model, spec, variant: str, device, autocast: bool, top: int) -> list[str]:
    """One (warm) calibration batch of ``spec.docs`` documents under torch.profiler: wall time against the
    device's kernel time (a busy fraction well below 1 means the loop is host-bound: op dispatch, not the GPU)
    and the ``top`` operators by device time (CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from metattt.eval import docttt_compile
    from metattt.eval.scoring import _sync

    v = parse_variant(variant)
    once, _ = calib_batch(model, spec, device, spec.docs, v["shapes"], autocast, v["attn"])
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with docttt_compile.compiled_core(model, v["compile"]):
        once()  # warm
        _sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            out = once()
            _sync(device)
            wall = time.perf_counter() - t0
    from torch.autograd import DeviceType

    ka = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:  # kernel events (one stream: they do not overlap)
        busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
    else:  # top-level operators' CPU time
        busy = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None) / 1e6
    lines = [f"profile, {spec.name} [{variant}]: one batch of {spec.docs} documents, {out.plan.n_chunks} chunk "
             f"steps, wall {wall:.3f} s ({1e3 * wall / out.plan.n_chunks:.1f} ms per step), "
             f"{'kernel' if cuda else 'CPU op'} time {busy:.3f} s (busy {100 * busy / wall:.0f}%), "
             f"{sum(e.count for e in ka if e.key.startswith('aten::')):,} aten calls",
             ka.table(sort_by=key, row_limit=top, max_name_column_width=70)]
    return lines


def _docttt_calibration(spec, variant, model, data, device, autocast) -> tuple[dict, list[str]]:
    """The chunk-step model of one docttt protocol and its full-val projection, measured *before* the protocol
    run (it also warms that run's kernels and graphs up), so a run cut short still leaves these lines."""
    from metattt.eval.docttt_batch import resolve_attn
    from metattt.eval.windows import doc_segments

    v = parse_variant(variant)
    train = spec.adapter is not None
    D = spec.docs
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sm, shapes, lo = step_model(model, spec, device, v["shapes"], v["compile"], autocast, attn=v["attn"])
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    t, f_full, u_full, f1, u1, over = sm.t, sm.fwd_full, sm.upd_full, sm.fwd1, sm.upd1, sm.overhead
    lengths = np.array([e - a for a, e in doc_segments(data.tokens_np, data.bos_id)], dtype=np.int64)
    check = project_docttt(lengths, sm, spec.chunk, spec.window, D, 1, shapes, train)
    full = project_docttt(resample_lengths(lengths, FULL_VAL_TOKENS), sm, spec.chunk, spec.window, D, 8, shapes,
                          train)
    show = sorted({int(x) for x in t if x in (t[0], t[-1])} | {int(x) for x in t if int(x) & (int(x) - 1) == 0})
    att = resolve_attn(v["attn"], device, autocast)
    lines = [f"docttt projection, {spec.name} [{variant}, shapes {shapes}, attention {att}]:",
             f"  measured ({time.perf_counter() - t0:.1f} s, before the protocol run): the chunk step "
             f"(forward{' | backward + AdamW' if train else ''}) of one batch of {D} and of {lo} document(s) of "
             f"{spec.window + spec.chunk} targets, per forward length t (CUDA events on GPU, 2nd of 2 runs"
             + ("; batch shapes: every step runs all rows, so the few-row columns repeat the full ones" if shapes == "batch" else "") + "):",
             f"  {'t':>6}{'fwd ms @' + str(D):>13}{'upd ms @' + str(D):>13}{'fwd ms @' + str(lo):>11}"
             f"{'upd ms @' + str(lo):>11}"]
    for x in show:
        i = int(np.flatnonzero(t == x)[0])
        lines.append(f"  {x:>6}{1e3 * f_full[i]:>13.2f}{1e3 * u_full[i]:>13.2f}{1e3 * f1[i]:>11.2f}"
                     f"{1e3 * u1[i]:>11.2f}")
    lines += [f"  per-batch overhead {1e3 * over:.1f} ms; peak memory of the {D}-row batch {mem:.2f} GiB",
              f"  model: a batch costs, per chunk c, fwd(t_c, rows_c)"
              + (" + upd(t_c, rows_c) (not on its last chunk)" if train else "")
              + f", t_c = min((c+1)*{spec.chunk}, {spec.window}), rows_c = documents still active"
              + (" (batch shapes: every document of the batch)" if shapes == "batch" else "")
              + f"; linear between measured t and between {lo} and {D} rows; + overhead",
              f"  this data ({check['docs']:,} documents, {check['targets']:,} targets, {check['batches']} batches, "
              f"1 process): modelled {check['wall_s']:.2f} s",
              f"  full val: {full['docs']:,} document lengths resampled (seed 0) from those {check['docs']:,} to "
              f"{full['targets']:,} targets, {full['batches']} batches dealt over 8 ranks by docttt's schedule: "
              f"PROJECTED {full['wall_s']:.1f} s (slowest rank; mean rank {full['rank_s'].mean():.1f} s)"]
    if spec.phases:
        lines.append("  (phase SGD is not in the model: add its measured time)")
    return {"check_s": check["wall_s"], "full_s": full["wall_s"]}, lines


def _docttt_check(proj: dict, result) -> tuple[float, str]:
    """The measured run against the model: (projected 8-GPU seconds, the check line)."""
    ratio = result.seconds / proj["check_s"]
    return proj["full_s"], (f"  measured {result.seconds:.2f} s on this data, modelled {proj['check_s']:.2f} s "
                            f"(measured / modelled = {ratio:.2f}); PROJECTED full val x {ratio:.2f} = "
                            f"{proj['full_s'] * ratio:.1f} s")


# ------------------------------------------------------------------------------------------------ main
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
    ap.add_argument("--variants", default="eager", help="comma list of eager, compile (+shapes=... for docttt)")
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--progress", action="store_true", help="per-chunk / per-batch progress on stderr")
    ap.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="docttt: also profile one calibration batch and print the TOP operators")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        try:
            parse_variant(v)
        except SystemExit as e:
            ap.error(str(e))  # exit 2, one line
    device = torch.device(args.device)
    model, tokens, lut, source, extras = _model_and_tokens(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} params; data: {tokens.numel():,} tokens ({source}); device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    specs = [parse_protocol(p) for p in args.protocols.split(",") if p.strip()]
    rows, notes = [], []
    for variant in variants:
        var = parse_variant(variant)
        scorer = torch.compile(model, dynamic=False) if var["compile"] else None
        for bt in (int(b) for b in args.batch_tokens.split(",")):
            cfg = EvalConfig(seq_len=args.context, context=args.context, stride=args.stride,
                             chunk_tokens=args.chunk_tokens, batch_tokens=bt, autocast=not args.no_autocast,
                             n_boot=0, attn=var["attn"], progress=args.progress)
            data = prepare_stream(tokens, lut, device, cfg.chunk_tokens, vocab_size=model.cfg.vocab_size)
            warm = prepare_stream(tokens[: args.chunk_tokens + args.context + 1], lut, device, cfg.chunk_tokens)
            for spec in specs:
                adapter = None
                family = spec.mode == "docttt"  # builds its own document queue and adapter from the spec
                if family:  # the compile variant compiles docttt's core, not a separate scorer
                    cfg = replace(cfg, docttt_compile=var["compile"], docttt_shapes=var["shapes"])

                def plan(d):
                    return None if family else build_plan(spec.windows, d, cfg)

                if spec.adapter is not None and not family:
                    from metattt.ttt.registry import adapter_from_spec

                    adapter = adapter_from_spec(args.adapter_spec).bind(model)
                    prefix = f"ttt.{adapter.name}."
                    mine = {k: v for k, v in extras.items() if k.startswith(prefix)}
                    adapter.load_artifact_extras(mine, strict=bool(mine))
                t0 = time.perf_counter()
                run_protocol(spec, model, warm, plan(warm), cfg, adapter, scorer=scorer)
                warm_s = time.perf_counter() - t0
                if family:
                    est, lines = _docttt_calibration(spec, variant, model, data, device, cfg.autocast)
                    if args.profile:
                        lines += profile_batch(model, spec, variant, device, cfg.autocast, args.profile)
                    print("\n".join(lines), flush=True)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                r = run_protocol(spec, model, data, plan(data), cfg, adapter, scorer=scorer)
                wall = time.perf_counter() - t0
                rate = r.stream.n_scored / r.stream.seconds
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                proj = FULL_VAL_TOKENS / (rate * 8)
                if family:
                    proj, line = _docttt_check(est, r.stream)
                    notes.append([f"docttt {spec.name} [{variant}]:", line])
                rows.append((variant, bt, spec.name, r.stream.n_scored, r.stream.seconds, wall, rate,
                             r.stream.score_seconds, r.stream.adapt_seconds, proj, mem, warm_s, family))
                print(f"  {variant} batch_tokens={bt} {spec.name}: {rate:,.0f} tok/s (warm-up {warm_s:.1f} s)",
                      flush=True)
    w = max([12] + [len(r[2]) + 1 for r in rows])
    hdr = (f"{'variant':<8}{'batch_tok':>10}  {'protocol':<{w}}{'tokens':>10}{'loop s':>9}{'tok/s':>12}"
           f"{'score s':>9}{'adapt s':>9}{'proj 62M/8GPU':>15}{'peak GiB':>10}{'warm-up s':>11}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for v, bt, name, n, s, wall, rate, ss, as_, proj, mem, warm_s, fam in rows:
        print(f"{v:<8}{bt:>10}  {name:<{w}}{n:>10,}{s:>9.2f}{rate:>12,.0f}{ss:>9.2f}{as_:>9.2f}{proj:>13.1f}s"
              f"{'*' if fam else ' '}{mem:>10.2f}{warm_s:>11.1f}")
    print(f"\nproj 62M/8GPU: {FULL_VAL_TOKENS:,} tokens / (measured single-process tok/s x 8), assuming linear "
          "scaling; * = the docttt model below instead. 'loop s' excludes plan building and bootstrap; "
          "'warm-up s' (a short run first, untimed) holds compilation. 'score s' / 'adapt s' of docttt: forward "
          "/ backward + step, CUDA-event time on GPU.")
    for lines in notes:
        print()
        print("\n".join(lines))


if __name__ == "__main__":
    main()
