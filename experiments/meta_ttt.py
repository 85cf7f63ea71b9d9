#!/usr/bin/env python
"""Train a banked GPT (optionally meta-training a TTT adapter), write a quantized artifact, and evaluate it.

    python experiments/meta_ttt.py                                  # embedded synthetic corpus, CPU-sized
    python experiments/meta_ttt.py --final-eval full                # the evaluator's full-size protocols after
    torchrun --nproc_per_node 8 experiments/meta_ttt.py --preset pg-2026-03-23 --data DIR --tokenizer MODEL
    python experiments/meta_ttt.py --meta.adapter fomaml:lr=0.01 --meta.every 4

Every flag of TrainConfig / ModelConfig / OptimConfig / MetaConfig is settable; see --help.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from metattt.train.cli import main  # noqa: E402,F401  (exit codes: README "Exit codes")


if __name__ == "__main__":
    raise SystemExit(main())
