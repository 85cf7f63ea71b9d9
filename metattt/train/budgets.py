"""Token-budget checkpoints of a warmup-stable-decay run, and the decay branch that starts from one.

Why: a scaling ladder needs one model at several token budgets D (as multiples of its parameter count N, D/N).
Training each budget with its own warmdown costs the sum of the budgets; a constant-lr run saved at every budget,
with a short linear decay branched from each save, costs the largest budget plus the branches, and each branch is
the very run that a warmdown schedule over ``budget + decay`` steps would have been (tests/test_train_budgets.py).
Budgets are capped at a number of passes over the training tokens (tiny data, large budgets); a capped budget is
reported as such.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

BUDGET_DIR = "budgets"
BUDGETS_JSON = "budgets.json"


@dataclass(frozen=True)
class Budget:
    """One checkpoint of a budget run: the requested budget, the step it falls on, and whether the cap hit."""

    label: str  # file stem: "dn25" (a D/N multiple) or "t1000000" (a token count)
    requested_tokens: int
    step: int
    tokens: int  # step * tokens per step: what the checkpoint has trained on
    capped: bool  # the pass cap moved it below the request
    dn: float | None = None  # the requested D/N, when it was given as one
    n_params: int = 0  # the N of D/N

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_budgets(*, save_at_tokens: Sequence[int], save_at_dn: Sequence[float], n_params: int, batch_tokens: int,
                 stream_tokens: int, max_passes: float) -> list[Budget]:
    """Budgets sorted by step; a budget falls on the nearest whole step (at least 1), never past the cap."""
    cap = cap_steps(max_passes, stream_tokens, batch_tokens)
    if cap is not None and cap < 1:
        raise ValueError(f"--max-passes {max_passes} over {stream_tokens:,} training tokens is less than one step "
                         f"of {batch_tokens:,} tokens")
    wanted = [(f"t{int(t)}", int(t), None) for t in save_at_tokens]
    wanted += [(f"dn{d:g}", int(round(d * n_params)), float(d)) for d in save_at_dn]
    out = []
    for label, req, dn in wanted:
        if req <= 0:
            raise ValueError(f"budget {label}: token budgets and D/N multiples must be positive")
        step = max(1, round(req / batch_tokens))
        capped = cap is not None and step > cap
        step = min(step, cap) if cap is not None else step
        out.append(Budget(label, req, step, step * batch_tokens, capped, dn, n_params))
    labels = [b.label for b in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"budgets repeat: {labels}")
    return sorted(out, key=lambda b: (b.step, b.label))


def cap_steps(max_passes: float, stream_tokens: int, batch_tokens: int) -> int | None:
    """The last step the pass cap allows (None without a cap)."""
    return math.floor(max_passes * stream_tokens / batch_tokens) if max_passes > 0 else None


def checkpoint_path(run_path: Path, label: str, rank: int) -> Path:
    return Path(run_path) / BUDGET_DIR / f"{label}_r{rank}.pt"


def write_plan(run_path: Path, budgets: list[Budget], meta: dict[str, Any]) -> None:
    from ..atomic import atomic_write

    atomic_write(Path(run_path) / BUDGETS_JSON, json.dumps(
        {**meta, "budgets": [{**b.to_dict(), "checkpoint": f"{BUDGET_DIR}/{b.label}_r{{rank}}.pt"}
                             for b in budgets]}, indent=2))


# --- decay branches ------------------------------------------------------------------------------------------------

_RANK = re.compile(r"_r\d+\.pt$")


def branch_paths(branch_from: str, rank: int) -> tuple[Path, Path]:
    """(parent run directory, this rank's checkpoint) for ``--branch-from`` (any rank's checkpoint file)."""
    p = Path(branch_from)
    if not _RANK.search(p.name):
        raise ValueError(f"--branch-from {branch_from}: expected a checkpoint file NAME_r<rank>.pt (a budget "
                         f"checkpoint under <run>/{BUDGET_DIR}/ or a run's checkpoint_r0.pt)")
    ck = p.with_name(_RANK.sub(f"_r{rank}.pt", p.name))
    if not ck.is_file():
        raise FileNotFoundError(f"--branch-from: checkpoint {ck} not found")
    run = p.parent if (p.parent / "config.json").is_file() else p.parent.parent
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"--branch-from {branch_from}: no config.json of its run beside it or one level up")
    return run, ck


def checkpoint_step(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state["step"])


def parent_budget(run: Path, ck: Path) -> dict[str, Any] | None:
    """The parent's budgets.json entry of this checkpoint (None for a plain checkpoint)."""
    try:
        plan = json.loads((run / BUDGETS_JSON).read_text())
    except (OSError, ValueError):
        return None
    label = _RANK.sub("", ck.name)
    return next((b for b in plan.get("budgets", []) if b.get("label") == label), None)


def decay_steps(frac: float, from_step: int) -> int:
    """The branch's linear decay length: ``frac`` of the checkpoint's steps (tokens), at least one step."""
    return max(1, round(frac * from_step))


def branch_base_config(branch_from: str):
    """The parent run's config, as the base a branch's own flags override (``--run-name``, ``--decay-frac`` …):
    a branch continues the parent's model, data and optimiser."""
    from .config import TrainConfig

    run, _ = branch_paths(branch_from, 0)
    try:
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--branch-from {branch_from}: unreadable config.json of {run} ({e})") from None
    cfg.run_name, cfg.resume, cfg.halt_after, cfg.branch_from = "", "", 0, branch_from
    return cfg


def param_counts(model_cfg) -> tuple[int, int]:
    """(total, non-embedding) parameters of a model config, counted on the meta device (no memory, no RNG)."""
    from ..model.gpt import BankedGPT

    with torch.device("meta"):
        m = BankedGPT(model_cfg)
    return m.num_params(), m.num_non_embedding_params()


def branch_data_seed(seed: int, branch_seed: int) -> int:
    """The loader (and torch) seed of a decay branch: the parent's ``seed`` for branch seed 0 (the branch continues
    the parent's stream), else one drawn from (seed, branch seed), so each branch seed has its own block order."""
    if not branch_seed:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(branch_seed)]).generate_state(1)[0])
