"""Optional Weights & Biases mirror of a run (the run directory stays the source of truth).

Mode resolution (``resolve_wandb_mode``), in order:
1. an explicit ``mode`` argument ("online" | "offline" | "off"; "disabled" is accepted as "off");
2. env ``WANDB_MODE`` when set (online / offline / disabled|off);
3. otherwise "off" when wandb is not importable, "online" when an API key is configured (env
   ``WANDB_API_KEY`` or a netrc entry for the wandb host), else "offline".
An explicit (argument or env) "online"/"offline" without wandb installed is an error naming the extra to
install, never a silent downgrade. Offline runs are written under ``<run_dir>/wandb/`` so they sit beside
our own files and can be ``wandb sync``-ed later.
"""

from __future__ import annotations

import importlib
import netrc
import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

from metattt.track import jsonio

MODES = ("online", "offline", "off")
INSTALL_HINT = "pip install wandb (the project's optional extra 'wandb')"


class WandbUnavailable(RuntimeError):
    """wandb was requested explicitly but cannot be used."""


def _import_wandb() -> Any | None:
    try:
        return importlib.import_module("wandb")
    except ImportError:
        return None


def wandb_available() -> bool:
    return _import_wandb() is not None


def api_key_configured(environ: Mapping[str, str] | None = None) -> bool:
    """True when env WANDB_API_KEY is set or a netrc file has an entry for the wandb host.

    Only presence is checked; the key itself is never read into our objects.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_path = environ.get("NETRC") or str(Path(environ.get("HOME", str(Path.home()))) / ".netrc")
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _normalize(mode: str, source: str) -> str:
    m = mode.strip().lower()
    if m in ("disabled", "disable", "none", "false", "0"):
        m = "off"
    if m == "dryrun":
        m = "offline"
    if m not in MODES:
        raise ValueError(f"wandb mode {mode!r} from {source} is not one of {', '.join(MODES)}")
    return m


def resolve_wandb_mode(mode: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Resolve the effective mode (see module docstring); raise WandbUnavailable when impossible."""
    environ = os.environ if environ is None else environ
    if mode is not None:
        resolved, source = _normalize(mode, "argument"), "argument"
    elif environ.get("WANDB_MODE"):
        resolved, source = _normalize(environ["WANDB_MODE"], "env WANDB_MODE"), "env WANDB_MODE"
    else:
        return "off" if not wandb_available() else "online" if api_key_configured(environ) else "offline"
    if resolved != "off" and not wandb_available():
        raise WandbUnavailable(f"wandb mode {resolved!r} requested ({source}) but wandb is not installed: {INSTALL_HINT}")
    return resolved


class WandbLogger:
    """Thin mirror of metrics/summary/tables to wandb; every method is a no-op when the mode is "off".

    Non-zero ranks are always off. Use as a context manager or call :meth:`finish`.
    """

    def __init__(self, mode: str | None = None, project: str = "metattt", group: str | None = None,
                 tags: Sequence[str] = (), config: Mapping[str, Any] | Any | None = None,
                 run_dir: Path | str | None = None, *, name: str | None = None, rank: int = 0,
                 entity: str | None = None):
        self.mode = "off" if int(rank) != 0 else resolve_wandb_mode(mode)
        self._run: Any | None = None
        self._wandb: Any | None = None
        if self.mode == "off":
            return
        wandb = _import_wandb()
        assert wandb is not None  # guaranteed by resolve_wandb_mode
        self._wandb = wandb
        kwargs: dict[str, Any] = dict(
            project=project, group=group, tags=list(tags) or None, mode=self.mode, entity=entity,
            config=jsonio.to_jsonable(config) if config is not None else None,
            name=name if name is not None else (Path(run_dir).name if run_dir is not None else None))
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(run_dir)
        self._run = wandb.init(**{k: v for k, v in kwargs.items() if v is not None})

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def run(self) -> Any | None:
        """The underlying ``wandb.Run`` (None when off), for anything this wrapper does not cover."""
        return self._run

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        if self._run is None:
            return
        self._run.log(dict(data), step=step)

    def summary(self, data: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        for k, v in dict(data).items():
            self._run.summary[k] = v

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None) -> None:
        """Log a table (e.g. the evaluator's per-protocol results) under ``name``."""
        if self._run is None:
            return
        cols = list(columns)
        data = [list(r) for r in rows]
        for i, r in enumerate(data):
            if len(r) != len(cols):
                raise ValueError(f"table {name!r} row {i} has {len(r)} cells, expected {len(cols)} ({cols})")
        assert self._wandb is not None
        self._run.log({name: self._wandb.Table(columns=cols, data=data)}, step=step)

    def finish(self, exit_code: int | None = None) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        if exit_code is None:
            run.finish()
        else:
            run.finish(exit_code=exit_code)

    def __enter__(self) -> "WandbLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)
