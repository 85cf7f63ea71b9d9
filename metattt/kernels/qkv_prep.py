"""Q/K/V preparation in one Triton kernel each way: per-head RMSNorm, partial RoPE and the per-head q gain.

Why: after the fused QKV GEMM, Inductor spent four kernels (~0.4 ms per layer and micro-batch, ≈ 45 ms of a
training step) on the backward of norm → rope → gain and on re-assembling dQKV from dq, dk, dv. Here the
forward reads QKV once and writes q, k, v once; the backward reads dq, dk, dv and the saved QKV once and writes
dQKV once (plus a (row-blocks, heads) partial sum for the gain gradient). Same function as ``reference``;
``eps`` is ``F.rms_norm``'s default (see ``rms_eps``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # triton is optional: CPU installs (CI) run the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None


def reference(qkv: Tensor, cos: Tensor, sin: Tensor, gain: Tensor, heads: int, kv_heads: int,
              rope_dims: int) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B,T,(H+2Hk)·D) -> q (B,T,H,D), k and v (B,T,Hk,D); cos/sin (≥T, R/2) float32, gain (H,)."""
    b, t, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    tables = (cos[None, :t, None, :], sin[None, :t, None, :])

    def prep(x: Tensor, h: int) -> Tensor:
        x = F.rms_norm(x.reshape(b, t, h, d), (d,))
        if rope_dims:
            c, s = (tab.to(x.dtype) for tab in tables)
            lo, hi, rest = x[..., : rope_dims // 2], x[..., rope_dims // 2: rope_dims], x[..., rope_dims:]
            x = torch.cat((lo * c - hi * s, lo * s + hi * c, rest), dim=-1)
        return x

    q = prep(q, heads) * gain.to(qkv.dtype)[:, None]
    return q, prep(k, kv_heads), v.reshape(b, t, kv_heads, d)


def rms_eps(dtype: torch.dtype) -> float:
    """``F.rms_norm``'s default eps: it computes half-precision inputs in float32 and takes float32's eps then
    (not ``finfo(bfloat16).eps`` = 2^-7, which would change every norm of a small vector)."""
    return torch.finfo(torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype).eps


def available(x: Tensor, head_dim: int, rope_dims: int) -> bool:
    """The Triton path runs on CUDA half-precision inputs with power-of-two head dims and even RoPE dims."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and head_dim & (head_dim - 1) == 0 and rope_dims > 0 and rope_dims % 2 == 0 and rope_dims <= head_dim)


if triton is not None:
    # one fixed tile for every row count. A tuner keyed on the row count re-benchmarked its five tiles at every new
    # shape (~0.8 s each), and the doc-batched loop makes a new shape at almost every step; measured on the H200
    # (session 8, docs/benchmarks.md), 16 rows x 2 warps is the fastest of those tiles or within 1 us of it, each way,
    # at every row count measured (2K to 131K rows, training's 98K included).
    # A one-config ``autotune`` only attaches the warps; it benchmarks nothing. The interpreter (tests) gets a tile
    # spanning two gain-gradient slots, so that path is exercised on CPU too.
    _MIN_BLOCK_M = 16
    TILE = (triton.Config({"BLOCK_M": 32}, num_warps=1) if os.environ.get("TRITON_INTERPRET") == "1"
            else triton.Config({"BLOCK_M": 16}, num_warps=2))

    @triton.jit
    def _rope_coeffs(rows, cols, cos, sin, T, rmask, D: tl.constexpr, R: tl.constexpr):
        """Per (row, col): C, S (signed sin) and the partner column, so out = n*C + n[partner]*S."""
        half: tl.constexpr = R // 2
        rot = cols < R
        f = tl.where(cols < half, cols, cols - half)
        partner = tl.where(cols < half, cols + half, tl.where(rot, cols - half, cols))
        pos = rows % T
        tab = pos[:, None] * half + f[None, :]
        m2 = rmask[:, None] & rot[None, :]
        c = tl.load(cos + tab, mask=m2, other=1.0)
        s = tl.load(sin + tab, mask=m2, other=0.0)
        s = tl.where((cols < half)[None, :], -s, s)
        return c, s, partner

    @triton.autotune(configs=[TILE], key=[])
    @triton.jit
    def metattt_qkv_fwd(qkv, q_out, k_out, v_out, cos, sin, gain, M, T, eps,
                    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 row math (no 64-bit division); int64 addresses
        cols = tl.arange(0, D)
        rmask = rows < M
        row_base = rows[:, None].to(tl.int64) * ((HQ + 2 * HK) * D) + h * D
        x = tl.load(qkv + row_base + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        if h < HQ + HK:
            c, s, partner = _rope_coeffs(rows, cols, cos, sin, T, rmask, D, R)
            xp = tl.load(qkv + row_base + partner[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            out = (x * c + xp * s) * r[:, None]
            if h < HQ:
                out = out * tl.load(gain + h).to(tl.float32)
                dst = q_out + rows[:, None] * (HQ * D) + h * D + cols[None, :]
            else:
                dst = k_out + rows[:, None] * (HK * D) + (h - HQ) * D + cols[None, :]
            tl.store(dst, out.to(q_out.dtype.element_ty), mask=rmask[:, None])
        else:
            dst = v_out + rows[:, None] * (HK * D) + (h - HQ - HK) * D + cols[None, :]
            tl.store(dst, x.to(v_out.dtype.element_ty), mask=rmask[:, None])

    @triton.autotune(configs=[TILE], key=[])
    @triton.jit
    def metattt_qkv_bwd(qkv, dq, dk, dv, cos, sin, gain, dqkv, dgain_part, M, T, eps,
                    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, n_part,
                    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, R: tl.constexpr, MIN_M: tl.constexpr,
                    BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 row math (no 64-bit division); int64 addresses
        cols = tl.arange(0, D)
        rmask = rows < M
        b = (rows // T).to(tl.int64)
        t = (rows % T).to(tl.int64)
        row_base = rows[:, None].to(tl.int64) * ((HQ + 2 * HK) * D) + h * D
        if h < HQ + HK:
            if h < HQ:
                g_base = dq + (b * sq_b + t * sq_t + h * sq_h)[:, None]
            else:
                g_base = dk + (b * sk_b + t * sk_t + (h - HQ) * sk_h)[:, None]
            go = tl.load(g_base + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            c, s, partner = _rope_coeffs(rows, cols, cos, sin, T, rmask, D, R)
            gp = tl.load(g_base + partner[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            x = tl.load(qkv + row_base + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            n = x * r[:, None]
            if h < HQ:
                xp = tl.load(qkv + row_base + partner[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
                pre = n * c + xp * r[:, None] * s  # the output before the gain
                # the gain-gradient partial goes in the first of this tile's MIN_M-row slots, zeros in the rest,
                # so every slot is written whatever the tile height (no stale values)
                sub = tl.arange(0, BLOCK_M // MIN_M)
                slot = pid * (BLOCK_M // MIN_M) + sub
                total = tl.sum(tl.sum(go * pre, axis=1), axis=0)
                tl.store(dgain_part + slot * HQ + h, tl.where(sub == 0, total, 0.0), mask=slot < n_part)
                g = tl.load(gain + h).to(tl.float32)
                go = go * g
                gp = gp * g
            dn = go * c - gp * s
            dx = r[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
            tl.store(dqkv + row_base + cols[None, :], dx.to(dqkv.dtype.element_ty), mask=rmask[:, None])
        else:
            src = dv + (b * sv_b + t * sv_t + (h - HQ - HK) * sv_h)[:, None] + cols[None, :]
            gv = tl.load(src, mask=rmask[:, None], other=0.0)
            tl.store(dqkv + row_base + cols[None, :], gv.to(dqkv.dtype.element_ty), mask=rmask[:, None])

    @torch.library.triton_op("metattt::qkv_prep", mutates_args=())
    def _qkv_prep(qkv: Tensor, cos: Tensor, sin: Tensor, gain: Tensor, heads: int, kv_heads: int,
                  rope_dims: int) -> tuple[Tensor, Tensor, Tensor]:
        b, t, width = qkv.shape
        d = width // (heads + 2 * kv_heads)
        q = qkv.new_empty(b, t, heads, d)
        k = qkv.new_empty(b, t, kv_heads, d)
        v = qkv.new_empty(b, t, kv_heads, d)

        def grid(meta):
            return (triton.cdiv(b * t, meta["BLOCK_M"]), heads + 2 * kv_heads)

        torch.library.wrap_triton(metattt_qkv_fwd)[grid](
            qkv, q, k, v, cos, sin, gain, b * t, t, rms_eps(qkv.dtype),
            HQ=heads, HK=kv_heads, D=d, R=rope_dims)
        return q, k, v

    @torch.library.triton_op("metattt::qkv_prep_bwd", mutates_args=())
    def _qkv_prep_bwd(qkv: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor, gain: Tensor,
                      heads: int, kv_heads: int, rope_dims: int) -> tuple[Tensor, Tensor]:
        b, t, width = qkv.shape
        d = width // (heads + 2 * kv_heads)
        dqkv = torch.empty_like(qkv)
        # one partial gain-gradient row per MIN_M rows (the tile is a multiple of MIN_M), and one zero row more: a
        # size that can be 1 makes Dynamo specialise it (a step of <= MIN_M positions got its own graph, session 10)
        part = torch.zeros(triton.cdiv(b * t, _MIN_BLOCK_M) + 1, heads, device=qkv.device, dtype=torch.float32)
        strides = [st for g in (dq, dk, dv) for st in g.stride()[:3]]  # (B,T,H,D), any strides but unit along D

        def grid(meta):
            return (triton.cdiv(b * t, meta["BLOCK_M"]), heads + 2 * kv_heads)

        torch.library.wrap_triton(metattt_qkv_bwd)[grid](
            qkv, dq, dk, dv, cos, sin, gain, dqkv, part, b * t, t, rms_eps(qkv.dtype), *strides, part.size(0),
            HQ=heads, HK=kv_heads, D=d, R=rope_dims, MIN_M=_MIN_BLOCK_M)
        return dqkv, part.sum(0).to(gain.dtype)

    def _setup(ctx, inputs, output) -> None:
        qkv, cos, sin, gain, heads, kv_heads, rope_dims = inputs
        ctx.save_for_backward(qkv, cos, sin, gain)
        ctx.dims = (heads, kv_heads, rope_dims)

    def _backward(ctx, dq, dk, dv):
        qkv, cos, sin, gain = ctx.saved_tensors
        heads, kv_heads, rope_dims = ctx.dims
        b, t, width = qkv.shape
        d = width // (heads + 2 * kv_heads)
        grads = []
        for g, h in ((dq, heads), (dk, kv_heads), (dv, kv_heads)):
            g = qkv.new_zeros(b, t, h, d) if g is None else g
            grads.append(g if g.stride(-1) == 1 else g.contiguous())
        dqkv, dgain = torch.ops.metattt.qkv_prep_bwd(qkv, *grads, cos, sin, gain, heads, kv_heads, rope_dims)
        return dqkv, None, None, dgain, None, None, None

    torch.library.register_autograd("metattt::qkv_prep", _backward, setup_context=_setup)


def qkv_prep(qkv: Tensor, cos: Tensor, sin: Tensor, gain: Tensor, heads: int, kv_heads: int,
             rope_dims: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (B,T,H,D) normed, rotated and gained; k (B,T,Hk,D) normed and rotated; v (B,T,Hk,D) — Triton on CUDA,
    else ``reference``. ``qkv`` is (B,T,(H+2Hk)·D); cos/sin are (≥T, R/2) float32."""
    d = qkv.size(-1) // (heads + 2 * kv_heads)
    if not available(qkv, d, rope_dims):
        return reference(qkv, cos, sin, gain, heads, kv_heads, rope_dims)
    t = qkv.size(1)
    cos, sin = cos[:t].contiguous(), sin[:t].contiguous()
    return torch.ops.metattt.qkv_prep(qkv.contiguous(), cos, sin, gain.float(), heads, kv_heads, rope_dims)
