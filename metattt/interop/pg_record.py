"""Parameter Golf record models (the PR #549 family's ``train_gpt.py``) <-> metattt artifacts.

The record writes ``final_model.pt`` (the raw post-EMA state dict, banked names) and ``final_model.int6.ptz``
(``lzma(torch.save({"w", "m"}))``: un-banked per-layer names, int6 ``.q`` + fp16 per-row ``.scale``, int8 rows
for the embeddings, fp16 passthrough for small tensors). Both import here; the int6 file's integers and scales
are stored as they are (the record clamps row scales to >= 1/31, so re-quantizing would move clamped rows).

The mapping is one table (``_plan``) read in both directions, and each direction checks that every source
tensor is used exactly once and every target tensor is filled with the right shape. Two transforms make the
functions equal: the record rotates RoPE the other way (negating dims [rope_dims/2, rope_dims) of every head's
rows of W_q and W_k gives identical attention scores: an exact sign fold), and our one ``ve_scales`` vector is the
record's ``ve_shared.scale * ve_layer_scales[j]``. Imported configs set ``rope_ntk_len=1024`` (the record's
``Rotary(train_seq_len=1024)``). The record dequantizes each tensor back to the dtype its model holds it in, bf16
for the embedding tables (``RECORD_BF16``); import marks those entries ``round_to="bfloat16"`` so the imported
weights are the record's, value for value. docs/interop.md has the table and the facts.
"""
from __future__ import annotations

import hashlib
import io
import lzma
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..artifact.quant import QuantizedState, quantize_state_dict
from ..model.config import ModelConfig, pg_2026_03_23
from ..model.gpt import BankedGPT

BANKED = {  # record per-layer matrix -> (our bank, offset in units of L)
    "attn.c_q": ("qo_bank", 0), "attn.proj": ("qo_bank", 1),
    "attn.c_k": ("kv_bank", 0), "attn.c_v": ("kv_bank", 1),
    "mlp.fc": ("mlp_up_bank", 0), "mlp.proj": ("mlp_down_bank", 0),
}
RECORD_BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
ROPE_FOLDED = ("attn.c_q", "attn.c_k")
# the record's nn.Embedding weights: its eval model is ``GPT(...).bfloat16()`` with banks, CastedLinear weights,
# vectors and control tensors put back to float32, so these three stay bf16, and its dequantization casts every
# int8 row (and any fp16 passthrough) of them to bf16: import rounds them the same way ("round_to")
RECORD_BF16 = ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")
RECORD_XSA_LAST_N = 4  # the record's defaults for what a state dict cannot tell
RECORD_ROPE_DIMS = 16
RECORD_NTK_LEN = 1024


class RecordFormatError(ValueError):
    """A record file that does not map onto a metattt model (names every offending key)."""


@dataclass
class Source:
    """One source tensor: float ``data``, or int ``q`` + per-row ``scale`` (``qmax`` 31 for int6, 127 int8)."""

    data: torch.Tensor | None = None
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    qmax: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple((self.data if self.data is not None else self.q).shape)

    def float(self) -> torch.Tensor:
        if self.data is not None:
            return self.data.float()
        return self.q.float() * self.scale.float().reshape(-1, *([1] * (self.q.dim() - 1)))


@dataclass
class RecordModel:
    """A record file read into per-layer sources (banks of ``final_model.pt`` are un-banked on read)."""

    path: str
    kind: str  # "int6.ptz" | "state_dict"
    sources: dict[str, Source]
    sha256: str


@dataclass
class Imported:
    """What ``import_record`` returns: the config, the quantized state to store and the mapping report."""

    config: ModelConfig
    qstate: QuantizedState
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (source keys, target, transform)
    source: RecordModel | None = None


# --------------------------------------------------------------------------------------------------- reading
def _torch_load(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle / zip errors have many types; one clear message
        raise RecordFormatError(f"{where}: not a torch.save file of tensors ({type(e).__name__}: {e})") from None


def read_record(path: str | os.PathLike) -> RecordModel:
    """Read ``final_model.int6.ptz`` (lzma + {"w", "m"}) or a raw record state dict (``final_model.pt``)."""
    p = Path(path)
    if p.is_dir():
        raise RecordFormatError(f"{p}: is a directory, expected a record model file "
                                "(final_model.pt or final_model.int6.ptz)")
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: record model file does not exist") from None
    digest = hashlib.sha256(raw).hexdigest()
    if raw[:6] == b"\xfd7zXZ\x00":
        try:
            raw = lzma.decompress(raw)
        except lzma.LZMAError as e:
            raise RecordFormatError(f"{p}: corrupted lzma stream ({e})") from None
        obj = _torch_load(raw, str(p))
        if not (isinstance(obj, dict) and set(obj) == {"w", "m"}):
            raise RecordFormatError(f"{p}: lzma payload is not the record's {{'w', 'm'}} dict "
                                    f"(keys {sorted(obj) if isinstance(obj, dict) else type(obj).__name__})")
        return RecordModel(str(p), "int6.ptz", _int6_sources(obj["w"], obj["m"], str(p)), digest)
    obj = _torch_load(raw, str(p))
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RecordFormatError(f"{p}: expected a state dict of tensors (the record's final_model.pt)")
    return RecordModel(str(p), "state_dict", _state_sources(obj, str(p)), digest)


def _int6_sources(w: Mapping[str, torch.Tensor], m: Mapping[str, Any], where: str) -> dict[str, Source]:
    out: dict[str, Source] = {}
    used: set[str] = set()
    problems = []
    for name, info in m.items():
        if info in ("passthrough", "passthrough_ctrl", "passthrough_fp16"):
            if name not in w:
                problems.append(f"{name}: meta says passthrough but the tensor is absent")
                continue
            out[name] = Source(data=w[name])
            used.add(name)
        elif isinstance(info, dict) and info.get("type") in ("int6", "int8"):
            qk, sk = name + ".q", name + ".scale"
            if qk not in w or sk not in w:
                problems.append(f"{name}: meta says {info['type']} but {qk} / {sk} is absent")
                continue
            q, s = w[qk], w[sk]
            if q.dtype != torch.int8 or s.dim() != 1 or s.numel() != q.shape[0]:
                problems.append(f"{name}: expected int8 rows + one scale per row, got {q.dtype}{list(q.shape)} "
                                f"and scale {list(s.shape)}")
                continue
            out[name] = Source(q=q, scale=s, qmax=31 if info["type"] == "int6" else 127)
            used |= {qk, sk}
        else:
            problems.append(f"{name}: unknown quantization meta {info!r}")
    stray = sorted(set(w) - used)
    if stray:
        problems.append(f"tensors without meta: {stray}")
    if problems:
        raise RecordFormatError(f"{where}: unreadable record int6 file: " + "; ".join(problems))
    return out


def _state_sources(sd: Mapping[str, torch.Tensor], where: str) -> dict[str, Source]:
    """Un-bank the record's 3-D banks into its per-layer names, so both file kinds share one mapping."""
    out: dict[str, Source] = {}
    for name, t in sd.items():
        if name in RECORD_BANKS:
            if t.dim() != 3:
                raise RecordFormatError(f"{where}: {name} has shape {list(t.shape)}, expected a 3-D bank")
            for leaf, (bank, off) in BANKED.items():
                if bank != name:
                    continue
                n = t.shape[0] if bank.startswith("mlp") else t.shape[0] // 2
                for i in range(n):
                    out[f"blocks.{i}.{leaf}.weight"] = Source(data=t[off * n + i])
        else:
            out[name] = Source(data=t)
    return out


# --------------------------------------------------------------------------------------------------- config
def infer_config(sources: Mapping[str, Source], overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """Our config for a record model: shapes from the tensors, the rest from the record's defaults."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in sources:
            raise RecordFormatError(f"record model lacks {name!r}: cannot infer the architecture")
        return sources[name].shape

    layers = sorted(int(k.split(".")[1]) for k in sources if k.startswith("blocks.") and k.endswith(".attn.c_q.weight"))
    if not layers or layers != list(range(len(layers))):
        raise RecordFormatError(f"record model has attention layers {layers}, expected blocks 0..L-1")
    n_layers = len(layers)
    d = shape("blocks.0.attn.c_q.weight")[1]
    heads = shape("blocks.0.attn.q_gain")[0]
    kv_dim = shape("blocks.0.attn.c_k.weight")[0]
    vocab, d_emb = shape("tok_emb.weight")
    if d_emb != d or d % heads or kv_dim % (d // heads):
        raise RecordFormatError(f"record shapes disagree: tok_emb dim {d_emb}, model dim {d}, {heads} heads, "
                                f"kv dim {kv_dim}")
    n_ve = sum(1 for k in sources if k.startswith("ve_layer_scales."))
    kw: dict[str, Any] = dict(
        vocab_size=vocab, num_layers=n_layers, model_dim=d, num_heads=heads, num_kv_heads=kv_dim // (d // heads),
        mlp_mult=shape("blocks.0.mlp.fc.weight")[0] / d, rope_dims=RECORD_ROPE_DIMS, rope_ntk_len=RECORD_NTK_LEN,
        xsa_layers=tuple(range(max(0, n_layers - RECORD_XSA_LAST_N), n_layers)),
        ve_layers=tuple(range(n_layers - n_ve, n_layers)), tie_embeddings="lm_head.weight" not in sources,
        bigram_vocab=shape("bigram.embed.weight")[0] if "bigram.embed.weight" in sources else 0,
    )
    if kw["bigram_vocab"]:
        kw["bigram_dim"] = shape("bigram.embed.weight")[1]
    if n_ve:
        kw["ve_dim"] = shape("ve_shared.embed.weight")[1]
    if float(kw["mlp_mult"]).is_integer():
        kw["mlp_mult"] = float(kw["mlp_mult"])
    known = {f.name for f in fields(ModelConfig)}
    for k, v in (overrides or {}).items():
        if k not in known:
            raise RecordFormatError(f"--set {k}: not a ModelConfig field (valid: {', '.join(sorted(known))})")
        kw[k] = tuple(v) if isinstance(v, list) else v
    try:
        return replace(pg_2026_03_23(), **kw)
    except ValueError as e:
        raise RecordFormatError(f"record model does not fit a metattt config: {e}") from None


def _check_exportable(cfg: ModelConfig) -> list[str]:
    """What the record script cannot express (export refuses these)."""
    n = cfg.num_layers
    return [what for unfit, what in (
        (cfg.recur_start is not None or cfg.recur_times != 1, "depth recurrence"),
        (cfg.parallel_start is not None, "parallel attention/MLP blocks"),
        (not cfg.smear_gate, "no SmearGate"), (not cfg.unet_skips, "no U-Net skips"),
        (tuple(cfg.xsa_layers) != tuple(range(n - len(cfg.xsa_layers), n)),
         f"XSA layers {list(cfg.xsa_layers)} are not the last k"),
        (cfg.leaky_slope != 0.5, f"leaky slope {cfg.leaky_slope} (the record's MLP hard-codes 0.5)")) if unfit]


# --------------------------------------------------------------------------------------------------- the table
def _plan(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, str]]:
    """(record keys, our tensor, transform): the one mapping both directions read."""
    n = cfg.num_layers
    rows: list[tuple[tuple[str, ...], str, str]] = [(("tok_emb.weight",), "tok_emb", "copy")]
    for bank in RECORD_BANKS:
        keys = []
        for leaf, (b, off) in BANKED.items():
            if b == bank:
                keys += [(off, i, f"blocks.{i}.{leaf}.weight") for i in range(n)]
        keys.sort()
        folded = [k for _, _, k in keys if any(f".{leaf}." in k for leaf in ROPE_FOLDED)]
        rows.append((tuple(k for _, _, k in keys), bank, "stack+rope_fold" if folded else "stack"))
    for i in range(n):
        for leaf in ("attn_scale", "mlp_scale", "resid_mix"):
            rows.append(((f"blocks.{i}.{leaf}",), f"blocks.{i}.{leaf}", "copy"))
        rows.append(((f"blocks.{i}.attn.q_gain",), f"blocks.{i}.q_gain", "copy"))
    if cfg.unet_skips:
        rows.append((("skip_weights",), "skip_weights", "copy"))
    if cfg.smear_gate:
        rows.append((("smear.gate",), "smear_gate", "copy"))
    if cfg.bigram_vocab:
        rows += [(("bigram.embed.weight",), "bigram_emb", "copy"), (("bigram.proj.weight",), "bigram_proj", "copy"),
                 (("bigram.scale",), "bigram_scale", "reshape")]
    if cfg.ve_layers:
        rows += [(("ve_shared.embed.weight",), "ve_emb", "copy"), (("ve_shared.proj.weight",), "ve_proj", "copy"),
                 (("ve_shared.scale",) + tuple(f"ve_layer_scales.{j}" for j in range(len(cfg.ve_layers))),
                  "ve_scales", "product")]
    if not cfg.tie_embeddings:
        rows.append((("lm_head.weight",), "lm_head", "copy"))
    return rows


def rope_fold_rows(cfg: ModelConfig, out_features: int) -> torch.Tensor:
    """Row mask (True = negate) of a Q or K matrix: dims [rope_dims/2, rope_dims) of every head."""
    hd, rd = cfg.head_dim, cfg.rope_dims
    col = torch.arange(out_features) % hd
    return (col >= rd // 2) & (col < rd)


def _fold(cfg: ModelConfig, key: str, t: torch.Tensor) -> torch.Tensor:
    if not any(f".{leaf}." in key for leaf in ROPE_FOLDED):
        return t
    sign = torch.where(rope_fold_rows(cfg, t.shape[0]), -1, 1).to(t.dtype)
    return t * sign.reshape(-1, *([1] * (t.dim() - 1)))


# --------------------------------------------------------------------------------------------------- import
def _data_entry(qs: QuantizedState, name: str, data: torch.Tensor, shape: tuple[int, ...]) -> None:
    scheme = "fp16" if data.dtype == torch.float16 else "fp32"
    qs.arrays[f"{name}.data"] = data.to(torch.float16 if scheme == "fp16" else torch.float32).reshape(shape).contiguous()
    qs.entries[name] = {"scheme": scheme, "shape": list(shape), "dtype": "float32", "arrays": [f"{name}.data"]}


def _rows_entry(qs: QuantizedState, name: str, q: torch.Tensor, s: torch.Tensor, shape: tuple[int, ...],
                qmax: int) -> None:
    qs.arrays[f"{name}.q"] = q.reshape(-1, shape[-1]).contiguous()
    qs.arrays[f"{name}.scale"] = s.to(torch.float16).reshape(-1).contiguous()
    qs.entries[name] = {"scheme": "int6_row" if qmax == 31 else "int8_row", "shape": list(shape), "dtype": "float32",
                        "arrays": [f"{name}.q", f"{name}.scale"], "qmax": qmax, "rel_err": 0.0}


def map_record(rec: RecordModel, cfg: ModelConfig) -> Imported:
    """Map every source tensor onto ``cfg``'s model: integers kept as they are, floats through our quantizer."""
    want = {n: tuple(t.shape) for n, t in BankedGPT(cfg).state_dict().items()}
    src = rec.sources
    problems: list[str] = []
    used: dict[str, str] = {}
    floats: dict[str, torch.Tensor] = {}
    qs = QuantizedState()
    rows = []
    for keys, target, how in _plan(cfg):
        missing = [k for k in keys if k not in src]
        if missing:
            problems.append(f"missing {missing} (for {target})")
            continue
        for k in keys:
            used[k] = target
        parts = [src[k] for k in keys]
        shape = want.get(target)
        if shape is None:
            problems.append(f"{target}: not a tensor of the model built from the inferred config")
            continue
        rows.append((", ".join(keys) if len(keys) <= 3 else f"{keys[0]} … {keys[-1]} ({len(keys)} keys)", target,
                     how))
        if how.startswith("stack"):
            if any(p.shape != shape[1:] for p in parts):
                bad = [f"{k}: {list(p.shape)}" for k, p in zip(keys, parts) if p.shape != shape[1:]]
                problems.append(f"mis-shaped for {target} slices {list(shape[1:])}: {bad}")
                continue
            if all(p.q is not None and p.qmax == 31 for p in parts):  # the int6 grid survives exactly
                q = torch.stack([_fold(cfg, k, p.q) for k, p in zip(keys, parts)])
                s = torch.cat([p.scale for p in parts])
                _rows_entry(qs, target, q, s, shape, 31)
            else:  # raw weights (final_model.pt) or mixed storage: float, then our quantizer
                floats[target] = torch.stack([_fold(cfg, k, p.float()) for k, p in zip(keys, parts)])
                rows[-1] = (rows[-1][0], target, how + " (requantized by metattt)")
            continue
        if how == "product":
            vals = [p.float().reshape(-1) for p in parts]
            if any(v.numel() != 1 for v in vals):
                problems.append(f"{target}: expected scalar VE scales, got {[list(p.shape) for p in parts]}")
                continue
            prod = torch.cat([vals[0] * v for v in vals[1:]])
            if tuple(prod.shape) != shape:
                problems.append(f"{target}: {prod.numel()} layer scales for shape {list(shape)}")
                continue
            _data_entry(qs, target, prod, shape)
            continue
        p = parts[0]
        if (how == "copy" and p.shape != shape) or (how == "reshape" and math.prod(p.shape) != math.prod(shape)):
            problems.append(f"{keys[0]}: shape {list(p.shape)}, expected {list(shape)} for {target}")
            continue
        if p.q is not None:
            _rows_entry(qs, target, p.q, p.scale, shape, p.qmax)
        elif p.data.dtype == torch.float16 and rec.kind == "int6.ptz":
            _data_entry(qs, target, p.data, shape)  # the record's fp16 passthrough, bit-exact
        else:
            floats[target] = p.data.float().reshape(shape)
            continue
        if rec.kind == "int6.ptz" and keys[0] in RECORD_BF16:
            qs.entries[target]["round_to"] = "bfloat16"
            rows[-1] = (rows[-1][0], target, how + " (rounded to bf16, as the record dequantizes it)")
    unknown = sorted(set(src) - set(used))
    if unknown:
        problems.append(f"unknown keys (no metattt tensor takes them): {unknown}")
    unfilled = sorted(set(want) - set(qs.entries) - set(floats))
    if unfilled and not problems:
        problems.append(f"model tensors left empty: {unfilled}")
    if problems:
        raise RecordFormatError(f"{rec.path}: cannot import: " + "; ".join(problems))
    if floats:
        fq = quantize_state_dict(floats, qs.config)
        qs.entries.update(fq.entries)
        qs.arrays.update(fq.arrays)
    qs.entries = {n: qs.entries[n] for n in want}  # the model's state-dict order
    return Imported(cfg, qs, rows, rec)


def ve_factors(imp: Imported) -> dict[str, Any] | None:
    """The record's value-embedding scale factors, ``{"shared": s, "layers": [l_i, ...]}``, or None without VE.
    Import stores only their products (``ve_scales``, the plan's "product" row, whose keys name the factors); the
    record's TTT steps the factors, which ``--compat pg-record`` reproduces from these (``metattt.eval.compat``)."""
    keys = next((k for k, _, how in _plan(imp.config) if how == "product"), None)
    if keys is None or imp.source is None:
        return None
    shared, *layers = (imp.source.sources[k].float().reshape(()).item() for k in keys)
    return {"shared": shared, "layers": layers}


def import_record(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Imported:
    rec = read_record(path)
    return map_record(rec, infer_config(rec.sources, overrides))


# --------------------------------------------------------------------------------------------------- export
def export_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our float state dict -> the record's banked ``final_model.pt`` names and shapes (float32)."""
    bad = _check_exportable(cfg)
    if bad:
        raise RecordFormatError("the record script cannot express this model: " + "; ".join(bad))
    out: dict[str, torch.Tensor] = {}
    for keys, target, how in _plan(cfg):
        t = state[target].detach().float().cpu()
        if how.startswith("stack"):  # keys are in bank-slice order; the fold is its own inverse
            out[target] = torch.stack([_fold(cfg, k, t[i]) for i, k in enumerate(keys)])
        elif how == "product":
            out[keys[0]] = torch.tensor(1.0)
            for j, k in enumerate(keys[1:]):
                out[k] = t[j].reshape(1).clone()
        elif how == "reshape":
            out[keys[0]] = t.reshape(()).clone()
        else:
            out[keys[0]] = t.clone()
    return out


def record_env(cfg: ModelConfig) -> dict[str, str]:
    """The record script's environment variables for this architecture (printed by export-pg)."""
    env = {"VOCAB_SIZE": cfg.vocab_size, "NUM_LAYERS": cfg.num_layers, "MODEL_DIM": cfg.model_dim,
           "NUM_HEADS": cfg.num_heads, "NUM_KV_HEADS": cfg.num_kv_heads, "MLP_MULT": cfg.mlp_mult,
           "ROPE_DIMS": cfg.rope_dims, "ROPE_BASE": cfg.rope_base, "LOGIT_SOFTCAP": cfg.logit_softcap,
           "XSA_LAST_N": len(cfg.xsa_layers), "BIGRAM_VOCAB_SIZE": cfg.bigram_vocab, "BIGRAM_DIM": cfg.bigram_dim,
           "VE_ENABLED": int(bool(cfg.ve_layers)), "VE_DIM": cfg.ve_dim,
           "VE_LAYERS": ",".join(str(i) for i in cfg.ve_layers), "LN_SCALE": int(cfg.ln_scale),
           "TIE_EMBEDDINGS": int(cfg.tie_embeddings)}
    return {k: str(v) for k, v in env.items()}
