"""``doclora``: per-document LoRA for document-batched test-time training (the 2026-04 records' method).

Every document of a batch owns its own rank-r factors on Q, K, V, the attention output, a parallel MLP branch
and the LM head; the factors of all documents live in batched tensors with a leading document dimension and the
model applies them per row (``gpt_forward(..., lora=)``), so per-document weights are never materialised.

Contract (issue 16's adapter shape): ``init(params, n_docs) -> (trainables, state)``,
``step(trainables, state, grads, progress) -> (trainables, state)``, ``materialize(trainables) -> model
overrides``. AdamW is elementwise (decoupled weight decay ``p *= 1 - lr * wd``, eps added to the bias-corrected
``sqrt(v)`` as in ``torch.optim.AdamW``), so one step over the batched tensors is the per-document step of every
document at once, provided the loss is a sum of per-document terms (the evaluator's is). ``step`` works in place
(torch's fused AdamW kernel on views of the batched tensors): at rank 96 the factors of 64 documents
are ~1.3 GB, and an out-of-place step would double that and its memory traffic.

Meta-learned init (``init=meta``): the module then owns one shared A factor per target (``A0``, nn.Parameters,
shapes (L, r, in) / (r, in)) that every document's A starts from instead of a fresh uniform draw; B still starts
at 0, so the adapted model still starts as the base model. ``metattt.ttt.meta.doclora_meta_loss`` learns A0 in
the trainer (``--meta.adapter doclora:...``); the artifact carries it as ``ttt.doclora.A0.<target>`` and the
evaluator's ``docttt:doclora@init=meta`` uses it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from .registry import typed_options

TARGETS = ("q", "k", "v", "out", "mlp", "head")
INITS = ("random", "meta")
EXTRA_PREFIX = "ttt.doclora.A0."


@dataclass
class DocLoRAConfig:
    """Defaults: the records' (rank 96, AdamW lr 1e-4, betas (0, 0.999), eps 1e-10, weight decay 0.5)."""

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
    #: passes of the update over a document's chunks: one, as the doc-batched evaluator takes (not an option)
    epochs: ClassVar[int] = 1

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"doclora rank must be a positive integer, got {self.rank!r}")
        for name, v in self.to_dict().items():
            if name in ("lr", "eps", "weight_decay", "alpha") and v < 0:
                raise ValueError(f"doclora {name} must be >= 0, got {v!r}")
            if name in ("beta1", "beta2") and not 0 <= v < 1:
                raise ValueError(f"doclora {name} must be in [0, 1), got {v!r}")
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "DocLoRAConfig":
        """Build from options (protocol text), typed as the fields by the adapters' one option grammar."""
        cfg = cls(**typed_options(cls, opts, "doclora"))
        cfg.validate()
        return cfg


class DocLoRA(nn.Module):
    """Batched per-document LoRA factors and their AdamW, as pure functions of tensor dicts.

    Trainables: ``A.{t}`` (D, L, r, in) and ``B.{t}`` (D, L, out, r) per block target t (L = physical layers),
    ``A.head`` (D, r, d), ``B.head`` (D, V, r). A ~ uniform(+-1/sqrt(in)), B = 0: the identity at init.
    """

    name = "doclora"
    Config = DocLoRAConfig
    #: True: the chunk loop trains on each chunk before scoring it (illegal: its ledger must refuse the run; the
    #: cheating test sets it, no adapter does)
    adapts_before_scoring: bool = False

    def __init__(self, cfg: DocLoRAConfig | None = None, **kw: Any) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else DocLoRAConfig(**kw)
        self.cfg.validate()
        self.A0 = nn.ParameterDict()  # the learned shared init (init=meta), created by ``bind``

    # ------------------------------------------------------------------ the learned init (init=meta)
    def bind(self, model: nn.Module) -> "DocLoRA":
        """Create A0 for ``model`` (init=meta; a no-op otherwise): uniform(+-1/sqrt(in)) from ``cfg.seed``, float32
        on the model's device. Idempotent: a bound adapter keeps its (possibly learned) values."""
        if self.cfg.init != "meta" or len(self.A0):
            return self
        dev = next(model.parameters()).device
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for t, (layers, fin, _) in self.shapes(model.cfg).items():
            shape = (self.cfg.rank, fin) if layers is None else (layers, self.cfg.rank, fin)
            bound = 1.0 / math.sqrt(fin)
            self.A0[t] = nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=gen).to(dev))
        return self

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        return {f"A0.{t}": p for t, p in self.A0.items()}

    def artifact_extras(self) -> dict[str, Tensor]:
        return {EXTRA_PREFIX + t: p.detach().cpu().clone() for t, p in self.A0.items()}

    def load_artifact_extras(self, extras: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load A0 from an artifact's extras (after ``bind``); with ``strict`` every target must be there."""
        have = {k[len(EXTRA_PREFIX):]: v for k, v in extras.items() if k.startswith(EXTRA_PREFIX)}
        missing = [t for t in self.A0 if t not in have]
        if missing and strict:
            raise ValueError(f"doclora init=meta: the artifact has no learned A0 for {missing} (extras "
                             f"{[EXTRA_PREFIX + t for t in missing]}); meta-train it with --meta.adapter doclora "
                             "and --meta.split seq-half, or use init=random")
        with torch.no_grad():
            for t, p in self.A0.items():
                if t in have:
                    if tuple(have[t].shape) != tuple(p.shape):
                        raise ValueError(f"doclora A0.{t}: the artifact has shape {tuple(have[t].shape)}, this "
                                         f"adapter {tuple(p.shape)} (another rank or model?)")
                    p.copy_(have[t].to(p.device, p.dtype))

    def shapes(self, model_cfg: Any) -> dict[str, tuple[int | None, int, int]]:
        """target -> (layers or None for the head, in features, out features)."""
        d, kv, L = model_cfg.model_dim, model_cfg.kv_dim, model_cfg.num_layers
        full = {"q": (L, d, d), "k": (L, d, kv), "v": (L, d, kv), "out": (L, d, d), "mlp": (L, d, d),
                "head": (None, d, model_cfg.vocab_size)}
        return {t: full[t] for t in self.cfg.target_list}

    def init(self, params: Mapping[str, Tensor], n_docs: int, model_cfg: Any, generator: torch.Generator,
             carry: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Fresh factors and optimiser state for ``n_docs`` documents on the device/dtype of ``params``.

        ``carry``: the previous batch's trainables; with ``keep_a`` their A factors are kept (same shape only)."""
        ref = params["tok_emb"]
        dev, dt, r = ref.device, ref.dtype, self.cfg.rank
        tr: dict[str, Tensor] = {}
        for t, (layers, fin, fout) in self.shapes(model_cfg).items():
            lead = (n_docs,) if layers is None else (n_docs, layers)
            keep = carry is not None and self.cfg.keep_a and f"A.{t}" in carry and carry[f"A.{t}"].shape[0] == n_docs
            if keep:
                a = carry[f"A.{t}"].detach().clone()
            elif self.cfg.init == "meta":
                if t not in self.A0:
                    raise ValueError("doclora init=meta: call bind(model) (and load the artifact's A0) first")
                a = self.A0[t].detach().to(dev, dt).expand(*lead[:1], *self.A0[t].shape).clone()
            else:
                bound = 1.0 / math.sqrt(fin)
                a = torch.empty(*lead, r, fin, device=dev, dtype=dt).uniform_(-bound, bound, generator=generator)
            tr[f"A.{t}"] = a
            tr[f"B.{t}"] = torch.zeros(*lead, fout, r, device=dev, dtype=dt)
        state = {f"m.{k}": torch.zeros_like(v) for k, v in tr.items()}
        state.update({f"v.{k}": torch.zeros_like(v) for k, v in tr.items()})
        # steps taken, per document, on the host: bias corrections are host scalars (no device sync per step)
        state["t"] = torch.zeros(n_docs, dtype=torch.float64)
        return tr, state

    def materialize(self, trainables: Mapping[str, Tensor], n_layers: int) -> dict[str, Any]:
        """Model overrides: ``{"lora": {"q.{layer}": (A, scale * B), ..., "head": (A, scale * B)}}``."""
        s = self.cfg.scale
        lora: dict[str, tuple[Tensor, Tensor]] = {}
        for t in self.cfg.target_list:
            a, b = trainables[f"A.{t}"], trainables[f"B.{t}"]
            if s != 1.0:
                b = b * s
            if t == "head":
                lora["head"] = (a, b)
            else:  # unbind, not a[:, layer]: one backward stack instead of a zero-filled full-size gradient per layer
                for layer, (al, bl) in enumerate(zip(a.unbind(1)[:n_layers], b.unbind(1)[:n_layers])):
                    lora[f"{t}.{layer}"] = (al, bl)
        return {"lora": lora}

    def step(self, trainables: Mapping[str, Tensor], state: Mapping[str, Tensor], grads: Mapping[str, Tensor],
             progress: float, active: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One AdamW step (constant lr; ``progress`` unused), in place on ``trainables`` and ``state``, which are
        returned. ``grads`` cover the first R <= D documents (later ones take no step); ``active`` (R,) bool
        (host or device; a device mask costs one sync): the documents that step, the others keep factors and
        state unchanged, as if they were not in the batch.

        Documents are grouped into runs of consecutive rows with the same step count, each run is a view, and
        the whole step is one call of torch's fused AdamW kernel (what ``torch.optim.AdamW(fused=True)`` runs)
        over all runs' views, each run with its own step count: in the evaluator the stepping documents are a
        prefix at one step count, i.e. one view per tensor, no zero-filled gradients, one kernel launch."""
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
                P.append(p[r0:r1])
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

    @staticmethod
    def rows(tree: Mapping[str, Tensor], index: slice | Tensor) -> dict[str, Tensor]:
        """The documents ``index`` of a trainables/state dict (e.g. one document for reference runs)."""
        return {k: v[index] for k, v in tree.items()}

    def adapted_count(self, model_cfg: Any) -> int:
        """Adapter scalars per document."""
        r = self.cfg.rank
        return sum((layers or 1) * r * (fin + fout) for layers, fin, fout in self.shapes(model_cfg).values())
