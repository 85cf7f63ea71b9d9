"""Typed model configuration: one dataclass describes every architectural switch of the banked GPT."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a banked GPT.

    Layer lists (``xsa_layers``, ``ve_layers``) name *physical* layers; depth recurrence re-runs physical
    layers ``recur_start..recur_end-1`` ``recur_times`` times in total, reusing their bank slices.
    """

    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    rope_dims: int = 16
    rope_base: float = 10000.0
    # dynamic NTK RoPE as the record scripts build it (``Rotary(train_seq_len=1024)``): a forward over T >
    # rope_ntk_len tokens uses base ``rope_base * (T / rope_ntk_len) ** (rope_dims / (rope_dims - 2))``. The
    # record trains and scores at T = 2048, i.e. base 22081.79; None (our default) keeps ``rope_base`` at every T
    rope_ntk_len: int | None = None
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    ln_scale: bool = True
    xsa_layers: tuple[int, ...] = (7, 8, 9, 10)
    ve_layers: tuple[int, ...] = (9, 10)
    ve_dim: int = 128
    bigram_vocab: int = 1536
    bigram_dim: int = 128
    smear_gate: bool = True
    unet_skips: bool = True
    leaky_slope: float = 0.5
    recur_start: int | None = None
    recur_end: int | None = None
    recur_times: int = 1
    parallel_start: int | None = None
    tie_embeddings: bool = True
    init_std: float = 0.005
    bos_id: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.model_dim % self.num_heads:
            problems.append(f"model_dim {self.model_dim} not divisible by num_heads {self.num_heads}")
        elif self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        elif self.rope_dims > self.head_dim or self.rope_dims % 2:
            problems.append(f"rope_dims {self.rope_dims} must be even and <= head_dim {self.head_dim}")
        for name in ("xsa_layers", "ve_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if bad:
                problems.append(f"{name} {bad} outside 0..{self.num_layers - 1}")
        if (self.recur_start is None) != (self.recur_end is None):
            problems.append("recur_start and recur_end must be given together")
        elif (self.recur_start is not None and self.recur_end is not None
              and not 0 <= self.recur_start < self.recur_end <= self.num_layers):
            problems.append(f"recurrence range {self.recur_start}..{self.recur_end} invalid")
        if self.recur_times < 1:
            problems.append("recur_times must be >= 1")
        if self.rope_ntk_len is not None and (self.rope_ntk_len < 1 or self.rope_dims <= 2):
            problems.append(f"rope_ntk_len {self.rope_ntk_len} needs a positive length and rope_dims > 2")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def rope_base_at(self, t: int) -> float:
        """The RoPE base a forward over ``t`` tokens uses (``rope_base`` unless dynamic NTK applies)."""
        if self.rope_ntk_len is None or t <= self.rope_ntk_len:
            return self.rope_base
        rd = self.rope_dims
        return self.rope_base * (t / self.rope_ntk_len) ** (rd / (rd - 2))

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    def layer_schedule(self) -> list[int]:
        """Physical layer index of each virtual layer (depth recurrence repeats a range)."""
        layers = list(range(self.num_layers))
        if self.recur_start is None or self.recur_times == 1:
            return layers
        s, e = self.recur_start, self.recur_end
        return layers[:s] + layers[s:e] * self.recur_times + layers[e:]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["xsa_layers"] = list(self.xsa_layers)
        d["ve_layers"] = list(self.ve_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        kw = dict(d)
        for name in ("xsa_layers", "ve_layers"):
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)


def pg_2026_03_23() -> ModelConfig:
    """The public record's architecture (2026-03-23), as a metattt model.

    What differs from the record's ``train_gpt.py`` (docs/interop.md; ``python -m metattt import-pg`` maps a
    record model onto this config exactly): the RoPE rotation runs the other way (an exact sign fold of W_q/W_k,
    applied on import), the record's dynamic NTK base is off here (``rope_ntk_len=None``: base 10000 at every
    length; imported models set ``rope_ntk_len=1024``), one ``ve_scales`` vector holds the record's
    ``ve_shared.scale * ve_layer_scales``, and every table is float32 where the record keeps ``tok_emb``,
    ``bigram.embed`` and ``ve_shared.embed`` in bf16 (``legal_ttt.py --compat pg-record`` reproduces that).
    """
    return ModelConfig()


def tiny_synthetic(vocab_size: int = 256) -> ModelConfig:
    """A CPU-sized model for the embedded synthetic corpus (the main job's default)."""
    return ModelConfig(
        vocab_size=vocab_size, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
        rope_dims=16, xsa_layers=(3,), ve_layers=(3,), ve_dim=32, bigram_vocab=512, bigram_dim=32,
    )


# The scaling ladder of the ceiling study (issue 29): the record's block design at smaller depth and width.
# name -> (num_layers, model_dim); non-embedding parameters (tests/test_ladder_presets.py holds them exact):
# 616,866 / 1,186,442 / 2,032,946 / 4,186,170 / 8,369,035 (the record: 26,076,251).
LADDER_SHAPES: dict[str, tuple[int, int]] = {
    "0.6m": (4, 128), "1.2m": (5, 160), "2m": (6, 192), "4m": (7, 256), "8m": (9, 320),
}


def ladder(num_layers: int, model_dim: int) -> ModelConfig:
    """``pg_2026_03_23`` scaled: width and depth grow together (d/L ≈ 32-36, the record's 46 at the top), the
    record's 8 query / 4 KV heads (head_dim = d/8 >= 16 holds the 16 RoPE dims), MLP ×3, the same bigram and
    value-embedding tables, XSA on the last 4/11 and value embeddings on the last 2/11 of the layers (rounded,
    at least one)."""
    n = num_layers
    return ModelConfig(num_layers=n, model_dim=model_dim,
                       xsa_layers=tuple(range(n - max(1, round(4 * n / 11)), n)),
                       ve_layers=tuple(range(n - max(1, round(2 * n / 11)), n)))
