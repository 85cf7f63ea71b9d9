"""Learning-rate warmdown as a pure function of progress (momentum warmup lives in OptimConfig)."""
from __future__ import annotations


SCHEDULES = ("warmdown", "wsd")


def lr_scale(step: int, elapsed_s: float, *, iterations: int, warmdown_iters: int, max_wallclock_s: float,
             warmdown_frac: float = 0.0, schedule: str = "warmdown", warmup_steps: int = 0) -> float:
    """Multiplier on every base lr for the step about to be taken.

    ``schedule="wsd"`` (warmup-stable-decay, without its decay): constant after the warmup; the decay is a branch
    of its own (``--branch-from``, metattt/train/budgets.py). ``warmup_steps`` ramps linearly from
    ``1 / warmup_steps`` to 1 in either schedule.

    Under a wallclock cap the warmdown is placed by time: the last ``warmdown_iters`` steps are estimated from
    the mean step time so far (the record's "warmdown 3500 steps by wallclock"), or the last ``warmdown_frac``
    of the budget when that is set. Without a cap it is the last ``warmdown_iters`` of ``iterations``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose from {SCHEDULES}")
    scales = [1.0]
    if warmup_steps > 0 and step < warmup_steps:
        scales.append((step + 1) / warmup_steps)
    if schedule == "wsd":
        return min(scales)
    if max_wallclock_s > 0:
        remaining = max(max_wallclock_s - elapsed_s, 0.0)
        if warmdown_frac > 0:
            scales.append(remaining / (warmdown_frac * max_wallclock_s))
        elif warmdown_iters > 0 and step > 0:
            step_s = elapsed_s / step
            scales.append(remaining / max(warmdown_iters * step_s, 1e-9))
    if iterations > 0 and warmdown_iters > 0:
        scales.append((iterations - step) / warmdown_iters)
    return max(0.0, min(scales))



def meta_step_due(every: int, start_frac: float, step: int, iterations: int, elapsed_s: float,
                  max_wallclock_s: float) -> bool:
    """Meta-training runs every ``every`` steps once ``start_frac`` of training (by clock under a cap) is done."""
    if every <= 0 or step % every:
        return False
    if max_wallclock_s > 0:
        return elapsed_s >= start_frac * max_wallclock_s
    return step >= start_frac * iterations
