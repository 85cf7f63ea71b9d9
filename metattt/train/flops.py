"""Training FLOPs, counted as the run spends them, and a plain-step budget that matches another run's.

Why: a meta step costs more than a plain step (the inner loop's forwards and backwards, its passes, SAM's second
gradient, a no-grad forward for L_pre), so arms matched on steps are not matched on compute, and "meta-training
helps" could be "more compute helps" (issue 31). Each arm therefore reports what it spent, and the no-meta arm can
take as many plain steps as another arm's FLOPs buy (``--match-flops-of RUN`` or ``--flops-budget F``).

How it counts: a forward pre-hook on the model sees every forward of a training step -- the plain loss, the inner
loop's losses whatever the adapter's rule does with them, the outer loss, a no-grad L_pre -- and adds its input
positions (rows x length) and their length-weighted sum (attention) to a :class:`metattt.eval.cost.Work`, under
``train`` (forward + backward) when gradients are on and ``fwd`` when they are off; FLOPs are then
``metattt.eval.cost.flops`` of that work, the evaluator's convention (a forward 2·N per position plus attention,
a backward twice its forward, whatever subset of weights the backward reaches). Nothing is inferred from the
adapter, so a plug-in rule is counted as it runs. Validation forwards are outside the step and not counted.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..eval.cost import Work, flops

CATEGORIES = ("plain", "meta")
CONVENTION = ("model FLOPs of every forward in a training step (metattt.eval.cost: forward 2*N per position + "
              "attention 4*L*d*T, backward = 2x its forward), summed over ranks; validation not counted")


class FlopCounter:
    """Counts this rank's training forwards per category (``active``); cumulative since the model's init when the
    checkpoints it started from carried a count, and since this run's start (a branch's own steps) always."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.work = {c: Work() for c in CATEGORIES}
        self.start = {c: Work() for c in CATEGORIES}  # the count when this run (a branch: its decay) began
        self.meta_steps = 0
        self.start_meta_steps = 0
        self.known_since_init = True
        self.active: str | None = None
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:  # noqa: ANN001
        if self.active is None:
            return
        tokens = args[0] if args else kwargs["tokens"]
        b, t = tokens.shape
        n = float(b * t)
        w = Work(train=n, train_attn=n * t) if torch.is_grad_enabled() else Work(fwd=n, fwd_attn=n * t)
        self.work[self.active] = self.work[self.active] + w

    def close(self) -> None:
        self._handle.remove()

    def mark_start(self, known_since_init: bool) -> None:
        """This run's own count starts here (a branch from a checkpoint: its parent's steps are not its own)."""
        self.start = dict(self.work)
        self.start_meta_steps = self.meta_steps
        self.known_since_init = known_since_init

    def state_dict(self) -> dict[str, Any]:
        return {"work": {c: asdict(w) for c, w in self.work.items()},
                "start": {c: asdict(w) for c, w in self.start.items()},
                "meta_steps": self.meta_steps, "start_meta_steps": self.start_meta_steps,
                "known_since_init": self.known_since_init}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.work = {c: Work(**state["work"][c]) for c in CATEGORIES}
        self.start = {c: Work(**state["start"][c]) for c in CATEGORIES}
        self.meta_steps, self.start_meta_steps = int(state["meta_steps"]), int(state["start_meta_steps"])
        self.known_since_init = bool(state["known_since_init"])

    def summary(self, reduce_sum, plain_step: float, steps: int) -> dict[str, Any]:
        """The run's FLOPs for summary.json; ``reduce_sum(x)`` sums a float over ranks (identity on one)."""
        run = {c: reduce_sum(flops(_minus(self.work[c], self.start[c]), self.model) or 0.0) for c in CATEGORIES}
        total = sum(reduce_sum(flops(w, self.model) or 0.0) for w in self.work.values())
        out = {"run": run["plain"] + run["meta"], "plain": run["plain"], "meta": run["meta"],
               "total_since_init": total if self.known_since_init else None,
               "per_plain_step": plain_step, "steps": steps, "meta_steps": self.meta_steps - self.start_meta_steps,
               "convention": CONVENTION}
        out["plain_step_equivalents"] = out["run"] / plain_step if plain_step else None
        return out


def _minus(a: Work, b: Work) -> Work:
    return Work(*(x - y for x, y in zip(asdict(a).values(), asdict(b).values())))


def plain_step_flops(model_cfg: Any, train_batch_tokens: int, seq_len: int) -> float:
    """FLOPs of one plain step (forward + backward over every row of the global batch), counted on the meta device
    exactly as the hook counts a plain step."""
    from ..model.gpt import BankedGPT

    with torch.device("meta"):
        m = BankedGPT(model_cfg)
    n = float(train_batch_tokens)
    return float(flops(Work(train=n, train_attn=n * seq_len), m))


def budget_of(cfg: Any) -> float:
    """This run's FLOPs budget: ``--flops-budget``, or the counted FLOPs of ``--match-flops-of RUN``'s own steps
    (``summary.json`` ``flops.run``); 0 = none. Bad input raises ValueError naming it."""
    if cfg.flops_budget < 0:
        raise ValueError(f"--flops-budget must be >= 0, got {cfg.flops_budget}")
    if cfg.match_flops_of and cfg.flops_budget:
        raise ValueError("give one of --flops-budget and --match-flops-of")
    if not cfg.match_flops_of:
        return float(cfg.flops_budget)
    path = Path(cfg.match_flops_of)
    path = path / "summary.json" if path.is_dir() else path
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--match-flops-of {cfg.match_flops_of}: no summary.json (is the run finished?)") \
            from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--match-flops-of {cfg.match_flops_of}: unreadable summary.json ({e})") from None
    run = (summary.get("flops") or {}).get("run")
    if not run:
        raise ValueError(f"--match-flops-of {cfg.match_flops_of}: its summary.json has no counted FLOPs "
                         "(trained before the trainer counted them)")
    return float(run)


def steps_for_budget(budget: float, plain_step: float) -> int:
    """Plain steps whose FLOPs come nearest the budget (at least one): within half a step of it."""
    return max(1, round(budget / plain_step))
