"""Causal GQA attention kernels.

Why a choice: flash-attn (FA3 on Hopper, FA2 elsewhere) is fastest where installed; SDPA is everywhere;
the explicit ``math`` path is the only one with a double backward (second-order meta-gradients).
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_BACKENDS = ("auto", "flash", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-repeat", "math")
# SDPA with one fused kernel forced (the default lets PyTorch choose; on H100 it picks cuDNN)
_SDPA_FORCED = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
# backends whose kernels take only half-precision inputs: a float32 forward uses SDPA's own choice instead (why:
# the audit re-runs every evaluation in float32, record-numerics ones included, which force SDPA flash; forcing
# it there stopped an H100 run with "No available kernel")
HALF_ONLY = ("flash", "sdpa-flash", "sdpa-cudnn")


def _load_flash():
    for mod, fn in (("flash_attn_interface", "flash_attn_func"), ("flash_attn", "flash_attn_func")):
        try:
            return getattr(importlib.import_module(mod), fn)
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            continue
    return None


_FLASH = _load_flash()


def flash_available() -> bool:
    return _FLASH is not None


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D), causal, grouped-query. A half-only backend (``HALF_ONLY``)
    given float32 inputs runs as ``sdpa``."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTN_BACKENDS}")
    if backend in HALF_ONLY and q.dtype == torch.float32:
        backend = "sdpa"
    if backend == "flash" and _FLASH is None:
        raise RuntimeError("attention backend 'flash' requested but flash-attn is not importable")
    use_flash = _FLASH is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if backend == "flash" or (backend == "auto" and use_flash):
        out = _FLASH(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    if backend == "math":
        return _math_attention(q, k, v)
    if backend == "sdpa-repeat":  # materialise the shared KV heads: some fused kernels lack native GQA
        group = q.size(2) // k.size(2)
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = kt.size(1) != qt.size(1)
    if backend in _SDPA_FORCED:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, _SDPA_FORCED[backend])):
            y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    return y.transpose(1, 2)


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain softmax attention: differentiable twice (no fused kernel)."""
    group = q.size(2) // k.size(2)
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.size(-1))
    t = q.size(1)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
