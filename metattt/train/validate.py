"""Flat validation bpb during training: the evaluator's ``flat`` protocol (non-overlapping seq_len windows,
the challenge's roundtrip eval) through the evaluator's one scoring path, so trainer and evaluator agree."""
from __future__ import annotations

import numpy as np
from torch import Tensor

from ..data.bpb import ByteLUT, bpb
from ..model.gpt import BankedGPT
from ..eval.scoring import ScoreConfig, run_stream
from ..eval.windows import flat_plan
from .dist import DistInfo


def flat_val_bpb(model: BankedGPT, tokens: Tensor, lut: ByteLUT, seq_len: int, batch_seqs: int,
                 info: DistInfo, autocast: bool) -> dict[str, float]:
    """bpb and mean nats/target over every target of ``tokens`` (windows split over ranks by the scorer)."""
    if tokens.numel() < 2:
        raise ValueError(f"validation set of {tokens.numel()} tokens has nothing to score")
    plan = flat_plan(tokens.numel(), seq_len)
    cfg = ScoreConfig(batch_tokens=batch_seqs * seq_len, autocast=autocast)
    with model.eager_core():  # flat scoring is cheap; compiling its shapes would cost more than it saves
        res = run_stream(model, tokens.to(info.device), plan, cfg)
    nats = float(np.sum(res.token_nll, dtype=np.float64))
    nbytes = float(lut.target_bytes(tokens[:-1], tokens[1:]).sum())
    n = int(res.token_nll.size)
    return {"val_bpb": bpb(nats, nbytes), "val_loss": nats / n, "val_tokens": n, "val_bytes": int(nbytes)}
