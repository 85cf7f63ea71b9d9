"""The evaluator's command line: its arguments (``build_parser``), their parsing, and every input check that must
fail (exit 2, ``EvalInputError``) before anything is loaded, scored or written. ``metattt.eval.run`` runs it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from ..model.attention import ATTN_BACKENDS
from ..ttt.registry import add_module_flag
from .audit import CUDA_TOL, AuditConfig
from .docttt_spec import DocTTTSpec
from .positions import parse_edges
from .protocols import EvalConfig
from .scoring import FULL_VAL_TOKENS, parse_horizon
from .tuning import parse_grid, parse_slice

DEFAULT_PROTOCOLS = "flat,sliding,ttt:sgd"


def _horizon(text: str) -> int | None:
    try:
        return parse_horizon(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class EvalInputError(ValueError):
    """Bad evaluator input (artifact, data, tokenizer, arguments), reported with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="legal_ttt.py",
        description="Legal score-first evaluation of an artifact: flat vs sliding (context gain) vs score-first "
                    "test-time training (TTT gain), with a legality ledger and paired document-bootstrap CIs.")
    ap.add_argument("artifact", help="artifact file (.ptz) written by the trainer")
    ap.add_argument("--val", help="val shard glob (default: artifact metadata, else $METATTT_DATA)")
    ap.add_argument("--tokenizer", help="SentencePiece model for the byte LUT (default: LUT stored in the artifact)")
    ap.add_argument("--protocols", default=DEFAULT_PROTOCOLS,
                    help="comma list of flat, sliding, doc (=doc-sliding), doc-flat, ttt:<adapter>[@windows], "
                         f"oracle:<adapter>[@windows], and the doc-batched family doc-chunk[@opts] / "
                         f"docttt:<per-document adapter>[@k=v/...] (default {DEFAULT_PROTOCOLS}); flat and each ttt's base windows "
                         "(docttt: its decomposition chain doc-flat -> doc-chunk -> docttt -> + phases) are added "
                         "when needed for the deltas. docttt options, '/'-separated: chunk (32), docs (64), window "
                         "(2048), phases (0), phase_docs (2000), phase_lr (0.001), phase_momentum (0.9), "
                         "phase_tokens (32768), phase_epochs (1), phase_clip (1.0); any other key is an option of the "
                         "per-document adapter (doclora, or a --adapter-module plug-in's): rank (96), alpha, lr (1e-4), beta1, beta2, eps, weight_decay, targets, keep_a, "
                         "seed, init (meta: the artifact's learned A0). Example: "
                         "docttt:doclora@phases=3/chunk=64/rank=64")
    ap.add_argument("--adapter-spec", action="append", default=[], metavar="SPEC",
                    help="adapter hyper-parameters, e.g. 'sgd:lr=0.002,epochs=3,select=all' (repeatable; "
                         "'KEY=name:...' defines a protocol key, e.g. ttt:fast with 'fast=sgd:lr=0.01')")
    add_module_flag(ap)
    ap.add_argument("--context", type=int, default=None,
                    help="sliding window length (default: the artifact's training seq_len, else 2048)")
    ap.add_argument("--stride", type=int, default=64, help="sliding stride = scored tokens per window (default 64)")
    ap.add_argument("--seq-len", type=int, default=None, help="flat window length (default: artifact's seq_len)")
    ap.add_argument("--chunk-tokens", type=int, default=32768, help="TTT chunk size in scored tokens (default 32768)")
    ap.add_argument("--schedule-horizon", type=_horizon, default=None, metavar="TOKENS|full",
                    help="index the adapters' schedules (e.g. sgd's cosine lr) to a stream of this many tokens, "
                         f"'full' = the official FineWeb val ({FULL_VAL_TOKENS:,} tokens, the records' horizon), "
                         "progress clipped to 1; default: the scored stream, so a prefix runs the whole schedule")
    ap.add_argument("--train-seq-len", type=int, default=None,
                    help="adapter training sequence length (default: context)")
    ap.add_argument("--batch-tokens", type=int, default=32 * 2048, help="padded tokens per scoring forward")
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N val tokens")
    ap.add_argument("--run-dir", default=None, help="where eval.json goes (default: the artifact's directory)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no CIs)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--projection-tokens", type=int, default=62_000_000,
                    help="tokens assumed for the full FineWeb val in the time projection (default 62M)")
    ap.add_argument("--projection-gpus", type=int, default=8,
                    help="GPUs assumed in the time projection (>= 1). The projection uses the timed part only "
                         "(compilation is warm-up, shown in its own column); docttt protocols on CUDA use the "
                         "batch-cost model of metattt.eval.docttt_model, calibrated in their warm-up")
    ap.add_argument("--orders", type=int, default=1, metavar="K",
                    help="evaluate every protocol on K document orders (fixed seeds; one permutation per order, the "
                         "same for every protocol, so pairing survives); K > 1 adds hierarchical intervals "
                         "(runs -> documents) in eval.json 'runs'. Default 1: intervals are conditional on one order")
    ap.add_argument("--adapt-seeds", type=int, default=1, metavar="S",
                    help="adapter seeds per order (the seed option of adapters that have one, e.g. lora, "
                         "docttt:doclora; others are deterministic and repeat), for the hierarchical intervals")
    ap.add_argument("--position-buckets", default="0,128,1024,2048", metavar="EDGES",
                    help="per-position Δ: bucket edges of the target's offset from its document's BOS (default "
                         "0,128,1024,2048: [0,128) [128,1024) [1024,2048) [2048,inf)); stream deciles always")
    ap.add_argument("--tune-slice", default=None, metavar="A:B",
                    help="documents A..B-1 of the val stream (after --max-tokens) on which --tune-grid chooses the "
                         "adapters' hyper-parameters; needs a disjoint --report-slice")
    ap.add_argument("--report-slice", default=None, metavar="C:D",
                    help="evaluate and report only documents C..D-1 (slice syntax: '200:' = from 200 on)")
    ap.add_argument("--tune-grid", action="append", default=[], metavar="KEY:opt=v1|v2,...",
                    help="a small grid for the adapter of protocol ttt:KEY (repeatable), e.g. 'sgd:lr=0.001|0.003|"
                         "0.01,epochs=1|2': every combination is scored on --tune-slice, the lowest bpb is reported "
                         "on --report-slice; eval.json 'meta.tuning' records every candidate and the choice")
    ap.add_argument("--equivalence-margin", type=float, default=0.001, metavar="BPB",
                    help="TOST margin in bpb for the equivalence table of the adapters' Δ (Holm-corrected; "
                         "default 0.001)")
    ap.add_argument("--allow-longer-context", action="store_true",
                    help="allow --context, --seq-len, --train-seq-len or a docttt window= longer than the sequence "
                         "length the artifact was trained at (refused by default: the model never saw such "
                         "positions and scores worse there)")
    ap.add_argument("--allow-other-data", action="store_true",
                    help="evaluate even when the validation data's fingerprint differs from the one stored in the "
                         "artifact (the stored and the new bpb then refer to different data)")
    ap.add_argument("--expect", action="append", default=[], metavar="KEY=VALUE",
                    help="require a model-config value in the artifact (e.g. vocab_size=1024)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-autocast", action="store_true",
                    help="float32 on GPU too: the scoring forwards and the adapters' test-time updates (ttt:, "
                         "oracle:, docttt:)")
    ap.add_argument("--attn", default="auto", choices=ATTN_BACKENDS,
                    help="attention backend (default auto: flash-attn if installed, else SDPA's choice; the docttt "
                         "family then uses SDPA's FLASH kernel, whose cost does not depend on new shapes)")
    ap.add_argument("--compat", default="none", choices=("none", "pg-record"),
                    help="pg-record: also report the record scripts' numbers (truncated val, tail re-scoring, every "
                         "forward padded to the context, late-QAT TTT forwards, the record's bf16 numerics under "
                         "autocast; docs/interop.md). Default: every target exactly once")
    ap.add_argument("--compat-knobs", default="", metavar="K=V,...",
                    help="pg-record: turn single sources of the record's numerics off, e.g. 'qat=0,attn=auto' "
                         "(metattt.eval.compat.RecordNumerics; for benchmarks/compat_residual.py)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the scoring forward (adapters train eager); every forward is then padded to "
                    "one shape, so it compiles once; docttt protocols compile the model's core with dynamic rows and "
                    "lengths (one graph, forward and backward). Default: on for CUDA (1.9x sliding throughput on an "
                    "H100; docttt 6.8K -> 11.7K tokens/s on an H200), off on CPU (compiling costs more than it saves there)")
    ap.add_argument("--audit", action=argparse.BooleanOptionalAction, default=True,
                    help="black-box legality audit (default on; docs/adapters.md 'Trust model'): every protocol is "
                         "re-run on a prefix of the stream with the tokens from seeded points q on replaced (and a "
                         "BOS moved to q); any target scored before q whose nats change is a violation (exit 3). "
                         "oracle: is expected to fail and is only reported")
    ap.add_argument("--audit-points", type=int, default=None, metavar="N",
                    help="token perturbations per protocol (default 2; 4 with --adapter-module plug-ins), plus one "
                         "moved BOS")
    ap.add_argument("--audit-tokens", type=int, default=None, metavar="N",
                    help="audit prefix length (default: 4 chunks, 2 on a short stream; docttt: its first 2 batches "
                         "of documents)")
    ap.add_argument("--audit-tol", type=float, default=None, metavar="NATS",
                    help=f"allowed |change| of a target's nats (default 0 on CPU, {CUDA_TOL:g} on CUDA, whose "
                         "re-runs are not bit-exact)")
    ap.add_argument("--wandb", default=None, metavar="MODE", help="online | offline | off (default: env/auto)")
    ap.add_argument("--wandb-project", default="metattt")
    ap.add_argument("--quiet", action="store_true")
    return ap


def parse_expect(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq:
            raise EvalInputError(f"--expect needs KEY=VALUE, got {it!r}")
        try:
            import json

            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def parse_adapter_specs(items: list[str]) -> dict[str, str]:
    """Protocol key -> adapter spec; a spec's key is its adapter name unless given as ``KEY=spec``."""
    out: dict[str, str] = {}
    for raw in items:
        if not raw.strip(" ;"):
            raise EvalInputError(f"--adapter-spec {raw!r} is empty: give NAME:key=value,... or KEY=NAME:...")
        for it in (s for s in raw.split(";") if s.strip()):
            it = it.strip()
            head = it.split(":", 1)[0]
            if "=" in head:
                key, _, spec = it.partition("=")
                if not key.strip() or not spec.strip():
                    raise EvalInputError(f"--adapter-spec {it!r}: KEY=SPEC needs both a key and an adapter spec")
            else:
                key, spec = head, it
            if key in out:
                raise EvalInputError(f"--adapter-spec given twice for {key!r}")
            out[key.strip()] = spec.strip()
    return out


def resolve_val(args: argparse.Namespace, meta: dict[str, Any]) -> str:
    if args.val:
        return args.val
    if meta.get("val_pattern"):
        return str(meta["val_pattern"])
    env = os.environ.get("METATTT_DATA")
    if env:
        p = Path(os.path.expanduser(env))
        return str(p / "fineweb_val_*.bin") if p.is_dir() else str(p)
    raise EvalInputError("no validation data: pass --val PATTERN (the artifact stores no val_pattern and "
                         "METATTT_DATA is not set)")


def resolve_lut(args: argparse.Namespace, meta: dict[str, Any], vocab: int):
    from metattt.data.bpb import ByteLUT

    stored = None
    if isinstance(meta.get("lut"), dict):
        try:
            stored = ByteLUT.from_dict(meta["lut"])
        except (ValueError, KeyError, TypeError) as e:
            raise EvalInputError(f"the artifact's stored byte LUT is unreadable: {e}") from e
    tok = args.tokenizer or (None if stored is not None else meta.get("tokenizer"))
    if tok:
        try:
            lut = ByteLUT.from_sentencepiece(tok)
        except (OSError, RuntimeError, ValueError) as e:
            raise EvalInputError(f"cannot read tokenizer {tok}: {e}") from e
        if lut.vocab_size != vocab:
            raise EvalInputError(f"tokenizer {tok} has {lut.vocab_size} pieces but the artifact's model has vocab "
                                 f"{vocab}: wrong tokenizer for this artifact")
        if stored is not None and not (stored.vocab_size == lut.vocab_size and stored.equals(lut)):
            raise EvalInputError(f"tokenizer {tok} gives a different byte LUT than the one stored in the artifact "
                                 "(the model was trained with another tokenizer)")
        return lut, f"tokenizer:{tok}"
    if stored is None:
        raise EvalInputError("no byte LUT: the artifact stores none; pass --tokenizer MODEL")
    if stored.vocab_size != vocab:
        raise EvalInputError(f"the artifact's byte LUT covers {stored.vocab_size} tokens but its model has vocab "
                             f"{vocab}: corrupted or mismatched artifact")
    return stored, f"artifact:{stored.kind}"


def check_args(args: argparse.Namespace) -> None:
    """Ranges of the numeric options, before anything is loaded (the ones needing the artifact come later)."""
    positive = {"--context": args.context, "--seq-len": args.seq_len, "--train-seq-len": args.train_seq_len,
                "--stride": args.stride, "--chunk-tokens": args.chunk_tokens, "--batch-tokens": args.batch_tokens,
                "--projection-tokens": args.projection_tokens, "--projection-gpus": args.projection_gpus}
    for flag, v in positive.items():
        if v is not None and v < 1:
            raise EvalInputError(f"{flag} must be at least 1, got {v}")
    if args.bootstrap < 0:
        raise EvalInputError(f"--bootstrap must be >= 0 (0: no CIs), got {args.bootstrap}")
    if args.orders < 1 or args.adapt_seeds < 1:
        raise EvalInputError(f"--orders and --adapt-seeds must be at least 1, got {args.orders} and "
                             f"{args.adapt_seeds}")
    if not args.equivalence_margin > 0:
        raise EvalInputError(f"--equivalence-margin must be > 0 bpb, got {args.equivalence_margin}")
    try:
        parse_edges(args.position_buckets)
        grid = parse_grid(args.tune_grid)
        if args.tune_slice:
            parse_slice(args.tune_slice, "--tune-slice")
        if args.report_slice:
            parse_slice(args.report_slice, "--report-slice")
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    if grid and not args.tune_slice:
        raise EvalInputError("--tune-grid needs --tune-slice (documents to tune on) and a disjoint --report-slice")
    if args.tune_slice and not args.report_slice:
        raise EvalInputError("--tune-slice needs --report-slice: the reported documents must be disjoint from the "
                             "tuning ones")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise EvalInputError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.audit:
        try:
            audit_config(args)
        except ValueError as e:
            raise EvalInputError(f"--audit-*: {e}") from e


def audit_config(args: argparse.Namespace) -> AuditConfig:
    """The audit's settings: a cheap default for built-in adapters, more points for ``--adapter-module`` code."""
    points = args.audit_points if args.audit_points is not None else (4 if args.adapter_module else 2)
    return AuditConfig(points=points, prefix_tokens=args.audit_tokens, seed=args.seed, tol=args.audit_tol)


def check_artifact_path(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise EvalInputError(f"artifact not found: {path}")
    if p.is_dir():
        hint = f" (did you mean {p / 'artifact.ptz'}?)" if (p / "artifact.ptz").is_file() else ""
        raise EvalInputError(f"artifact {path} is a directory, not an artifact file{hint}")


def check_adapter_specs(adapter_specs: dict[str, str], specs: list[Any]) -> None:
    used = {s.adapter for s in specs if s.adapter is not None}
    unused = [k for k in adapter_specs if k not in used]
    if unused:
        raise EvalInputError(f"--adapter-spec {', '.join(unused)}: no protocol uses "
                             f"{'it' if len(unused) == 1 else 'them'} (protocol adapters: "
                             f"{', '.join(sorted(used)) or 'none'}); a misspelt key would run the defaults")


def check_windows(cfg: EvalConfig, specs: list[Any]) -> None:
    if any(s.windows in ("sliding", "doc-sliding") for s in specs) and cfg.stride > cfg.context:
        raise EvalInputError(f"--stride {cfg.stride} exceeds the sliding context {cfg.context}: it must be in "
                             f"1..{cfg.context}")


def run_dir_target(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else Path(args.artifact).resolve().parent


def check_run_dir(target: Path) -> bool:
    """Validate the run directory before scoring; True when it is an existing run directory to add to."""
    from metattt.track.rundir import MalformedRunDir, RunDir, is_run_dir, unwritable

    if target.exists() and not target.is_dir():
        raise EvalInputError(f"run directory {target} is not a directory (--run-dir)")
    why = unwritable(target)  # before scoring: results that cannot be written would be lost
    if why:
        raise EvalInputError(f"run directory {target} is not writable: {why}; choose another --run-dir")
    if target.is_dir() and is_run_dir(target):
        try:
            RunDir.open(target)
        except MalformedRunDir as e:
            raise EvalInputError(f"{e}; fix or move it, or choose another --run-dir") from e
        return True
    return False


def open_run_dir(target: Path, existing: bool, config: dict[str, Any]):
    """The run directory for eval.json: the existing one, or a new run dir at ``target``."""
    from metattt.track.rundir import RunDir

    if existing:
        return RunDir.open(target)
    return RunDir.create(target.parent, target.name, config, exist_ok=True)


def check_lengths(args: argparse.Namespace, meta: dict[str, Any], specs: list[Any],
                   warn: Callable[[str], None]) -> None:
    """Windows longer than the artifact's training length are refused unless ``--allow-longer-context``: the
    model never saw those positions (a sliding window of 4096 on a 256-token model scored worse than flat).
    Defaults are the trained length; a docttt ``window=`` is checked when given (its default is the records')."""
    trained = meta.get("seq_len")
    if not trained:
        return  # an artifact that does not say: nothing to compare with
    trained = int(trained)
    asked = [(flag, v) for flag, v in (("--context", args.context), ("--seq-len", args.seq_len),
                                       ("--train-seq-len", args.train_seq_len)) if v is not None and v > trained]
    asked += [("docttt window=", w) for w in sorted({s.window for s in specs if isinstance(s, DocTTTSpec)
                                                    and s.window != type(s).window and s.window > trained})]
    if not asked:
        return
    what = ", ".join(f"{flag} {v}" if flag.startswith("--") else f"{flag}{v}" for flag, v in asked)
    msg = f"{what}: longer than the model was trained at ({trained} tokens)"
    if not args.allow_longer_context:
        raise EvalInputError(msg + "; pass --allow-longer-context to evaluate it anyway")
    warn(f"warning: {msg} (--allow-longer-context)")


def check_data(args: argparse.Namespace, meta: dict[str, Any], val: str, fp: str, warn: Callable[[str], None]
                ) -> str:
    """Compare the loaded validation data with the artifact's; returns how it went (stored in eval.json)."""
    stored = meta.get("val_fingerprint")
    if stored is None:
        warn(f"warning: the artifact stores no validation-data fingerprint (written before fingerprints existed): "
             f"cannot check that {val} ({fp}) is the data it was scored on")
        return "unchecked: the artifact stores no fingerprint"
    if stored == fp:
        return "match"
    msg = (f"validation data {val} has fingerprint {fp} but the artifact's was {stored} "
           f"({meta.get('val_n_tokens', '?')} tokens): different data")
    if not args.allow_other_data:
        raise EvalInputError(msg + "; pass --allow-other-data to evaluate on it anyway")
    warn(f"warning: {msg} (--allow-other-data)")
    return f"other data allowed: artifact {stored}"
