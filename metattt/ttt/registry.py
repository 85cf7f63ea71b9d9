"""Adapter registry and the CLI spec ``name:key=value,...`` (e.g. ``sgd:lr=0.002,epochs=3,select=all``)."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from .adapter import Adapter
from .dyneval import DynEvalAdapter
from .fomaml import FOMAMLAdapter
from .lora import LoRAAdapter
from .metasgd import MetaSGDAdapter
from .none import NoneAdapter
from .reptile import ReptileAdapter
from .sam import SAMAdapter
from .sgd import SGDAdapter

ADAPTER_CLASSES: dict[str, type[Adapter]] = {
    c.name: c for c in (NoneAdapter, SGDAdapter, FOMAMLAdapter, MetaSGDAdapter, SAMAdapter, LoRAAdapter,
                        DynEvalAdapter, ReptileAdapter)
}
ADAPTERS: tuple[str, ...] = tuple(ADAPTER_CLASSES)
_SELECT_KEYS = ("select", "selection")


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets (selection kinds ``banks[q,k]`` contain commas)."""
    out, depth, cur = [], 0, []
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


def parse_adapter_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"sgd:lr=0.002,momentum=0.9,select=banks[q,v]:layers>=2"`` -> ("sgd", {...}); values typed literally."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"adapter spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in ADAPTER_CLASSES:
        raise ValueError(f"unknown adapter {name!r}; valid adapters: {', '.join(ADAPTERS)}")
    kwargs: dict[str, Any] = {}
    for item in _split_top(rest):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"adapter spec {spec!r}: expected key=value, got {item!r}")
        key = key.strip()
        kwargs[key] = val.strip() if key in _SELECT_KEYS else _literal(val.strip())
    return name, kwargs


def _coerce(cls_name: str, key: str, typ: str, value: Any) -> Any:
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
        raise ValueError(f"{cls_name}.{key} must be {t}, got {value!r}")
    return value


def make_adapter(name: str, selection: str | None = None, **hparams: Any) -> Adapter:
    """Build an (unbound) adapter. ``selection`` None -> the adapter's default ("all"; "banks" for lora;
    "none" for none). ``select=`` / ``selection=`` inside ``hparams`` (from a CLI spec) are accepted too."""
    if name not in ADAPTER_CLASSES:
        raise ValueError(f"unknown adapter {name!r}; valid adapters: {', '.join(ADAPTERS)}")
    cls = ADAPTER_CLASSES[name]
    for k in _SELECT_KEYS:
        if k in hparams:
            v = hparams.pop(k)
            if selection is not None and v != selection:
                raise ValueError(f"adapter {name!r}: selection given twice ({selection!r} and {v!r})")
            selection = v
    types = {f.name: f.type for f in fields(cls.Config)}
    unknown = sorted(set(hparams) - set(types))
    if unknown:
        raise ValueError(f"adapter {name!r}: unknown hyper-parameters {unknown}; valid: "
                         f"{', '.join(sorted(types))}, select")
    kw = {k: _coerce(cls.Config.__name__, k, types[k], v) for k, v in hparams.items()}
    return cls(cls.Config(**kw), selection)


def adapter_from_spec(spec: str) -> Adapter:
    """``make_adapter(*parse_adapter_spec(spec))``."""
    name, kwargs = parse_adapter_spec(spec)
    return make_adapter(name, **kwargs)


def adapter_help() -> str:
    """One line per adapter: its hyper-parameters and defaults."""
    lines = []
    for name, cls in ADAPTER_CLASSES.items():
        cfg = cls.Config()
        hp = ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg))
        lines.append(f"{name}: {hp} (select default {cls.default_selection!r})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m metattt adapters``: every adapter with its hyper-parameters and defaults."""
    print(adapter_help())
    print("\nspec syntax: NAME[:key=value,...,select=SELECTION], e.g. 'sgd:lr=0.002,epochs=3,select=banks:layers>=2'")
    return 0
