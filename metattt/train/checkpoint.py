"""Checkpoint save / resume: everything that decides the next step (weights, optimizer and EMA state, data
position, RNG, clock) so a resumed run takes the very step an uninterrupted run would have taken."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path

from .config import TrainConfig


def path_for(run_path: Path, rank: int) -> Path:
    return Path(run_path) / f"checkpoint_r{rank}.pt"


def save(run_path: Path, rank: int, *, step: int, elapsed: float, model, opts, ema, loader, adapter,
         meta_opt, path: Path | None = None, flops=None) -> Path:
    """Write the checkpoint (to ``path``, default this rank's resume checkpoint of the run); ``flops``: the
    run's FLOPs counter (metattt/train/flops.py), so a resumed run or a branch keeps counting."""
    state = {
        "flops": flops.state_dict() if flops is not None else None,
        "step": step, "elapsed": elapsed,
        "model": model.state_dict(), "opts": opts.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "loader": loader.state_dict(),
        "adapter": adapter.state_dict() if adapter is not None else None,
        "meta_opt": meta_opt.state_dict() if meta_opt is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    path = path or path_for(run_path, rank)
    with atomic_path(path) as tmp:  # a crash mid-save keeps the previous checkpoint
        torch.save(state, tmp)
    return path


def find(resume: str, rank: int) -> tuple[Path, Path]:
    """Accept a run directory or a checkpoint file; return (run directory, this rank's checkpoint)."""
    run_path = run_path_of(resume)
    ck = path_for(run_path, rank)
    if not ck.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint {ck.name} in {run_path} (did the run reach a "
                                f"checkpoint (--checkpoint-every-s, --checkpoint-every, a SIGINT/SIGTERM), and is it "
                                f"resumed with the same number of ranks?)")
    return run_path, ck


def run_path_of(resume: str) -> Path:
    p = Path(resume)
    return p.parent if p.is_file() else p


def saved_config(run_path: Path, resume: str, halt_after: int = 0) -> TrainConfig:
    """The run's own config (a resumed run is the same run), with this process's resume/halt settings."""
    cfg_path = Path(run_path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"cannot resume: {run_path} holds no config.json and no checkpoint (not a run "
                                "directory)")
    try:
        cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot resume from {run_path}: unreadable config.json ({e})") from None
    cfg.resume, cfg.halt_after = resume, halt_after
    return cfg


def restore(path: Path, *, model, opts, ema, loader, adapter, meta_opt, device, flops=None,
            reseed: bool = False) -> tuple[int, float]:
    """Load a checkpoint into the run's objects; ``flops``: a FLOPs counter to continue (left at zero, and marked
    as not counting from the init, when the checkpoint has none); ``reseed``: a branch seed's loader keeps the
    checkpoint's position with its own seed (a new block order from here)."""
    state: dict[str, Any] = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    opts.load_state_dict(state["opts"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    loader.load_state_dict({**state["loader"], "seed": loader.seed} if reseed else state["loader"])
    if flops is not None:
        if state.get("flops"):
            flops.load_state_dict(state["flops"])
        else:
            flops.known_since_init = int(state["step"]) == 0
    if adapter is not None and state["adapter"] is not None:
        adapter.load_state_dict(state["adapter"])
    if meta_opt is not None and state["meta_opt"] is not None:
        meta_opt.load_state_dict(state["meta_opt"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    return int(state["step"]), float(state["elapsed"])
