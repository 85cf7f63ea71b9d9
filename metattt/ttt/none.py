"""The ``none`` adapter: no test-time training (the baseline every TTT number is compared against)."""
from __future__ import annotations

from dataclasses import dataclass

from . import rules
from .adapter import Adapter, AdapterConfig


@dataclass
class NoneConfig(AdapterConfig):
    """No hyper-parameters besides ``reset`` (irrelevant: nothing changes)."""


class NoneAdapter(Adapter):
    """Scores with the trained weights: selects nothing, so ``adapt`` is a no-op and ``params()`` is empty."""

    name = "none"
    Config = NoneConfig
    cfg: NoneConfig  # Adapter.__init__ checks it is a Config
    default_selection = "none"
    trains_in_eval = False

    def rule(self) -> rules.Transform:
        return rules.chain()  # no transform: never run (nothing is selected)
