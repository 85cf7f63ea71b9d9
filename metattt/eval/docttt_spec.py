"""The document-batched family's protocol specs: ``doc-chunk[@...]`` (no adaptation, the baseline) and
``docttt:ADAPTER[@...]``, their options, their decomposition (``base``, ``requires``) and the registry's
per-document adapter a spec names (``make_doc_adapter``). The loop that runs them is ``metattt.eval.docttt``.

``ADAPTER`` is any ``per_document`` adapter of the run's registry (built-ins and ``--adapter-module`` plug-ins,
which the spec carries); its options are the registry's (typed by ``Registry.make``: the same keys, values and errors
as ``--adapter-spec``), written ``/``-separated after ``@`` beside the protocol's own."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import torch

from ..ttt.adapter import Adapter
from ..ttt.registry import Registry, builtin_registry
from .spec import ProtocolSpec, Spec

BASELINE = "doc-chunk"
FAMILY = "docttt"
NOT_OPTIONS = ("adapter", "adapter_opts", "registry")  # fields that are not ``@key=value`` protocol options


@dataclass(frozen=True)
class DocTTTSpec(Spec):
    """One protocol of the family; ``adapter=None`` is the ``doc-chunk`` baseline (adaptation off)."""

    adapter: str | None = None
    chunk: int = 32
    docs: int = 64
    window: int = 2048
    phases: int = 0
    phase_docs: int = 2000
    phase_lr: float = 0.001
    phase_momentum: float = 0.9
    phase_tokens: int = 32768
    phase_epochs: int = 1
    phase_clip: float = 1.0
    adapter_opts: tuple[tuple[str, str], ...] = ()
    #: where ``adapter`` is registered (None: the built-ins); not part of the protocol's identity
    registry: Registry | None = field(default=None, compare=False, repr=False)
    mode: str = field(default=FAMILY, init=False)
    windows: str = field(default=BASELINE, init=False)

    def __post_init__(self) -> None:
        for n in ("chunk", "docs", "window", "phase_docs", "phase_tokens", "phase_epochs"):
            if getattr(self, n) < 1:
                raise ValueError(f"{self.name}: {n} must be >= 1, got {getattr(self, n)}")
        if self.phases < 0:
            raise ValueError(f"{self.name}: phases must be >= 0, got {self.phases}")
        if self.adapter is None and (self.phases or self.adapter_opts):
            raise ValueError(f"{BASELINE} takes no adapter options or phases (use docttt:ADAPTER@...)")
        if self.adapter is not None and (self.registry is not None or self.adapter in builtin_registry().classes):
            self.make_adapter()  # validates the name and options now (exit 2 before anything runs); a plug-in's
            # name without its registry (a report read back) is checked when the adapter is made

    @property
    def adapts(self) -> bool:
        return self.adapter is not None

    @property
    def name(self) -> str:
        opts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                if f.init and f.name not in NOT_OPTIONS and getattr(self, f.name) != f.default]
        opts += [f"{k}={v}" for k, v in self.adapter_opts]
        head = BASELINE if self.adapter is None else f"{FAMILY}:{self.adapter}"
        return head + ("@" + "/".join(opts) if opts else "")

    @property
    def base(self) -> str:
        """The protocol this one's Δ is taken from: doc-flat → doc-chunk → docttt → docttt + phases."""
        if self.adapter is None:
            return "doc-flat"
        if self.phases:
            return self.without_phases().name
        return self.baseline().name

    def baseline(self) -> "DocTTTSpec":
        return DocTTTSpec(None, self.chunk, self.docs, self.window)

    def without_phases(self) -> "DocTTTSpec":
        return replace(self, phases=0, phase_docs=2000, phase_lr=0.001, phase_momentum=0.9, phase_tokens=32768,
                       phase_epochs=1, phase_clip=1.0)

    @property
    def total_base(self) -> str | None:
        return "doc-flat" if self.adapter is not None else None

    @property
    def step(self) -> str:
        return "context" if self.adapter is None else ("phases" if self.phases else "adaptation")

    @property
    def order(self) -> tuple:
        return (1, self.adapter is not None, self.phases > 0)  # the decomposition's order

    def requires(self) -> list[Spec]:
        """flat, doc-flat and the family members of its decomposition."""
        out: list[Spec] = [ProtocolSpec("flat"), ProtocolSpec("doc-flat")]
        out += [self.baseline()] if self.adapter is not None else []
        return out + ([self.without_phases()] if self.phases else [])

    def make_adapter(self) -> Adapter:
        """The (unbound) per-document adapter from the spec's registry, its ``chunk`` the protocol's. The option
        texts are typed by ``Registry.make`` as ``--adapter-spec``'s are (the same keys, values and errors)."""
        reg = self.registry or builtin_registry()
        name = str(self.adapter)
        if not reg.get(name).per_document:  # an unknown name: the registry's error, naming them
            per_doc = [n for n, c in reg.classes.items() if c.per_document]
            raise ValueError(f"docttt adapter {name!r} is not a per-document adapter (run it as ttt:{name}); "
                             f"per-document adapters: {', '.join(per_doc)}")
        opts: dict[str, Any] = {**dict(self.adapter_opts), "chunk": self.chunk}
        return reg.make(name, **opts)


def is_docttt(text: str) -> bool:
    t = text.strip()
    return t.startswith(FAMILY + ":") or t == BASELINE or t.startswith(BASELINE + "@")


def parse_docttt(text: str, registry: Registry | None = None) -> DocTTTSpec:
    """``doc-chunk[@chunk=32/window=2048/docs=64]`` or ``docttt:ADAPTER[@opt=value/...]``: protocol options
    (chunk, docs, window, phases, phase_docs, phase_lr, phase_momentum, phase_tokens, phase_epochs, phase_clip)
    and the adapter's (doclora: rank, alpha, lr, beta1, beta2, eps, weight_decay, targets, keep_a, seed, init),
    ADAPTER a per-document adapter of ``registry`` (default: the built-ins)."""
    t = text.strip()
    head, _, rest = t.partition("@")
    adapter = None if head == BASELINE else head.partition(":")[2]
    if adapter == "":
        raise ValueError(f"protocol {t!r} names no adapter (docttt:doclora)")
    proto = {f.name: f for f in fields(DocTTTSpec) if f.init and f.name not in NOT_OPTIONS}
    kw: dict[str, Any] = {}
    lora: list[tuple[str, str]] = []
    for item in (s for s in rest.split("/") if s.strip()):
        k, eq, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not eq or not k:
            raise ValueError(f"protocol {t!r}: option {item!r} is not key=value")
        if k in proto:
            typ: Any = type(proto[k].default)
            try:
                kw[k] = typ(v)
            except ValueError as e:
                raise ValueError(f"protocol {t!r}: {k}={v!r} is not a {typ.__name__}") from e
        else:
            lora.append((k, v))
    return DocTTTSpec(adapter, adapter_opts=tuple(lora), registry=registry, **kw)


def make_doc_adapter(spec: DocTTTSpec, model: torch.nn.Module,
                     extras: Mapping[str, torch.Tensor] | None = None) -> Adapter | None:
    """The spec's per-document adapter, bound to ``model`` with its learned meta-parameters loaded from the
    artifact's ``extras`` (required when it needs them: ``init=meta``); None for the baseline."""
    if spec.adapter is None:
        return None
    ad = spec.make_adapter().bind(model)
    if ad.meta_parameters():
        ad.load_artifact_extras(extras or {})
    return ad
