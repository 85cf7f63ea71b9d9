"""The ceiling study's config: models × evaluator settings, read from TOML and expanded into cells.

A *cell* is one (model, evaluator setting) pair and owns one run directory. Its key hashes every setting that
changes its numbers (the model's trainer flags or artifact path, the protocols, adapter specs and evaluator
flags, exactly as written in the config), so a changed setting is a new cell in a new directory and an old
result is never reported for a new setting.

Config file (see experiments/ceiling_cpu.toml)::

    [study]
    name = "ceiling-cpu"               # marker prefix in the report
    root = "runs/ceiling-cpu"           # run directories (relative to the working directory)
    report = "docs/ceiling.md"          # generated sections go between this study's markers
    plots = "docs/ceiling"              # PNGs
    nproc = 1                           # > 1: torchrun --nproc_per_node N for trainer and evaluator
    [study.sections]
    "6" = "the analytic ceiling"        # section id -> title (cells name their section)

    [[model]]
    name = "small"
    train = ["--iterations", "80", "--data-dir", "{study}/data/synthetic"]   # experiments/meta_ttt.py flags
    # or: artifact = "$RUNS/record/artifact.ptz"

    [[eval]]
    name = "adapters"
    section = "6"
    protocols = ["flat", "sliding", "ttt:sgd"]
    adapter_specs = ["sgd:lr=0.002"]    # evaluators/legal_ttt.py --adapter-spec
    flags = ["--bootstrap", "200"]      # other evaluator flags
    models = ["small"]                  # optional subset (default: every model)
    sweep = { "--chunk-tokens" = [4096, 8192] }   # optional: one cell per combination

Strings may use ``{study}`` (the study root) and environment variables (``$METATTT_DATA``); keys hash the
strings as written, so the same config on another machine finds the same cells.

A model's ``train`` flags may name another model's run directory as ``{model:NAME}`` (NAME defined above it),
e.g. ``["--branch-from", "{model:small}/budgets/dn25_r0.pt"]`` for a decay branch from a budget checkpoint: it
becomes ``{study}/models/NAME-KEY`` (so the key changes when NAME's does), and NAME is trained first.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")
_MODEL_REF = re.compile(r"\{model:([^}]*)\}")


class StudyConfigError(ValueError):
    """A bad study config; the message names the file and the problem."""


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _flags(value: Any, where: str) -> tuple[str, ...]:
    """Flags as a TOML list of strings (or one shell-quoted string)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return tuple(str(v) for v in value)
    raise StudyConfigError(f"{where}: expected a list of strings or one string, got {value!r}")


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise StudyConfigError(f"{where}: name {value!r} must be letters, digits and _.=+- (no spaces or slashes)")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """One model: trained by experiments/meta_ttt.py with ``train`` flags, or an existing ``artifact``."""

    name: str
    train: tuple[str, ...] | None = None
    artifact: str | None = None
    note: str = ""
    depends: tuple[str, ...] = ()  # models its train flags name as {model:NAME}: trained before it

    def __post_init__(self) -> None:
        if (self.train is None) == (self.artifact is None):
            raise StudyConfigError(f"model {self.name!r}: give exactly one of train = [...] or artifact = PATH")

    @property
    def key(self) -> str:
        return _key({"train": list(self.train)} if self.train is not None else {"artifact": self.artifact})


@dataclass(frozen=True)
class EvalSpec:
    """One evaluator setting (after sweep expansion)."""

    name: str
    section: str
    protocols: tuple[str, ...]
    adapter_specs: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None  # None: every model
    note: str = ""

    def settings(self) -> dict[str, Any]:
        return {"protocols": list(self.protocols), "adapter_specs": list(self.adapter_specs), "flags": list(self.flags)}


@dataclass(frozen=True)
class Cell:
    """One model × evaluator setting; ``key`` changes with any setting of either."""

    model: ModelSpec
    ev: EvalSpec

    @property
    def key(self) -> str:
        return _key({"model": self.model.key, **self.ev.settings()})

    @property
    def rel_dir(self) -> str:
        return f"cells/{self.model.name}/{self.ev.name}-{self.key}"


@dataclass(frozen=True)
class StudyConfig:
    name: str
    root: Path
    report: Path
    plots: Path
    sections: dict[str, str]
    models: tuple[ModelSpec, ...]
    evals: tuple[EvalSpec, ...]
    nproc: int = 1
    source: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the subprocesses
    arms: Any = None  # [arms]: the arms comparison of a meta-training study (metattt/study/arms.py), None if absent

    def expand(self, text: str, env: bool = True) -> str:
        """``{study}`` -> the study root, then environment variables (``env=False`` keeps ``$VAR`` as written: the
        command a report shows must run on the reader's machine, not name this one's paths)."""
        text = text.replace("{study}", str(self.root))
        return os.path.expandvars(text) if env else text

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def cells(self) -> list[Cell]:
        """Every cell in config order (evaluator setting major, then model)."""
        return [Cell(m, e) for e in self.evals for m in self.models if e.models is None or m.name in e.models]

    def model_dir(self, m: ModelSpec) -> Path:
        return self.root / "models" / f"{m.name}-{m.key}"

    def artifact_path(self, m: ModelSpec) -> Path:
        return Path(self.expand(m.artifact)) if m.artifact is not None else self.model_dir(m) / "artifact.ptz"

    def cell_dir(self, c: Cell) -> Path:
        return self.root / c.rel_dir


def _expand_sweep(sweep: Any, where: str) -> list[tuple[str, tuple[str, ...]]]:
    """(name suffix, extra flags) per combination of the sweep's values; booleans are bare flags."""
    if sweep is None:
        return [("", ())]
    if not isinstance(sweep, dict) or not sweep:
        raise StudyConfigError(f"{where}: sweep must be a table of flag -> list of values")
    for flag, vals in sweep.items():
        if not flag.startswith("--") or not isinstance(vals, list) or not vals:
            raise StudyConfigError(f"{where}: sweep entry {flag!r} must be '--flag' = [non-empty list]")
    out = []
    for combo in itertools.product(*sweep.values()):
        parts, flags = [], []
        for flag, v in zip(sweep, combo):
            short = flag[2:]
            if isinstance(v, bool):
                parts.append(f"{short}={str(v).lower()}")
                flags += [flag] if v else []
            else:
                parts.append(f"{short}={v}")
                flags += [flag, str(v)]
        out.append(("." + ".".join(parts), tuple(flags)))
    return out


def _resolve_refs(m: ModelSpec, defined: dict[str, ModelSpec], where: str) -> ModelSpec:
    """``{model:NAME}`` in the train flags -> ``{study}/models/NAME-KEY`` (NAME defined above)."""
    if m.train is None:
        return m
    deps: list[str] = []

    def sub(match: re.Match) -> str:
        name = match.group(1)
        ref = defined.get(name)
        if ref is None or ref.train is None:
            raise StudyConfigError(f"{where}: {{model:{name}}} must name a trained model defined above it")
        deps.append(name)
        return f"{{study}}/models/{name}-{ref.key}"

    train = tuple(_MODEL_REF.sub(sub, f) for f in m.train)
    return ModelSpec(m.name, train, m.artifact, m.note, tuple(dict.fromkeys(deps)))


def _section_id(value: Any, where: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise StudyConfigError(f"{where}: section must be a string or integer, got {value!r}")
    return str(value)


def parse_study(data: dict[str, Any], source: Path | None = None, root_override: str | None = None) -> StudyConfig:
    """Validate a parsed TOML document into a StudyConfig (raises StudyConfigError naming the problem)."""
    src = str(source) if source else "config"
    st = data.get("study")
    if not isinstance(st, dict):
        raise StudyConfigError(f"{src}: missing [study] table")
    known = {"name", "root", "report", "plots", "nproc", "sections", "env"}
    if set(st) - known:
        raise StudyConfigError(f"{src}: unknown [study] keys {sorted(set(st) - known)}; known: {sorted(known)}")
    name = _name(st.get("name"), f"{src} [study].name")
    sections = {_section_id(k, src): str(v) for k, v in (st.get("sections") or {}).items()}
    nproc = st.get("nproc", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise StudyConfigError(f"{src}: [study].nproc must be a positive integer, got {nproc!r}")
    env = st.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise StudyConfigError(f"{src}: [study].env must be a table of strings")

    models: list[ModelSpec] = []
    raw_models = data.get("model") or []
    if not isinstance(raw_models, list) or not raw_models:
        raise StudyConfigError(f"{src}: no [[model]] entries")
    for i, m in enumerate(raw_models):
        where = f"{src} [[model]] #{i + 1}"
        unknown = set(m) - {"name", "train", "artifact", "note"}
        if unknown:
            raise StudyConfigError(f"{where}: unknown keys {sorted(unknown)}")
        art = m.get("artifact")
        if art is not None and not isinstance(art, str):
            raise StudyConfigError(f"{where}: artifact must be a path string")
        spec = ModelSpec(_name(m.get("name"), where), _flags(m["train"], where) if "train" in m else None,
                         art, str(m.get("note", "")))
        models.append(_resolve_refs(spec, {x.name: x for x in models}, where))
    if len({m.name for m in models}) != len(models):
        raise StudyConfigError(f"{src}: model names must be unique")

    evals: list[EvalSpec] = []
    raw_evals = data.get("eval") or []
    if not isinstance(raw_evals, list) or not raw_evals:
        raise StudyConfigError(f"{src}: no [[eval]] entries")
    model_names = {m.name for m in models}
    for i, e in enumerate(raw_evals):
        where = f"{src} [[eval]] #{i + 1}"
        unknown = set(e) - {"name", "section", "protocols", "adapter_specs", "flags", "models", "sweep", "note"}
        if unknown:
            raise StudyConfigError(f"{where}: unknown keys {sorted(unknown)}")
        ename = _name(e.get("name"), where)
        section = _section_id(e.get("section"), where)
        if section not in sections:
            raise StudyConfigError(f"{where}: section {section!r} is not in [study.sections] ({sorted(sections)})")
        protocols = _flags(e.get("protocols"), where)
        if not protocols:
            raise StudyConfigError(f"{where}: protocols is empty")
        from metattt.eval.protocols import parse_protocol

        try:
            for p in protocols:
                parse_protocol(p)
        except ValueError as err:
            raise StudyConfigError(f"{where}: {err}") from err
        sel = e.get("models")
        if sel is not None:
            sel = _flags(sel, where)
            missing = set(sel) - model_names
            if missing:
                raise StudyConfigError(f"{where}: models {sorted(missing)} are not defined")
        specs = _flags(e.get("adapter_specs"), where)
        flags = _flags(e.get("flags"), where)
        for bad in ("--protocols", "--adapter-spec", "--run-dir"):
            if bad in flags:
                raise StudyConfigError(f"{where}: {bad} is set by the study (use protocols / adapter_specs keys)")
        for suffix, extra in _expand_sweep(e.get("sweep"), where):
            evals.append(EvalSpec(ename + suffix, section, protocols, specs, flags + extra, sel, str(e.get("note", ""))))
    if len({x.name for x in evals}) != len(evals):
        raise StudyConfigError(f"{src}: eval names (after sweep expansion) must be unique")

    root = root_override or st.get("root") or f"runs/{name}"
    from .arms import parse_arms

    try:
        arms = parse_arms(data["arms"], src, sections, models, evals) if "arms" in data else None
    except ValueError as e:
        raise StudyConfigError(str(e)) from None
    return StudyConfig(name=name, root=Path(root), report=Path(st.get("report", "docs/ceiling.md")),
                       plots=Path(st.get("plots", "docs/ceiling")), sections=sections, models=tuple(models),
                       evals=tuple(evals), nproc=nproc, source=source, env=dict(env), arms=arms)


def load_study(path: str | os.PathLike, root_override: str | None = None) -> StudyConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise StudyConfigError(f"config file not found: {p}") from e
    except tomllib.TOMLDecodeError as e:
        raise StudyConfigError(f"{p}: not valid TOML: {e}") from e
    return parse_study(data, p, root_override)
