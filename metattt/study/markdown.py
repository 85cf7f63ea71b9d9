"""The report's markdown: number cells, tables, links, and reading tables back (for the tests that hold a report
to its run directories). A module of its own so that report, ladder and arms share it without importing each
other."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

_ROW_SPLIT = re.compile(r"\s*\|\s*")


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


def table_rows(text: str, is_head: Callable[[list[str]], bool], anchor: str | None = None
               ) -> Iterator[tuple[str | None, list[str], list[str]]]:
    """(anchor, header cells, row cells) for every row of the tables in ``text`` whose header ``is_head`` accepts.
    ``anchor``: a pattern whose group names the rows after a line it matches (e.g. a cell's run dir); with one,
    rows before its first match are skipped. A prose line ends a table; a blank line does not."""
    key, head = None, None
    for line in text.splitlines():
        m = re.match(anchor, line) if anchor else None
        if m:
            key, head = m.group(1), None
        elif not line.startswith("|"):
            head = None if line.strip() else head
        elif not line.startswith("|---"):
            cols = _ROW_SPLIT.split(line.strip().strip("|").strip())
            if is_head(cols):
                head = cols
            elif head is not None and (anchor is None or key is not None):
                yield key, head, cols
