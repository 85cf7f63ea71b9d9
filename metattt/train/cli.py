"""Command-line flags generated from the typed config, so the dataclasses stay the single source of truth."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Sequence

from .config import PRESETS, TrainConfig, preset

_NESTED = ("model", "optim", "meta", "runtime")


def _parse_bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _converter(tp: Any):
    """argparse ``type=`` for a field annotation; None for fields not settable from the CLI."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _converter(args[0]) if len(args) == 1 else None
        if inner is None:
            return None
        return lambda s: None if s.lower() in ("none", "") else inner(s)
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        return lambda s: tuple(elem(v) for v in s.split(",") if v.strip() != "")
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    return None


def _fields(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def build_parser(description: str = "Train a banked GPT (optionally with meta-TTT).") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    ap.add_argument("--preset", default="tiny-synthetic", choices=sorted(PRESETS),
                    help="named configuration to start from (default: tiny-synthetic, the embedded corpus)")
    ap.add_argument("--adapter-module", action="append", dest="meta.adapter_modules", metavar="FILE.py|MODULE",
                    help="load adapter plug-ins usable in --meta.adapter (repeatable; docs/adapters.md); the same "
                         "as --meta.adapter-modules A,B")
    base = TrainConfig()
    presets = {n: preset(n) for n in sorted(PRESETS)}  # what each preset sets: the plain dataclass defaults are not
    for name, tp in _fields(TrainConfig):
        if name in _NESTED or name == "preset":
            continue
        conv = _converter(tp)
        if conv is not None:
            shown = "; ".join(f"{n}: {getattr(c, name)!r}" for n, c in presets.items()).replace("%", "%%")
            ap.add_argument("--" + name.replace("_", "-"), dest=name, type=conv, metavar=tp.__name__.upper()
                            if isinstance(tp, type) else "V", help=f"(default from --preset; {shown})")
    for section in _NESTED:
        group = ap.add_argument_group(section)
        for name, tp in _fields(type(getattr(base, section))):
            conv = _converter(tp)
            if conv is not None:
                group.add_argument(f"--{section}.{name.replace('_', '-')}", dest=f"{section}.{name}", type=conv,
                                   metavar="V")
    return ap


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """The preset, then the flags given. With ``--resume RUN`` the run's own config.json replaces the preset (a
    resumed run is the same run: its final evaluation, schedule, data...), and only the flags given now override
    it; ``--halt-after`` applies to this process only."""
    values = vars(ns)
    if values.get("resume"):
        from .checkpoint import run_path_of, saved_config

        cfg = saved_config(run_path_of(values["resume"]), values["resume"])
    elif values.get("branch_from"):  # a decay branch continues its parent: the parent's config is the base
        from .budgets import branch_base_config

        cfg = branch_base_config(values["branch_from"])
    else:
        cfg = preset(values.get("preset", "tiny-synthetic"))
    nested: dict[str, dict[str, Any]] = {s: {} for s in _NESTED}
    for key, val in values.items():
        if key == "preset":
            continue
        if "." in key:
            section, name = key.split(".", 1)
            nested[section][name] = tuple(val) if isinstance(val, list) else val
        else:
            setattr(cfg, key, val)
    for section, kw in nested.items():
        if kw:
            setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **kw))
    return cfg


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    return config_from_args(build_parser().parse_args(argv))


EXIT_OK, EXIT_BAD_INPUT = 0, 2


def main(argv: Sequence[str] | None = None) -> int:
    """The trainer's entry point: 0 when the run finished, 2 for bad input (one line on stderr, naming it), 3 if
    the final evaluation's ledger refused an update. Single-process runs end with the evaluator's decomposition
    (``--final-eval``); under torchrun the command for it is printed.

    argparse itself exits 2 for unknown flags and malformed values. SIGINT / SIGTERM exit 130 / 143 with one line
    (during the steps after a checkpoint, so ``--resume RUN`` continues the run with its own configuration).
    """
    from ..data.shards import ShardFormatError
    from ..eval.ledger import LegalityError
    from ..interrupts import signal_name, signum_of, sigterm_raises

    try:
        with sigterm_raises():
            return _run(argv)
    except KeyboardInterrupt as e:
        print(f"interrupted ({signal_name(signum_of(e))}) outside the training steps: no checkpoint was taken now",
              file=sys.stderr)
        return 128 + signum_of(e)
    except LegalityError as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ShardFormatError, ValueError) as e:  # bad input: say what, not where
        if os.environ.get("METATTT_DEBUG"):
            raise
        print(f"error: {e} (METATTT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(argv: Sequence[str] | None) -> int:
    from .final_eval import check_mode, run_final_eval
    from .loop import train

    cfg = parse_config(argv)
    check_mode(cfg.final_eval)  # before training: a typo must not cost the run
    summary = train(cfg)
    if "signum" in summary:  # checkpointed at a step boundary
        print(f"interrupted ({summary['interrupted']}) at step {summary['halted_at_step']}: checkpoint saved; "
              f"continue with --resume {summary['run_dir']}", file=sys.stderr)
        return 128 + int(summary["signum"])
    if "artifact" in summary and cfg.final_eval != "off":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"final eval skipped under torchrun: python evaluators/legal_ttt.py {summary['artifact']}")
        else:
            run_final_eval(cfg, summary["artifact"], trainer=summary)
    return EXIT_OK
