"""Run directories: the on-disk record of one training / evaluation run.

Layout (see docs/architecture.md): ``config.json``, ``env.json``, ``metrics.jsonl`` (one JSON object per
line, ``{"step", "time_s", "kind", ...}``), ``summary.json``, ``eval.json``; checkpoints and artifacts live
beside them. The directory is the source of truth for ``python -m metattt compare``; wandb is a mirror.

Only one process may write: ``RunDir.create(..., rank=r)`` with ``r != 0`` returns a reader whose write
methods do nothing, so callers need no ``if rank == 0`` around every log line.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from metattt.track import jsonio

CONFIG = "config.json"
ENV = "env.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVAL = "eval.json"
#: eval.json schemas (metattt.eval.report writes the last one): /2 adds per_position, runs (document orders and
#: adapter seeds, hierarchical intervals), equivalence, cost and warm-up fields and keeps every /1 field, so the
#: readers (compare, the study) accept both; anything else is refused with its schema named
EVAL_SCHEMA = "metattt.eval/2"
READABLE_EVAL_SCHEMAS = ("metattt.eval/1", EVAL_SCHEMA)
#: Files whose presence marks a directory as a run directory (any one suffices).
MARKER_FILES = (CONFIG, SUMMARY, EVAL, METRICS)


class MalformedRunDir(Exception):
    """A run directory that cannot be read faithfully; never silently averaged into a comparison."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"malformed run directory {self.path}: {reason}")


def is_run_dir(path: Path) -> bool:
    """A directory holding any of a run's files (what compare expands into, what the evaluator adds to)."""
    return any((path / f).is_file() for f in MARKER_FILES)


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def unique_name() -> str:
    """``YYYYmmdd-HHMMSS-<6 hex>``: a run directory's default name."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"run name {name!r} must be a single, non-empty path component")
    return name


def _git_info(repo: Path) -> dict[str, Any]:
    """Commit + dirty flag of the repository holding ``repo``; ``None`` values when git is unavailable."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                                 check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"device": "cpu", "cuda_device_count": 0}
    try:  # lazy: a run directory is usable without torch (an already imported torch is simply returned)
        import torch
    except Exception:  # noqa: BLE001 - environment capture must never crash a run
        return info
    info["torch_version"] = getattr(torch, "__version__", None)
    try:
        if torch.cuda.is_available():
            info["cuda_device_count"] = torch.cuda.device_count()
            info["device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return info


def collect_env(repo: Path | None = None) -> dict[str, Any]:
    """Everything needed to tell two runs' environments apart (written once to ``env.json``)."""
    import numpy  # a dependency of the package

    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    return {"created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "git": _git_info(repo),
            "python": sys.version.split()[0], "numpy_version": numpy.__version__, "torch_version": None,
            "platform": platform.platform(), "hostname": socket.gethostname(), "rank": _env_rank(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1),
            "argv": list(sys.argv), **_device_info()}


def unwritable(path: Path | str) -> str | None:
    """Why files cannot be written in directory ``path`` (created if missing), or None when they can.

    Probed by creating and removing a file in ``path`` or, when it does not exist yet, in its nearest existing
    ancestor (nothing is left behind): permission bits do not tell (root ignores them, a read-only mount ignores
    them the other way), and a run must learn this before hours of work, not when it writes its results."""
    p = Path(path)
    anc = p
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        return f"{anc} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot create files in {anc} ({e.strerror or e})"
    return None


@contextlib.contextmanager
def locked(path: Path | str, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive OS lock (``fcntl.flock`` on ``path/name``) for the block: writers of one run directory
    take turns (two evaluations finishing together would otherwise both find no eval.json and one would replace the
    other). The lock dies with its process, so a crash never leaves the directory locked. No-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the project targets Linux)
        yield
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    with open(Path(path) / name, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class RunDir:
    """Writer and reader of one run directory. Construct with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path | None, *, writes: bool):
        self._path = Path(path) if path is not None else None
        self._writes = writes

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, root: Path | str, name: str | None = None, config: Mapping[str, Any] | Any | None = None, *,
               rank: int | None = None, exist_ok: bool = False, env: Mapping[str, Any] | None = None) -> "RunDir":
        """Make ``root/name`` (``name`` None → ``YYYYmmdd-HHMMSS-<6 hex>``) and write config + env.

        ``rank`` defaults to env ``RANK``. Non-zero ranks get a no-op writer; its ``path`` is ``root/name``
        when a name is given and ``None`` otherwise (the unique name is only known on rank 0: pass an
        explicit name, or broadcast it, when other ranks need the directory). ``exist_ok=True`` reuses an
        existing directory (resume); ``config``/``env`` are then rewritten and metrics keep appending.
        ``config`` may be a dict or a dataclass (anything :func:`jsonio.to_jsonable` accepts).
        """
        rank = _env_rank() if rank is None else int(rank)
        root = Path(root)
        if rank != 0:
            return cls(root / _check_name(name) if name is not None else None, writes=False)
        name = _check_name(name) if name is not None else unique_name()
        path = root / name
        if path.exists() and not exist_ok:
            raise FileExistsError(f"run directory {path} already exists (pass exist_ok=True to resume into it)")
        cfg_text = jsonio.dumps(config if config is not None else {}, indent=2)  # validate before mkdir
        path.mkdir(parents=True, exist_ok=exist_ok)
        run = cls(path, writes=True)
        jsonio.write_atomic(path / CONFIG, cfg_text + "\n")
        run.write_json(ENV, dict(env) if env is not None else collect_env())
        return run

    @classmethod
    def open(cls, path: Path | str, *, rank: int = 0) -> "RunDir":
        """Open an existing run directory for reading (and, on rank 0, for adding files such as eval.json).

        Raises :class:`MalformedRunDir` when the path is not a directory, holds none of the run files, or
        one of its JSON files does not parse to an object. ``metrics.jsonl`` is checked when read.
        """
        path = Path(path)
        if not path.is_dir():
            raise MalformedRunDir(path, "not a directory")
        if not is_run_dir(path):
            raise MalformedRunDir(path, f"none of {', '.join(MARKER_FILES)} present")
        run = cls(path, writes=(int(rank) == 0))
        for fname in (CONFIG, SUMMARY, EVAL):
            run._read_object(fname)  # validate eagerly: a bad run is rejected as a whole
        return run

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def name(self) -> str | None:
        return self._path.name if self._path is not None else None

    @property
    def is_writer(self) -> bool:
        return self._writes

    def __repr__(self) -> str:
        return f"RunDir({str(self._path)!r}, writes={self._writes})"

    def _require_path(self) -> Path:
        if self._path is None:
            raise RuntimeError("this RunDir has no path (non-zero rank created without a name)")
        return self._path

    # ------------------------------------------------------------------ writing (no-ops off rank 0)
    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line to ``metrics.jsonl`` and flush (readable while running)."""
        if not self._writes:
            return
        if not isinstance(record, Mapping):
            raise TypeError(f"metrics record must be a mapping, got {type(record).__name__}")
        line = jsonio.dumps(dict(record))
        with open(self._require_path() / METRICS, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def write_json(self, name: str, data: Any) -> Path | None:
        """Atomically write ``data`` as ``<run>/<name>`` (pretty, strict JSON). Returns the path (None off rank 0)."""
        if not self._writes:
            return None
        path = self._require_path() / _check_name(name)
        jsonio.write_atomic(path, jsonio.dumps(data, indent=2) + "\n")
        return path

    def write_summary(self, data: Mapping[str, Any]) -> Path | None:
        return self.write_json(SUMMARY, data)

    def write_eval(self, data: Mapping[str, Any]) -> Path | None:
        return self.write_json(EVAL, data)

    # ------------------------------------------------------------------ reading
    def _read_object(self, fname: str) -> dict[str, Any] | None:
        path = self._require_path() / fname
        if not path.exists():
            return None
        try:
            data = jsonio.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise MalformedRunDir(self._require_path(), f"{fname} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise MalformedRunDir(self._require_path(), f"{fname} holds a {type(data).__name__}, not an object")
        return data

    @property
    def config(self) -> dict[str, Any] | None:
        return self._read_object(CONFIG)

    @property
    def env(self) -> dict[str, Any] | None:
        return self._read_object(ENV)

    @property
    def summary(self) -> dict[str, Any] | None:
        return self._read_object(SUMMARY)

    @property
    def eval(self) -> dict[str, Any] | None:
        return self._read_object(EVAL)

    def metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl`` (optionally only ``record["kind"] == kind``); [] when absent.

        Blank lines are ignored; any other line that is not a JSON object raises MalformedRunDir naming
        the line number, so a corrupted log is never half-plotted.
        """
        path = self._require_path() / METRICS
        if not path.exists():
            return []
        out: list[dict[str, Any]] = []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MalformedRunDir(self._require_path(), f"{METRICS} unreadable ({e})") from e
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = jsonio.loads(line)
            except ValueError as e:
                raise MalformedRunDir(self._require_path(), f"{METRICS} line {lineno} is not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise MalformedRunDir(self._require_path(), f"{METRICS} line {lineno} is not a JSON object")
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
        return out
