"""Run a study: train the models that are not trained yet, evaluate the cells that are not done yet.

Resumability is decided from the run directories alone: a model is done when its directory has
``summary.json``, ``artifact.ptz`` and a ``study.json`` whose key matches; a cell is done when its
``eval.json`` holds every requested protocol and its ``study.json`` key and artifact sha256 match. A directory left by an
interrupted run is moved aside (``NAME.incomplete-N``), never deleted. Trainer and evaluator run as
subprocesses (``torchrun --standalone --nproc_per_node N`` when ``nproc > 1``), each logging to its directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable

from metattt.track.rundir import READABLE_EVAL_SCHEMAS

from .config import Cell, ModelSpec, StudyConfig, StudyConfigError

REPO = Path(__file__).resolve().parents[2]
TRAINER = "experiments/meta_ttt.py"
EVALUATOR = "evaluators/legal_ttt.py"
RECORD = "study.json"
LOG = "study.log"


def _launcher(nproc: int) -> list[str]:
    if nproc > 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
    return ["python"]


def train_command(study: StudyConfig, m: ModelSpec, nproc: int, env: bool = True) -> list[str]:
    """The trainer command (``python`` / ``torchrun`` and repo-relative scripts); ``env=False``: as recorded and
    shown, environment variables unexpanded."""
    assert m.train is not None
    d = study.model_dir(m)
    flags = [study.expand(f, env) for f in m.train]
    extra = ["--run-root", str(d.parent), "--run-name", d.name]
    if "--wandb" not in flags:
        extra += ["--wandb", "off"]
    return [*_launcher(nproc), TRAINER, *flags, *extra]


def eval_command(study: StudyConfig, c: Cell, nproc: int, env: bool = True) -> list[str]:
    cmd = [*_launcher(nproc), EVALUATOR, str(study.artifact_path(c.model)),
           "--protocols", ",".join(c.ev.protocols)]
    for s in c.ev.adapter_specs:
        cmd += ["--adapter-spec", s]
    flags = [study.expand(f, env) for f in c.ev.flags]
    cmd += flags + ["--run-dir", str(study.cell_dir(c))]
    if "--wandb" not in flags:
        cmd += ["--wandb", "off"]
    return cmd


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _record_ok(d: Path, key: str) -> bool:
    rec = read_json(d / RECORD)
    return bool(rec) and rec.get("key") == key and rec.get("status") == "done"


def model_done(study: StudyConfig, m: ModelSpec, recorded: bool = False) -> bool:
    """``recorded``: a trained model's artifact may be absent if its sha256 sidecar is there (report only)."""
    if m.artifact is not None:
        return study.artifact_path(m).is_file()
    d = study.model_dir(m)
    art = d / "artifact.ptz"
    have = art.is_file() or (recorded and _sidecar(art).is_file())
    return _record_ok(d, m.key) and (d / "summary.json").is_file() and have


def requested_protocols(c: Cell) -> list[str]:
    from metattt.eval.protocols import parse_protocols

    return [s.name for s in parse_protocols(list(c.ev.protocols))]


def _sidecar(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".sha256")


def artifact_digest(path: Path, recorded: bool = False) -> str | None:
    """sha256 of the artifact file: a cell evaluated another file (re-imported, retrained) is not done.

    ``recorded``: when the file is absent, the digest its training wrote beside it (``artifact.ptz.sha256``), so a
    report can be regenerated where run directories were copied without their (large) artifacts."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        if recorded and _sidecar(path).is_file():
            return _sidecar(path).read_text().strip() or None
        return None
    return h.hexdigest()


def cell_done(study: StudyConfig, c: Cell, recorded: bool = False) -> bool:
    """``recorded``: accept a trained model's recorded digest for an absent artifact (report only)."""
    d = study.cell_dir(c)
    if not _record_ok(d, c.key):
        return False
    rec = read_json(d / RECORD) or {}
    digest = artifact_digest(study.artifact_path(c.model), recorded=recorded and c.model.train is not None)
    if rec.get("artifact_sha256") != digest:
        return False
    ev = read_json(d / "eval.json")
    if not ev or ev.get("schema") not in READABLE_EVAL_SCHEMAS:  # /1 cells stay done: /2 only adds sections
        return False
    return all(p in (ev.get("protocols") or {}) for p in requested_protocols(c))


def _fresh(d: Path, what: str, log) -> Path:
    """``d`` emptied for a new run: an incomplete earlier one is moved aside (never deleted), and said so."""
    if d.exists():
        i = 1
        while (dest := d.parent / f"{d.name}.incomplete-{i}").exists():
            i += 1
        d.rename(dest)
        log(f"{what}: incomplete directory moved to {dest}")
    return d


@dataclass
class Outcome:
    what: str  # "model NAME" | "cell MODEL/EVAL"
    status: str  # "skipped (done)" | "done" | "failed (rc N)" | "blocked (...)" | "would run"
    seconds: float = 0.0


def _run(cmd: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        real = [sys.executable if cmd[0] == "python" else cmd[0],
                *(str(REPO / a) if a in (TRAINER, EVALUATOR) else a for a in cmd[1:])]
        pp = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        # its own process group, killed with the study: a study stopped by `timeout` (SIGTERM) must not leave a
        # trainer holding the GPU (seen on the H200: the next command then measured a shared device)
        proc = subprocess.Popen(real, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env, "PYTHONPATH": pp})
        try:
            return proc.wait()
        except BaseException:
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (torchrun and its workers too), then SIGKILL what is left after 10 s."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10.0)
            return
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    proc.wait()


def _write_record(d: Path, key: str, settings: dict, cmd: list[str], seconds: float, **extra) -> None:
    from metattt.atomic import atomic_write

    rec = {"status": "done", "key": key, **extra, "settings": settings, "command": shlex.join(cmd),
           "argv": cmd, "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(d / RECORD, json.dumps(rec, indent=2))


def run_study(study: StudyConfig, *, nproc: int | None = None, dry_run: bool = False,
              only: set[str] | None = None, log: Callable[[str], None] = print) -> list[Outcome]:
    """Train missing models and evaluate missing cells; returns one Outcome per model and cell."""
    nproc = nproc or study.nproc
    outcomes: list[Outcome] = []
    cells = [c for c in study.cells()
             if only is None or any(fnmatchcase(x, pat) for pat in only
                                    for x in (c.model.name, c.ev.name, c.ev.section, f"{c.model.name}/{c.ev.name}"))]
    needed: dict[str, ModelSpec] = {}

    def need(m: ModelSpec) -> None:  # a model's dependencies (decay branches' parents) train before it
        for dep in m.depends:
            need(study.model(dep))
        needed.setdefault(m.name, m)

    for c in cells:
        need(c.model)
    if only is not None:  # a model named by --only trains even with no cells of its own (a ladder's parent)
        for m in study.models:
            if any(fnmatchcase(m.name, pat) for pat in only):
                need(m)
    texts = [t for m in needed.values() for t in (m.train or (m.artifact,))] + [f for c in cells for f in c.ev.flags]
    unset = sorted({v for t in texts for v in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", study.expand(t))})
    if unset:
        raise StudyConfigError(f"environment variable(s) {', '.join(unset)} not set (used in {study.source})")
    failed_models: set[str] = set()

    def would_run(what: str, cmd: list[str]) -> bool:
        if dry_run:
            outcomes.append(Outcome(what, "would run"))
            log(f"{what}: would run {shlex.join(cmd)}")
        return dry_run

    def finished(what: str, ok: bool, rc: int, dt: float, log_path: Path) -> None:
        outcomes.append(Outcome(what, "done" if ok else f"failed (rc {rc})", dt))
        log(f"{what}: done in {dt:.0f}s" if ok else f"{what}: FAILED (rc {rc}); log {log_path}")

    for m in needed.values():
        what = f"model {m.name}"
        if model_done(study, m):
            outcomes.append(Outcome(what, "skipped (done)"))
            continue
        if any(dep in failed_models for dep in m.depends):
            failed_models.add(m.name)
            outcomes.append(Outcome(what, "blocked (model it starts from missing)"))
            continue
        if m.artifact is not None:
            failed_models.add(m.name)
            outcomes.append(Outcome(what, f"blocked (artifact {study.artifact_path(m)} not found)"))
            log(f"{what}: artifact {study.artifact_path(m)} not found; its cells are skipped")
            continue
        cmd = train_command(study, m, nproc)
        if would_run(what, cmd):
            continue
        d = _fresh(study.model_dir(m), what, log)
        log(f"{what}: training -> {d}")
        t0 = time.perf_counter()
        rc = _run(cmd, Path.cwd(), d.parent / f"{d.name}.{LOG}", {**study.env})
        dt = time.perf_counter() - t0
        ok = rc == 0 and (d / "artifact.ptz").is_file()
        if ok:
            _sidecar(d / "artifact.ptz").write_text(artifact_digest(d / "artifact.ptz") + "\n")
            _write_record(d, m.key, {"train": list(m.train or ())}, train_command(study, m, nproc, env=False), dt)
        else:
            failed_models.add(m.name)
        finished(what, ok, rc, dt, d.parent / f"{d.name}.{LOG}")
    for c in cells:
        what = f"cell {c.model.name}/{c.ev.name}"
        if cell_done(study, c):
            outcomes.append(Outcome(what, "skipped (done)"))
            continue
        if c.model.name in failed_models:
            outcomes.append(Outcome(what, "blocked (model missing)"))
            continue
        cmd = eval_command(study, c, nproc)
        if would_run(what, cmd):
            continue
        d = _fresh(study.cell_dir(c), what, log)
        d.mkdir(parents=True, exist_ok=True)
        digest = artifact_digest(study.artifact_path(c.model))
        log(f"{what}: evaluating -> {d}")
        t0 = time.perf_counter()
        rc = _run(cmd, Path.cwd(), d / LOG, {**study.env})
        dt = time.perf_counter() - t0
        if rc == 0:
            _write_record(d, c.key, {"model": c.model.name, "model_key": c.model.key, **c.ev.settings()},
                          eval_command(study, c, nproc, env=False), dt, artifact_sha256=digest)
        finished(what, rc == 0 and cell_done(study, c), rc, dt, d / LOG)
    return outcomes
