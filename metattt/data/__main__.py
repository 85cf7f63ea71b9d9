"""``python -m metattt.data {build,synthetic,download}``: thin CLI over the data package."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metattt.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="tokenize text into fineweb_{train,val}_*.bin shards")
    b.add_argument("--text", nargs="+", required=True, help=".jsonl[.xz|.gz|.zst] / .txt files or directories")
    b.add_argument("--tokenizer", required=True, type=Path,
                   help="SentencePiece .model (written there with --train-tokenizer)")
    b.add_argument("--out", required=True, type=Path)
    val = b.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=int, help="the first N documents of --text become validation")
    val.add_argument("--val-text", nargs="+", default=[], help="separate validation inputs")
    b.add_argument("--train-tokenizer", action="store_true", help="train a BPE tokenizer on the train documents")
    b.add_argument("--vocab-size", type=int, default=1024)
    b.add_argument("--shard-tokens", type=int, default=100_000_000)
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--pseudo-doc-text", nargs="+", default=[], metavar="PATH",
                   help="long texts (books) cut into BOS-delimited pseudo-documents with the length distribution "
                        "of --pseudo-doc-lengths-from, shuffled into the train split with the --text documents")
    b.add_argument("--pseudo-doc-lengths-from", nargs="+", default=[], metavar="PATH",
                   help="documents whose token lengths the pseudo-documents follow (default: --text train docs)")
    b.add_argument("--seed", type=int, default=0, help="seed of the pseudo-document lengths and train order")
    b.add_argument("--indist-val-frac", type=float, default=0.0, metavar="F",
                   help="in-distribution validation split: hold out this seeded fraction of the --text train "
                        "documents into indist_val_*.bin (with it, --val-docs/--val-text are optional)")
    b.add_argument("--indist-val-books", type=int, default=0, metavar="N",
                   help="hold out N whole --pseudo-doc-text texts (books): no token of them trains, one seeded "
                        "pseudo-document of each joins indist_val_*.bin")
    b.add_argument("--indist-val-min-tokens", type=int, default=500_000, metavar="T",
                   help="refuse (before writing) an in-distribution split of fewer tokens (default 500000)")
    b.add_argument("--workers", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="processes that split --pseudo-doc-text books into units (the output does not depend on "
                        "it; default: the CPUs available, at most 16)")

    s = sub.add_parser("synthetic", help="write the embedded synthetic document-language corpus")
    s.add_argument("--out", required=True, type=Path)
    from metattt.data.synthetic import NAMED_SPECS, SyntheticSpec

    s.add_argument("--named", choices=sorted(NAMED_SPECS), default=None,
                   help="start from a named corpus design (the trainer's --synthetic-spec); flags given override it")
    for f in fields(SyntheticSpec):  # unset flags stay absent: the spec's (or the named design's) value holds
        if isinstance(f.default, bool):  # --shared-theta: the zero-room control (one theta for all documents)
            s.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=argparse.SUPPRESS)
        else:
            s.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=argparse.SUPPRESS)

    d = sub.add_parser("download", help="fetch challenge FineWeb sp1024 shards + tokenizer from the HF hub")
    d.add_argument("--train-shards", type=int, default=1)
    d.add_argument("--out", type=Path, default=Path("data"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "build":
        from metattt.data.build import BuildConfig, build_dataset, summary_line

        try:
            same = {f.name: getattr(args, f.name) for f in fields(BuildConfig) if hasattr(args, f.name)}
            cfg = BuildConfig(**same, progress=not args.no_progress, pseudo_doc_lengths=args.pseudo_doc_lengths_from)
            print(summary_line(build_dataset(cfg), args.out))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.cmd == "synthetic":
        from metattt.data.synthetic import SyntheticSpec, make_synthetic_dataset, named_spec

        try:
            given = {f.name: getattr(args, f.name) for f in fields(SyntheticSpec) if hasattr(args, f.name)}
            spec = named_spec(args.named, **given) if args.named else SyntheticSpec(**given)
            meta = make_synthetic_dataset(args.out, spec)
        except ValueError as e:  # bad spec, or --out holds another corpus (never overwritten)
            print(f"error: {e}", file=sys.stderr)
            return 2
        state = "reused" if meta.get("reused") else f"generated in {meta['generation_seconds']:.1f}s"
        print(f"synthetic corpus in {args.out} ({state}): {meta['n_train_tokens']:,} train / "
              f"{meta['n_val_tokens']:,} val tokens, vocab {meta['vocab_size']}")
        print(json.dumps(meta["bounds"], indent=2))
    elif args.cmd == "download":
        from metattt.data.download import OfflineError, download_fineweb

        try:
            paths = download_fineweb(args.out, args.train_shards)
        except OfflineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{len(paths)} files present under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
