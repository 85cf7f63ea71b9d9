"""The report's markdown: number cells, tables, links. A module of its own so that report, ladder and arms share it
without importing each other (the tests' reader of the tables back is tests/report_tables.py)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable


def num(v: float | None, signed: bool = False) -> str:
    """A bpb-scale number at 5 decimals; n/a for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:+.5f}" if signed else f"{v:.5f}"


def ci(lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None or any(isinstance(x, float) and math.isnan(x) for x in (lo, hi)):
        return "n/a"
    return f"[{lo:.5f}, {hi:.5f}]"


def table(head: str, rows: Iterable[str] = ()) -> list[str]:
    """A header line ``| a | b |``, its separator and the rows."""
    return [head, "|" + "---|" * head.count(" |"), *rows]


def link(path: Path, report_dir: Path) -> str:
    """``path`` relative to the report's folder, as a markdown link target."""
    return Path(os.path.relpath(path.resolve(), report_dir.resolve())).as_posix()
