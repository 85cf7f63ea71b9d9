"""Which parameters a test-time adapter may change, with exact per-slice accounting.

Why this exists: the four banks hold every layer's matrices *outside* the blocks, so "freeze the first two
blocks" by module name freezes only the blocks' control vectors (a public meta-TTT series froze 4,112 of 27M
parameters that way). Here layer filters act on bank slices too, and ``SelectedParams.count`` is the exact
number of adapted scalars.

Spec grammar (terms joined by ``+``; a parameter is selected if any term selects it)::

    spec   := "none" | term ("+" term)*
    term   := group ["[" kind ("," kind)* "]"] (":" filter)*
    group  := all | banks | qo_bank | kv_bank | mlp_up_bank | mlp_down_bank | emb | norms | gains | q_gain | head
    kind   := q | k | v | out | up | down                  (bank slices only)
    filter := layers>=N | layers>N | layers<=N | layers<N | layers=N | layers=A-B   (A-B inclusive)

Groups: ``all`` every parameter; ``banks`` the four banks; ``emb`` tok_emb, bigram_emb, bigram_proj, ve_emb,
ve_proj; ``norms`` (alias ``gains``) the per-block control vectors (attn_scale, mlp_scale, resid_mix, q_gain)
plus skip_weights, smear_gate, bigram_scale, ve_scales and any other tensor with ndim <= 1; ``q_gain`` the
per-block query gains alone (one scalar per head and layer: the smallest selection that changes attention
sharpness); ``head`` the output
projection: ``lm_head`` when untied, else ``tok_emb`` (tied embeddings: adapting the head adapts the input
embedding too). A layer filter restricts layer-indexed tensors only (bank slices and ``blocks.{i}.*``);
tensors that belong to no layer (embeddings, skip weights, ...) are unaffected by it.
Examples: ``all``, ``banks``, ``banks:layers>=2``, ``banks[q,k,v,out]:layers=7-10``,
``banks:layers>=2+emb+norms+head``, ``all:layers>=2``, ``none``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..model.gpt import BANK_NAMES as BANK_GROUPS  # the bank layout's one home
from ..model.gpt import SLICE_KINDS

GROUPS = ("all", "banks", *BANK_GROUPS, "emb", "norms", "gains", "q_gain", "head")
EMB_NAMES = ("tok_emb", "bigram_emb", "bigram_proj", "ve_emb", "ve_proj")
NORM_SUFFIXES = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "smear_gate",
                 "bigram_scale", "ve_scales")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_FILTER_RE = re.compile(r"^layers\s*(>=|<=|>|<|=)\s*(\d+)(?:\s*-\s*(\d+))?$")
_TERM_RE = re.compile(r"^([a-z_]+)\s*(?:\[([^\]]*)\])?\s*((?::[^:]+)*)$")


@dataclass(frozen=True)
class Term:
    """One ``+``-separated term: a group, optional bank slice kinds, an inclusive layer range."""

    group: str
    kinds: tuple[str, ...] | None = None
    layer_lo: int | None = None
    layer_hi: int | None = None

    def layer_ok(self, layer: int) -> bool:
        return (self.layer_lo is None or layer >= self.layer_lo) and (self.layer_hi is None or layer <= self.layer_hi)


def _parse_filter(text: str, spec: str) -> tuple[int | None, int | None]:
    m = _FILTER_RE.match(text.strip())
    if not m:
        raise ValueError(f"selection {spec!r}: bad filter {text!r}; expected layers>=N, layers>N, layers<=N, "
                         "layers<N, layers=N or layers=A-B")
    op, a, b = m.group(1), int(m.group(2)), m.group(3)
    if b is not None and op != "=":
        raise ValueError(f"selection {spec!r}: a range A-B needs '=', got {text!r}")
    if op == "=":
        hi = int(b) if b is not None else a
        if hi < a:
            raise ValueError(f"selection {spec!r}: empty layer range {text!r}")
        return a, hi
    return {">=": (a, None), ">": (a + 1, None), "<=": (None, a), "<": (None, a - 1)}[op]


def _parse_term(text: str, spec: str) -> Term:
    m = _TERM_RE.match(text.strip())
    if not m:
        raise ValueError(f"selection {spec!r}: cannot parse term {text!r}")
    group, kinds_s, filters_s = m.group(1), m.group(2), m.group(3)
    if group not in GROUPS:
        raise ValueError(f"selection {spec!r}: unknown group {group!r}; valid groups: {', '.join(GROUPS)}, none")
    kinds = None
    if kinds_s is not None:
        if group not in ("banks", *BANK_GROUPS):
            raise ValueError(f"selection {spec!r}: slice kinds [..] only apply to banks, not {group!r}")
        kinds = tuple(k.strip() for k in kinds_s.split(",") if k.strip())
        bad = [k for k in kinds if k not in SLICE_KINDS]
        if bad or not kinds:
            raise ValueError(f"selection {spec!r}: unknown slice kinds {bad}; valid: {', '.join(SLICE_KINDS)}")
    lo: int | None = None
    hi: int | None = None
    for f in filter(None, (s.strip() for s in filters_s.split(":"))):
        flo, fhi = _parse_filter(f, spec)
        lo = flo if lo is None else (lo if flo is None else max(lo, flo))
        hi = fhi if hi is None else (hi if fhi is None else min(hi, fhi))
    return Term(group, kinds, lo, hi)


@dataclass(frozen=True)
class ParamSelection:
    """A parsed selection spec; ``resolve(model)`` turns it into concrete tensors and slices."""

    spec: str = "all"
    terms: tuple[Term, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, spec: "str | ParamSelection") -> "ParamSelection":
        if isinstance(spec, ParamSelection):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"selection spec must be a non-empty string, got {spec!r}")
        s = spec.strip().replace(" ", "")
        if s == "none":
            return cls(s, ())
        return cls(s, tuple(_parse_term(t, s) for t in s.split("+")))

    def resolve(self, model: nn.Module) -> "SelectedParams":
        params = dict(model.named_parameters())
        slices_of = getattr(model, "named_bank_slices", None)
        bank_slices = list(slices_of()) if callable(slices_of) else []
        banks = {b for b, *_ in bank_slices}
        num_layers = 1 + max((layer for _, _, layer, _ in bank_slices), default=-1)
        chosen: dict[str, set[int] | bool] = {}

        def add_whole(name: str) -> None:
            chosen[name] = True

        def add_slices(term: Term, only_bank: str | None) -> None:
            for bank, idx, layer, kind in bank_slices:
                if only_bank not in (None, bank) or not term.layer_ok(layer):
                    continue
                if term.kinds is not None and kind not in term.kinds:
                    continue
                cur = chosen.setdefault(bank, set())
                if isinstance(cur, set):  # a whole-tensor choice (True) already covers every slice
                    cur.add(idx)

        def add_named(term: Term, name: str) -> None:
            m = _BLOCK_RE.match(name)
            if m and not term.layer_ok(int(m.group(1))):
                return
            add_whole(name)

        for term in self.terms:
            g = term.group
            if g in ("all", "banks") or g in BANK_GROUPS:
                add_slices(term, None if g in ("all", "banks") else g)
            if g == "all":
                for name in params:
                    if name not in banks:
                        add_named(term, name)
            elif g == "emb":
                for name in EMB_NAMES:
                    if name in params:
                        add_whole(name)
            elif g in ("norms", "gains"):
                for name, p in params.items():
                    if name in banks or name in EMB_NAMES or name == "lm_head":
                        continue
                    if name.split(".")[-1] in NORM_SUFFIXES or p.ndim <= 1:
                        add_named(term, name)
            elif g == "q_gain":
                for name in params:
                    if name.endswith(".q_gain"):
                        add_named(term, name)
            elif g == "head":
                add_whole("lm_head" if "lm_head" in params else "tok_emb")

        if self.terms and not any(v is True or v for v in chosen.values()):
            raise ValueError(f"selection {self.spec!r} selects no parameters on this model "
                             f"(model has {num_layers} layers in its banks)")
        names: list[str] = []
        slices: dict[str, list[int] | None] = {}
        masks: dict[str, Tensor | None] = {}
        for name, p in params.items():  # model order: deterministic
            sel = chosen.get(name)
            if not sel:
                continue
            names.append(name)
            if sel is True or len(sel) == p.shape[0]:
                slices[name], masks[name] = None, None
            else:
                idx = sorted(sel)
                slices[name] = idx
                m = torch.zeros(p.shape[0], *([1] * (p.ndim - 1)), dtype=p.dtype, device=p.device)
                m[idx] = 1
                masks[name] = m
        info = {name: (tuple(p.shape), p.numel()) for name, p in params.items()}
        return SelectedParams(self.spec, tuple(names), slices, masks, info, _slice_labels(bank_slices))


def _slice_labels(bank_slices: list) -> dict[tuple[str, int], str]:
    return {(b, idx): f"{kind}{layer}" for b, idx, layer, kind in bank_slices}


@dataclass
class SelectedParams:
    """Concrete selection on one model.

    ``names``: selected tensor names (model order). ``slices[name]``: sorted dim-0 slice indices for a partly
    selected bank, None for a whole tensor. ``masks[name]``: 0/1 tensor of shape (n,1,..) (same dtype and device
    as the parameter) broadcastable against it, None when whole. ``count``: exact adapted scalars.
    """

    spec: str
    names: tuple[str, ...]
    slices: dict[str, list[int] | None]
    masks: dict[str, Tensor | None]
    info: dict[str, tuple[tuple[int, ...], int]]  # every model tensor: (shape, numel)
    labels: dict[tuple[str, int], str] = field(default_factory=dict)

    def scalars(self, name: str) -> int:
        shape, numel = self.info[name]
        idx = self.slices.get(name)
        return numel if idx is None else len(idx) * (numel // shape[0])

    @property
    def count(self) -> int:
        return sum(self.scalars(n) for n in self.names)

    @property
    def model_total(self) -> int:
        return sum(numel for _, numel in self.info.values())

    def mask_grads(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Zero gradient rows of unselected bank slices (so frozen slices stay bit-identical)."""
        out = {}
        for n, g in grads.items():
            m = self.masks.get(n)
            out[n] = g if m is None else g * m.to(device=g.device, dtype=g.dtype)
        return out

    def report(self) -> str:
        rows = [("tensor", "slices", "scalars")]
        for n in self.names:
            idx = self.slices[n]
            if idx is None:
                desc = "all"
            else:
                desc = ",".join(self.labels.get((n, i), str(i)) for i in idx)
            rows.append((n, desc, f"{self.scalars(n):,}"))
        total, model_total = self.count, self.model_total
        frac = 100.0 * total / model_total if model_total else 0.0
        rows.append(("TOTAL", f"selection={self.spec}", f"{total:,} of {model_total:,} ({frac:.2f}%)"))
        w0 = max(len(r[0]) for r in rows)
        w1 = min(60, max(len(r[1]) for r in rows))
        return "\n".join(f"{a:<{w0}}  {b[:60]:<{w1}}  {c:>}" for a, b, c in rows)
