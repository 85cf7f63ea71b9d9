"""Artifact error hierarchy.

Every failure mode of reading or writing an artifact has its own subclass so callers (and tests) can tell a
truncated upload from a bit flip from a stale format, and every message names the file and the problem.
"""
from __future__ import annotations

from typing import Any


class ArtifactError(Exception):
    """Base class of every artifact problem."""


class NotAnArtifactError(ArtifactError):
    """The file does not start with the artifact magic (wrong file, or not ours)."""


class TruncatedArtifactError(ArtifactError):
    """The file is shorter than its header says (interrupted copy / write)."""


class CorruptedArtifactError(ArtifactError):
    """Checksum mismatch, undecodable payload or inconsistent index: the bytes changed after writing."""


class ArtifactVersionError(ArtifactError):
    """The artifact was written by a format version (or with flags) this code does not read."""


class OverBudgetError(ArtifactError):
    """Compressed artifact + code exceeds the byte budget. `report` holds the full accounting."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class ConfigMismatchError(ArtifactError):
    """The stored model config disagrees with what the caller expected.

    `mismatches` maps field -> (stored, expected); a field missing from the stored config has stored=<missing>.
    """

    def __init__(self, message: str, mismatches: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.mismatches = mismatches


class StateDictMismatchError(ArtifactError):
    """The artifact's tensors do not match the model built from its config (missing/unexpected/shape)."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 shape_mismatch: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatch = shape_mismatch or []
