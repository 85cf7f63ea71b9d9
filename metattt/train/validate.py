"""Flat validation bpb during training: non-overlapping seq_len windows (the challenge's roundtrip eval).

The evaluator (metattt.eval) owns sliding / TTT protocols; the trainer only needs this cheap, exact score.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data.bpb import ByteLUT
from .dist import DistInfo, all_reduce_sum_


@torch.no_grad()
def flat_val_bpb(model: torch.nn.Module, tokens: Tensor, lut: ByteLUT, seq_len: int, batch_seqs: int,
                 info: DistInfo, autocast: bool) -> dict[str, float]:
    """bpb and mean nats/token over all complete seq_len windows of ``tokens`` (windows split over ranks)."""
    n_win = (tokens.numel() - 1) // seq_len
    if n_win < 1:
        raise ValueError(f"validation set of {tokens.numel()} tokens is shorter than one window ({seq_len + 1})")
    mine = range(info.rank, n_win, info.world_size)
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # nats, bytes, tokens
    was_training = model.training
    model.eval()
    idx = list(mine)
    for i in range(0, len(idx), batch_seqs):
        starts = torch.tensor(idx[i:i + batch_seqs]) * seq_len
        rows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).to(info.device)
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast):
            nll = model(x, y, reduction="none")
        nbytes = lut.target_bytes(x, y)
        sums += torch.stack((nll.double().sum(), nbytes.double().sum(),
                             torch.tensor(float(y.numel()), dtype=torch.float64, device=info.device)))
    model.train(was_training)
    all_reduce_sum_(sums, info)
    nats, nbytes, ntok = sums.tolist()
    return {"val_bpb": nats / math.log(2) / nbytes, "val_loss": nats / ntok, "val_tokens": int(ntok),
            "val_bytes": int(nbytes)}
