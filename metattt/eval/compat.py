"""``--compat pg-record``: score as the Parameter Golf record scripts do, so a number sits beside their log lines.

Our default scores every target exactly once. The record's evaluators differ in what they score and in their
numerics (docs/interop.md):

* they keep ``((N - 1) // L) * L + 1`` val tokens (L = the training length);
* their sliding and TTT loops add ``L / stride - 1`` tail windows that re-score the last ``stride`` targets
  (31 windows, 1,984 extra scorings at L = 2048, stride 64) -- counted here as a separate ``compat`` bpb;
* every forward is padded to L tokens (their ``x_batch`` is always ``seq_len`` long), which matters with the
  dynamic NTK RoPE base (``ModelConfig.rope_ntk_len``);
* their late-QAT flag stays on through TTT, so TTT training forwards see the CastedLinear weights on the int6
  grid (``fake_int6``);
* under bf16 autocast their numerics differ from ours in several places (``RecordNumerics``: attention kernel,
  split Q/K/V, unfolded gains, bf16 tables and embedding sum, eager TTT scoring, bf16 table gradients and momentum,
  the sliding evaluator's bf16 logits).
  With ``--no-autocast`` the record's function is evaluated in float32, tables included.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.bpb import bpb

if TYPE_CHECKING:
    from ..model.gpt import BankedGPT
    from .scoring import AdapterFactory, AdapterLike

COMPAT_MODES = ("none", "pg-record")
BF16_TABLES = ("tok_emb", "bigram_emb", "ve_emb")


def check_mode(mode: str) -> str:
    if mode not in COMPAT_MODES:
        raise ValueError(f"--compat must be one of {', '.join(COMPAT_MODES)}, got {mode!r}")
    return mode


def truncate(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The record's val stream: whole ``seq_len`` blocks of targets plus the first token."""
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ValueError(f"--compat pg-record needs more than {seq_len} val tokens, got {tokens.numel()}")
    return tokens[: usable + 1]


def round_tables(model: torch.nn.Module) -> list[str]:
    """Round the record's bf16 tables to bf16 values in place (they stay float32 tensors)."""
    named = dict(model.named_parameters())
    done = []
    with torch.no_grad():
        for n in BF16_TABLES:
            if n in named:
                named[n].copy_(named[n].to(torch.bfloat16).float())
                done.append(n)
    return done


@dataclass(frozen=True)
class RecordNumerics:
    """What ``--compat pg-record`` reproduces of the record's numerics, one switch per source of difference
    (docs/interop.md measures each; ``--compat-knobs qat=0,attn=auto`` turns some off, for
    ``benchmarks/compat_residual.py``). All but ``qat`` act under bf16 autocast on CUDA only."""

    tables: bool = True  # tok_emb, bigram_emb, ve_emb rounded to bf16 (imported artifacts already are)
    residual: bool = True  # bf16 residual stream
    softcap: bool = True  # soft cap in bf16
    casts: bool = True  # bf16 embedding sum, smear gate cast to bf16 before its sigmoid (Runtime.record_casts)
    split_qkv: bool = True  # separate Q, K, V GEMMs; norm, RoPE and q gain in plain torch (no fused GEMM/kernel)
    unfold_gains: bool = True  # attn/mlp scales multiply the branch output, not the weights' rows
    attn: str = "sdpa-flash"  # the record's SDPA call with only the flash kernel enabled
    eager_ttt: bool = True  # TTT scores through the uncompiled model, as the record's TTT loop does
    ttt_tables: bool = True  # TTT rounds every table update to bf16 (the record's tables are bf16 parameters)
    ttt_state: bool = True  # ... and their gradients and SGD momentum buffers (bf16 in the record too)
    qat: bool = True  # TTT training forwards see bigram/VE projections fake-quantized to int6 (late QAT stays on)
    # TTT steps the VE layer scales as the record's factors s (shared) and l_i (per layer), not their products
    # e_i = s*l_i: to first order e moves by -lr * (s^2 I + l l^T) g (``ve_precondition``); needs the factors,
    # which import-pg stores in the artifact's meta (``record_ve_factors``). Off until measured on the GPU: both
    # reference models match the record within 3e-5 without it (docs/interop.md, "Session 17")
    ve_factors: bool = False
    # the sliding evaluator's logits rounded to bf16 once before its float32 loss: the record compiles
    # forward_logits, whose bf16 output inductor rounds once after a soft cap it computes in float32 (its flat
    # evaluator fuses the loss into the graph and never rounds there; our compiled scorer returns float32)
    sliding_logits: bool = True


def parse_knobs(text: str | None) -> RecordNumerics:
    """``"qat=0,attn=auto"`` -> RecordNumerics; ValueError naming a bad item."""
    kw: dict[str, Any] = {}
    known = {f.name: f.type for f in fields(RecordNumerics)}
    for item in (t.strip() for t in (text or "").split(",") if t.strip()):
        k, eq, v = item.partition("=")
        if not eq or k not in known:
            raise ValueError(f"--compat-knobs: {item!r} is not KEY=VALUE with KEY one of {', '.join(known)}")
        if k == "attn":
            from ..model.attention import ATTN_BACKENDS

            if v not in ATTN_BACKENDS:
                raise ValueError(f"--compat-knobs: attn must be one of {ATTN_BACKENDS}, got {v!r}")
            kw[k] = v
        elif v in ("0", "1"):
            kw[k] = v == "1"
        else:
            raise ValueError(f"--compat-knobs: {k} takes 0 or 1, got {v!r}")
    return RecordNumerics(**kw)


def record_numerics(model: BankedGPT, knobs: RecordNumerics = RecordNumerics()) -> None:
    """The record's forward numerics under bf16 autocast (see ``RecordNumerics``), set on the model's runtime."""
    model.runtime = replace(model.runtime, residual_dtype="bfloat16" if knobs.residual else "float32",
                            lowp_softcap=knobs.softcap, record_casts=knobs.casts,
                            fused_qkv=not knobs.split_qkv and model.runtime.fused_qkv,
                            qkv_kernel=not knobs.split_qkv and model.runtime.qkv_kernel,
                            fold_gains=not knobs.unfold_gains and model.runtime.fold_gains, attn=knobs.attn)
    if knobs.tables:
        round_tables(model)


QAT_LINEARS = ("bigram_proj", "ve_proj", "lm_head")  # the record's CastedLinear weights


def fake_int6(w: torch.Tensor) -> torch.Tensor:
    """The record's late-QAT forward of a CastedLinear weight: per-row int6 grid (scale max|w|/31, at least 1/31,
    values in [-32, 31]) in the forward, the identity in the backward. Under autocast it is formed in the autocast
    dtype, as the record forms it from the bf16 copy of the weight."""
    with torch.no_grad():
        w32 = w.detach().float()
        scale = (w32.abs().amax(dim=1) / 31.0).clamp_min(1.0 / 31.0)
        wq = torch.clamp(torch.round(w32 / scale[:, None]), -32, 31) * scale[:, None]
    dev = w.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        w, wq = w.to(dt), wq.to(dt)
    return w + (wq.to(w.dtype) - w).detach()


def ve_precondition(factors: dict[str, Any]) -> torch.Tensor:
    """P = s^2 I + l l^T for the record's VE factors: SGD (with momentum, which is linear) on s and l moves the
    products e_i = s*l_i by -lr * P g to first order in lr, where g is the gradient with respect to e (the
    chain rule gives grad_s = l.g and grad_l = s*g; d(e) = s*d(l) + l*d(s))."""
    s = float(factors["shared"])
    lv = torch.tensor([float(v) for v in factors["layers"]], dtype=torch.float64)
    return s * s * torch.eye(lv.numel(), dtype=torch.float64) + torch.outer(lv, lv)


def record_ttt_factory(factory: AdapterFactory, knobs: RecordNumerics = RecordNumerics(),
                       bf16: bool = True, ve_factors: dict[str, Any] | None = None) -> AdapterFactory:
    """Adapters that train as the record's TTT does: late QAT on the CastedLinear weights during their training
    forwards (``knobs.qat``); the VE scales stepped as the record's factors (``knobs.ve_factors``, when the
    artifact carries them); with ``bf16`` (autocast on CUDA) the tables' updates, gradients and momentum
    buffers in bf16 (``knobs.ttt_tables`` / ``ttt_state``)."""
    from ..ttt.adapter import Adapter

    wrapped: weakref.WeakSet[Adapter] = weakref.WeakSet()  # adapters whose loss / direction are already wrapped
    precond = ve_precondition(ve_factors) if knobs.ve_factors and ve_factors else None

    def get(key: str) -> AdapterLike:
        ad = factory(key)
        if not isinstance(ad, Adapter):  # an adapter written against the evaluator's seam alone: left as it is
            return ad
        if bf16 and knobs.ttt_tables:
            ad.storage_dtypes = {n: torch.bfloat16 for n in BF16_TABLES}
            ad.storage_state = knobs.ttt_state
        if ad in wrapped:
            return ad
        wrapped.add(ad)
        if precond is not None:
            plain_direction = ad.direction

            def direction(trainables: Any, grad_at: Any) -> Any:
                loss, g = plain_direction(trainables, grad_at)
                if "ve_scales" in g:
                    ge = g["ve_scales"]
                    # P g as a product and a sum, not a matmul: no autocast cast of the tiny operands
                    g = {**g, "ve_scales": (precond.to(ge.device) * ge.double()).sum(1).to(ge.dtype)}
                return loss, g

            ad.direction = direction  # type: ignore[method-assign]
        if knobs.qat:
            plain = ad.loss

            def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, overrides: Any,
                     attn: str | None = None, **forward: Any) -> torch.Tensor:
                ov = dict(overrides)
                named = dict(model.named_parameters())
                for n in QAT_LINEARS:
                    if n in ov or n in named:
                        ov[n] = fake_int6(ov[n] if n in ov else named[n])
                return plain(model, x, y, ov, attn, **forward)

            # this instance's training forwards fake-quantize; a per-instance override of the method is the point
            ad.loss = loss  # type: ignore[method-assign]
        return ad
    return get


def tail_plan(n_tokens: int, context: int, stride: int) -> Any:
    """The record's extra windows at the stream end: starts ``total - context + stride .. total - stride``,
    each scoring the last ``stride`` targets again."""
    from .windows import WindowPlan

    total = n_tokens - 1
    starts = np.arange(max(0, total - context + stride), total - stride + 1, stride, dtype=np.int64)
    starts = starts[total - starts < context]
    length = total - starts
    return WindowPlan("pg-record-tail", n_tokens, starts, length, length - stride)


def tail_scores(model: torch.nn.Module, data: Any, cfg: Any, params: dict[str, torch.Tensor] | None,
                scorer: torch.nn.Module | None = None, sc: Any = None) -> dict[str, Any]:
    """Nats and bytes of the tail re-scorings, with the weights the stream ended with (the record's last chunk
    is never trained on, so these are the weights that scored it)."""
    from .scoring import score_windows

    plan = tail_plan(data.n_tokens, cfg.context, cfg.stride)
    if plan.n_windows == 0:
        return {"tail_windows": 0, "tail_targets": 0, "tail_nats": 0.0, "tail_bytes": 0.0}
    sc = cfg.score_config("sliding") if sc is None else sc
    with torch.inference_mode():
        nll, _ = score_windows(scorer if scorer is not None else model, data.tokens, plan, 0, plan.n_windows, sc,
                               params)
    pos = np.concatenate([np.arange(lo, hi) for lo, hi in zip(plan.lo, plan.hi)])
    tail_bytes = float(data.target_bytes[pos - 1].sum())
    return {"tail_windows": plan.n_windows, "tail_targets": int(pos.size), "tail_nats": float(nll.double().sum()),
            "tail_bytes": tail_bytes}


def compat_bpb(nats: float, total_bytes: float, tail: dict[str, Any]) -> float:
    return bpb(nats + tail["tail_nats"], total_bytes + tail["tail_bytes"])
