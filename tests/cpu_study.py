"""Shared set-up of the CPU-sized study variants (ladder, meta arms): a build of generated text with an
in-distribution split, and one run of a study config against it, its report checked to regenerate identically."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
         "court law state river city music water light year people time day world house school").split()


def generated_text(seed: int, n: int, sentences: tuple[int, int]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(*sentences))) for _ in range(n)]


def run_cpu_study(root: Path, config: str, again: list[str]) -> tuple[Path, str]:
    """Build $LADDER_CPU_DATA from generated text under ``root``, run experiments/``config`` with its outputs moved
    under ``root``, run it again with ``again`` (resume or ``--report-only``: the report must not change); returns
    (the study TOML written, the report)."""
    from metattt.data.build import BuildConfig, build_dataset

    sys.path.insert(0, str(REPO / "experiments"))
    import ceiling

    docs = generated_text(11, 400, (3, 8))
    books = ["\n".join(generated_text(100 + k, 45, (2, 4))) for k in range(12)]
    for name, texts in (("docs", docs), ("books", books)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                    for i, t in enumerate(texts)))
    data = root / "data"
    build_dataset(BuildConfig([root / "docs.jsonl"], data / "tok.model", data, val_docs=40,
                              pseudo_doc_text=[root / "books.jsonl"], indist_val_frac=0.1, indist_val_books=3,
                              indist_val_min_tokens=1000, train_tokenizer=True, vocab_size=320, progress=False))
    text = (REPO / "experiments" / config).read_text()
    for key, value in (("root", root / "study"), ("report", root / "report.md"), ("plots", root / "plots")):
        text = text.replace(f'{key} = "', f'{key} = "{value}" # was "', 1)
    cfg = root / "study.toml"
    cfg.write_text(text)
    os.environ["LADDER_CPU_DATA"] = str(data)
    try:
        assert ceiling.main(["--config", str(cfg)]) == 0
        report = (root / "report.md").read_text()
        assert ceiling.main(["--config", str(cfg), *again]) == 0
        assert (root / "report.md").read_text() == report
    finally:
        del os.environ["LADDER_CPU_DATA"]
    return cfg, report
