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

import os  # noqa: E402

from metattt.data.shards import ShardFormatError  # noqa: E402
from metattt.train.cli import parse_config  # noqa: E402
from metattt.train.final_eval import check_mode, run_final_eval  # noqa: E402
from metattt.train.loop import train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from metattt.eval.ledger import LegalityError
    from metattt.eval.run import EXIT_ILLEGAL

    cfg = parse_config(argv)
    try:
        check_mode(cfg.final_eval)  # before training: a typo must not cost the run
        summary = train(cfg)
        if "artifact" in summary and cfg.final_eval != "off":
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                if int(os.environ.get("RANK", "0")) == 0:
                    print(f"final eval skipped under torchrun: python evaluators/legal_ttt.py {summary['artifact']}")
            else:
                run_final_eval(cfg, summary["artifact"])
    except LegalityError as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return EXIT_ILLEGAL
    except (FileNotFoundError, ShardFormatError, ValueError) as e:  # bad input (EvalInputError too): say what, not where
        if os.environ.get("METATTT_DEBUG"):
            raise
        print(f"error: {e}\n(set METATTT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
