"""The docttt chunk loop's compiled core: the model's functional core compiled once with the loop's changing rows
and lengths marked dynamic, so a whole protocol runs on one graph (plus one for a 1-document batch)."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from ..model.gpt import BankedGPT


def _dynamic_core(compiled: Callable) -> Callable:
    """``compiled`` (the core compiled with automatic dynamic shapes) called with the chunk loop's changing
    dimensions marked dynamic: rows (tokens, targets, positions, every LoRA factor) and length (tokens, RoPE
    tables). The first trace is then already the dynamic graph: without marks Dynamo compiles a static graph for
    the first shape and a second, dynamic one at the first change. Size-1 dimensions are not marked (Dynamo
    specialises them; ``MIN_ROWS`` keeps the loop off them). ``maybe_mark_dynamic``: a dimension the model's code
    specialises gets a static graph and the next change a dynamic one, as without marks, instead of an error."""
    import torch._dynamo as dynamo

    def run(cfg, p, tokens, targets, reduction, attn, rope, rt, lora=None, positions=None):
        marks = [(tokens, 0), (tokens, 1)] + [(r, 1) for r in rope]
        marks += [(x, 0) for x in (targets, positions) if x is not None]
        marks += [(f, 0) for pair in (lora or {}).values() for f in pair]
        for x, dim in marks:
            if x.size(dim) > 1:
                dynamo.maybe_mark_dynamic(x, dim)
        return compiled(cfg, p, tokens, targets, reduction, attn, rope, rt, lora, positions)

    return run


@contextlib.contextmanager
def compiled_core(model: BankedGPT, enabled: bool = True) -> Iterator[BankedGPT]:
    """Inside the block the model's functional core is the docttt compiled one (dynamic rows and lengths, see
    ``_dynamic_core``; its graphs are kept on the model, so later runs reuse them); the previous core and
    Dynamo's shape options are restored after. Duck shaping (one symbol for dimensions equal at trace time) is off
    inside: a first batch of exactly as many documents as the first forward length would tie the two."""
    if not enabled:
        yield model
        return
    import torch._dynamo as dynamo
    import torch.fx.experimental._config as fx_cfg

    cfg = dynamo.config  # every graph variant (lengths, rows, grad mode, lora or not) counts towards one limit
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    from ..model.gpt import inductor_options

    core, duck = model._core, getattr(fx_cfg, "use_duck_shape", None)
    # no matmul padding: its heuristics compare the symbolic length with small constants and, on the H200 with the
    # test model, pinned it to the first one (16); the loop's lengths are multiples of the chunk anyway
    model.compile_core(dynamic=None, options={**inductor_options(), "shape_padding": False})
    model._core = _dynamic_core(model._core)
    if duck is not None:
        fx_cfg.use_duck_shape = False
    try:
        yield model
    finally:
        model._core = core
        if duck is not None:
            fx_cfg.use_duck_shape = duck
