"""Legal score-first evaluation: window plans, the one scoring path, the legality ledger, bootstrap CIs, report.

Entry point: ``evaluators/legal_ttt.py`` (``metattt.eval.run.main``).
"""
from __future__ import annotations

from .ledger import Ledger, LegalityError
from .protocols import EvalConfig, ProtocolSpec, evaluate, parse_protocol, parse_protocols, prepare_stream
from .report import SIGN_CONVENTION, build_report, format_report
from .scoring import ScoreConfig, run_stream
from .stats import bootstrap
from .windows import WindowPlan, doc_plan, flat_plan, sliding_plan

__all__ = [
    "Ledger", "LegalityError", "EvalConfig", "ProtocolSpec", "evaluate", "parse_protocol", "parse_protocols",
    "prepare_stream", "SIGN_CONVENTION", "build_report", "format_report", "ScoreConfig", "run_stream",
    "bootstrap", "WindowPlan", "doc_plan", "flat_plan", "sliding_plan",
]
