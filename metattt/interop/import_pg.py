"""``python -m metattt import-pg SRC --out RUN/artifact.ptz``: a record model as a metattt artifact.

Exit codes: 0 written; 2 bad input (unreadable file, keys that do not map, bad options): nothing is written.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from .pg_record import RecordFormatError, import_record, ve_factors


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m metattt import-pg", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="the record's final_model.int6.ptz (integers kept as they are) or final_model.pt")
    ap.add_argument("--out", required=True, help="artifact path to write, e.g. runs/record/artifact.ptz")
    ap.add_argument("--tokenizer", help="SentencePiece model: its byte LUT is stored in the artifact")
    ap.add_argument("--val", help="val shard glob stored in the artifact (the evaluator's default --val)")
    ap.add_argument("--seq-len", type=int, default=2048, help="the record's training length (default 2048)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override an inferred ModelConfig field (e.g. 've_layers=[9,10]', 'xsa_layers=[7,8,9,10]'); "
                         "shapes are read from the file, these are the record's defaults for what shapes cannot tell")
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    return ap


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or not k.strip():
            raise RecordFormatError(f"--set needs KEY=JSON, got {it!r}")
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def _grouped(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Per-layer rows printed once, as ``blocks.{i}.…`` with the layer range."""
    out: list[tuple[str, str, str]] = []
    seen: dict[tuple[str, str, str], list[int]] = {}
    for src, dst, how in rows:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", dst)
        if m and src.startswith(f"blocks.{m.group(1)}."):
            key = (src.replace(f"blocks.{m.group(1)}.", "blocks.{i}.", 1), f"blocks.{{i}}.{m.group(2)}", how)
            if key not in seen:
                seen[key] = []
                out.append(key)
            seen[key].append(int(m.group(1)))
        else:
            out.append((src, dst, how))
    return [(s, d + (f"  i={min(seen[(s, d, h)])}..{max(seen[(s, d, h)])}" if (s, d, h) in seen else ""), h)
            for s, d, h in out]


def run(args: argparse.Namespace, say=print) -> dict[str, Any]:
    from ..artifact.format import save_artifact
    from ..data.bpb import ByteLUT

    out = Path(args.out)
    if out.is_dir():
        raise RecordFormatError(f"--out {out} is a directory; give the artifact's file path (e.g. {out}/artifact.ptz)")
    if out.exists() and not args.force:
        raise RecordFormatError(f"--out {out} exists (pass --force to replace it)")
    if args.seq_len < 1:
        raise RecordFormatError(f"--seq-len must be positive, got {args.seq_len}")
    lut = None
    if args.tokenizer:
        try:
            lut = ByteLUT.from_sentencepiece(args.tokenizer)
        except (OSError, RuntimeError, ValueError) as e:
            raise RecordFormatError(f"cannot read tokenizer {args.tokenizer}: {e}") from None
    imp = import_record(args.src, _overrides(args.set))
    cfg = imp.config
    if lut is not None and lut.vocab_size != cfg.vocab_size:
        raise RecordFormatError(f"tokenizer {args.tokenizer} has {lut.vocab_size} pieces but the record model's vocab "
                                f"is {cfg.vocab_size}")
    rec = imp.source
    meta = {"data": "imported", "seq_len": int(args.seq_len), "val_pattern": args.val,
            "imported_from": {"format": f"pg-record {rec.kind}", "path": str(Path(rec.path).resolve()),
                              "sha256": rec.sha256}}
    factors = ve_factors(imp)
    if factors is not None:
        meta["record_ve_factors"] = factors
    if lut is not None:
        meta["lut"] = lut.to_dict()
        meta["tokenizer"] = str(Path(args.tokenizer).resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    report = save_artifact(out, cfg.to_dict(), {}, meta=meta, prequantized=imp.qstate, allow_over_budget=True)
    rows = _grouped(imp.rows)
    width = max(len(s) for s, _, _ in rows)
    say(f"imported {rec.path} ({rec.kind}, sha256 {rec.sha256[:12]}…): {len(rec.sources)} record tensors -> "
        f"{len(imp.qstate.entries)} metattt tensors")
    for src, dst, how in rows:
        say(f"  {src:<{width}}  ->  {dst:<20} {how}")
    changed = {k: v for k, v in cfg.to_dict().items() if k not in ("extra",)}
    say("config: " + json.dumps(changed, separators=(",", ":")))
    say(str(report))
    say(f"wrote {out}")
    return {"config": cfg.to_dict(), "rows": imp.rows, "report": report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (RecordFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
