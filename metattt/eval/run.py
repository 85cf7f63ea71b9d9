"""``python evaluators/legal_ttt.py ARTIFACT ...``: load an artifact, run the protocols, verify legality, report.

Exit codes (README "Exit codes"): 0 ok; 2 bad input (artifact, data, tokenizer, arguments, run directory),
checked before anything is scored or written; 3 an illegal adaptation was detected (nothing is reported): the
ledger refused an update, a plug-in's ``training_positions`` named no chunk of the stream, or the black-box audit
(``metattt.eval.audit``, ``--audit``) saw a score change when later tokens changed; 4 a reported
``ttt:``/``oracle:``/``docttt:`` protocol is invalid (non-finite adapter loss, parameters or nats; its adaptation
was stopped, eval.json holds every protocol with the invalid one marked); 130 / 143 interrupted by SIGINT / SIGTERM
(one line: whether the results were already written).

Results first, report second: eval.json is written as soon as the protocols are scored; the plot, the printed
table and wandb come after it, and a failure there is a warning, never a lost evaluation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..model.attention import ATTN_BACKENDS
from ..ttt.registry import PluginError, Registry, add_module_flag
from .audit import CUDA_TOL, AuditConfig, run_audit
from .ledger import LegalityError
from metattt.data.fingerprint import tokens_fingerprint

from . import bayes_cache
from .orders import evaluate_runs, seeded_adapter_spec
from .positions import parse_edges
from .tuning import check_disjoint, parse_grid, parse_slice, slice_tokens, tune
from .protocols import EvalConfig, evaluate, parse_protocols, prepare_stream
from .report import format_report
from .results import PLOT_NAME, invalid_protocols, new_eval_id, write_results
from .scoring import FULL_VAL_TOKENS, parse_horizon
from metattt.interrupts import signal_name, signum_of, sigterm_raises
from metattt.track.rundir import locked

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_ILLEGAL = 3
EXIT_INVALID = 4
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
                         f"docttt:doclora[@k=v/...] (default {DEFAULT_PROTOCOLS}); flat and each ttt's base windows "
                         "(docttt: its decomposition chain doc-flat -> doc-chunk -> docttt -> + phases) are added "
                         "when needed for the deltas. docttt options, '/'-separated: chunk (32), docs (64), window "
                         "(2048), phases (0), phase_docs (2000), phase_lr (0.001), phase_momentum (0.9), "
                         "phase_tokens (32768), phase_epochs (1), phase_clip (1.0); any other key is a DocLoRA "
                         "option: rank (96), alpha, lr (1e-4), beta1, beta2, eps, weight_decay, targets, keep_a, "
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


def _parse_expect(items: list[str]) -> dict[str, Any]:
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


def _parse_adapter_specs(items: list[str]) -> dict[str, str]:
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


def _resolve_val(args: argparse.Namespace, meta: dict[str, Any]) -> str:
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


def _resolve_lut(args: argparse.Namespace, meta: dict[str, Any], vocab: int):
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


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _setup_dist(device: torch.device) -> tuple[int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def make_adapter_factory(model: torch.nn.Module, specs: dict[str, str], extras: dict[str, torch.Tensor],
                         registry: Any = None) -> Callable[[str], Any]:
    """Build, bind and load meta-parameters of each adapter on first use (cached per key); names resolve in
    ``registry`` (default: the built-ins and installed entry points)."""
    from metattt.ttt.registry import Registry

    reg = registry if registry is not None else Registry.build()
    cache: dict[str, Any] = {}

    def get(key: str) -> Any:
        if key not in cache:
            try:
                if key in specs:
                    ad = reg.from_spec(specs[key])
                elif key in reg.classes:
                    ad = reg.make(key)
                else:
                    raise EvalInputError(f"unknown adapter {key!r}: not a registered adapter "
                                         f"({', '.join(reg.names)}) and no --adapter-spec {key}=...")
                ad.bind(model)
                prefix = f"ttt.{ad.name}."
                mine = {k: v for k, v in extras.items() if k.startswith(prefix)}
                ad.load_artifact_extras(mine, strict=bool(mine))
            except (ValueError, KeyError, TypeError) as e:
                raise EvalInputError(f"adapter {key!r}: {e}") from e
            cache[key] = ad
        return cache[key]

    return get


def _slices(args: argparse.Namespace, tokens: Any, bos: int) -> tuple[Any, dict[str, Any]]:
    """(tuning tokens or None, {"report_tokens", "tune_docs", "report_docs"}) for --tune-slice/--report-slice."""
    if not args.report_slice:
        return None, {}
    arr = np.asarray(tokens)
    try:
        rep, rep_docs = slice_tokens(arr, bos, parse_slice(args.report_slice, "--report-slice"))
        out: dict[str, Any] = {"report_tokens": rep, "report_docs": list(rep_docs)}
        tune = None
        if args.tune_slice:
            tune, tune_docs = slice_tokens(arr, bos, parse_slice(args.tune_slice, "--tune-slice"))
            check_disjoint(tune_docs, rep_docs)
            out["tune_docs"] = list(tune_docs)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    return tune, out


def _tune(args, model, tune_tokens, lut, device, specs, grid, adapter_specs, extras, registry, adapter_factory,
          cfg, say) -> dict[str, Any]:
    """Score every grid candidate as its ttt: protocol (and that protocol's base) on the tuning documents."""
    from dataclasses import replace

    from .protocols import ProtocolSpec

    data = prepare_stream(tune_tokens, lut, device, cfg.chunk_tokens, vocab_size=int(model.cfg.vocab_size))
    quiet = replace(cfg, progress=False, docttt_model=False)

    def score(key: str, spec: str) -> tuple[float, bool]:
        sp = next(s for s in specs if s.mode == "ttt" and s.adapter == key)
        f = (make_adapter_factory(model, {**adapter_specs, key: spec}, extras, registry) if adapter_factory is None
             else adapter_factory(model, {**adapter_specs, key: spec}, extras))
        r = evaluate(model, data, [ProtocolSpec(sp.windows), sp], f, quiet).results[sp.name]
        bpb = r.nats / math.log(2) / float(data.target_bytes.sum())
        say(f"tune {key}: {spec} -> bpb {bpb:.5f} on {data.n_docs} tuning documents")
        return bpb, r.stream.invalid is None

    try:
        return tune(grid, adapter_specs, score)
    except ValueError as e:
        raise EvalInputError(str(e)) from e


def _check_args(args: argparse.Namespace) -> None:
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


def _check_artifact_path(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise EvalInputError(f"artifact not found: {path}")
    if p.is_dir():
        hint = f" (did you mean {p / 'artifact.ptz'}?)" if (p / "artifact.ptz").is_file() else ""
        raise EvalInputError(f"artifact {path} is a directory, not an artifact file{hint}")


def _check_adapter_specs(adapter_specs: dict[str, str], specs: list[Any]) -> None:
    used = {s.adapter for s in specs if s.adapter is not None}
    unused = [k for k in adapter_specs if k not in used]
    if unused:
        raise EvalInputError(f"--adapter-spec {', '.join(unused)}: no protocol uses "
                             f"{'it' if len(unused) == 1 else 'them'} (protocol adapters: "
                             f"{', '.join(sorted(used)) or 'none'}); a misspelt key would run the defaults")


def _check_windows(cfg: EvalConfig, specs: list[Any]) -> None:
    if any(s.windows in ("sliding", "doc-sliding") for s in specs) and cfg.stride > cfg.context:
        raise EvalInputError(f"--stride {cfg.stride} exceeds the sliding context {cfg.context}: it must be in "
                             f"1..{cfg.context}")


def _run_dir_target(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else Path(args.artifact).resolve().parent


def _check_run_dir(target: Path) -> bool:
    """Validate the run directory before scoring; True when it is an existing run directory to add to."""
    from metattt.track.rundir import MARKER_FILES, MalformedRunDir, RunDir, unwritable

    if target.exists() and not target.is_dir():
        raise EvalInputError(f"run directory {target} is not a directory (--run-dir)")
    why = unwritable(target)  # before scoring: results that cannot be written would be lost
    if why:
        raise EvalInputError(f"run directory {target} is not writable: {why}; choose another --run-dir")
    if target.is_dir() and any((target / f).is_file() for f in MARKER_FILES):
        try:
            RunDir.open(target)
        except MalformedRunDir as e:
            raise EvalInputError(f"{e}; fix or move it, or choose another --run-dir") from e
        return True
    return False


def _open_run_dir(target: Path, existing: bool, config: dict[str, Any]):
    """The run directory for eval.json: the existing one, or a new run dir at ``target``."""
    from metattt.track.rundir import RunDir

    if existing:
        return RunDir.open(target)
    return RunDir.create(target.parent, target.name, config, exist_ok=True)


def _check_lengths(args: argparse.Namespace, meta: dict[str, Any], specs: list[Any],
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
    asked += [("docttt window=", w) for w in sorted({s.window for s in specs if getattr(s, "mode", None) == "docttt"
                                                    and s.window != type(s).window and s.window > trained})]
    if not asked:
        return
    what = ", ".join(f"{flag} {v}" if flag.startswith("--") else f"{flag}{v}" for flag, v in asked)
    msg = f"{what}: longer than the model was trained at ({trained} tokens)"
    if not args.allow_longer_context:
        raise EvalInputError(msg + "; pass --allow-longer-context to evaluate it anyway")
    warn(f"warning: {msg} (--allow-longer-context)")


def _check_data(args: argparse.Namespace, meta: dict[str, Any], val: str, fp: str, warn: Callable[[str], None]
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


def run(args: argparse.Namespace, adapter_factory: Callable[..., Callable[[str], Any]] | None = None,
        out: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate as the CLI does and return the report (raises on bad input / illegality)."""
    from metattt.artifact.errors import ArtifactError
    from metattt.artifact.model_io import load_model_artifact
    from metattt.data.loaders import load_val_tokens
    from metattt.data.shards import ShardFormatError

    _check_args(args)
    try:
        specs = parse_protocols(args.protocols)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    adapter_specs = _parse_adapter_specs(args.adapter_spec)
    _check_adapter_specs(adapter_specs, specs)
    _check_artifact_path(args.artifact)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(args.device, local_rank)
    rank, world = _setup_dist(device)
    say = out if rank == 0 and not args.quiet else (lambda _s: None)
    warn = (lambda s: print(s, file=sys.stderr)) if rank == 0 else (lambda _s: None)
    target = _run_dir_target(args)
    existing_run = _check_run_dir(target) if rank == 0 else False
    t0 = time.perf_counter()
    try:
        model, loaded = load_model_artifact(args.artifact, device=device, expect=_parse_expect(args.expect) or None)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise EvalInputError(f"cannot read artifact {args.artifact}: {e}") from e
    except ArtifactError as e:
        raise EvalInputError(f"cannot load artifact {args.artifact}: {type(e).__name__}: {e}") from e
    meta = dict(loaded.meta or {})
    try:
        specs = bayes_cache.bind(specs, meta)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    vocab = int(model.cfg.vocab_size)
    lut, lut_src = _resolve_lut(args, meta, vocab)
    val = _resolve_val(args, meta)
    try:
        tokens = load_val_tokens(val, vocab_size=vocab)
    except FileNotFoundError as e:
        raise EvalInputError(f"validation data: {e}") from e
    except ShardFormatError as e:
        raise EvalInputError(f"bad validation shard: {e}") from e
    val_fp = tokens_fingerprint(tokens)  # of the whole stream, as the trainer stored it
    data_check = _check_data(args, meta, val, val_fp, warn)
    _check_lengths(args, meta, specs, warn)
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    if args.compat == "pg-record":
        from .compat import parse_knobs, truncate

        try:
            tokens = truncate(tokens, int(args.seq_len or meta.get("seq_len") or 2048))
            knobs = parse_knobs(args.compat_knobs)
        except ValueError as e:
            raise EvalInputError(str(e)) from e
    elif args.compat_knobs:
        raise EvalInputError("--compat-knobs needs --compat pg-record")
    record_bf16 = args.compat == "pg-record" and not args.no_autocast and device.type == "cuda"
    tune_tokens, slices = _slices(args, tokens, int(lut.bos_id))
    if slices:
        tokens = torch.as_tensor(slices.pop("report_tokens"))
    if args.compile is None:
        args.compile = device.type == "cuda"
    trained_len = int(meta.get("seq_len") or 2048)
    cfg = EvalConfig(seq_len=args.seq_len if args.seq_len is not None else trained_len,
                     context=args.context if args.context is not None else trained_len,
                     stride=args.stride, chunk_tokens=args.chunk_tokens, batch_tokens=args.batch_tokens,
                     train_seq_len=args.train_seq_len, autocast=not args.no_autocast, n_boot=args.bootstrap,
                     seed=args.seed, projection_tokens=args.projection_tokens, projection_gpus=args.projection_gpus,
                     progress=not args.quiet, fixed_shapes=args.compile, docttt_compile=args.compile,
                     compat=args.compat, eager_adapted=record_bf16 and knobs.eager_ttt,
                     attn=args.attn, position_edges=parse_edges(args.position_buckets),
                     equivalence_margin=args.equivalence_margin, orders=args.orders, adapt_seeds=args.adapt_seeds,
                     docttt_model=device.type == "cuda" and args.projection_gpus >= 1,
                     schedule_horizon=args.schedule_horizon)
    _check_windows(cfg, specs)
    try:
        data = prepare_stream(tokens, lut, device, cfg.chunk_tokens, vocab_size=vocab)
        cfg.score_config()
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    if record_bf16:
        from .compat import record_numerics

        record_numerics(model, knobs)  # before any adapter snapshots the weights
    try:
        registry = Registry.build(args.adapter_module or ())
    except PluginError as e:
        raise EvalInputError(str(e)) from e
    extras_all = dict(loaded.extras or {})
    if adapter_factory is None:
        factory = make_adapter_factory(model, adapter_specs, dict(loaded.extras or {}), registry)
    else:
        factory = adapter_factory(model, adapter_specs, dict(loaded.extras or {}))
    tuning = None
    grid = parse_grid(args.tune_grid)
    if grid:
        unknown = sorted(set(grid) - {sp.adapter for sp in specs if sp.mode == "ttt"})
        if unknown:
            raise EvalInputError(f"--tune-grid {', '.join(unknown)}: no ttt: protocol uses that adapter key")
        tuning = _tune(args, model, tune_tokens, lut, device, specs, grid, adapter_specs, extras_all, registry,
                       adapter_factory, cfg, say)
        adapter_specs = {**adapter_specs, **tuning["chosen"]}
        factory = (make_adapter_factory(model, adapter_specs, extras_all, registry) if adapter_factory is None
                   else adapter_factory(model, adapter_specs, extras_all))
        tuning.update(slices)
    if args.compat == "pg-record":
        from .compat import record_ttt_factory

        factory = record_ttt_factory(factory, knobs, bf16=record_bf16)
    say(f"artifact {args.artifact}: vocab {vocab}, {sum(p.numel() for p in model.parameters()):,} params; "
        f"val {val}: {data.n_tokens:,} tokens, {data.n_docs:,} docs; LUT from {lut_src}; device {device}"
        + (f"; {world} ranks" if world > 1 else ""))
    say("protocols: " + ", ".join(s.name for s in specs)
        + ("; scoring forward compiled (--no-compile: eager)" if args.compile else ""))
    model.eval()
    if args.compile:  # RoPE tables for the longest window, built eagerly: no first-fill recompile
        model.prepare_rope(max(cfg.seq_len, cfg.context, cfg.train_seq_len or 0), device)
    scorer = torch.compile(model, dynamic=False) if args.compile else None
    extras = dict(loaded.extras or {})
    for spec in specs:  # a learned batched init must be in the artifact: exit 2 before anything runs
        if spec.mode == "docttt":
            from .docttt import make_doc_adapter

            try:
                make_doc_adapter(spec, model, extras)
            except ValueError as e:
                raise EvalInputError(f"{spec.name}: {e}") from e
    ev = evaluate(model, data, specs, factory, cfg, log=say, scorer=scorer, extras=extras)
    if args.audit:  # raises AuditError (exit 3, nothing written) when a legal protocol read the future
        audit = run_audit(model, data, specs, factory, cfg, audit_config(args), scorer=scorer, extras=extras, log=say)
        say(f"audit: {len(specs)} protocols in {audit['seconds']:.1f}s (wall)")
    else:
        audit = {"ran": False, "why": "--no-audit"}
        warn("note: --no-audit: only the ledger checked legality (it trusts the adapter's declared positions)")
    runs = None
    if args.orders > 1 or args.adapt_seeds > 1:
        def factory_for_seed(s: int) -> Callable[[str], Any]:
            if s == 0:
                return factory
            seeded = dict(adapter_specs)
            for key in {sp.adapter for sp in specs if sp.adapter is not None and sp.mode != "docttt"}:
                if hasattr(getattr(factory(key), "cfg", None), "seed"):
                    seeded[key] = seeded_adapter_spec(adapter_specs.get(key, key), s)
            f = (make_adapter_factory(model, seeded, extras, registry) if adapter_factory is None
                 else adapter_factory(model, seeded, extras))
            if args.compat == "pg-record":
                from .compat import record_ttt_factory

                f = record_ttt_factory(f, knobs, bf16=record_bf16)
            return f

        runs = evaluate_runs(model, data.tokens_np, lut, device, specs, factory_for_seed, cfg, args.orders,
                             args.adapt_seeds, log=say, scorer=scorer, extras=extras)
    rep_meta = {"artifact": str(args.artifact), "val": val, "val_fingerprint": val_fp, "data_check": data_check,
                "lut": lut_src, "device": str(device),
                "world_size": world, "model_config": model.cfg.to_dict(), "adapter_specs": adapter_specs,
                "artifact_meta": {k: v for k, v in meta.items() if k != "lut"},
                "total_eval_s": time.perf_counter() - t0, "argv": list(sys.argv),
                "compiled_scorer": bool(args.compile), "compat": args.compat, "scorer_compile_s": ev.scorer_compile_s,
                **({"slices": slices} if slices else {}), **({"tuning": tuning} if tuning else {}),
                "eval_id": new_eval_id(), "audit": audit}
    if rank != 0:  # every rank holds the same results: the same exit code everywhere
        return {"protocols": {n: {"invalid": r.stream.invalid} for n, r in ev.results.items()}}
    # results first: eval.json is on disk before any plot, table or wandb step can fail
    run_dir = _open_run_dir(target, existing_run, {"evaluator": vars(args)})
    with locked(run_dir.path):  # evaluations finishing together on one directory take turns: all are kept
        report = write_results(run_dir, ev, rep_meta, warn, runs)
        path = report["_paths"]["eval_json"]
        args.written_eval_json = path  # an interrupt from here on is reported with it (main)
        png = None
        try:
            from .plot import plot_running_delta

            png = plot_running_delta(report, Path(run_dir.path) / PLOT_NAME)
        except Exception as e:  # noqa: BLE001 - a plot must never cost the evaluation
            warn(f"warning: the running-delta plot failed ({type(e).__name__}: {e}); results are in {path}")
    report["_paths"]["plot"] = str(png) if png else None
    try:
        say(format_report(report))
    except Exception as e:  # noqa: BLE001
        warn(f"warning: printing the report failed ({type(e).__name__}: {e}); results are in {path}")
    say(f"wrote {path}" + (f" and {png}" if png else ""))
    try:
        _wandb(args, report, run_dir)
    except Exception as e:  # noqa: BLE001
        warn(f"warning: wandb logging failed ({type(e).__name__}: {e}); results are in {path}")
    return report


def _wandb(args: argparse.Namespace, report: dict[str, Any], run_dir) -> None:
    from metattt.track.wandb_log import WandbLogger

    logger = WandbLogger(args.wandb, project=args.wandb_project, group="eval", tags=["eval"],
                         config={"evaluator": vars(args)}, run_dir=run_dir.path)
    if not logger.enabled:
        return
    summ = {f"eval/{n}/bpb": p["bpb"] for n, p in report["protocols"].items()}
    summ.update({f"eval/delta/{k}": d["value"] for k, d in report["deltas"].items()})
    logger.summary(summ)
    rows = [[n, p["bpb"], p["ci95"][0], p["ci95"][1], p["legal"], p["wallclock_s"], p["tokens_per_s"]]
            for n, p in report["protocols"].items()]
    logger.log_table("eval/protocols", ["protocol", "bpb", "ci_lo", "ci_hi", "legal", "wall_s", "tok_per_s"], rows)
    logger.finish()


def main(argv: list[str] | None = None, adapter_factory: Callable[..., Callable[[str], Any]] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_raises():
            report = run(args, adapter_factory)
        bad = invalid_protocols(report)
        for name, why in bad.items():
            print(f"INVALID: {name}: {why}", file=sys.stderr)
        return EXIT_INVALID if bad else EXIT_OK
    except LegalityError as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return EXIT_ILLEGAL
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM: one line, the conventional 128 + signal number
        written = getattr(args, "written_eval_json", None)
        print(f"interrupted ({signal_name(signum_of(e))}): "
              + (f"the results were already written to {written}" if written else "nothing was written"),
              file=sys.stderr)
        return 128 + signum_of(e)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
