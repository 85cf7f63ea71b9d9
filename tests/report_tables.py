"""Reading the ceiling report's tables back, so a test can hold a report (metattt/study) to its run directories.
Test code only: the study writes these tables and never reads them."""
from __future__ import annotations

import re
from typing import Callable, Iterator

_ROW_SPLIT = re.compile(r"\s*\|\s*")


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


def parse_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """run dir -> protocol -> {column: cell text} for every cell table in ``text`` (the main and the bounds table:
    columns prefixed ``main:`` / ``bounds:``)."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for run_dir, head, cols in table_rows(text, lambda c: c[0] == "protocol", r"^run dir: `([^`]+)`$"):
        key = "bounds" if "adaptation room" in head else "main"
        out.setdefault(str(run_dir), {}).setdefault(cols[0], {}).update({f"{key}:{h}": v for h, v in zip(head, cols)})
    return out


def parse_summary(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """(model, setting) -> {column: cell text} for the summary tables in ``text``."""
    return {(cols[0], cols[1]): dict(zip(head, cols))
            for _, head, cols in table_rows(text, lambda c: c[:2] == ["model", "setting"])}


def parse_arm_rows(text: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """(validation set, arm, quantity) -> {column: cell text} of the arms' comparison tables in ``text``."""
    return {(str(v), cols[0], cols[2]): dict(zip(head, cols)) for v, head, cols in
            table_rows(text, lambda c: c[:3] == ["arm", "seeds", "quantity"], r"^\*\*Validation set `([^`]+)`\*\*$")}
