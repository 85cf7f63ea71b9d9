"""``--compat pg-record``: score as the Parameter Golf record scripts do, so a number sits beside their log lines.

Our default scores every target exactly once. The record's evaluators differ in what they score and in their
numerics (docs/interop.md):

* they keep ``((N - 1) // L) * L + 1`` val tokens (L = the training length);
* their sliding and TTT loops add ``L / stride - 1`` tail windows that re-score the last ``stride`` targets
  (31 windows, 1,984 extra scorings at L = 2048, stride 64) -- counted here as a separate ``compat`` bpb;
* every forward is padded to L tokens (their ``x_batch`` is always ``seq_len`` long), which matters with the
  dynamic NTK RoPE base (``ModelConfig.rope_ntk_len``);
* under bf16 autocast, ``tok_emb``, ``bigram.embed`` and ``ve_shared.embed`` are bf16 tensors, the residual
  stream is bf16 and the soft cap runs in bf16; their TTT updates those tables in bf16. With ``--no-autocast``
  the record's function is evaluated in float32, tables included.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

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


def record_numerics(model: torch.nn.Module) -> None:
    """bf16 residual stream and bf16 soft cap (active only under autocast) plus bf16-valued tables."""
    model.runtime = replace(model.runtime, residual_dtype="bfloat16", lowp_softcap=True)
    round_tables(model)


def bf16_tables_factory(factory: Any) -> Any:
    """Adapters whose every update of the record's tables is rounded to bf16 (its TTT updates them in bf16;
    its SGD momentum buffers are bf16 too, which this does not reproduce)."""
    def get(key: str) -> Any:
        ad = factory(key)
        if hasattr(ad, "storage_dtypes"):
            ad.storage_dtypes = {n: torch.bfloat16 for n in BF16_TABLES}
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
                scorer: torch.nn.Module | None = None) -> dict[str, Any]:
    """Nats and bytes of the tail re-scorings, with the weights the stream ended with (the record's last chunk
    is never trained on, so these are the weights that scored it)."""
    from .scoring import score_windows

    plan = tail_plan(data.n_tokens, cfg.context, cfg.stride)
    if plan.n_windows == 0:
        return {"tail_windows": 0, "tail_targets": 0, "tail_nats": 0.0, "tail_bytes": 0.0}
    sc = cfg.score_config("sliding")
    with torch.inference_mode():
        nll, _ = score_windows(scorer if scorer is not None else model, data.tokens, plan, 0, plan.n_windows, sc,
                               params)
    pos = np.concatenate([np.arange(lo, hi) for lo, hi in zip(plan.lo, plan.hi)])
    tail_bytes = float(data.target_bytes[pos - 1].sum())
    return {"tail_windows": plan.n_windows, "tail_targets": int(pos.size), "tail_nats": float(nll.double().sum()),
            "tail_bytes": tail_bytes}


def compat_bpb(nats: float, total_bytes: float, tail: dict[str, Any]) -> float:
    return (nats + tail["tail_nats"]) / math.log(2.0) / (total_bytes + tail["tail_bytes"])
