"""Legality ledger: when each target position was scored, and which positions each adapter update saw.

Score-first test-time training is legal only if no update ever saw a position before that position's score
was fixed. The evaluator records events on one monotone step counter; ``verify`` checks the rule on interval
sets (positions come in contiguous ranges), so it costs O(#intervals) even for 62M-token streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


class LegalityError(RuntimeError):
    """An adapter update saw a position before that position was scored (or a position was scored twice)."""


@dataclass(frozen=True)
class UpdateRecord:
    step: int
    ranges: tuple[tuple[int, int], ...]  # half-open position ranges [lo, hi) the update's batch contained
    label: str = ""


@dataclass
class Ledger:
    """Event log of one protocol run. ``enforce=False`` only for labelled non-legal bounds (oracle).

    Its records are written only through its methods (``record_*``, ``advance_to``, ``merge``), so the step order
    and the interval lists ``verify`` relies on cannot be bent from outside."""

    name: str = ""
    enforce: bool = True
    _step: int = field(default=0, init=False, repr=False)
    _score_lo: list[int] = field(default_factory=list, init=False, repr=False)
    _score_hi: list[int] = field(default_factory=list, init=False, repr=False)
    _score_step: list[int] = field(default_factory=list, init=False, repr=False)
    _updates: list[UpdateRecord] = field(default_factory=list, init=False, repr=False)

    def next_step(self) -> int:
        """A fresh step number; every scoring pass and every update gets its own."""
        self._step += 1
        return self._step

    def advance_to(self, step: int) -> None:
        """Later steps are numbered after ``step`` (a no-op when the counter is already past it): one global order
        when several processes each count their own events between common points."""
        self._step = max(self._step, int(step))

    def record_score(self, lo: int, hi: int, step: int) -> None:
        """Positions ``[lo, hi)`` were scored at ``step`` (merged with the previous range when contiguous)."""
        if hi <= lo:
            return
        if self._score_hi and self._score_hi[-1] == lo and self._score_step[-1] == step:
            self._score_hi[-1] = hi
            return
        self._score_lo.append(int(lo))
        self._score_hi.append(int(hi))
        self._score_step.append(int(step))

    def record_scores(self, lo: np.ndarray, hi: np.ndarray, step: int) -> None:
        """Many ranges ``[lo[i], hi[i])`` scored at one ``step`` (one forward of many rows), kept as given."""
        lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
        if lo.shape != hi.shape or np.any(hi < lo):
            raise ValueError(f"{self.name}: score ranges need matching lo <= hi")
        self._score_lo.extend(lo.tolist())
        self._score_hi.extend(hi.tolist())
        self._score_step.extend([int(step)] * int(lo.size))

    def record_update(self, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...], step: int,
                      label: str = "") -> None:
        """An update at ``step`` trained on a batch containing (inputs or targets at) positions ``ranges``."""
        clean = tuple((int(a), int(b)) for a, b in ranges if b > a)
        self._updates.append(UpdateRecord(int(step), clean, label))

    def merge(self, parts: Sequence["Ledger"]) -> None:
        """This ledger's records become those of ``parts`` (every rank's ledger, this one among them), in order:
        each rank verifies the whole run."""
        lo = [x for p in parts for x in p._score_lo]
        hi = [x for p in parts for x in p._score_hi]
        st = [x for p in parts for x in p._score_step]
        self._score_lo, self._score_hi, self._score_step = lo, hi, st
        self._updates = [u for p in parts for u in p._updates]

    @property
    def updates(self) -> tuple[UpdateRecord, ...]:
        return tuple(self._updates)

    def scores(self) -> list[tuple[int, int, int]]:
        """The score records (lo, hi, step), in the order they were recorded."""
        return list(zip(self._score_lo, self._score_hi, self._score_step))

    @property
    def n_scored(self) -> int:
        return int(sum(h - l for l, h in zip(self._score_lo, self._score_hi)))

    def _sorted_scores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo = np.asarray(self._score_lo, dtype=np.int64)
        hi = np.asarray(self._score_hi, dtype=np.int64)
        st = np.asarray(self._score_step, dtype=np.int64)
        order = np.argsort(lo, kind="stable")
        lo, hi, st = lo[order], hi[order], st[order]
        overlap = np.flatnonzero(lo[1:] < hi[:-1])
        if overlap.size:
            i = int(overlap[0])
            a, b = int(lo[i + 1]), int(min(hi[i], hi[i + 1]))
            raise LegalityError(f"{self.name}: positions [{a}, {b}) were scored twice (steps {int(st[i])} and "
                                f"{int(st[i + 1])})")
        return lo, hi, st

    def violations(self) -> list[str]:
        """Human-readable description of every illegal update (empty when all updates were score-first)."""
        lo, hi, st = self._sorted_scores()
        out = []
        for k, up in enumerate(sorted(self._updates, key=lambda u: u.step)):
            for a, b in up.ranges:
                i0 = max(int(np.searchsorted(hi, a, side="right")), 0)
                i1 = int(np.searchsorted(lo, b, side="left"))
                bad = [i for i in range(i0, i1) if st[i] >= up.step]
                if bad:
                    i = bad[0]
                    pa, pb = max(a, int(lo[i])), min(b, int(hi[i]))
                    n_bad = sum(min(b, int(hi[j])) - max(a, int(lo[j])) for j in bad)
                    out.append(
                        f"update #{k} (step {up.step}{', ' + up.label if up.label else ''}) trained on positions "
                        f"[{pa}, {pb}) which were only scored later, at step {int(st[i])} "
                        f"({n_bad} premature positions in its range [{a}, {b}))"
                    )
        return out

    def verify(self) -> dict:
        """Raise :class:`LegalityError` naming the first offending update; else return a summary for the report."""
        bad = self.violations()
        if bad and self.enforce:
            more = f" (and {len(bad) - 1} more violations)" if len(bad) > 1 else ""
            raise LegalityError(f"ILLEGAL evaluation {self.name!r}: {bad[0]}{more}. "
                                "Adaptation must only use tokens that were already scored.")
        seen = sum(b - a for up in self._updates for a, b in up.ranges)
        return {
            "legal": not bad,
            "enforced": self.enforce,
            "n_score_intervals": len(self._score_lo),
            "n_scored_positions": self.n_scored,
            "n_updates": len(self._updates),
            "n_update_positions": int(seen),
            "n_violations": len(bad),
            "first_violation": bad[0] if bad else None,
        }
