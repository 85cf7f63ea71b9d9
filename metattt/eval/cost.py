"""What a protocol costs, in the same units for every family: model FLOPs per scored token, counted.

Convention (as benchmarks/train_throughput.py): a forward costs 2·N FLOPs per input position, N = the matmul
weights one position passes through (the banks' per-layer share x the virtual layers of the schedule, the tied
head, the bigram / value-embedding projections), plus attention 4·L·d·T per position of a length-T row
(QKᵀ and AV, counted non-causal); a backward costs twice its forward. What is counted per family:

* windowed protocols (flat, sliding, doc-*): every window's positions (``plan.length``) once;
* ``ttt:`` / ``oracle:``: that, plus the adapter's training: forward + backward over the trained positions
  (from the ledger's update ranges) x ``epochs``; extra gradient passes of a rule (SAM's second gradient,
  dyneval's statistics) are not counted;
* ``doc-chunk`` / ``docttt:``: each document's chunk windows (min((c+1)·chunk, window) positions for chunk c; the
  one forward scores and trains), a backward on every chunk but a document's last when adapting, and the phases'
  full-model SGD (forward + backward over the phase documents x ``phase_epochs``). Padding rows and positions of
  the ``chunk``/``batch`` shapes are not counted (the count is the work the method needs, not the kernel's).

Measured time per scored token (the timed part, warm-up excluded) is in the report beside it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Work:
    """Positions through the model: ``fwd`` forward-only, ``train`` forward + backward, ``bwd`` backward-only
    (a forward already counted); ``*_attn``: the same sums weighted by each row's length (attention)."""

    fwd: float = 0.0
    fwd_attn: float = 0.0
    train: float = 0.0
    train_attn: float = 0.0
    bwd: float = 0.0
    bwd_attn: float = 0.0

    def __add__(self, o: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(asdict(self).values(), asdict(o).values())))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def matmul_weights(model: Any) -> float:
    """N: matmul weights one position's forward passes through."""
    cfg = model.cfg
    banks = sum(float(getattr(model, b).numel()) for b in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"))
    n = banks / cfg.num_layers * len(cfg.layer_schedule()) + cfg.vocab_size * cfg.model_dim
    for name, p in model.named_parameters():
        if name in ("bigram_proj", "ve_proj"):
            n += float(p.numel())
    return n


def flops(work: Work, model: Any) -> float | None:
    """Counted FLOPs of ``work`` on a banked GPT; None for any other scoring model (a test's stand-in such as the
    synthetic corpus's true chain has no banks to count)."""
    from ..model.gpt import BankedGPT

    if not isinstance(model, BankedGPT):
        return None
    cfg = model.cfg
    n = matmul_weights(model)
    attn = 4.0 * len(cfg.layer_schedule()) * cfg.model_dim
    pos = work.fwd + 3.0 * work.train + 2.0 * work.bwd
    per_len = work.fwd_attn + 3.0 * work.train_attn + 2.0 * work.bwd_attn
    return 2.0 * n * pos + attn * per_len


def window_work(lengths: np.ndarray) -> Work:
    lengths = np.asarray(lengths, dtype=np.float64)
    return Work(fwd=float(lengths.sum()), fwd_attn=float((lengths ** 2).sum()))


def training_work(ledger_summary: dict[str, Any], epochs: int, seq_len: int) -> Work:
    """An adapter's training: each update range holds its rows' inputs + 1 (the last target)."""
    pos = float(ledger_summary.get("n_update_positions", 0) - ledger_summary.get("n_updates", 0)) * max(epochs, 1)
    return Work(train=pos, train_attn=pos * seq_len)


def docttt_work(n_targets: np.ndarray, chunk: int, window: int, adapt: bool, phase_targets: float = 0.0,
                phase_epochs: int = 1) -> Work:
    """The chunk loop's forwards (and backwards when adapting) per document, plus the phases' SGD."""
    nc = -(-np.asarray(n_targets, dtype=np.int64) // chunk)
    k = window // chunk  # chunks whose window is still growing
    grow = np.minimum(nc, k).astype(np.float64)
    rest = np.maximum(nc - k, 0).astype(np.float64)
    fwd = chunk * grow * (grow + 1) / 2 + rest * window  # Σ_c min((c+1)·chunk, window)
    sq = chunk ** 2 * grow * (grow + 1) * (2 * grow + 1) / 6 + rest * window ** 2
    w = Work(fwd=float(fwd.sum()), fwd_attn=float(sq.sum()))
    if adapt:  # every chunk but the document's last: its window length is that of chunk c
        last = np.minimum(nc * chunk, window).astype(np.float64)
        w = w + Work(bwd=float((fwd - last).sum()), bwd_attn=float((sq - last ** 2).sum()))
    if phase_targets:
        p = float(phase_targets) * max(phase_epochs, 1)
        w = w + Work(train=p, train_attn=p * window)
    return w
