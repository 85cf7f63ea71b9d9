"""Save / load a `BankedGPT` as an artifact: the config travels in the artifact, so loading needs nothing
but the file (the model is rebuilt with `BankedGPT(ModelConfig.from_dict(cfg))`)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .budget import ArtifactReport
from .errors import StateDictMismatchError
from .format import LoadedArtifact, load_artifact, save_artifact

if TYPE_CHECKING:
    from metattt.model.gpt import BankedGPT


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip torch.compile (`_orig_mod`) and DDP/FSDP-style (`module`) wrappers so stored names are the
    plain BankedGPT names (a wrapped model would otherwise store '_orig_mod.tok_emb' etc.)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
    return model


def _model_config(model: torch.nn.Module) -> Any:
    for attr in ("cfg", "config"):
        cfg = getattr(model, attr, None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    raise TypeError(f"{type(model).__name__} has no .cfg/.config with to_dict(); cannot store its config")


def model_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict, names of persistent buffers): buffers are stored bit-exact, never quantized."""
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return dict(state), [n for n in state if n not in params]


def save_model_artifact(path: str | os.PathLike, model: torch.nn.Module, **kw: Any) -> ArtifactReport:
    """`save_artifact` with the model's config and state dict (kw: extras, meta, level, budget, ...)."""
    model = unwrap(model)
    state, buffers = model_state(model)
    exact = tuple(kw.pop("exact", ())) + tuple(buffers)
    return save_artifact(path, _model_config(model).to_dict(), state, exact=exact, **kw)


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str = "<memory>") -> None:
    """load_state_dict(strict=True) with one clear error listing missing, unexpected and mis-shaped keys."""
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = sorted(f"{k}: stored {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
                    for k in set(want) & set(state) if tuple(state[k].shape) != tuple(want[k].shape))
    if missing or unexpected or shapes:
        raise StateDictMismatchError(
            f"{where}: artifact tensors do not match the model built from its config: "
            f"missing={missing} unexpected={unexpected} shape_mismatch={shapes}", missing, unexpected, shapes)
    model.load_state_dict(dict(state), strict=True)


def load_model_artifact(path: str | os.PathLike, device: str | torch.device = "cpu",
                        expect: Mapping[str, Any] | None = None, **kw: Any) -> tuple[BankedGPT, LoadedArtifact]:
    """Rebuild BankedGPT from the artifact's config and load its dequantized weights (strict)."""
    from metattt.model.config import ModelConfig  # lazy: keeps the format layer importable on its own
    from metattt.model.gpt import BankedGPT

    loaded = load_artifact(path, expect=expect, **kw)
    model = BankedGPT(ModelConfig.from_dict(loaded.config))
    load_state_strict(model, loaded.state_dict, str(path))
    return model.to(device), loaded
