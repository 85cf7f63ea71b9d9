"""Fair comparisons: adapter hyper-parameters chosen on one set of documents, reported on a disjoint one.

``--tune-slice A:B`` and ``--report-slice C:D`` are ranges of document indices of the val stream (Python slice
syntax, end exclusive, either end may be left out); they must not overlap. ``--tune-grid 'KEY:opt=v1|v2,...'``
(repeatable) names a small grid per adapter key: every combination of the listed values is evaluated as
``ttt:KEY`` on the tuning documents (its base protocol beside it), the lowest legal, finite bpb wins, and the
report run uses the winning spec on the report documents. eval.json records the slices, every candidate's bpb
and the chosen spec (``tuning``), so a reader can see that the reported number was not selected on itself.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .windows import doc_starts


@dataclass(frozen=True)
class DocSlice:
    start: int | None
    stop: int | None

    @property
    def text(self) -> str:
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"

    def bounds(self, n_docs: int) -> tuple[int, int]:
        a, b, _ = slice(self.start, self.stop).indices(n_docs)
        return a, max(a, b)


def parse_slice(text: str, flag: str) -> DocSlice:
    a, colon, b = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return DocSlice(int(a) if a.strip() else None, int(b) if b.strip() else None)
    except ValueError:
        raise ValueError(f"{flag} needs a document range START:STOP (e.g. 0:200 or 200:), got {text!r}") from None


def slice_tokens(tokens: np.ndarray, bos_id: int, s: DocSlice) -> tuple[np.ndarray, tuple[int, int]]:
    """The tokens of documents ``s`` (whole documents; the stream's own BOS delimiters kept)."""
    starts = doc_starts(np.asarray(tokens), bos_id)
    a, b = s.bounds(int(starts.size))
    if b - a < 1:
        raise ValueError(f"document range {s.text} holds no documents (the stream has {starts.size})")
    end = int(starts[b]) if b < starts.size else int(np.asarray(tokens).size)
    return np.asarray(tokens)[int(starts[a]):end], (a, b)


def check_disjoint(tune: tuple[int, int], report: tuple[int, int]) -> None:
    if tune[0] < report[1] and report[0] < tune[1]:
        raise ValueError(f"--tune-slice documents [{tune[0]}, {tune[1]}) overlap --report-slice [{report[0]}, "
                         f"{report[1]}): tuning and reporting must use disjoint documents")


def parse_grid(items: list[str]) -> dict[str, list[dict[str, str]]]:
    """``KEY:opt=v1|v2,opt2=w1|w2`` -> key -> every combination as {opt: value}."""
    out: dict[str, list[dict[str, str]]] = {}
    for it in items:
        key, colon, rest = it.partition(":")
        opts: list[tuple[str, list[str]]] = []
        for part in (p for p in rest.split(",") if p.strip()):
            k, eq, vals = part.partition("=")
            values = [v.strip() for v in vals.split("|") if v.strip()]
            if not eq or not k.strip() or not values:
                raise ValueError(f"--tune-grid {it!r}: expected KEY:opt=v1|v2,...")
            opts.append((k.strip(), values))
        if not colon or not key.strip() or not opts:
            raise ValueError(f"--tune-grid {it!r}: expected KEY:opt=v1|v2,...")
        if key in out:
            raise ValueError(f"--tune-grid given twice for {key!r}")
        out[key.strip()] = [dict(zip([k for k, _ in opts], combo))
                            for combo in itertools.product(*[v for _, v in opts])]
    return out


def with_options(spec: str, opts: dict[str, str]) -> str:
    """An adapter spec ``name[:k=v,...]`` with ``opts`` set (replacing the same keys)."""
    name, _, rest = spec.partition(":")
    kept = [t for t in rest.split(",") if t.strip() and t.partition("=")[0].strip() not in opts]
    return f"{name}:" + ",".join(kept + [f"{k}={v}" for k, v in opts.items()])


def tune(grid: dict[str, list[dict[str, str]]], specs: dict[str, str],
         score: Callable[[str, str], tuple[float, bool]]) -> dict[str, Any]:
    """For each key: every candidate spec scored by ``score(key, spec) -> (bpb, usable)``; the lowest usable
    bpb wins (ties: the first). Returns {"candidates": {key: [{spec, bpb, usable}]}, "chosen": {key: spec}}."""
    cands: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, str] = {}
    for key, combos in grid.items():
        rows: list[dict[str, Any]] = []
        for opts in combos:
            spec = with_options(specs.get(key, key), opts)
            bpb, usable = score(key, spec)
            rows.append({"spec": spec, "options": opts, "bpb": bpb, "usable": usable})
        ok = [r for r in rows if r["usable"] and np.isfinite(r["bpb"])]
        if not ok:
            raise ValueError(f"--tune-grid {key}: no candidate gave a legal, finite bpb on the tuning documents")
        chosen[key] = min(ok, key=lambda r: r["bpb"])["spec"]
        cands[key] = rows
    return {"candidates": cands, "chosen": chosen}
