"""The record-trained reference models (``pg549-*`` folders) and the data they are scored on: where they are, and
what the record script printed for them.

Why here: the reference GPU test, the CPU fidelity test and ``benchmarks/compat_residual.py`` must all find them
without set-up, on a workstation (``../shared`` beside the checkout) and on the device (``.device/`` staged into the
checkout, or the ``METATTT_REFERENCE`` / ``METATTT_DATA`` variables its setup exports). The printed numbers are
read from each folder's README table, so no number is copied into code.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# our protocol -> the record script's log line that prints it
RECORD_LINES = {"flat": "final_int6_roundtrip_exact", "sliding": "final_int6_sliding_window_exact",
                "ttt:sgd": "legal_ttt_exact"}
REFERENCE_MODELS = ("pg549-143steps", "pg549-393steps")
VAL_SHARD = ("fineweb_sp1024_valprefix", "fineweb_val_000000.bin")
TOKENIZER = ("tokenizers", "fineweb_1024_bpe.model")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _first_dir(env: str, *rel: str) -> Path | None:
    root = repo_root()
    cands = ([Path(os.environ[env])] if os.environ.get(env) else []) + [root / ".device" / rel[0],
                                                                        root.parent / "shared" / rel[1]]
    return next((c for c in cands if c.is_dir()), None)


def reference_root() -> Path | None:
    """``$METATTT_REFERENCE``, else ``.device/reference``, else ``../shared/reference``; None when none exists."""
    return _first_dir("METATTT_REFERENCE", "reference", "reference")


def data_root() -> Path | None:
    """``$METATTT_DATA``, else ``.device/data``, else ``../shared/data``; None when none exists."""
    return _first_dir("METATTT_DATA", "data", "data")


def reference_model(name: str) -> Path | None:
    """The record artifact ``<reference>/<name>/final_model.int6.ptz``, or None when absent."""
    root = reference_root()
    p = root / name / "final_model.int6.ptz" if root is not None else None
    return p if p is not None and p.is_file() else None


def val_and_tokenizer() -> tuple[Path, Path] | None:
    """(official val prefix shard, sp1024 tokenizer) under the data root, or None when either is absent."""
    root = data_root()
    if root is None:
        return None
    val, tok = root.joinpath(*VAL_SHARD), root.joinpath(*TOKENIZER)
    return (val, tok) if val.is_file() and tok.is_file() else None


def printed_numbers(folder: Path) -> dict[str, float]:
    """Our protocol name -> the val bpb the record printed for the model in ``folder``: from its README's table rows
    (``| `final_int6_roundtrip_exact` (...) | 5.19963323 |``), else from the record script's own log (``*.txt`` /
    ``*.log``: ``final_int6_roundtrip_exact val_loss:... val_bpb:5.19963323``). ValueError when a line is missing."""
    folder = Path(folder)
    readme = folder / "README.md"
    if readme.is_file():
        text, pattern = readme.read_text(encoding="utf-8"), r"^\|\s*`{line}`[^|]*\|\s*([0-9]+\.[0-9]+)\s*\|"
        where = readme
    else:
        logs = sorted(folder.glob("*.txt")) + sorted(folder.glob("*.log"))
        if not logs:
            raise ValueError(f"{folder}: neither a README.md nor a record log (*.txt, *.log)")
        text, pattern = "\n".join(p.read_text(encoding="utf-8") for p in logs), r"^{line} .*val_bpb:([0-9]+\.[0-9]+)"
        where = logs[0]
    out = {}
    for proto, line in RECORD_LINES.items():
        m = re.search(pattern.format(line=re.escape(line)), text, re.M)
        if m is None:
            raise ValueError(f"{where}: no `{line}` number")
        out[proto] = float(m.group(1))
    return out
