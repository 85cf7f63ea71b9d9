"""Post-training quantization of a state dict for the 16 MB artifact ("unbank -> quantize").

Schemes (one per tensor, chosen by `classify`):

* ``int6_row``  -- 3-D ``*_bank`` tensors. Every bank slice is a 2-D (out, in) matrix; each of its rows gets
  its own fp16 scale and int6 values in [-31, 31] stored in int8. Rows of consecutive slices are laid out
  contiguously (one int8 array per bank), so zstd sees long runs of the same small alphabet.
* ``int8_row``  -- other float tensors with ndim >= 2 and numel >= ``small_numel`` (tok_emb, bigram_emb,
  ve_emb, lm_head, large projections): per-row int8 in [-127, 127] with fp16 scales.
* ``fp32``      -- control tensors (name contains scale/gain/mix/skip/gate) and every 1-D float tensor. They
  are tiny, multiplicative and sensitive (q_gain, resid_mix, skip weights, ...), so we keep them bit-exact.
* ``fp16``      -- remaining small float tensors (numel < ``small_numel``), e.g. ve_proj at record size.
  Falls back to fp32 automatically if a value would overflow fp16.
* ``raw``       -- non-float tensors and names the caller marks ``exact`` (e.g. buffers): stored bit-exact in
  their original dtype.

The clip of each quantized row is chosen by trying a few quantiles of |w| (1.0 = max, i.e. no clipping, is
always a candidate) and keeping the one with the lowest reconstruction MSE, measured with the fp16-rounded
scale that is actually stored -- so clipping can never be worse than no clipping, row by row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): scales never round to 0
# an entry's optional "round_to": its dequantized values are rounded to this dtype (a model that stores the
# tensor in it, e.g. the record's bf16 embedding tables, computes with exactly those values)
ROUND_TO = ("bfloat16", "float16")


@dataclass(frozen=True)
class QuantConfig:
    """Knobs of the quantizer; the defaults are the artifact convention (see module docstring)."""

    bank_qmax: int = 31
    embed_qmax: int = 127
    small_numel: int = 65_536
    clip_quantiles: tuple[float, ...] = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
    embed_clip_search: bool = True
    control_patterns: tuple[str, ...] = ("scale", "gain", "mix", "skip", "gate")
    bank_suffix: str = "_bank"

    def __post_init__(self) -> None:
        for q in (self.bank_qmax, self.embed_qmax):
            if not 1 <= q <= 127:
                raise ValueError(f"QuantConfig: qmax must be in [1, 127] to fit int8, got {q}")
        if not self.clip_quantiles or any(not 0.0 < q <= 1.0 for q in self.clip_quantiles):
            raise ValueError(f"QuantConfig: clip_quantiles must be non-empty and in (0, 1], "
                             f"got {self.clip_quantiles}")
        if self.small_numel < 0:
            raise ValueError(f"QuantConfig: small_numel must be >= 0, got {self.small_numel}")

    def to_dict(self) -> dict[str, Any]:
        return {"bank_qmax": self.bank_qmax, "embed_qmax": self.embed_qmax, "small_numel": self.small_numel,
                "clip_quantiles": list(self.clip_quantiles), "embed_clip_search": self.embed_clip_search,
                "control_patterns": list(self.control_patterns), "bank_suffix": self.bank_suffix}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        d = dict(d)
        for k in ("clip_quantiles", "control_patterns"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class QuantizedState:
    """Quantized state dict: flat named arrays plus JSON-able per-tensor metadata.

    ``entries[name]`` = {"scheme", "shape", "dtype", "arrays": [keys into ``arrays``], "rel_err"}; for row
    schemes the arrays are ``{name}.q`` (int8, 2-D rows) and ``{name}.scale`` (fp16, one per row); for the
    other schemes ``{name}.data``. Entry order is the state-dict order.
    """

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    config: QuantConfig = field(default_factory=QuantConfig)

    def stored_bytes(self, name: str) -> int:
        return sum(_nbytes(self.arrays[k]) for k in self.entries[name]["arrays"])


# --------------------------------------------------------------------------------------------- bank <-> rows
def to_rows(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as 2-D rows over its last dim.

    For a bank (n, out, in) this is the n slices (out, in) stacked: rows [i*out, (i+1)*out) are slice i, so
    per-row quantization of the rows *is* per-row quantization of each unbanked slice, and the int values of
    a slice stay contiguous. The single helper used for both directions (see `from_rows`).
    """
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(-1, t.shape[-1])


def from_rows(rows: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of `to_rows`: re-bank rows into the original (e.g. 3-D bank) shape."""
    return rows.reshape(tuple(shape))


# ------------------------------------------------------------------------------------------- classification
def is_control(name: str, cfg: QuantConfig) -> bool:
    leaf = name.lower()
    return any(p in leaf for p in cfg.control_patterns)


def classify(name: str, t: torch.Tensor, cfg: QuantConfig, exact: Iterable[str] = ()) -> str:
    """Pick the storage scheme of one tensor (documented in the module docstring)."""
    if name in set(exact) or not t.is_floating_point():
        return "raw"
    if t.dim() == 3 and name.endswith(cfg.bank_suffix) and t.numel() > 0:
        return "int6_row"
    if is_control(name, cfg) or t.dim() <= 1:
        return "fp32"
    if t.numel() < cfg.small_numel:
        return "fp16"
    return "int8_row"


# ------------------------------------------------------------------------------------------ row quantizers
def _row_quantiles(top_desc: torch.Tensor, n_cols: int, q: float) -> torch.Tensor:
    """Per-row linear-interpolated quantile of |w| (q=1.0 -> exact max), numpy/torch 'linear' convention.

    `top_desc` holds the k largest |w| of each row in descending order (k large enough for q, see
    `_topk_needed`): ascending position i of the full row is column n_cols-1-i of `top_desc`. Using topk
    instead of a full sort keeps quantizing a record-size model to a couple of seconds.
    """
    pos = q * (n_cols - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n_cols - 1)
    frac = pos - lo
    return top_desc[:, n_cols - 1 - lo] * (1.0 - frac) + top_desc[:, n_cols - 1 - hi] * frac


def _topk_needed(n_cols: int, qmin: float) -> int:
    return min(n_cols, n_cols - int(math.floor(qmin * (n_cols - 1))))


def _fp16_scale(clip: torch.Tensor, qmax: int) -> torch.Tensor:
    """Scale as it will be stored (fp16), returned in fp32 so quantization uses exactly the stored value."""
    s = (clip / qmax).clamp(min=FP16_TINY, max=FP16_MAX)
    return s.to(torch.float16).float()


def quantize_rows(w: torch.Tensor, qmax: int, quantiles: Iterable[float] = (1.0,),
                  name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of a 2-D tensor with an MSE-searched clip.

    Returns (q int8 (R, C) with values in [-qmax, qmax], scale fp16 (R,)). Dequantize with q * scale.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_rows({name}): expects 2-D rows, got shape {tuple(w.shape)}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"quantize_rows({name}): tensor contains NaN/inf; refusing to quantize")
    if w.abs().max() / qmax > FP16_MAX:
        raise ValueError(f"quantize_rows({name}): |w| up to {float(w.abs().max()):.3g} is too large "
                         f"for an fp16 scale")
    r, c = w.shape
    if r == 0 or c == 0:
        return (torch.zeros(r, c, dtype=torch.int8, device=w.device),
                torch.zeros(r, dtype=torch.float16, device=w.device))
    qs = sorted(set(float(q) for q in quantiles) | {1.0}, reverse=True)  # 1.0 first: wins ties
    top_desc = w.abs().topk(_topk_needed(c, min(qs)), dim=1, sorted=True).values
    best_s: torch.Tensor | None = None
    best_err: torch.Tensor | None = None
    for qu in qs:  # pick the per-row scale with the lowest error; materialize q once at the end
        s = _fp16_scale(_row_quantiles(top_desc, c, qu), qmax)
        x = (w / s[:, None]).round_().clamp_(-qmax, qmax)
        err = x.mul_(s[:, None]).sub_(w).square_().sum(dim=1)
        if best_s is None or best_err is None:  # the first quantile (set together)
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s = torch.where(better, s, best_s)
            best_err = torch.where(better, err, best_err)
    assert best_s is not None  # qs is never empty: it holds 1.0
    best_q = (w / best_s[:, None]).round_().clamp_(-qmax, qmax)
    return best_q.to(torch.int8), best_s.to(torch.float16)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(R, C) int8 * (R,) fp16 -> float32 rows."""
    return q.float() * scale.float()[:, None]


# ------------------------------------------------------------------------------------------ state dicts
def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: QuantConfig | None = None,
                        exact: Iterable[str] = ()) -> QuantizedState:
    """Quantize every tensor of a state dict by its scheme. `exact` names are stored bit-exact ('raw')."""
    cfg = cfg or QuantConfig()
    exact = set(exact)
    out = QuantizedState(config=cfg)
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"quantize_state_dict: {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()  # row quantization runs on t's device (fast on GPU); stored arrays go to CPU
        scheme = classify(name, t, cfg, exact)
        entry: dict[str, Any] = {"scheme": scheme, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        if scheme in ("int6_row", "int8_row"):
            qmax = cfg.bank_qmax if scheme == "int6_row" else cfg.embed_qmax
            search = scheme == "int6_row" or cfg.embed_clip_search
            rows = to_rows(t.float())
            q, s = quantize_rows(rows, qmax, cfg.clip_quantiles if search else (1.0,), name=name)
            out.arrays[f"{name}.q"] = q.cpu().contiguous()
            out.arrays[f"{name}.scale"] = s.cpu().contiguous()
            entry["arrays"] = [f"{name}.q", f"{name}.scale"]
            entry["qmax"] = qmax
            deq = dequantize_rows(q, s)
            denom = float(rows.square().sum())
            entry["rel_err"] = float((deq - rows).square().sum()) / denom if denom > 0 else 0.0
        else:
            if scheme == "fp16":
                data = t.to(torch.float16)
                if not torch.isfinite(data).all() and torch.isfinite(t).all():
                    scheme, data = "fp32", t.float()  # would overflow fp16
                    entry["scheme"] = scheme
            elif scheme == "fp32":
                data = t.float()
            else:
                data = t
            out.arrays[f"{name}.data"] = data.cpu().contiguous()
            entry["arrays"] = [f"{name}.data"]
        out.entries[name] = entry
    return out


def dequantize_state_dict(qs: QuantizedState, dtype: torch.dtype | None = torch.float32,
                          restore_dtype: bool = False) -> dict[str, torch.Tensor]:
    """Reverse `quantize_state_dict`: float tensors come back as `dtype` (float32 by default; the original
    dtype with restore_dtype=True), banks re-stacked to 3-D; 'raw' tensors come back bit-exact."""
    out: dict[str, torch.Tensor] = {}
    for name, e in qs.entries.items():
        shape = tuple(e["shape"])
        scheme = e["scheme"]
        if scheme in ("int6_row", "int8_row"):
            t = from_rows(dequantize_rows(qs.arrays[f"{name}.q"], qs.arrays[f"{name}.scale"]), shape)
        elif scheme in ("fp16", "fp32"):
            t = qs.arrays[f"{name}.data"].reshape(shape)
        elif scheme == "raw":
            out[name] = qs.arrays[f"{name}.data"].reshape(shape).clone()
            continue
        else:
            raise ValueError(f"dequantize_state_dict: unknown scheme {scheme!r} for {name!r}")
        if e.get("round_to"):  # values held in a lower precision by the model's source (imported record tables)
            if e["round_to"] not in ROUND_TO:
                raise ValueError(f"dequantize_state_dict: {name!r} rounds to {e['round_to']!r}, "
                                 f"expected one of {ROUND_TO}")
            t = t.to(getattr(torch, e["round_to"])).float()
        target = getattr(torch, e["dtype"]) if restore_dtype else dtype
        out[name] = t.to(target) if target is not None else t.clone()
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
