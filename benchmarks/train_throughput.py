#!/usr/bin/env python
"""Training throughput of the banked GPT: tokens/s per GPU, ms/step, MFU and peak memory.

    python benchmarks/train_throughput.py --preset pg-2026-03-23 --steps 20 --variants eager,compile
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --variants compile

A step is a full optimizer step on ``train_batch_tokens`` global tokens (gradient accumulation included),
exactly as the trainer does it (bf16 autocast, Muon/Parallel Muon + AdamW, grad clip). Tokens are random ids
unless --data gives shards: throughput does not depend on the values. FLOPs per token follow the usual
convention 6·N_matmul + 12·L·T·d (attention counted as non-causal), against 989 TFLOP/s bf16 dense (H100 SXM).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from metattt.model.attention import ATTN_BACKENDS  # noqa: E402
from metattt.model.gpt import BankedGPT, Runtime, inductor_options  # noqa: E402
from metattt.optim.builder import build_optimizers  # noqa: E402
from metattt.train.config import preset  # noqa: E402
from metattt.train.dist import setup, teardown  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def flops_per_token(model: BankedGPT, seq_len: int) -> float:
    cfg = model.cfg
    matmul = sum(getattr(model, b).numel() for b in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"))
    matmul += cfg.vocab_size * cfg.model_dim  # output head (tied)
    for name in ("bigram_proj", "ve_proj"):
        if hasattr(model, name):
            matmul += getattr(model, name).numel()
    n_virtual = len(cfg.layer_schedule())
    return 6.0 * matmul + 12.0 * n_virtual * seq_len * cfg.model_dim


def _inductor_value(key: str, val: str):
    """Parse VAL to the type of the Inductor option KEY (bool/int/float/str)."""
    import torch._inductor.config as icfg

    cur = icfg
    for part in key.split("."):
        if not hasattr(cur, part):
            raise SystemExit(f"unknown Inductor option {key!r}")
        cur = getattr(cur, part)
    if isinstance(cur, bool):
        return val.lower() in ("1", "true", "on", "yes")
    for tp in (int, float):
        if isinstance(cur, tp):
            return tp(val)
    return None if val.lower() == "none" else val


def parse_variant(name: str) -> dict:
    """``compile+bf16+mb=196608`` -> options. Tokens: eager | compile, meta (FOMAML every 4 steps), bf16 (bf16
    residual stream), unfused-qkv (three Q/K/V GEMMs), unfolded (attn/mlp scales as separate multiplies), no-qkv-kernel (q/k norm+RoPE left
    to Inductor), fp8 (bank GEMMs with FP8 operands, ``Runtime.fp8``), mb=N (micro-batch tokens), mode=M (torch.compile mode),
    ind:KEY=VAL (an Inductor option, e.g. ind:triton.mix_order_reduction=0), attn=BACKEND (overrides --attn)."""
    opts = {"compile": False, "meta": False, "bf16": False, "fused_qkv": True, "fold_gains": True, "qkv_kernel": True, "fp8": False, "mb": 0, "mode": None, "inductor": {},
            "attn": None}
    for tok in name.split("+"):
        if tok in ("eager", "compile"):
            opts["compile"] = tok == "compile"
        elif tok in ("meta", "bf16", "fp8"):
            opts[tok] = True
        elif tok == "unfused-qkv":
            opts["fused_qkv"] = False
        elif tok == "unfolded":
            opts["fold_gains"] = False
        elif tok == "no-qkv-kernel":
            opts["qkv_kernel"] = False
        elif tok.startswith("mb="):
            opts["mb"] = int(tok[3:])
        elif tok.startswith("attn="):
            opts["attn"] = tok[5:]
        elif tok.startswith("mode="):
            opts["mode"] = tok[5:]
        elif tok.startswith("ind:"):  # an Inductor option for this compile, e.g. ind:triton.mix_order_reduction=0
            key, _, val = tok[4:].partition("=")
            opts["inductor"][key] = _inductor_value(key, val)
        else:
            raise SystemExit(f"unknown variant token {tok!r} in {name!r}")
    return opts


def run_variant(name: str, args, info) -> dict:
    v = parse_variant(name)
    cfg = preset(args.preset)
    torch.manual_seed(0)
    runtime = Runtime(residual_dtype="bfloat16" if v["bf16"] else "float32", fused_qkv=v["fused_qkv"],
                      fold_gains=v["fold_gains"], qkv_kernel=v["qkv_kernel"], fp8=v["fp8"])
    model = BankedGPT(cfg.model, runtime).to(info.device)
    opts = build_optimizers(model, cfg.optim, distributed=info.distributed)
    if v["compile"]:
        kw = {"mode": v["mode"]} if v["mode"] else {}
        if v["inductor"]:
            kw["options"] = {**inductor_options(), **v["inductor"]}
        model.compile_core(**kw)
    adapter = None
    if v["meta"]:  # FOMAML outer loop on one micro-batch every 4th step, as --meta.adapter fomaml would
        from metattt.ttt.meta import MetaConfig, meta_loss

        meta_cfg = MetaConfig(adapter=args.meta_spec, every=4, micro_batches=1)
        adapter = meta_cfg.make_adapter().bind(model)
    counter = {"step": 0, "loss": None}
    seq = cfg.seq_len
    per_rank = cfg.train_batch_tokens // info.world_size
    micro = min(v["mb"] or args.micro_batch_tokens or cfg.micro_batch_tokens, per_rank)
    accum = per_rank // micro
    b = micro // seq
    gen = torch.Generator(device=info.device).manual_seed(info.rank)
    batches = [torch.randint(0, cfg.model.vocab_size, (b, seq + 1), device=info.device, generator=gen)
               for _ in range(min(accum, 4))]

    def step() -> None:
        meta_now = adapter is not None and counter["step"] % 4 == 0
        for i in range(accum):
            tok = batches[i % len(batches)]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=info.device.type == "cuda"):
                if meta_now and i == 0:
                    loss, _ = meta_loss(model, adapter, tok[:, :-1], tok[:, 1:], meta_cfg)
                else:
                    loss = model(tok[:, :-1], tok[:, 1:], attn=v["attn"] or args.attn)
            (loss / accum).backward()
            counter["loss"] = loss.detach().clone()  # clone: a CUDA-graph replay may reuse the output buffer
        opts.step()
        counter["step"] += 1

    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_compile = time.perf_counter() - t_compile
    n_steps = args.steps * (4 if adapter is not None else 1)
    times = []
    if args.sync_each_step:  # per-step times (min/max); the idle GPU at each step start is counted too
        for _ in range(n_steps):
            t0 = time.perf_counter()
            step()
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    else:  # as the trainer runs: steps back to back, one sync at the end of the window
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        times = [(time.perf_counter() - t0) / n_steps] * n_steps
    if args.profile and info.is_main:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)  # device file transfer accepts only these characters
        _profile(step, args.profile, f"{args.profile_out}.{safe}.txt" if args.profile_out else "")
    times.sort()
    med = sum(times) / len(times)  # mean: with meta every 4 steps the median would hide the meta steps
    tok_s_gpu = cfg.train_batch_tokens / med / info.world_size
    fpt = flops_per_token(model, seq)
    dev_name = torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in dev_name), float("nan"))
    return {
        "variant": name, "device": dev_name, "world_size": info.world_size, "accum": accum,
        "micro_batch_tokens": micro, "ms_per_step": 1000 * med, "ms_min": 1000 * times[0],
        "ms_max": 1000 * times[-1], "tokens_per_s_per_gpu": tok_s_gpu,
        "mfu": tok_s_gpu * fpt / (peak * 1e12), "gflops_per_token": fpt / 1e9,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else 0.0,
        "warmup_s": t_compile,
        "last_loss": float(counter["loss"]),  # same seed, data and steps in every variant: a cheap numerics check
    }


KERNEL_GROUPS = (  # (group, substrings of CUDA kernel names), first match wins: where a step's time goes
    ("metattt triton", ("metattt_",)),  # metattt.kernels (hand-written Triton kernels)
    ("inductor fused", ("triton_",)),  # before copy/cast: Inductor names fused kernels after their ops (_to_copy)
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas", "wgmma")),
    ("optimizer", ("foreach", "multi_tensor", "adam")),
    ("embedding", ("embedding", "index_put", "indexing_backward", "scatter", "gather", "sort", "radix")),
    ("copy/cast", ("copy", "cast", "convert", "elementwise_kernel", "vectorized_elementwise")),
)


def _profile(step, top: int, out: str = "") -> None:
    """Print the ``top`` CUDA kernels of one step by total device time, and time per kernel group."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=110)
    groups: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        t = ev.cuda_time_total if t is None else t
        if t <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        name = ev.key.lower()
        g = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[g] = groups.get(g, 0.0) + t / 1000.0
    lines = [f"{g:<16}{ms:>10.1f} ms" for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])]
    text = table + "\nkernel groups (ms per step; CPU-side ops excluded by name):\n" + "\n".join(lines)
    print(text, flush=True)
    if out:
        Path(out).write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="pg-2026-03-23")
    ap.add_argument("--variants", default="eager,compile",
                    help="comma list of '+'-joined tokens: eager|compile, meta (FOMAML every 4 steps, timed over "
                         "multiples of 4 steps), bf16, unfused-qkv, mb=N, mode=M; e.g. compile,compile+bf16")
    ap.add_argument("--attn", default="auto", choices=ATTN_BACKENDS)
    ap.add_argument("--sync-each-step", action="store_true",
                    help="synchronize after every timed step (per-step min/max; the trainer syncs only at log steps)")
    ap.add_argument("--meta-spec", default="fomaml:lr=0.002",
                    help="adapter spec of the meta variant (its batch_seqs sets the inner mini-batches; default 32 "
                         "rows, as the evaluator's TTT)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch-tokens", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--profile", type=int, default=0, help="print the top-N CUDA kernels of one step")
    ap.add_argument("--profile-out", default="", help="also write each variant's profile to PREFIX.VARIANT.txt")
    args = ap.parse_args()
    info = setup("auto")
    rows = []
    try:
        for v in args.variants.split(","):
            rows.append(run_variant(v.strip(), args, info))
            if info.is_main:
                print(json.dumps(rows[-1]), flush=True)
    finally:
        teardown()
    if info.is_main:
        w = max(16, *(len(r["variant"]) + 2 for r in rows))
        print(f"\n{'variant':<{w}}{'ms/step':>10}{'tok/s/GPU':>12}{'MFU':>7}{'peak GiB':>10}{'world':>7}{'loss':>9}")
        for r in rows:
            print(f"{r['variant']:<{w}}{r['ms_per_step']:>10.1f}{r['tokens_per_s_per_gpu']:>12,.0f}"
                  f"{100 * r['mfu']:>6.1f}%{r['peak_mem_gib']:>10.1f}{r['world_size']:>7}{r['last_loss']:>9.4f}")
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
