"""Experiment tracking: run directories, optional wandb mirror, progress display, run comparison.

Heavy imports (matplotlib, wandb) happen only inside the functions that need them.
"""

from __future__ import annotations

from metattt.track.jsonio import to_jsonable
from metattt.track.progress import Progress, progress
from metattt.track.rundir import MalformedRunDir, RunDir, collect_env
from metattt.track.wandb_log import WandbLogger, WandbUnavailable, resolve_wandb_mode

__all__ = [
    "MalformedRunDir", "Progress", "RunDir", "WandbLogger", "WandbUnavailable", "collect_env", "progress",
    "resolve_wandb_mode", "to_jsonable",
]
