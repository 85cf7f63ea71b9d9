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
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch

from ..data.bpb import bpb as bits_per_byte
from ..devices import setup, teardown
from ..ttt.adapter import Adapter
from ..ttt.registry import Registry
from .audit import run_audit
from .docttt_spec import DocTTTSpec, make_doc_adapter
from .cli import (EvalInputError, audit_config, build_parser, check_adapter_specs, check_args, check_artifact_path,
                  check_data, check_lengths, check_run_dir, check_windows, open_run_dir, parse_adapter_specs,
                  parse_expect, resolve_lut, resolve_val, run_dir_target)
from .ledger import LegalityError
from metattt.data.fingerprint import tokens_fingerprint

from . import bayes_cache
from .orders import evaluate_runs, seeded_adapter_spec
from .positions import parse_edges
from .tuning import check_disjoint, parse_grid, parse_slice, slice_tokens, tune
from .protocols import AdapterFactory, EvalConfig, evaluate, parse_protocols, prepare_stream
from .report import format_report
from .results import PLOT_NAME, invalid_protocols, new_eval_id, write_results
from metattt.interrupts import signal_name, signum_of, sigterm_raises
from metattt.track.rundir import locked

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_ILLEGAL = 3
EXIT_INVALID = 4


def make_adapter_factory(model: torch.nn.Module, specs: dict[str, str], extras: dict[str, torch.Tensor],
                         registry: Any = None) -> Callable[[str], Adapter]:
    """Build, bind and load meta-parameters of each adapter on first use (cached per key); names resolve in
    ``registry`` (default: the built-ins and installed entry points)."""
    from metattt.ttt.registry import Registry

    reg = registry if registry is not None else Registry.build()
    cache: dict[str, Adapter] = {}

    def get(key: str) -> Adapter:
        if key not in cache:
            try:
                if key in specs:
                    ad = reg.from_spec(specs[key])
                elif key in reg.classes:
                    ad = reg.make(key)
                else:
                    raise EvalInputError(f"unknown adapter {key!r}: not a registered adapter "
                                         f"({', '.join(reg.names)}) and no --adapter-spec {key}=...")
                if ad.per_document:
                    raise ValueError(f"it adapts one document per row: evaluate it as docttt:{ad.name}")
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
        bpb = bits_per_byte(r.nats, data.target_bytes.sum())
        say(f"tune {key}: {spec} -> bpb {bpb:.5f} on {data.n_docs} tuning documents")
        return bpb, r.stream.invalid is None

    try:
        return tune(grid, adapter_specs, score)
    except ValueError as e:
        raise EvalInputError(str(e)) from e


def run(args: argparse.Namespace, adapter_factory: Callable[..., AdapterFactory] | None = None,
        out: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate as the CLI does and return the report (raises on bad input / illegality)."""
    from metattt.artifact.errors import ArtifactError
    from metattt.artifact.model_io import load_model_artifact
    from metattt.data.loaders import load_val_tokens
    from metattt.data.shards import ShardFormatError

    check_args(args)
    try:  # the plug-ins first: a docttt: protocol may name one of theirs
        registry = Registry.build(args.adapter_module or ())
        specs = parse_protocols(args.protocols, registry)
    except ValueError as e:  # PluginError included
        raise EvalInputError(str(e)) from e
    adapter_specs = parse_adapter_specs(args.adapter_spec)
    check_adapter_specs(adapter_specs, specs)
    check_artifact_path(args.artifact)
    info = setup(args.device)
    device, rank, world = info.device, info.rank, info.world_size
    say = out if rank == 0 and not args.quiet else (lambda _s: None)
    warn = (lambda s: print(s, file=sys.stderr)) if rank == 0 else (lambda _s: None)
    target = run_dir_target(args)
    existing_run = check_run_dir(target) if rank == 0 else False
    t0 = time.perf_counter()
    try:
        model, loaded = load_model_artifact(args.artifact, device=device, expect=parse_expect(args.expect) or None)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise EvalInputError(f"cannot read artifact {args.artifact}: {e}") from e
    except ArtifactError as e:
        raise EvalInputError(f"cannot load artifact {args.artifact}: {type(e).__name__}: {e}") from e
    meta = dict(loaded.meta or {})
    ve_factors = meta.get("record_ve_factors")  # an imported record's VE scale factors (--compat pg-record's TTT)
    try:
        specs = bayes_cache.bind(specs, meta)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    vocab = int(model.cfg.vocab_size)
    lut, lut_src = resolve_lut(args, meta, vocab)
    val = resolve_val(args, meta)
    try:
        tokens = load_val_tokens(val, vocab_size=vocab)
    except FileNotFoundError as e:
        raise EvalInputError(f"validation data: {e}") from e
    except ShardFormatError as e:
        raise EvalInputError(f"bad validation shard: {e}") from e
    val_fp = tokens_fingerprint(tokens)  # of the whole stream, as the trainer stored it
    data_check = check_data(args, meta, val, val_fp, warn)
    check_lengths(args, meta, specs, warn)
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
                     sliding_logits=record_bf16 and knobs.sliding_logits,
                     attn=args.attn, position_edges=parse_edges(args.position_buckets),
                     equivalence_margin=args.equivalence_margin, orders=args.orders, adapt_seeds=args.adapt_seeds,
                     docttt_model=device.type == "cuda" and args.projection_gpus >= 1,
                     schedule_horizon=args.schedule_horizon)
    check_windows(cfg, specs)
    try:
        data = prepare_stream(tokens, lut, device, cfg.chunk_tokens, vocab_size=vocab)
        cfg.score_config()
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    if record_bf16:
        from .compat import record_numerics

        record_numerics(model, knobs)  # before any adapter snapshots the weights
    extras_all = dict(loaded.extras or {})
    factory: AdapterFactory
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

        factory = record_ttt_factory(factory, knobs, bf16=record_bf16, ve_factors=ve_factors)
    say(f"artifact {args.artifact}: vocab {vocab}, {sum(p.numel() for p in model.parameters()):,} params; "
        f"val {val}: {data.n_tokens:,} tokens, {data.n_docs:,} docs; LUT from {lut_src}; device {device}"
        + (f"; {world} ranks" if world > 1 else ""))
    say("protocols: " + ", ".join(s.name for s in specs)
        + ("; scoring forward compiled (--no-compile: eager)" if args.compile else ""))
    model.eval()
    if args.compile:  # RoPE tables for the longest window, built eagerly: no first-fill recompile
        model.prepare_rope(max(cfg.seq_len, cfg.context, cfg.train_seq_len or 0), device)
    # torch.compile of a Module returns a Module (OptimizedModule); its stubs only promise a callable
    scorer = cast(torch.nn.Module, torch.compile(model, dynamic=False)) if args.compile else None
    extras = dict(loaded.extras or {})
    for spec in specs:  # a learned batched init must be in the artifact: exit 2 before anything runs
        if isinstance(spec, DocTTTSpec):
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
        def factory_for_seed(s: int) -> AdapterFactory:
            if s == 0:
                return factory
            seeded = dict(adapter_specs)
            for key in {sp.adapter for sp in specs if sp.adapter is not None and not isinstance(sp, DocTTTSpec)}:
                ad = factory(key)  # seeded where its config has a seed (a bare seam adapter has none to offset)
                if isinstance(ad, Adapter) and any(f.name == "seed" for f in fields(ad.cfg)):
                    seeded[key] = seeded_adapter_spec(adapter_specs.get(key, key), s)
            f = (make_adapter_factory(model, seeded, extras, registry) if adapter_factory is None
                 else adapter_factory(model, seeded, extras))
            if args.compat == "pg-record":
                from .compat import record_ttt_factory

                f = record_ttt_factory(f, knobs, bf16=record_bf16, ve_factors=ve_factors)
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
    run_dir = open_run_dir(target, existing_run, {"evaluator": vars(args)})
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
        teardown()
