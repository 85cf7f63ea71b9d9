"""The ``none`` adapter: no test-time training (the baseline every TTT number is compared against)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .adapter import Adapter, AdapterConfig


@dataclass
class NoneConfig(AdapterConfig):
    """No hyper-parameters besides ``reset`` (irrelevant: nothing changes)."""


class NoneAdapter(Adapter):
    """Scores with the trained weights; ``adapt`` is a no-op and ``params()`` is empty."""

    name = "none"
    Config = NoneConfig
    default_selection = "none"
    trains_in_eval = False

    def params(self) -> dict[str, Tensor]:
        return {}

    def adapt(self, model: nn.Module, x: Tensor, y: Tensor, progress: float = 0.0) -> dict[str, float]:
        self._require_bound()
        return {"steps": 0}

    def _inner_step(self, model, base, state, x, y, k, create_graph, attn, backend):  # noqa: ANN001
        return state
