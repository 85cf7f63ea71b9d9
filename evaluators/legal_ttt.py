#!/usr/bin/env python
"""Legal score-first evaluator: ``python evaluators/legal_ttt.py ARTIFACT [options]`` (also under torchrun).

Reports bpb of flat / sliding / doc / ttt:<adapter> / oracle:<adapter> protocols and the document-batched family
doc-chunk / docttt:doclora[@phases=.../chunk=.../rank=...], Δ_context = flat - sliding,
Δ_TTT = sliding - ttt:<adapter> with paired document-bootstrap CIs, and refuses (exit 3) when an adapter
update saw a token before it was scored (the ledger) or a score moved when later tokens changed (the audit,
``--audit``), or 4 when a ttt:/oracle: adapter diverged (non-finite loss or weights;
that protocol is marked invalid). Bad input exits 2 before anything is scored. See ``metattt/eval/run.py``,
README "Exit codes" and ``--help``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from metattt.eval.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
