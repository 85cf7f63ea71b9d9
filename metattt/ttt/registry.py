"""Adapter registry (built per run from the built-ins and plug-in modules) and the CLI spec ``name:key=value,...``.

Why an object, not a global dict: a run's adapters are the built-ins plus whatever ``--adapter-module`` files /
modules and installed ``metattt.adapters`` entry points provide; building one :class:`Registry` per run keeps
two runs (or two tests) from seeing each other's plug-ins. Any :class:`Adapter` subclass *defined* in a plug-in
module (imported ones are ignored) is registered under its ``name``; a name given twice is an error naming both
sources. Spec: ``"sgd:lr=0.002,momentum=0.9,select=banks[q,v]:layers>=2"``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Iterable, Mapping, Sequence

from .adapter import Adapter
from .doclora import DocLoRA
from .dyneval import DynEvalAdapter
from .lora import LoRAAdapter
from .metasgd import MetaSGDAdapter
from .none import NoneAdapter
from .sgd import FOMAMLAdapter, ReptileAdapter, SAMAdapter, SGDAdapter

BUILTINS: tuple[type[Adapter], ...] = (NoneAdapter, SGDAdapter, FOMAMLAdapter, MetaSGDAdapter, SAMAdapter,
                                       LoRAAdapter, DynEvalAdapter, ReptileAdapter, DocLoRA)
ADAPTERS: tuple[str, ...] = tuple(c.name for c in BUILTINS)
ENTRY_POINT_GROUP = "metattt.adapters"
_SELECT_KEYS = ("select", "selection")


class PluginError(ValueError):
    """A plug-in module could not be loaded, defines no adapter, or clashes with another adapter's name."""


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets (selection kinds ``banks[q,k]`` contain commas)."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [p.strip() for p in out if p.strip()]


def _literal(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _coerce(who: str, key: str, typ: object, value: Any) -> Any:
    t = str(typ)
    if t == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if t == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if t == "bool" and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if t == "bool" and isinstance(value, int) and value in (0, 1):
        return bool(value)
    ok = {"float": float, "int": int, "bool": bool, "str": str}.get(t)
    if ok is not None and (not isinstance(value, ok) or (ok is int and isinstance(value, bool))):
        raise ValueError(f"{who} option {key}={value!r} is not a {t}")
    return value


def parse_options(text: str, spec: str) -> dict[str, Any]:
    """``"lr=0.002,select=banks[q,v]:layers>=2"`` -> {"lr": 0.002, "select": "banks[q,v]:layers>=2"}: values typed
    literally (selections kept as text); ``spec`` names the whole spec in errors."""
    out: dict[str, Any] = {}
    for item in _split_top(text):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"adapter spec {spec!r}: option {item!r} is not key=value")
        key = key.strip()
        out[key] = val.strip() if key in _SELECT_KEYS else _literal(val.strip())
    return out


def typed_options(config: type, options: Mapping[str, Any], who: str, also: str = "") -> dict[str, Any]:
    """``options`` (text or values) typed as the fields of the dataclass ``config``; an unknown key or a value of
    the wrong type is an error naming it and the valid keys."""
    types = {f.name: f.type for f in fields(config)}
    unknown = sorted(set(options) - set(types))
    if unknown:
        raise ValueError(f"{who} has no option {unknown[0]!r} (unknown hyper-parameters {unknown}; valid: "
                         f"{', '.join(sorted(types))}{also})")
    return {k: _coerce(who, k, types[k], _literal(v) if isinstance(v, str) else v) for k, v in options.items()}


def load_module(ref: str) -> ModuleType:
    """Import ``ref``: a ``.py`` file path (imported under a private name) or a dotted module name."""
    path = Path(ref).expanduser()
    if ref.endswith(".py") or path.is_file():
        if not path.is_file():
            raise PluginError(f"adapter module {ref!r}: no such file")
        path = path.resolve()
        name = f"metattt_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"adapter module {ref!r}: not an importable Python file")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses resolve their module while the file executes
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[name]
            raise PluginError(f"adapter module {ref!r} failed to import: {type(e).__name__}: {e}") from e
        return mod
    try:
        return importlib.import_module(ref)
    except ImportError as e:
        raise PluginError(f"adapter module {ref!r}: cannot import it ({e}); give a .py path or an importable "
                          "module name") from e


def adapters_in(mod: ModuleType) -> list[type[Adapter]]:
    """The concrete Adapter subclasses that ``mod`` itself defines."""
    return [c for c in vars(mod).values()
            if inspect.isclass(c) and issubclass(c, Adapter) and c is not Adapter and c.__module__ == mod.__name__
            and not inspect.isabstract(c)]


@dataclass(frozen=True)
class Registry:
    """Name -> adapter class for one run (read-only); ``sources`` says where each came from."""

    classes: Mapping[str, type[Adapter]]
    sources: Mapping[str, str]

    @classmethod
    def build(cls, modules: Iterable[str] = (), *, use_entry_points: bool = True) -> "Registry":
        """Built-ins, then installed ``metattt.adapters`` entry points, then ``modules`` (paths or names)."""
        classes: dict[str, type[Adapter]] = {}
        sources: dict[str, str] = {}

        def add(c: type[Adapter], source: str) -> None:
            name = c.name
            if not isinstance(name, str) or not name or name == Adapter.name:
                raise PluginError(f"adapter class {c.__qualname__} from {source} sets no name (class attribute "
                                  "name = '...')")
            if c.per_document and "chunk" not in {f.name for f in fields(c.Config)}:
                raise PluginError(f"per-document adapter {name!r} from {source}: its Config has no 'chunk' option "
                                  "(tokens per update; the doc-batched evaluator sets it from docttt:NAME@chunk=)")
            if name in classes and classes[name] is not c:
                raise PluginError(f"adapter name clash: {name!r} is defined by {sources[name]} and by {source} "
                                  f"({c.__qualname__}); rename one")
            classes[name], sources[name] = c, source

        for c in BUILTINS:
            add(c, "metattt (built-in)")
        if use_entry_points:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    obj = ep.load()
                except Exception as e:  # an installed package's bug: say which one
                    raise PluginError(f"entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e
                found = adapters_in(obj) if isinstance(obj, ModuleType) else (
                    [obj] if inspect.isclass(obj) and issubclass(obj, Adapter) else [])
                if not found:
                    raise PluginError(f"entry point {ep.name!r} ({ep.value}) is not an Adapter subclass or a "
                                      "module defining one")
                for c in found:
                    add(c, f"entry point {ep.name!r} ({ep.value})")
        for ref in modules:
            found = adapters_in(load_module(ref))
            if not found:
                raise PluginError(f"adapter module {ref!r} defines no Adapter subclass")
            for c in found:
                add(c, f"module {ref!r}")
        return cls(MappingProxyType(classes), MappingProxyType(sources))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.classes)

    def get(self, name: str) -> type[Adapter]:
        if name not in self.classes:
            raise ValueError(f"unknown adapter {name!r}; valid adapters: {', '.join(self.classes)} "
                             "(plug-ins: --adapter-module FILE.py|pkg.module)")
        return self.classes[name]

    def parse_spec(self, spec: str) -> tuple[str, dict[str, Any]]:
        """``"sgd:lr=0.002,select=banks[q,v]:layers>=2"`` -> ("sgd", {...}); values typed literally."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"adapter spec must be a non-empty string, got {spec!r}")
        name, _, rest = spec.strip().partition(":")
        self.get(name.strip())
        return name.strip(), parse_options(rest, spec)

    def make(self, name: str, selection: str | None = None, **hparams: Any) -> Adapter:
        """An (unbound) adapter. ``selection`` None -> the adapter's default; ``select=`` / ``selection=`` inside
        ``hparams`` (from a CLI spec) are accepted too."""
        cls = self.get(name)
        for k in _SELECT_KEYS:
            if k in hparams:
                v = hparams.pop(k)
                if selection is not None and v != selection:
                    raise ValueError(f"adapter {name!r}: selection given twice ({selection!r} and {v!r})")
                selection = v
        return cls(cls.Config(**typed_options(cls.Config, hparams, f"adapter {name!r}", ", select")), selection)

    def from_spec(self, spec: str) -> Adapter:
        name, kwargs = self.parse_spec(spec)
        return self.make(name, **kwargs)

    def help(self) -> str:
        """One line per adapter: its hyper-parameters and defaults (and where a plug-in came from)."""
        lines = []
        for name, cls in self.classes.items():
            cfg = cls.Config()
            hp = ", ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items())
            src = self.sources[name]
            where = "" if src.endswith("(built-in)") else f" [{src}]"
            lines.append(f"{name}: {hp} (select default {cls.default_selection!r}){where}")
        return "\n".join(lines)


@lru_cache(maxsize=1)
def builtin_registry() -> Registry:
    """The built-in adapters only (no plug-ins, no entry points): what the module-level helpers use."""
    return Registry.build(use_entry_points=False)


def parse_adapter_spec(spec: str) -> tuple[str, dict[str, Any]]:
    return builtin_registry().parse_spec(spec)


def make_adapter(name: str, selection: str | None = None, **hparams: Any) -> Adapter:
    return builtin_registry().make(name, selection, **hparams)


def adapter_from_spec(spec: str) -> Adapter:
    return builtin_registry().from_spec(spec)


def add_module_flag(ap: argparse.ArgumentParser, dest: str = "adapter_module") -> None:
    """``--adapter-module FILE.py|pkg.module`` (repeatable), the same on every entry point."""
    ap.add_argument("--adapter-module", action="append", dest=dest, metavar="FILE.py|MODULE",
                    help="load adapter plug-ins: every Adapter subclass defined there is usable by name "
                         "(repeatable; see docs/adapters.md)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metattt adapters [--adapter-module M]``: every adapter with its hyper-parameters and defaults."""
    ap = argparse.ArgumentParser(prog="python -m metattt adapters", description=main.__doc__)
    add_module_flag(ap)
    args = ap.parse_args(argv)
    try:
        reg = Registry.build(args.adapter_module or ())
    except PluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(reg.help())
    print("\nspec syntax: NAME[:key=value,...,select=SELECTION], e.g. 'sgd:lr=0.002,epochs=3,select=banks:layers>=2'")
    return 0
