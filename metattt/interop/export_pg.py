"""``python -m metattt export-pg ARTIFACT --out final_model.pt``: a metattt model in the record's format.

Writes the banked float32 state dict the record's ``train_gpt.py`` builds (``GPT.load_state_dict`` takes it),
and prints the record script's environment variables for the architecture. Exit 2 on bad input (nothing written).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .pg_record import RECORD_NTK_LEN, RecordFormatError, export_state, record_env


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m metattt export-pg", description=__doc__.split("\n")[0])
    ap.add_argument("artifact", help="a metattt artifact (trained, or imported with import-pg)")
    ap.add_argument("--out", required=True, help="where to write the record-format state dict (final_model.pt)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..artifact.errors import ArtifactError
    from ..artifact.format import load_artifact
    from ..atomic import atomic_path
    from ..model.config import ModelConfig

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.is_dir() or (out.exists() and not args.force):
            raise RecordFormatError(f"--out {out} " + ("is a directory" if out.is_dir() else
                                                        "exists (pass --force to replace it)"))
        try:
            loaded = load_artifact(args.artifact)
        except (ArtifactError, FileNotFoundError, IsADirectoryError) as e:
            raise RecordFormatError(f"cannot load artifact {args.artifact}: {e}") from None
        cfg = ModelConfig.from_dict(loaded.config)
        sd = export_state(cfg, loaded.state_dict)
    except RecordFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with atomic_path(out) as tmp:
        torch.save(sd, tmp)
    print(f"wrote {out}: {len(sd)} tensors, {sum(t.numel() for t in sd.values()):,} parameters (float32)")
    if cfg.rope_ntk_len != RECORD_NTK_LEN:
        print(f"note: this model was trained with rope_ntk_len={cfg.rope_ntk_len}; the record script always uses "
              f"dynamic NTK from {RECORD_NTK_LEN} tokens (base {cfg.rope_base:g} -> "
              f"{replace(cfg, rope_ntk_len=RECORD_NTK_LEN).rope_base_at(2048):.2f} at 2048), "
              "so its function there differs from this model's")
    print("record script environment: " + " ".join(f"{k}={v}" for k, v in record_env(cfg).items()))
    return 0
