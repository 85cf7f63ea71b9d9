"""FP8 GEMMs for the bank weights: ``y = x @ w.T`` through ``torch._scaled_mm`` with dynamic per-tensor scales.

Why: on H100/H200 an FP8 tensor-core GEMM has twice the bf16 peak, and the four banks hold nearly all of a step's
weight-GEMM FLOPs (98% of the matmul parameters of ``pg-2026-03-23``; the rest is the tied head and two small
projections). This is the plain recipe (as in torchao's float8 "tensorwise" training and modded-nanogpt's FP8 head):

* forward: x and w cast to ``float8_e4m3fn`` (3 mantissa bits, max 448), each with one scale ``448 / amax`` so its
  largest magnitude lands on the format's largest finite value (full range, no overflow; the scale is computed
  on the device from this step's tensor, so there is no history to keep and no host sync);
* backward: the output gradient cast to ``float8_e5m2`` (2 mantissa bits, max 57344: gradients need range more
  than precision) with its own scale; ``dX = dY @ W`` and ``dW = dY.T @ X`` reuse the saved e4m3 copies of W and X
  (saving them in fp8 also halves what the GEMM keeps for backward).

The master weights and their gradients stay in the parameter dtype (``dW`` comes back in ``w``'s dtype, fp32 for
the model's fp32 banks); only the GEMM operands are rounded. Accumulation is in fp32 inside ``_scaled_mm``.

Layout: ``_scaled_mm`` (CUDA) wants its first operand row-major and its second column-major, and every dim a
multiple of 16. The transposes below arrange that. Shapes that do not satisfy the multiple-of-16 rule (see
``unsupported_reason``) run plain ``F.linear`` instead, with a one-time warning in eager mode, so a toy config
still runs; the model's presets and the tiny test config have dims that are multiples of 16.

No double backward (``once_differentiable``) and no ``torch.func`` rule: callers that need either (second-order
meta-learning's ``attn="math"``, the ``torch.func`` inner loop) keep plain GEMMs, as for ``qkv_prep``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
E5M2_MAX = float(torch.finfo(E5M2).max)  # 57344
# amax floor: an all-zero tensor gets a finite scale (and quantises to zeros) instead of 448/0 = inf
AMAX_EPS = 1e-12
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what _scaled_mm can write
_warned: set[str] = set()


def quantize(t: Tensor, dtype: torch.dtype, fmax: float) -> tuple[Tensor, Tensor]:
    """(t in ``dtype``, row-major; the fp32 dequantisation factor ``amax / fmax`` that ``_scaled_mm`` takes).
    Scaling is in fp32 and clamped to ±fmax before the cast: e4m3fn has no infinity, so a value rounding past
    448 would become NaN."""
    amax = t.detach().abs().amax().float().clamp(min=AMAX_EPS)
    scale = fmax / amax
    q = (t.float() * scale).clamp(-fmax, fmax).to(dtype).contiguous()
    return q, scale.reciprocal()


def _mm(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor, dtype: torch.dtype) -> Tensor:
    """``(sa*a) @ (sb*b)`` in ``dtype``; a row-major (M,K), b column-major (K,N)."""
    out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=dtype if dtype in _OUT_DTYPES else torch.float32)
    return out.to(dtype)


def _col_major(t: Tensor) -> Tensor:
    """Same values, column-major storage (what ``_scaled_mm`` wants for its second operand)."""
    return t.t().contiguous().t()


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w: Tensor, out_dtype: torch.dtype) -> Tensor:
        x8, sx = quantize(x, E4M3, E4M3_MAX)
        w8, sw = quantize(w, E4M3, E4M3_MAX)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.dtypes = (x.dtype, w.dtype)  # type: ignore[attr-defined]
        return _mm(x8, w8.t(), sx, sw, out_dtype)  # w8 (N,K) row-major, so w8.t() is column-major

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor, Tensor, None]:
        x8, sx, w8, sw = ctx.saved_tensors  # type: ignore[attr-defined]
        x_dtype, w_dtype = ctx.dtypes  # type: ignore[attr-defined]
        g8, sg = quantize(dy, E5M2, E5M2_MAX)
        dx = _mm(g8, _col_major(w8), sg, sw, x_dtype)  # (M,N) @ (N,K)
        dw = _mm(g8.t().contiguous(), _col_major(x8), sg, sx, w_dtype)  # (N,M) @ (M,K)
        return dx, dw, None


def unsupported_reason(x: Tensor, w: Tensor) -> str | None:
    """Why ``(x (..., K), w (N, K))`` cannot take the FP8 path, or None. ``_scaled_mm`` needs M, K and N to be
    multiples of 16 (M = the flattened leading dims: it is the contraction dim of ``dW``)."""
    if x.dim() < 2 or w.dim() != 2 or x.size(-1) != w.size(1):
        return f"shapes {tuple(x.shape)} x {tuple(w.shape)} are not (..., K) x (N, K)"
    m = x.numel() // x.size(-1) if x.size(-1) else 0
    if m % 16 or w.size(0) % 16 or w.size(1) % 16:
        return f"M={m}, N={w.size(0)}, K={w.size(1)}: _scaled_mm needs multiples of 16"
    return None


def fp8_linear(x: Tensor, w: Tensor) -> Tensor:
    """``F.linear(x, w)`` (no bias) with FP8 operands; output in the autocast dtype while autocast is on for x's
    device (as ``F.linear`` would give), else in x's dtype. Falls back to ``F.linear`` for unsupported shapes."""
    reason = unsupported_reason(x, w)
    if reason is not None:
        if reason not in _warned and not torch.compiler.is_compiling():
            _warned.add(reason)
            warnings.warn(f"fp8_linear: plain F.linear for {reason}", stacklevel=2)
        return F.linear(x, w)
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    y = _FP8Linear.apply(x.reshape(-1, x.size(-1)), w, out_dtype)
    return y.view(*x.shape[:-1], w.size(0))
