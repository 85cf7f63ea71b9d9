"""Causal GQA attention alone: forward and forward+backward time per backend at the training shape.

Why: attention is the largest single block of a training step; this isolates the kernel choice from the model.
Default shape = one micro-batch of the pg-2026-03-23 preset (48 x 2048 tokens, 8 query / 4 KV heads of 64).

    python3 benchmarks/attention.py --backends sdpa,sdpa-flash,sdpa-repeat
    python3 benchmarks/attention.py --backends sdpa,sdpa-flash --new-shapes 20   # cost of a shape's first call

``--new-shapes N``: the mean time of the first call at each of N shapes never seen before (rows 1..N, lengths
64, 128, ...; synchronised per call) against a second call at the same shapes. The doc-batched TTT loop changes
its (rows, length) shape at almost every step, so a backend that builds a kernel per shape (cuDNN) costs that
build again and again.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metattt.model.attention import causal_attention  # noqa: E402


def timed_ms(fn, iters: int, warmup: int) -> float:
    """Mean CUDA-event milliseconds of ``fn`` over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def new_shape_ms(backend: str, shapes: list[tuple[int, int]], heads: int, kv_heads: int, d: int,
                 backward: bool) -> list[float]:
    """Wall milliseconds of one synchronised call per shape (in order)."""
    import time

    out = []
    for b, t in shapes:
        q = torch.randn(b, t, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        k, v = (torch.randn(b, t, kv_heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                for _ in range(2))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = causal_attention(q, k, v, backend)
        if backward:
            y.sum().backward()
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def new_shapes_report(args) -> int:
    n = args.new_shapes
    print(f"{'backend':<12}{'pass':<9}{'new shape ms':>13}{'same shape ms':>15}   ({n} shapes each, bf16)")
    for i, backend in enumerate(args.backends.split(",")):
        for j, backward in enumerate((False, True)):
            base = (2 * i + j) * n  # lengths unseen by every earlier backend and pass
            shapes = [(r, 64 * (base + r)) for r in range(1, n + 1)]
            cold = new_shape_ms(backend, shapes, args.heads, args.kv_heads, args.head_dim, backward)
            warm = new_shape_ms(backend, shapes, args.heads, args.kv_heads, args.head_dim, backward)
            print(f"{backend:<12}{'fwd+bwd' if backward else 'fwd':<9}{sum(cold) / n:>13.2f}{sum(warm) / n:>15.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="sdpa,sdpa-cudnn,sdpa-flash,sdpa-repeat")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--new-shapes", type=int, default=0, metavar="N",
                    help="instead: first-call vs repeated-call time at N new shapes per backend")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA device")
    if args.new_shapes:
        return new_shapes_report(args)
    b, t, d = args.batch, args.seq, args.head_dim
    torch.manual_seed(0)
    # the model's layout: (B, T, heads, D) views of one fused Q|K|V buffer
    qkv = torch.randn(b, t, (args.heads + 2 * args.kv_heads) * d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.view(b, t, -1, d) for x in qkv.split((args.heads * d, args.kv_heads * d, args.kv_heads * d), -1))
    q, k, v = (x.detach().requires_grad_() for x in (q.contiguous(), k.contiguous(), v.contiguous()))
    g = torch.randn_like(q)
    fwd_flop = 2 * 2 * b * args.heads * t * t * d / 2  # QK^T and PV, causal half
    ref = None
    print(f"{'backend':<12}{'fwd ms':>9}{'TFLOP/s':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'max|Δout|':>11}")
    for backend in args.backends.split(","):
        try:
            out = causal_attention(q, k, v, backend)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next backend
            print(f"{backend:<12}unavailable: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        ref = out.detach() if ref is None else ref
        diff = (out.detach().float() - ref.float()).abs().max().item()
        with torch.no_grad():
            ms_f = timed_ms(lambda: causal_attention(q, k, v, backend), args.iters, 2)
        ms_fb = timed_ms(lambda: torch.autograd.grad(causal_attention(q, k, v, backend), (q, k, v), g), args.iters, 2)
        print(f"{backend:<12}{ms_f:>9.3f}{fwd_flop / ms_f / 1e9:>9.0f}{ms_fb:>12.3f}"
              f"{3.5 * fwd_flop / ms_fb / 1e9:>9.0f}{diff:>11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
