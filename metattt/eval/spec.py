"""The one protocol-spec type (``Spec``) and the windowed protocols' spec (``ProtocolSpec``).

Every protocol (windows only, ``ttt:``/``oracle:``, the document-batched ``doc-chunk``/``docttt:``, ``bayes-cache``)
answers the same questions: its ``name``, whether it is ``legal``, whether it ``adapts`` (scored tokens change later
predictions), the protocol its Δ is taken from (``base``; ``total_base``: a whole chain's), its step in such a
chain (``step``), which protocols its deltas ``requires``, and its place in the run ``order``. Parsing, running
and reporting ask these, never the family's name.
"""
from __future__ import annotations

from dataclasses import dataclass

WINDOWS = ("flat", "sliding", "doc-flat", "doc-sliding")
MODES = ("score", "ttt", "oracle")


class Spec:
    """What every protocol spec answers (subclasses are frozen dataclasses; the defaults suit an adapting
    protocol that needs nothing else)."""

    mode: str  # eval.json's "mode": score | ttt | oracle | docttt | bayes-cache
    windows: str
    adapter: str | None

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def legal(self) -> bool:
        return True

    @property
    def adapts(self) -> bool:
        """Scored tokens change later predictions (an adapter, a cache); False: windows only."""
        return True

    @property
    def base(self) -> str | None:
        """The protocol this one's Δ is taken from (None: no Δ of its own)."""
        return None

    @property
    def total_base(self) -> str | None:
        """The start of the chain of Δs that ends here, when it is longer than one step (``total:`` Δ)."""
        return None

    @property
    def step(self) -> str | None:
        """What this protocol adds in its chain of Δs (None: not a chain member)."""
        return None

    @property
    def order(self) -> tuple:
        """Sort key of the run order: windows only, doc-batched, bayes-cache, ttt, oracle."""
        raise NotImplementedError

    def requires(self) -> list["Spec"]:
        """The protocols its deltas need (added by ``parse_protocols``)."""
        return []


@dataclass(frozen=True)
class ProtocolSpec(Spec):
    """One windowed protocol: a windowing, a mode and (for ttt / oracle) the key of an adapter."""

    windows: str
    mode: str = "score"
    adapter: str | None = None

    def __post_init__(self) -> None:
        if self.windows not in WINDOWS:
            raise ValueError(f"unknown windowing {self.windows!r}; choose from {', '.join(WINDOWS)} (or 'doc')")
        if self.mode not in MODES:
            raise ValueError(f"unknown protocol mode {self.mode!r}")
        if (self.mode == "score") != (self.adapter is None):
            raise ValueError(f"protocol mode {self.mode!r} {'needs' if self.mode != 'score' else 'takes no'} adapter")

    @property
    def name(self) -> str:
        if self.mode == "score":
            return self.windows
        suffix = "" if self.windows == "sliding" else f"@{self.windows}"
        return f"{self.mode}:{self.adapter}{suffix}"

    @property
    def legal(self) -> bool:
        return self.mode != "oracle"

    @property
    def adapts(self) -> bool:
        return self.mode != "score"

    @property
    def base(self) -> str | None:
        """An adapting protocol is compared with its own windows without adaptation."""
        return self.windows if self.adapts else None

    @property
    def order(self) -> tuple:
        return (0, WINDOWS.index(self.windows)) if self.mode == "score" else (3 + MODES.index(self.mode) - 1,)

    def requires(self) -> list[Spec]:
        """``flat`` (the context Δ's start) beside sliding windows and every adapting protocol, and its base."""
        flat: list[Spec] = [ProtocolSpec("flat")] if self.adapts or self.windows == "sliding" else []
        return flat + ([ProtocolSpec(self.windows)] if self.adapts else [])
