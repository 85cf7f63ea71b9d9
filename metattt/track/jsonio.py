"""Strict-JSON encoding shared by every file a run directory holds.

Why a module of its own: configs arrive as dataclasses, Paths, numpy or torch scalars, and metrics can be
NaN/inf (a diverging run is exactly the one we must be able to read back). Standard JSON has no NaN, so
non-finite floats are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (files stay
readable by jq / JavaScript) and turned back into floats on reading. Python's own ``NaN`` tokens, which
a plain ``json.dump`` writes, are accepted on reading too.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path, PurePath
from typing import Any

from metattt.atomic import atomic_write

NONFINITE_TOKENS: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_token(x: float) -> float | str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def to_jsonable(obj: Any, _where: str = "$") -> Any:
    """Convert ``obj`` to plain JSON types; unknown types raise ``TypeError`` naming where they sit.

    Failing loudly (instead of ``str(obj)``) keeps configs round-trippable: a config that cannot be
    written faithfully is a bug in the caller, better caught at step 0 than when comparing runs.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _float_token(float(obj))
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, _where)
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{_where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"cannot write key {k!r} of type {type(k).__name__} at {_where} as JSON")
            out[str(k)] = to_jsonable(v, f"{_where}.{k}")
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(items)]
    # numpy / torch without importing them: both expose .tolist() (arrays, tensors, scalars) / .item().
    mod = type(obj).__module__.split(".")[0]
    if mod in ("numpy", "torch") and hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist(), _where)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict(), _where)
    raise TypeError(f"cannot write value of type {type(obj).__name__} at {_where} as JSON")


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON text (``allow_nan=False`` proves no raw NaN slipped through)."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)


def restore_nonfinite(obj: Any) -> Any:
    """Inverse of the NaN/inf string encoding, applied recursively after ``json.loads``."""
    if isinstance(obj, str):
        return NONFINITE_TOKENS.get(obj, obj)
    if isinstance(obj, dict):
        return {k: restore_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_nonfinite(v) for v in obj]
    return obj


def loads(text: str) -> Any:
    return restore_nonfinite(json.loads(text))


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory + ``os.replace``: readers never see half a file."""
    atomic_write(path, text)
