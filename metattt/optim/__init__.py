"""Optimizers: Muon over 3-D weight banks (single-rank and sharded), AdamW for the rest, and the builder that
runs them in the right order. See docs/optim.md."""

from __future__ import annotations

from metattt.optim.builder import OptimConfig, Optimizers, build_optimizers, route_parameters
from metattt.optim.muon import Muon, apply_muon_update, muon_direction, shape_scale
from metattt.optim.ns import NS5_COEFFS, POLAR_EXPRESS_COEFFS, zeropower_via_newtonschulz
from metattt.optim.parallel_muon import ParallelMuon

__all__ = [
    "NS5_COEFFS", "POLAR_EXPRESS_COEFFS", "Muon", "OptimConfig", "Optimizers", "ParallelMuon",
    "apply_muon_update", "build_optimizers", "muon_direction", "route_parameters", "shape_scale",
    "zeropower_via_newtonschulz",
]
