"""Artifact file format: fixed header + zstd-compressed self-describing payload.

File layout (little endian)::

    header (56 bytes) = magic b"MTTT" | u16 version | u16 flags | u64 payload_len | u64 raw_len
                        | blake2b-256( header[0:24] + payload )
    payload           = zstd( u64 index_len | index JSON (utf-8) | blob )

The index JSON holds the model config, the JSON metadata, the quantizer config, per-tensor entries (scheme,
shape, dtype) and an array table [key, dtype, shape, offset, nbytes] into the blob. No pickle: loading an
artifact cannot execute code, and the same inputs always give the same bytes. Arrays are grouped by kind
(all int6 values, then int8, then scales, then floats, then extras) so zstd sees homogeneous runs.

Why the checks are ordered as they are: magic (is it ours at all) -> version/flags (can we read it) ->
length (was it cut short) -> checksum (did bytes change) -> decode. Each failure raises its own
`ArtifactError` subclass naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import zstandard

from metattt.atomic import atomic_path

from .budget import DEFAULT_BUDGET, ArtifactReport, KindBytes, default_code_bytes
from .errors import (ArtifactError, ArtifactVersionError, ConfigMismatchError, CorruptedArtifactError,
                     NotAnArtifactError, OverBudgetError, TruncatedArtifactError)
from .quant import QuantConfig, QuantizedState, dequantize_state_dict, quantize_state_dict

MAGIC = b"MTTT"
FORMAT_VERSION = 1
FLAG_ZSTD = 1
KNOWN_FLAGS = FLAG_ZSTD
_HEAD = struct.Struct("<4sHHQQ")  # 24 bytes covered by the checksum
DIGEST_SIZE = 32
HEADER_SIZE = _HEAD.size + DIGEST_SIZE  # 56
_MISSING = "<missing>"

# blob order: homogeneous runs compress better
_ORDER = {"int6_row": 0, "int8_row": 1, "scale": 2, "fp16": 3, "fp32": 4, "raw": 5, "extra": 6}


@dataclass
class LoadedArtifact:
    """What `load_artifact` returns. `state_dict` is dequantized (float32 by default, banks 3-D)."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]
    meta: dict[str, Any]
    report: ArtifactReport
    quantized: QuantizedState = field(repr=False, default_factory=QuantizedState)
    version: int = FORMAT_VERSION


# ------------------------------------------------------------------------------------------- helpers
def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _itemsize(name: str) -> int:
    return torch.empty((), dtype=_torch_dtype(name)).element_size()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()


def _tensor_from(buf: memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    dt = _torch_dtype(dtype)
    if len(buf) == 0:
        return torch.empty(shape, dtype=dt)
    raw = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
    return raw.view(dt).reshape(shape)


def _jsonable(x: Any, what: str) -> Any:
    """Normalize to JSON types (tuples -> lists) and fail early with a clear message if impossible."""
    if hasattr(x, "to_dict") and callable(x.to_dict):
        x = x.to_dict()
    try:
        return json.loads(json.dumps(x))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serializable: {e}") from None


def _normalize(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_normalize(v) for v in x]
    if isinstance(x, dict):
        return {k: _normalize(v) for k, v in x.items()}
    return x


def check_expect(config: Mapping[str, Any], expect: Mapping[str, Any] | None, path: str = "<memory>") -> None:
    """Raise ConfigMismatchError naming every field where the stored config disagrees with `expect`."""
    if not expect:
        return
    mism: dict[str, tuple[Any, Any]] = {}
    for k, want in expect.items():
        have = config.get(k, _MISSING)
        if have == _MISSING or _normalize(have) != _normalize(want):
            mism[k] = (have, want)
    if mism:
        parts = ", ".join(f"{k}: stored {s!r} vs expected {w!r}" for k, (s, w) in mism.items())
        raise ConfigMismatchError(f"{path}: model config mismatch ({parts})", mism)


# ------------------------------------------------------------------------------------------- encoding
def _build_payload(config: dict, qstate: QuantizedState, extras: dict[str, torch.Tensor],
                   meta: dict) -> tuple[bytes, dict[str, KindBytes], int]:
    items: list[tuple[int, int, str, str, torch.Tensor]] = []  # (order, seq, group, key, tensor)
    seq = 0
    for name, e in qstate.entries.items():
        for key in e["arrays"]:
            kind = "scale" if key.endswith(".scale") else e["scheme"]
            items.append((_ORDER[kind], seq, "q", key, qstate.arrays[key]))
            seq += 1
    for name, t in extras.items():
        items.append((_ORDER["extra"], seq, "x", name, t))
        seq += 1
    items.sort(key=lambda it: (it[0], it[1]))

    table, chunks, offset = [], [], 0
    for _, _, group, key, t in items:
        b = _tensor_bytes(t)
        table.append([group, key, _dtype_name(t), list(t.shape), offset, len(b)])
        chunks.append(b)
        offset += len(b)

    index = {"config": config, "meta": meta, "quant_config": qstate.config.to_dict(),
             "tensors": qstate.entries, "extras": list(extras), "arrays": table}
    index_bytes = json.dumps(index, separators=(",", ":")).encode("utf-8")
    payload = struct.pack("<Q", len(index_bytes)) + index_bytes + b"".join(chunks)
    return (payload, *_byte_table(qstate, extras, len(index_bytes)))


def _byte_table(qstate: QuantizedState, extras: Mapping[str, torch.Tensor],
                index_len: int) -> tuple[dict[str, KindBytes], int]:
    """(bytes per kind of tensor, the index included; float bytes of the parameters): the report's numbers."""
    kinds: dict[str, KindBytes] = {}
    for name, e in qstate.entries.items():
        k = kinds.setdefault(e["scheme"], KindBytes())
        n = int(np.prod(e["shape"], dtype=np.int64))
        k.count += 1
        k.numel += n
        k.raw_bytes += n * _itemsize(e["dtype"])
        k.stored_bytes += qstate.stored_bytes(name)
    if extras:
        k = kinds.setdefault("extras", KindBytes())
        for t in extras.values():
            k.count += 1
            k.numel += t.numel()
            k.raw_bytes += t.numel() * t.element_size()
            k.stored_bytes += t.numel() * t.element_size()
    kinds["index"] = KindBytes(count=1, stored_bytes=8 + index_len)
    return kinds, sum(int(np.prod(e["shape"], dtype=np.int64)) * _itemsize(e["dtype"]) for e in qstate.entries.values())


def _digest(head: bytes, payload: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(head)
    h.update(payload)
    return h.digest()


def pack_artifact(model_cfg: Any, state_dict: Mapping[str, torch.Tensor], extras: Mapping[str, Any] | None = None,
                  meta: Mapping[str, Any] | None = None, level: int = 22, budget: int = DEFAULT_BUDGET,
                  code_bytes: int | None = None, quant: QuantConfig | None = None,
                  exact: tuple[str, ...] | list[str] = (), threads: int = 0,
                  prequantized: QuantizedState | None = None) -> tuple[bytes, ArtifactReport]:
    """Quantize + serialize + compress in memory. Returns (file bytes, report); never raises for budget.

    ``prequantized``: store this quantized state as it is instead of quantizing ``state_dict`` (pass {}) -- an
    imported model's integer grid then survives exactly (docs/interop.md)."""
    if not 1 <= level <= 22:
        raise ValueError(f"zstd level must be in [1, 22], got {level}")
    config = _jsonable(model_cfg, "model_cfg")
    if not isinstance(config, dict):
        raise TypeError(f"model_cfg must be a dict (or have to_dict()), got {type(model_cfg).__name__}")
    meta_j = _jsonable(dict(meta or {}), "meta")
    ext: dict[str, torch.Tensor] = {}
    for k, v in (extras or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"extras keys must be str, got {k!r}")
        try:
            ext[k] = torch.as_tensor(v).detach().cpu()
        except Exception as e:  # noqa: BLE001 - re-raised with the offending name
            raise TypeError(f"extras[{k!r}] is not convertible to a tensor: {e}") from None
    if prequantized is not None and state_dict:
        raise ValueError("pack_artifact: give either a state_dict to quantize or a prequantized state, not both")
    qstate = prequantized if prequantized is not None else quantize_state_dict(state_dict, quant, exact=exact)
    raw, by_kind, raw_param_bytes = _build_payload(config, qstate, ext, meta_j)
    comp = zstandard.ZstdCompressor(level=level, threads=threads, write_content_size=True).compress(raw)
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, FLAG_ZSTD, len(comp), len(raw))
    blob = head + _digest(head, comp) + comp
    report = ArtifactReport(raw_param_bytes=raw_param_bytes, quantized_bytes=len(raw), compressed_bytes=len(blob),
                            code_bytes=default_code_bytes() if code_bytes is None else int(code_bytes),
                            budget=int(budget), by_kind=by_kind)
    return blob, report


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, verify, rename: an existing good file at `path`
    survives any failure, and readers never see a half-written artifact."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        if tmp.read_bytes() != data:
            raise ArtifactError(f"{path}: read-back of the temporary file differs from what was written")


def save_artifact(path: str | os.PathLike, model_cfg: Any, state_dict: Mapping[str, torch.Tensor],
                  extras: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None,
                  level: int = 22, budget: int = DEFAULT_BUDGET, code_bytes: int | None = None,
                  allow_over_budget: bool = False, quant: QuantConfig | None = None,
                  exact: tuple[str, ...] | list[str] = (), threads: int = 0,
                  prequantized: QuantizedState | None = None) -> ArtifactReport:
    """Quantize, compress and atomically write an artifact; returns its byte report.

    Refuses (OverBudgetError, nothing written) when compressed + code bytes exceed `budget`, unless
    allow_over_budget=True. `code_bytes=None` uses the package convention (`budget.default_code_bytes`).
    `extras` (named tensors, e.g. MetaSGD rates) are stored bit-exact; `meta` must be JSON-serializable.
    """
    path = Path(path)
    blob, report = pack_artifact(model_cfg, state_dict, extras, meta, level=level, budget=budget,
                                 code_bytes=code_bytes, quant=quant, exact=exact, threads=threads,
                                 prequantized=prequantized)
    report.path = str(path)
    if not report.within_budget and not allow_over_budget:
        raise OverBudgetError(
            f"{path}: artifact over budget: {report.compressed_bytes:,} compressed + {report.code_bytes:,} code "
            f"= {report.total_bytes:,} bytes > budget {report.budget:,} (over by {-report.headroom:,}); "
            f"not written (pass allow_over_budget=True to write anyway)", report)
    _atomic_write(path, blob)
    return report


# ------------------------------------------------------------------------------------------- decoding
def _parse(data: bytes, where: str) -> tuple[int, bytes]:
    """Validate header, length and checksum; return (version, decompressed payload)."""
    if len(data) < len(MAGIC):
        if MAGIC.startswith(data):
            raise TruncatedArtifactError(f"{where}: truncated: {len(data)} bytes, shorter than the magic")
        raise NotAnArtifactError(f"{where}: not an artifact (bad magic {data!r}, expected {MAGIC!r})")
    if data[:4] != MAGIC:
        raise NotAnArtifactError(f"{where}: not an artifact (bad magic {data[:4]!r}, expected {MAGIC!r})")
    if len(data) < HEADER_SIZE:
        raise TruncatedArtifactError(f"{where}: truncated: {len(data)} bytes, header alone needs {HEADER_SIZE}")
    magic, version, flags, plen, rlen = _HEAD.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise ArtifactVersionError(f"{where}: format version {version}, this code reads version {FORMAT_VERSION}")
    if flags & ~KNOWN_FLAGS or not flags & FLAG_ZSTD:
        raise ArtifactVersionError(f"{where}: unsupported flags 0x{flags:04x} (known: 0x{KNOWN_FLAGS:04x})")
    want = HEADER_SIZE + plen
    if len(data) < want:
        raise TruncatedArtifactError(f"{where}: truncated: file has {len(data):,} bytes, header says {want:,}")
    if len(data) > want:
        raise CorruptedArtifactError(f"{where}: corrupted: {len(data) - want:,} trailing bytes after the payload")
    head = data[:_HEAD.size]
    stored = data[_HEAD.size:HEADER_SIZE]
    payload = data[HEADER_SIZE:]
    if _digest(head, payload) != stored:
        raise CorruptedArtifactError(f"{where}: corrupted: checksum mismatch (blake2b of header+payload)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=rlen)
    except zstandard.ZstdError as e:
        raise CorruptedArtifactError(f"{where}: corrupted: zstd decode failed ({e})") from None
    if len(raw) != rlen:
        raise CorruptedArtifactError(f"{where}: corrupted: payload decodes to {len(raw):,} bytes, header says {rlen:,}")
    return version, raw


def unpack_artifact(data: bytes, where: str = "<memory>", expect: Mapping[str, Any] | None = None,
                    budget: int | None = None, code_bytes: int | None = None,
                    dtype: torch.dtype | None = torch.float32) -> LoadedArtifact:
    """Decode artifact bytes (see `load_artifact`)."""
    version, raw = _parse(data, where)
    try:
        (ilen,) = struct.unpack_from("<Q", raw, 0)
        index = json.loads(raw[8:8 + ilen].decode("utf-8"))
        blob = memoryview(raw)[8 + ilen:]
        q_arrays: dict[str, torch.Tensor] = {}
        extras: dict[str, torch.Tensor] = {}
        for group, key, dt, shape, off, nb in index["arrays"]:
            if off + nb > len(blob):
                raise ValueError(f"array {key!r} runs past the end of the payload")
            t = _tensor_from(blob[off:off + nb], dt, shape)
            (q_arrays if group == "q" else extras)[key] = t
        qstate = QuantizedState(entries=index["tensors"], arrays=q_arrays,
                                config=QuantConfig.from_dict(index["quant_config"]))
        for name, e in qstate.entries.items():
            missing = [k for k in e["arrays"] if k not in q_arrays]
            if missing:
                raise ValueError(f"tensor {name!r} lacks arrays {missing}")
        config, meta = index["config"], index["meta"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error, RuntimeError) as e:
        raise CorruptedArtifactError(f"{where}: corrupted: payload index unreadable ({e})") from None
    check_expect(config, expect, where)
    state = dequantize_state_dict(qstate, dtype=dtype)
    by_kind, raw_param_bytes = _byte_table(qstate, extras, ilen)
    report = ArtifactReport(raw_param_bytes=raw_param_bytes, quantized_bytes=len(raw), compressed_bytes=len(data),
                            code_bytes=default_code_bytes() if code_bytes is None else int(code_bytes),
                            budget=DEFAULT_BUDGET if budget is None else int(budget), by_kind=by_kind, path=where)
    if budget is not None and not report.within_budget:
        raise OverBudgetError(f"{where}: artifact over budget: {report.total_bytes:,} bytes "
                              f"(compressed {report.compressed_bytes:,} + code {report.code_bytes:,}) "
                              f"> budget {report.budget:,}", report)
    return LoadedArtifact(config=config, state_dict=state, extras=extras, meta=meta, report=report,
                          quantized=qstate, version=version)


def load_artifact(path: str | os.PathLike, expect: Mapping[str, Any] | None = None, budget: int | None = None,
                  code_bytes: int | None = None, dtype: torch.dtype | None = torch.float32) -> LoadedArtifact:
    """Read, verify and dequantize an artifact.

    `expect` (e.g. {"vocab_size": 1024}) -> ConfigMismatchError on disagreement. `budget` given -> raise
    OverBudgetError if compressed + code bytes exceed it (otherwise the report just records it).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: artifact file does not exist") from None
    return unpack_artifact(data, str(path), expect=expect, budget=budget, code_bytes=code_bytes, dtype=dtype)
