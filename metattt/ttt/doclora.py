"""``doclora``: per-document LoRA for document-batched test-time training (the 2026-04 records' method).

Every document of a batch owns its own rank-r factors on Q, K, V, the attention output, a parallel MLP branch
and the LM head; the factors of all documents live in batched tensors with a leading document dimension and the
model applies them per row (``gpt_forward(..., lora=)``), so per-document weights are never materialised.

A ``per_document`` :class:`~metattt.ttt.adapter.Adapter`: ``batches`` steps once per ``chunk``-token chunk (mean
per document, summed), as the doc-batched evaluator (``metattt.eval.docttt_batch``) steps on each scored chunk, so
meta-training (``inner_loop``) takes the evaluated update. AdamW is elementwise, so one step over the batched
tensors is every document's own step. ``step`` works in place (torch's fused AdamW kernel on views of the batched
tensors): at rank 96 the factors of 64 documents are ~1.3 GB, and an out-of-place step would double that and its
memory traffic. Its rule, ``rule()``, is the :mod:`metattt.ttt.rules` chain ``scale_by_adam`` + ``add_decayed_weights``
(AdamW), equal to the kernel's step to float rounding; ``step`` runs the kernel (in place, its bits) and adds what
the chain has no place for: a step count per document (``active`` rows step, the others wait).

Meta-learned init (``init=meta``): one shared A factor per target (``A0``, nn.Parameters) that every document's A
starts from instead of a fresh uniform draw (B still starts at 0). The trainer learns it first order (the adapted A
is A0's broadcast with the update's values written in place, so the outer gradient reaches A0 summed over
documents); the artifact carries it as ``ttt.doclora.A0.<target>``, ``docttt:doclora@init=meta`` uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import rules
from .adapter import Adapter, AdapterConfig, Batch, Tensors

TARGETS = ("q", "k", "v", "out", "mlp", "head")
INITS = ("random", "meta")
EXTRA_PREFIX = "ttt.doclora.A0."


@dataclass
class DocLoRAConfig(AdapterConfig):
    """Defaults: the records' (rank 96, AdamW lr 1e-4, betas (0, 0.999), eps 1e-10, weight decay 0.5, one step
    per 32-token chunk). ``chunk`` is the doc-batched protocol's (``docttt:doclora@chunk=``), which sets it."""

    rank: int = 96
    alpha: float = 0.0  # > 0: output scale alpha / rank (the records' later variant, alpha 144); 0: scale 1
    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-10
    weight_decay: float = 0.5
    targets: str = "q+k+v+out+mlp+head"  # '+'-separated subset of TARGETS
    keep_a: bool = False  # keep (trained) A across batches; only B and the optimiser state are reset
    seed: int = 0
    init: str = "random"  # "random": A ~ uniform(+-1/sqrt(in)) per document; "meta": the learned shared A0
    chunk: int = 32  # tokens per update (one step per chunk of every document)
    reset: str = "doc"

    def validate(self) -> None:
        super().validate()
        if self.epochs != 1:
            raise ValueError(f"doclora steps once per scored chunk: epochs must be 1, got {self.epochs!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"doclora {name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ValueError(f"doclora init must be one of {', '.join(INITS)}, got {self.init!r}")
        bad = [t for t in self.target_list if t not in TARGETS]
        if bad or not self.target_list:
            raise ValueError(f"doclora targets {self.targets!r}: choose '+'-joined names from {', '.join(TARGETS)}")

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets.split("+") if t)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha > 0 else 1.0


class DocLoRA(Adapter):
    """Batched per-document LoRA factors and their AdamW.

    Trainables: ``A.{t}`` (D, L, r, in) and ``B.{t}`` (D, L, out, r) per block target t (L = physical layers),
    ``A.head`` (D, r, d), ``B.head`` (D, V, r). A ~ uniform(+-1/sqrt(in)), B = 0: the identity at init. Rule state:
    ``m.<name>``, ``v.<name>`` and the steps taken per document ``t`` (D,), on the host (bias corrections are host
    scalars: no device sync per step).
    """

    name = "doclora"
    Config = DocLoRAConfig
    cfg: DocLoRAConfig
    default_selection = "none"  # its factors are its own (``targets``), no model tensor is selected
    per_document = True

    def setup(self, model: nn.Module) -> None:
        """Note the model's shapes; with init=meta create A0: uniform(+-1/sqrt(in)) from ``cfg.seed``, float32 on
        the model's device (learned by meta-training or loaded from the artifact's extras)."""
        if self._require_bound().names:
            raise ValueError(f"doclora adapts its own factors (targets={self.cfg.targets!r}), not a selection of the "
                             f"model's tensors: drop select={self.selection.spec!r}")
        mcfg: Any = model.cfg
        d, kv, L = mcfg.model_dim, mcfg.kv_dim, mcfg.num_layers
        full = {"q": (L, d, d), "k": (L, d, kv), "v": (L, d, kv), "out": (L, d, d), "mlp": (L, d, d),
                "head": (None, d, mcfg.vocab_size)}
        # target -> (layers or None for the head, in features, out features)
        self._shapes: dict[str, tuple[int | None, int, int]] = {t: full[t] for t in self.cfg.target_list}
        self._n_layers = int(L)
        self.A0 = nn.ParameterDict()
        if self.cfg.init != "meta":
            return
        dev = next(model.parameters()).device
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for t, (layers, fin, _) in self._shapes.items():
            shape = (self.cfg.rank, fin) if layers is None else (layers, self.cfg.rank, fin)
            bound = 1.0 / math.sqrt(fin)
            self.A0[t] = nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=gen).to(dev))

    def load_artifact_extras(self, extras: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load A0 from an artifact's extras (after ``bind``); with ``strict`` every target must be there."""
        missing = [EXTRA_PREFIX + t for t in self.A0 if EXTRA_PREFIX + t not in extras]
        if missing and strict:
            raise ValueError(f"doclora init=meta: the artifact has no learned A0 (extras {missing}); meta-train it "
                             "with --meta.adapter doclora and --meta.split seq-half, or use init=random")
        super().load_artifact_extras(extras, strict=False)  # a wrong shape: a ValueError naming it

    def carries(self) -> bool:
        return self.cfg.keep_a

    def start(self, base: Mapping[str, Tensor], rows: int, key: int = 0,
              carry: Mapping[str, Tensor] | None = None) -> Tensors:
        """Fresh factors for ``rows`` documents on the device/dtype of ``base``'s ``tok_emb``; random A from the
        seed ``cfg.seed * 1_000_003 + key`` (the evaluator's key: the batch index); ``carry``: the previous batch's
        trainables, whose A factors are kept with ``keep_a`` (same shape only). Under grad mode init=meta's A
        carries the graph of A0's broadcast (meta-training's first-order path to A0)."""
        self._require_bound()
        ref = base["tok_emb"]
        dev, dt, r = ref.device, ref.dtype, self.cfg.rank
        gen = torch.Generator(device=dev).manual_seed(self.cfg.seed * 1_000_003 + key)
        tr: Tensors = {}
        for t, (layers, fin, fout) in self._shapes.items():
            lead = (rows,) if layers is None else (rows, layers)
            keep = carry is not None and self.cfg.keep_a and f"A.{t}" in carry and carry[f"A.{t}"].shape[0] == rows
            if keep:
                assert carry is not None
                a = carry[f"A.{t}"].detach().clone()
            elif self.cfg.init == "meta":
                a = self.A0[t].to(dev, dt).expand(*lead[:1], *self.A0[t].shape).clone()
            else:
                bound = 1.0 / math.sqrt(fin)
                a = torch.empty(*lead, r, fin, device=dev, dtype=dt).uniform_(-bound, bound, generator=gen)
            tr[f"A.{t}"] = a
            tr[f"B.{t}"] = torch.zeros(*lead, fout, r, device=dev, dtype=dt)
        return tr

    def rule(self) -> rules.Transform:
        """AdamW as a chain: what ``step`` computes for documents at one step count, to float rounding
        (tests/test_ttt_rules.py); ``step`` runs torch's fused kernel instead (module docstring says why)."""
        c, lr = self.cfg, rules.Schedule(self.cfg.lr)
        return rules.chain(rules.scale_by_adam(lr, c.beta1, c.beta2, c.eps),
                           rules.add_decayed_weights(c.weight_decay, lr))

    def init(self, trainables: Mapping[str, Tensor]) -> dict[str, Any]:
        """AdamW moments, and the steps taken per document on the host."""
        state: dict[str, Any] = {f"m.{k}": torch.zeros_like(v) for k, v in trainables.items()}
        state.update({f"v.{k}": torch.zeros_like(v) for k, v in trainables.items()})
        rows = next(iter(trainables.values())).shape[0] if trainables else 0
        state["t"] = torch.zeros(rows, dtype=torch.float64)
        return state

    def materialize(self, base: Mapping[str, Tensor], trainables: Mapping[str, Tensor]) -> Tensors:
        """The factors, B scaled by ``alpha / rank`` (``loss`` hands them to the model per layer)."""
        s = self.cfg.scale
        return {k: (v * s if s != 1.0 and k.startswith("B.") else v) for k, v in trainables.items()}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, overrides: Mapping[str, Tensor],
             attn: str | None = None, **forward: Any) -> Tensor:
        """The model with the factors among ``overrides`` as per-row LoRA (``lora={"q.{layer}": (A, B), ...,
        "head": (A, B)}``), the other overrides as ``params=``."""
        params = {k: v for k, v in overrides.items() if not k.startswith(("A.", "B."))}
        lora: dict[str, tuple[Tensor, Tensor]] = {}
        for t in self.cfg.target_list:
            if f"A.{t}" not in overrides:
                continue
            a, b = overrides[f"A.{t}"], overrides[f"B.{t}"]
            if t == "head":
                lora["head"] = (a, b)
            else:  # unbind, not a[:, layer]: one backward stack instead of a zero-filled full-size gradient per layer
                for layer, (al, bl) in enumerate(zip(a.unbind(1)[:self._n_layers], b.unbind(1)[:self._n_layers])):
                    lora[f"{t}.{layer}"] = (al, bl)
        if lora:
            forward["lora"] = lora
        if params:
            forward["params"] = params
        if attn is not None:
            forward["attn"] = attn
        return model(x, y, **forward)

    def batches(self, x: Tensor, y: Tensor) -> list[Batch]:
        """One batch per whole ``chunk``-token chunk of the rows (one document each): the row's prefix up to the
        chunk's end as context, the chunk's targets at their positions (RoPE base of that prefix), loss = mean over
        the chunk per row summed over rows (the weight ``1 / chunk`` as the evaluator forms it: float32 division on
        the device)."""
        n, length = x.shape
        c = self.cfg.chunk
        if length < c:
            raise ValueError(f"doclora steps on whole chunks of {c} tokens; the rows hold {length} (rows of >= "
                             f"{2 * c} tokens for seq-half, or a smaller chunk=)")
        w = torch.ones(n, device=x.device) / torch.full((n,), float(c), device=x.device)
        cols = torch.arange(c, device=x.device).expand(n, c)
        return [Batch(x[:, :c0 + c], y[:, c0:c0 + c], {"positions": cols + c0, "reduction": "none",
                                                         "rope_len": c0 + c}, w)
                for c0 in range(0, length // c * c, c)]

    def step(self, trainables: Tensors, state: dict[str, Any], grads: Tensors,
             active: Tensor | None = None) -> tuple[Tensors, dict[str, Any]]:
        """One AdamW step, in place on ``trainables`` and ``state``, which are returned. ``grads`` cover the first
        R <= D documents (later ones take no step); ``active`` (R,) bool (a device mask costs one sync): the
        documents that step. Runs of consecutive rows at one step count are views, and the step is one call of
        torch's fused AdamW kernel (``torch.optim.AdamW(fused=True)``'s) over them: in the evaluator the stepping
        documents are a prefix at one step count, i.e. one view per tensor, one kernel launch."""
        c = self.cfg
        rows_in = next(iter(grads.values())).shape[0]
        act = (torch.ones(rows_in, dtype=torch.bool) if active is None
               else active.detach().to("cpu", torch.bool).reshape(-1))
        if act.numel() != rows_in:
            raise ValueError(f"doclora step: active has {act.numel()} rows, grads {rows_in}")
        t = state["t"]
        t[:rows_in] += act.to(t.dtype)
        steps = t[:rows_in].tolist()
        runs: list[list[Any]] = []  # [first row, end row, step count]
        for r in act.nonzero().flatten().tolist():
            if runs and runs[-1][1] == r and runs[-1][2] == steps[r]:
                runs[-1][1] = r + 1
            else:
                runs.append([r, r + 1, steps[r]])
        P, G, M, V, T = [], [], [], [], []
        dev = next(iter(trainables.values())).device
        for r0, r1, n in runs:
            step = torch.full((), n, dtype=torch.float32, device=dev)  # the kernel's bias correction
            for k, p in trainables.items():
                P.append(p.detach()[r0:r1])  # the values only: init=meta's A keeps its graph to A0
                # autograd gives some factors' gradients transposed strides (the head's); the CUDA kernel wants
                # every (param, grad, m, v) with the same strides, so the gradient is made contiguous
                G.append(grads[k][r0:r1].to(p.dtype).contiguous())
                M.append(state[f"m.{k}"][r0:r1])
                V.append(state[f"v.{k}"][r0:r1])
                T.append(step)
        for q in zip(P, G, M, V):  # the CUDA kernel's precondition, checked on every device (CPU would not)
            if len({(t.dtype, t.device, t.stride()) for t in q}) != 1 or not all(t.is_contiguous() for t in q):
                raise RuntimeError("doclora step: a factor, its gradient and its moments differ in dtype, device "
                                   f"or strides: {[(t.dtype, str(t.device), t.stride()) for t in q]}")
        if P:
            with torch.no_grad():
                torch._fused_adamw_(P, G, M, V, [], T, lr=c.lr, beta1=c.beta1, beta2=c.beta2,
                                    weight_decay=c.weight_decay, eps=c.eps, amsgrad=False, maximize=False)
        return dict(trainables), dict(state)

    @property
    def adapted_count(self) -> int:
        """Adapter scalars per document."""
        self._require_bound()
        r = self.cfg.rank
        return sum((layers or 1) * r * (fin + fout) for layers, fin, fout in self._shapes.values())
