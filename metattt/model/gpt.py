"""Banked GPT: a functional forward over a dict of tensors, wrapped by a thin nn.Module.

Why banks: all attention and MLP matrices live in four 3-D tensors so Muon orthogonalises every layer in one
batched Newton-Schulz call, and inner loops can adapt copies of them by passing ``params=`` / ``banks=``
without touching the module.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import fp8, in_functorch_transform, qkv_prep
from .attention import causal_attention
from .config import ModelConfig

BANK_NAMES = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
# (bank, offset in units of L, kind): slice offset*L + i of `bank` is layer i's `kind` matrix.
BANK_LAYOUT = (
    ("qo_bank", 0, "q"), ("qo_bank", 1, "out"),
    ("kv_bank", 0, "k"), ("kv_bank", 1, "v"),
    ("mlp_up_bank", 0, "up"), ("mlp_down_bank", 0, "down"),
)
SLICE_KINDS = tuple(kind for _, _, kind in BANK_LAYOUT)
# per-row LoRA factors of ``gpt_forward(..., lora=)``, keyed "{q,k,v,out,mlp}.{layer}" and "head"
LoRA = Mapping[str, tuple[Tensor, Tensor]]


def lora_delta(x: Tensor, lora: LoRA | None, key: str) -> Tensor | None:
    """Per-row low-rank term ``(x_b @ A_b.T) @ B_b.T`` for x (B,T,in), A (B,r,in), B (B,out,r); None when absent.
    Two batched GEMMs through rank r: per-document weights are never materialised."""
    if not lora or key not in lora:
        return None
    a, b = lora[key]
    return torch.matmul(torch.matmul(x, a.transpose(1, 2).to(x.dtype)), b.transpose(1, 2).to(x.dtype))


@dataclass(frozen=True)
class Runtime:
    """How the forward runs, not what it computes: never stored in artifacts, free to differ between training
    and evaluation.

    ``residual_dtype="bfloat16"`` keeps the residual stream in the autocast dtype while autocast is on (halves
    the memory traffic of the norm/residual kernels that dominate a step's non-GEMM time; fp32 params stay the
    master copy). ``fused_qkv`` computes Q, K and V with one GEMM on the concatenated bank slices.
    ``fold_gains`` multiplies the per-channel ``attn_scale``/``mlp_scale`` into the rows of the out-projection
    and down-projection before the GEMM (the same function: ``s * (y @ W.T) == y @ (s[:, None] * W).T``), so the
    backward gets their gradients from the small weight gradient instead of a column sum over every token.
    ``qkv_kernel`` runs per-head norm, partial RoPE and q gain as one Triton kernel each way (CUDA, half
    precision, fused QKV only; ``metattt.kernels.qkv_prep``). The kernel has no double backward and does not
    run under torch.func transforms, so ``attn="math"`` (the twice-differentiable path second-order meta-learning
    uses) and ``torch.func.grad`` run plain torch throughout. ``record_casts`` rounds where the record scripts' bf16 modules do (their
    embedding tables are bf16 tensors, so the token and bigram embeddings and their sum are bf16; the smear gate is
    cast to bf16 before its sigmoid); ``attn`` is the backend of a forward called with ``attn="auto"``
    (``--compat pg-record`` pins the record's SDPA kernel).
    ``fp8`` runs the bank GEMMs (Q/K/V, out-projection, MLP up/down; forward and backward) with FP8 operands and
    dynamic per-tensor scales (``metattt.kernels.fp8``: FP8 tensor cores have twice the bf16 peak on H100); the
    fp32 banks and their gradients stay the master copy, and the embeddings, head, value-embedding/bigram
    projections and LoRA terms keep plain GEMMs. It changes the numerics (operands rounded to 3 or 2 mantissa
    bits), so it is opt-in; like ``qkv_kernel`` it has no double backward, so ``attn="math"`` and ``torch.func``
    transforms keep plain GEMMs, and shapes ``_scaled_mm`` cannot take (dims not multiples of 16) fall back to
    ``F.linear`` with a warning.
    """

    residual_dtype: str = "float32"
    lowp_softcap: bool = False  # soft cap in the autocast dtype, as the record scripts compute it (compat scoring)
    fused_qkv: bool = True
    fold_gains: bool = True
    qkv_kernel: bool = True
    record_casts: bool = False  # the record scripts' bf16 embedding sum and smear-gate cast (compat scoring)
    attn: str = "auto"
    fp8: bool = False  # bank GEMMs with FP8 operands (see above); default off: bit-for-bit the plain forward

    def __post_init__(self) -> None:
        from .attention import ATTN_BACKENDS

        if self.residual_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"residual_dtype must be 'float32' or 'bfloat16', got {self.residual_dtype!r}")
        if self.attn not in ATTN_BACKENDS:
            raise ValueError(f"runtime attn must be one of {ATTN_BACKENDS}, got {self.attn!r}")


def bank_slice_index(cfg: ModelConfig, kind: str, layer: int) -> tuple[str, int]:
    """(bank name, slice index) holding layer ``layer``'s ``kind`` matrix."""
    for bank, offset, k in BANK_LAYOUT:
        if k == kind:
            return bank, offset * cfg.num_layers + layer
    raise ValueError(f"unknown slice kind {kind!r}; choose from {SLICE_KINDS}")


def _rms(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rope_tables(cfg: ModelConfig, t: int, device: torch.device, base: float | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin (1,T,1,rope_dims/2) for partial RoPE; cached by the module so compiled graphs take them as inputs.
    ``base`` defaults to the one a forward over ``t`` tokens uses (``cfg.rope_base_at(t)``)."""
    half = max(cfg.rope_dims // 2, 1)
    base = cfg.rope_base_at(t) if base is None else base
    inv = 1.0 / (base ** (torch.arange(0, 2 * half, 2, device=device, dtype=torch.float32) / (2 * half)))
    ang = torch.outer(torch.arange(t, device=device, dtype=torch.float32), inv)
    return ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]


def _rope(x: Tensor, rope_dims: int, tables: tuple[Tensor, Tensor]) -> Tensor:
    """Rotary embedding on the first ``rope_dims`` dims of each head (partial RoPE); x (B,T,H,D)."""
    if rope_dims == 0:
        return x
    cos, sin = (t.to(x.dtype) for t in tables)
    rot, rest = x[..., :rope_dims], x[..., rope_dims:]
    a, b = rot[..., : rope_dims // 2], rot[..., rope_dims // 2:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos, rest), dim=-1)


def bigram_hash(tokens: Tensor, buckets: int) -> Tensor:
    """Hash of (previous token, token) into ``buckets - 1`` buckets; the last bucket marks sequence starts."""
    prev = F.pad(tokens[:, :-1], (1, 0), value=0)
    h = torch.bitwise_xor(36313 * tokens, 27191 * prev) % (buckets - 1)
    h[:, 0] = buckets - 1
    return h


def _bank_linear(rt: Runtime, attn: str, x: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The GEMM for a bank slice: ``fp8.fp8_linear`` under ``rt.fp8`` where a once-differentiable plain-autograd
    op may run (not the twice-differentiable ``attn="math"`` path, not inside ``torch.func``), else ``F.linear``."""
    if rt.fp8 and attn != "math" and not in_functorch_transform(x):
        return fp8.fp8_linear
    return F.linear


def _qkv(cfg: ModelConfig, p: Mapping[str, Tensor], h: Tensor, layer: int, lora: LoRA | None = None,
         mm: Callable[[Tensor, Tensor], Tensor] = F.linear) -> tuple[Tensor, ...]:
    nl = cfg.num_layers
    out = (mm(h, p["qo_bank"][layer]), mm(h, p["kv_bank"][layer]), mm(h, p["kv_bank"][nl + layer]))
    if not lora:
        return out
    return tuple(o if d is None else o + d for o, d in
                 zip(out, (lora_delta(h, lora, f"{kind}.{layer}") for kind in ("q", "k", "v"))))


def _qkv_lora(h: Tensor, lora: LoRA | None, layer: int, qkv: Tensor, dims: tuple[int, int, int]) -> Tensor:
    """Fused Q/K/V output plus the per-row LoRA terms (zeros where a target has none)."""
    ds = [lora_delta(h, lora, f"{kind}.{layer}") for kind in ("q", "k", "v")]
    if all(d is None for d in ds):
        return qkv
    return qkv + torch.cat([qkv.new_zeros(*qkv.shape[:-1], n) if d is None else d for d, n in zip(ds, dims)], -1)


def _attention(cfg: ModelConfig, p: Mapping[str, Tensor], h: Tensor, layer: int, tokens: Tensor,
               attn: str, rope: tuple[Tensor, Tensor], rt: Runtime, gain: Tensor | None = None,
               lora: LoRA | None = None) -> Tensor:
    """Attention branch; ``gain`` (d,) scales the output channels inside the out-projection's weight."""
    b, t, _ = h.shape
    nl, hd, nh, nkv = cfg.num_layers, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q_gain = p[f"blocks.{layer}.q_gain"]
    mm = _bank_linear(rt, attn, h)
    qkv = mm(h, torch.cat((p["qo_bank"][layer], p["kv_bank"][layer], p["kv_bank"][nl + layer]))) \
        if rt.fused_qkv else None  # one GEMM reads h once (and one dgrad GEMM in backward)
    if lora and qkv is not None:
        qkv = _qkv_lora(h, lora, layer, qkv, (cfg.model_dim, cfg.kv_dim, cfg.kv_dim))
    if (qkv is not None and rt.qkv_kernel and attn != "math" and qkv_prep.available(qkv, hd, cfg.rope_dims)
            and not in_functorch_transform(qkv)):
        q, k, v = qkv_prep.qkv_prep(qkv, rope[0][0, :, 0], rope[1][0, :, 0], q_gain, nh, nkv, cfg.rope_dims)
    else:
        q, k, v = _qkv(cfg, p, h, layer, lora, mm) if qkv is None else \
            qkv.split((cfg.model_dim, cfg.kv_dim, cfg.kv_dim), dim=-1)
        q = _rope(_rms(q.reshape(b, t, nh, hd)), cfg.rope_dims, rope) * q_gain.to(q.dtype)[None, None, :, None]
        k = _rope(_rms(k.reshape(b, t, nkv, hd)), cfg.rope_dims, rope)
        v = v.reshape(b, t, nkv, hd)
    if layer in cfg.ve_layers:
        j = cfg.ve_layers.index(layer)
        ve = F.linear(F.embedding(tokens, p["ve_emb"]), p["ve_proj"])
        v = v + p["ve_scales"][j].to(v.dtype) * ve.to(v.dtype).view(b, t, nkv, hd)
    y = causal_attention(q, k, v, attn)
    if layer in cfg.xsa_layers:
        # Exclusive self-attention: remove the component of each head's output along its own value vector.
        g = cfg.num_heads // cfg.num_kv_heads
        yg = y.view(b, t, cfg.num_kv_heads, g, hd)
        vn = F.normalize(v, dim=-1).unsqueeze(3)
        y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(b, t, cfg.num_heads, hd)
    y = y.reshape(b, t, cfg.model_dim)
    out = mm(y, _scaled_rows(p["qo_bank"][nl + layer], gain))
    d = lora_delta(y, lora, f"out.{layer}")
    return out if d is None else out + (d if gain is None else gain.to(d.dtype) * d)


def _scaled_rows(w: Tensor, gain: Tensor | None) -> Tensor:
    return w if gain is None else gain[:, None] * w


def _mlp(cfg: ModelConfig, p: Mapping[str, Tensor], h: Tensor, layer: int, rt: Runtime, attn: str,
         gain: Tensor | None = None) -> Tensor:
    mm = _bank_linear(rt, attn, h)
    u = mm(h, p["mlp_up_bank"][layer])
    w = _scaled_rows(p["mlp_down_bank"][layer], gain)
    a = F.leaky_relu(u, cfg.leaky_slope)
    return mm(a * a, w)


def _mlp_lora(cfg: ModelConfig, p: Mapping[str, Tensor], h: Tensor, layer: int, rt: Runtime, attn: str,
              gain: Tensor | None, lora: LoRA | None) -> Tensor:
    """MLP plus the per-row LoRA's parallel branch on the MLP input (scaled like the MLP output)."""
    out = _mlp(cfg, p, h, layer, rt, attn, gain=gain)
    d = lora_delta(h, lora, f"mlp.{layer}")
    return out if d is None else out + (d if gain is None else gain.to(d.dtype) * d)


def _block(cfg: ModelConfig, p: Mapping[str, Tensor], x: Tensor, x0: Tensor, layer: int, virtual: int,
           tokens: Tensor, attn: str, rope: tuple[Tensor, Tensor], rt: Runtime, lora: LoRA | None = None) -> Tensor:
    pre = f"blocks.{layer}."
    mix = p[pre + "resid_mix"].to(x.dtype)
    x = mix[0] * x + mix[1] * x0
    s = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
    h = _rms(x) * s
    if rt.fold_gains:
        a = _attention(cfg, p, h, layer, tokens, attn, rope, rt, gain=p[pre + "attn_scale"], lora=lora)
        if cfg.parallel_start is not None and virtual >= cfg.parallel_start:
            return x + a + _mlp_lora(cfg, p, h, layer, rt, attn, p[pre + "mlp_scale"], lora)
        x = x + a
        return x + _mlp_lora(cfg, p, _rms(x) * s, layer, rt, attn, p[pre + "mlp_scale"], lora)
    attn_scale, mlp_scale = p[pre + "attn_scale"].to(x.dtype), p[pre + "mlp_scale"].to(x.dtype)
    a = _attention(cfg, p, h, layer, tokens, attn, rope, rt, lora=lora)
    if cfg.parallel_start is not None and virtual >= cfg.parallel_start:
        return x + attn_scale * a + mlp_scale * _mlp_lora(cfg, p, h, layer, rt, attn, None, lora)
    x = x + attn_scale * a
    return x + mlp_scale * _mlp_lora(cfg, p, _rms(x) * s, layer, rt, attn, None, lora)


def gpt_forward(cfg: ModelConfig, p: Mapping[str, Tensor], tokens: Tensor, attn: str = "auto",
                rope: tuple[Tensor, Tensor] | None = None, rt: Runtime = Runtime(), lora: LoRA | None = None,
                positions: Tensor | None = None) -> Tensor:
    """Functional core: logits (B,T,V) in float32 after the soft cap, from a full parameter dict.

    ``lora``: optional per-row low-rank terms (row b of the batch uses factors b; see ``lora_delta``) on
    "q|k|v|out|mlp.{layer}" (mlp: a parallel branch on the MLP input) and "head"; None = the plain model.
    ``positions`` (B,P) long: logits (B,P,V) of only those positions of each row (the final norm, head and soft
    cap run on P instead of T positions: chunked scoring needs a few positions of a long window)."""
    if rope is None:
        rope = rope_tables(cfg, tokens.size(1), tokens.device)
    if attn == "auto":
        attn = rt.attn
    dev = tokens.device.type
    lowp = torch.get_autocast_dtype(dev) if rt.residual_dtype != "float32" and torch.is_autocast_enabled(dev) else None
    x = F.embedding(tokens, p["tok_emb"])
    if rt.record_casts and torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    if cfg.bigram_vocab:
        big = F.linear(F.embedding(bigram_hash(tokens, cfg.bigram_vocab), p["bigram_emb"]), p["bigram_proj"])
        x = x + p["bigram_scale"].to(x.dtype) * big
    x = _rms(x)
    if lowp is not None:
        x = x.to(lowp)
    if cfg.smear_gate:
        g = torch.sigmoid(p["smear_gate"].to(x.dtype)) if rt.record_casts else torch.sigmoid(p["smear_gate"]).to(x.dtype)
        x = (1 - g) * x + g * F.pad(x[:, :-1], (0, 0, 1, 0))
    x0 = x
    schedule = cfg.layer_schedule()
    n_enc = len(schedule) // 2 if cfg.unet_skips else 0
    skips: list[Tensor] = []
    for virtual, layer in enumerate(schedule):
        if n_enc and virtual >= n_enc and skips:
            x = x + p["skip_weights"][virtual - n_enc].to(x.dtype) * skips.pop()
        x = _block(cfg, p, x, x0, layer, virtual, tokens, attn, rope, rt, lora)
        if virtual < n_enc:
            skips.append(x)
    if positions is not None:
        x = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.size(-1)))
    x = _rms(x)
    head = p["tok_emb"] if cfg.tie_embeddings else p["lm_head"]
    logits = F.linear(x, head)
    if lora:
        d = lora_delta(x, lora, "head")
        logits = logits if d is None else logits + d
    c = cfg.logit_softcap
    if rt.lowp_softcap and c and logits.dtype in (torch.float16, torch.bfloat16):
        return (c * torch.tanh(logits / c)).float()  # the record scripts' numerics (--compat pg-record)
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss and softcap in float32 (float64 stays)
        logits = logits.float()
    return c * torch.tanh(logits / c) if c else logits


def gpt_loss(cfg: ModelConfig, p: Mapping[str, Tensor], tokens: Tensor, targets: Tensor | None, reduction: str,
             attn: str, rope: tuple[Tensor, Tensor], rt: Runtime = Runtime(), lora: LoRA | None = None,
             positions: Tensor | None = None) -> Tensor:
    """Logits, or cross-entropy in nats (``reduction`` mean | sum | none), from a full parameter dict
    (``positions``: only those positions, targets then (B,P))."""
    logits = gpt_forward(cfg, p, tokens, attn, rope, rt, lora, positions)
    if targets is None:
        return logits
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
    return nll.view(targets.shape) if reduction == "none" else nll


def inductor_options() -> dict[str, object]:
    """Inductor options for ``compile_core``. Mix-order reductions (one kernel doing an RMSNorm-backward row
    reduction *and* the column sums of the per-channel gains' gradients) ran ~10x below memory bandwidth on H100
    and cost 5% of a step (docs/benchmarks.md), so they are off where this torch has them."""
    import torch._inductor.config as icfg

    return {"triton.mix_order_reduction": False} if hasattr(icfg.triton, "mix_order_reduction") else {}


def _param(*shape: int, std: float | None = None, fill: float | None = None) -> nn.Parameter:
    t = torch.empty(*shape)
    if std is not None:
        nn.init.normal_(t, std=std)
    else:
        t.fill_(0.0 if fill is None else fill)
    return nn.Parameter(t)


class Block(nn.Module):
    """Per-layer control tensors (the matrices live in the model's banks)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.model_dim
        self.attn_scale = _param(d, fill=1.0)
        self.mlp_scale = _param(d, fill=1.0)
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.q_gain = _param(cfg.num_heads, fill=cfg.qk_gain_init)


class BankedGPT(nn.Module):
    """Module wrapper holding the parameters; ``forward`` merges overrides and calls ``gpt_forward``."""

    def __init__(self, cfg: ModelConfig, runtime: Runtime = Runtime()) -> None:
        super().__init__()
        self.cfg = cfg
        self.runtime = runtime
        L, d, kv, h, V = cfg.num_layers, cfg.model_dim, cfg.kv_dim, cfg.mlp_hidden, cfg.vocab_size
        self.tok_emb = _param(V, d, std=cfg.init_std)
        self.qo_bank = _param(2 * L, d, d)
        self.kv_bank = _param(2 * L, kv, d)
        self.mlp_up_bank = _param(L, h, d)
        self.mlp_down_bank = _param(L, d, h)
        with torch.no_grad():  # inputs-side matrices random, output-side (out-proj, down) zero
            nn.init.normal_(self.qo_bank[:L], std=d ** -0.5)
            nn.init.normal_(self.kv_bank, std=d ** -0.5)
            nn.init.normal_(self.mlp_up_bank, std=d ** -0.5)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(L))
        n_virtual = len(cfg.layer_schedule())
        if cfg.unet_skips:
            self.skip_weights = _param(n_virtual // 2, d, fill=1.0)
        if cfg.smear_gate:
            self.smear_gate = _param(d, fill=-3.0)
        if cfg.bigram_vocab:
            self.bigram_emb = _param(cfg.bigram_vocab, cfg.bigram_dim, std=0.02)
            self.bigram_proj = _param(d, cfg.bigram_dim, std=cfg.bigram_dim ** -0.5)
            self.bigram_scale = _param(1, fill=0.05)
        if cfg.ve_layers:
            self.ve_emb = _param(V, cfg.ve_dim, std=0.02)
            self.ve_proj = _param(kv, cfg.ve_dim, std=cfg.ve_dim ** -0.5)
            self.ve_scales = _param(len(cfg.ve_layers), fill=0.1)
        if not cfg.tie_embeddings:
            self.lm_head = _param(V, d, std=cfg.init_std)
        self._core = gpt_loss
        self._compiled: dict[str, Callable[..., Tensor]] = {}  # compile_core's cores by arguments
        self._rope_cache: dict[str, tuple[Tensor, Tensor]] = {}  # per device, the longest length seen

    def compile_core(self, **kwargs) -> "BankedGPT":
        """torch.compile the functional core in place. Unlike ``torch.compile(model)`` this keeps parameter
        names and the ``params=`` path compiled too, so meta-training and TTT inner loops run the fast graph.
        Without ``mode``/``options`` it passes ``inductor_options()``; ``dynamic`` defaults to False. A compiled
        core is kept per set of arguments, so compiling again (e.g. a second evaluation) reuses its graphs."""
        if "mode" not in kwargs:
            kwargs.setdefault("options", inductor_options())
        kwargs.setdefault("dynamic", False)
        key = repr(sorted(kwargs.items()))
        if key not in self._compiled:
            self._compiled[key] = torch.compile(gpt_loss, **kwargs)
        self._core = self._compiled[key]
        return self

    @contextlib.contextmanager
    def eager_core(self) -> Iterator["BankedGPT"]:
        """Run the uncompiled core inside the block (e.g. validation: other shapes would cost recompiles)."""
        core, self._core = self._core, gpt_loss
        try:
            yield self
        finally:
            self._core = core

    def prepare_rope(self, t: int, device: torch.device) -> None:
        """Build the RoPE tables for windows up to ``t`` eagerly (before compiling a scorer: no first-fill
        recompile, and the tables stay ordinary tensors)."""
        self._rope(t, device)

    def _rope(self, t: int, device: torch.device, rope_len: int | None = None) -> tuple[Tensor, Tensor]:
        # one table per (device, base): prefixes of a longer table are exact only while the base is the same
        # (dynamic NTK changes it with T, see ModelConfig.rope_ntk_len). ``rope_len``: the base is that of a
        # forward over max(t, rope_len) tokens (the window the protocol chose), so a forward's own length --
        # which can depend on where a document ends, a token not yet scored -- never sets it
        base = self.cfg.rope_base_at(max(t, rope_len or 0))
        key = str(device) if base == self.cfg.rope_base else f"{device}|base={base!r}"
        cached = self._rope_cache.get(key)
        # tables made while scoring must stay usable for autograd (TTT trains right after scoring). Eager code
        # makes them outside inference mode below, but a compiled scorer traces this into its graph, whose
        # outputs are inference tensors when it runs under inference mode: eager training remakes such tables
        # (the check is skipped while compiling: Dynamo cannot trace it and would break the graph here)
        if (cached is None or cached[0].size(1) < t
                or (not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
                    and cached[0].is_inference())):
            with torch.inference_mode(False):
                self._rope_cache[key] = rope_tables(self.cfg, t, device, base)
        cos, sin = self._rope_cache[key]
        # contiguous: a prefix of a longer table would carry the table's stride, and a compiled graph with dynamic
        # lengths guards on it (one more graph per table length); a full-length table is returned as it is
        return cos[:, :t].contiguous(), sin[:, :t].contiguous()

    def param_dict(self) -> dict[str, Tensor]:
        return dict(self.named_parameters())

    def forward(self, tokens: Tensor, targets: Tensor | None = None, *, params: Mapping[str, Tensor] | None = None,
                banks: Mapping[str, Tensor] | None = None, reduction: str = "mean", attn: str = "auto",
                lora: LoRA | None = None, positions: Tensor | None = None, rope_len: int | None = None) -> Tensor:
        p = self.param_dict()
        for override in (banks, params):
            if override:
                unknown = set(override) - set(p)
                if unknown:
                    raise KeyError(f"overrides name unknown parameters: {sorted(unknown)}")
                p.update(override)
        rope = self._rope(tokens.size(1), tokens.device, rope_len)
        if lora is None and positions is None:  # the call every existing graph was compiled for
            return self._core(self.cfg, p, tokens, targets, reduction, attn, rope, self.runtime)
        return self._core(self.cfg, p, tokens, targets, reduction, attn, rope, self.runtime, lora, positions)

    def named_bank_slices(self) -> list[tuple[str, int, int, str]]:
        """(bank name, slice index, layer, kind) for every matrix in the banks."""
        return [(*bank_slice_index(self.cfg, kind, layer), layer, kind)
                for layer in range(self.cfg.num_layers) for kind in SLICE_KINDS]

    def layer_weights(self, layer: int) -> dict[str, Tensor]:
        """Views of layer ``layer``'s six matrices (for inspection and tests)."""
        return {kind: getattr(self, bank)[idx] for kind in SLICE_KINDS
                for bank, idx in [bank_slice_index(self.cfg, kind, layer)]}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_non_embedding_params(self) -> int:
        """Parameters outside the vocabulary tables (``*_emb``, an untied ``lm_head``): the N of scaling laws,
        which at small sizes the tables would swamp."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if not (name.endswith("_emb") or name == "lm_head"))
