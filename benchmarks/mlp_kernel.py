#!/usr/bin/env python
"""Fused leaky_relu² down-projection (metattt.kernels.leaky_mlp) against what the model does today. CUDA only.

    python benchmarks/mlp_kernel.py                          # M=98304 tokens, K=1536 hidden, N=512 dim, bf16
    python benchmarks/mlp_kernel.py --tokens 49152 --iters 50

Times forward+backward of ``out = leaky_relu(u, slope)² @ w.T`` (grads for u and w) for (a) eager torch, (b)
torch.compile of it (the model's path: cuBLAS GEMMs plus Inductor elementwise kernels for the activation), (c) the
fused Triton op, eager and under torch.compile. Then each fused kernel alone against a cuBLAS GEMM of the same
shape with the activation precomputed (GEMM efficiency), and the autotuner's pick per kernel. CUDA events,
``--iters`` timed iterations after ``--warmup`` (which also covers compilation and autotuning).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def timed_ms(fn, iters: int, warmup: int) -> float:
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


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=98304, help="M: rows of u (tokens per micro-batch)")
    ap.add_argument("--hidden", type=int, default=1536, help="K: MLP hidden width")
    ap.add_argument("--dim", type=int, default=512, help="N: model width (rows of the down weight)")
    ap.add_argument("--slope", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("mlp_kernel.py needs CUDA")
    from metattt.kernels import leaky_mlp as L
    if not L.fused_mlp_available("cuda"):
        sys.exit("fused kernels unavailable here (triton not importable, or a GPU older than sm80)")

    m, k, n, s = args.tokens, args.hidden, args.dim, args.slope
    gen = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(m, k, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16().requires_grad_()
    g = (torch.randn(m, n, device="cuda", generator=gen) / m ** 0.5).bfloat16()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {L.triton.__version__}")
    print(f"M={m} K={k} N={n} bf16 slope={s}; wgrad split-K factor {L.wgrad_split(m, n, k, u.device)}; "
          f"{args.iters} iters after {args.warmup} warm-up\n")

    def reference(a, b):
        return L.leaky2_down_reference(a, b, s)

    def fused(a, b):
        return L.leaky2_down(a, b, s)

    variants = {"eager reference": reference, "compiled reference (today)": torch.compile(reference),
                "fused eager": fused, "fused compiled": torch.compile(fused)}
    print(f"{'fwd+bwd':<28}{'ms':>9}")
    for name, f in variants.items():
        def step(f=f):
            out = f(u, w)
            torch.autograd.grad(out, (u, w), g)
        print(f"{name:<28}{timed_ms(step, args.iters, args.warmup):>9.3f}")

    ud, wd = u.detach(), w.detach()
    with torch.no_grad():
        act = F.leaky_relu(ud, s).square()
    flop = 2.0 * m * n * k
    kernels = [
        ("fwd   act(u) @ w.T", lambda: L.launch_fwd(ud, wd, s), lambda: torch.matmul(act, wd.t())),
        ("dgrad (g @ w)*act'(u)", lambda: L.launch_dgrad(g, wd, ud, s), lambda: torch.matmul(g, wd)),
        ("wgrad g.T @ act(u)", lambda: L.launch_wgrad(g, ud, s), lambda: torch.matmul(g.t(), act)),
    ]
    print(f"\n{'kernel':<24}{'fused ms':>10}{'TFLOP/s':>9}{'cuBLAS ms':>11}{'TFLOP/s':>9}{'fused/cuBLAS':>14}")
    for name, fused_fn, blas_fn in kernels:
        tf, tb = timed_ms(fused_fn, args.iters, args.warmup), timed_ms(blas_fn, args.iters, args.warmup)
        print(f"{name:<24}{tf:>10.3f}{flop / tf / 1e9:>9.0f}{tb:>11.3f}{flop / tb / 1e9:>9.0f}{tf / tb:>14.2f}")
    print("(cuBLAS: the bare GEMM with act(u) precomputed; fused wgrad includes its split-K partial sum)")

    print("\nautotune picks:")
    for name, cfg in L.chosen_configs().items():
        print(f"  {name:<6} {cfg}")

    with torch.no_grad():
        ref = F.linear(act.float(), wd.float())
        ref_du = (g.float() @ wd.float()) * torch.where(ud > 0, 2 * ud.float(), 2 * s * s * ud.float())
        ref_dw = g.float().t() @ act.float()
        errs = [rel_err(L.launch_fwd(ud, wd, s), ref), rel_err(L.launch_dgrad(g, wd, ud, s), ref_du),
                rel_err(L.launch_wgrad(g, ud, s), ref_dw)]
    print("\nrel. error vs fp32 (fwd, dgrad, wgrad): " + ", ".join(f"{e:.2e}" for e in errs))


if __name__ == "__main__":
    main()
