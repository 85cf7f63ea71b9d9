"""The update-rule transforms against torch.optim (an independent implementation of the same textbook rules), and
the chain's bookkeeping: progress in the state, identities dropped, the plain-SGD marker."""
from __future__ import annotations

import math

import pytest
import torch

from metattt.ttt import rules


def _run(rule: rules.Transform, opt_cls, steps: int = 4, progress: float = 0.0, **opt_kw):  # noqa: ANN001
    """(the rule's params, torch.optim's params) after ``steps`` steps on the same float64 gradient sequence."""
    g = torch.Generator().manual_seed(0)
    p0 = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64),
          "b": torch.randn(5, generator=g, dtype=torch.float64)}
    grads = [{n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in p0.items()} for _ in range(steps)]
    params, state = dict(p0), {**rule.init(p0), "progress": progress}
    ref = {n: t.clone().requires_grad_(True) for n, t in p0.items()}
    opt = opt_cls(list(ref.values()), **opt_kw)
    for gs in grads:
        u, changed = rule.update(gs, state, params)
        state = {**state, **changed}
        params = {n: p - u[n] for n, p in params.items()}
        for n, t in ref.items():
            t.grad = gs[n].clone()
        opt.step()
    return params, {n: t.detach() for n, t in ref.items()}, state


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_preset_is_torch_sgd(nesterov: bool) -> None:
    mine, ref, state = _run(rules.sgd(rules.Schedule(0.1), momentum=0.9, nesterov=nesterov), torch.optim.SGD,
                            lr=0.1, momentum=0.9, nesterov=nesterov)
    for n in ref:
        torch.testing.assert_close(mine[n], ref[n], rtol=1e-12, atol=1e-12)
    assert state["lr"] == 0.1 and set(state) == {"progress", "lr", "mom.a", "mom.b"}


def test_adam_is_torch_adam_and_the_cosine_schedule_reads_progress() -> None:
    lr = rules.Schedule(0.02, "cosine")
    mine, ref, state = _run(rules.scale_by_adam(lr, 0.9, 0.99), torch.optim.Adam, progress=0.5, lr=0.01,
                            betas=(0.9, 0.99), eps=1e-8)  # cosine at progress 0.5: half the peak
    for n in ref:
        torch.testing.assert_close(mine[n], ref[n], rtol=1e-10, atol=1e-12)
    assert state["t"] == 4 and state["lr"] == pytest.approx(0.01)


def test_clip_by_global_norm_is_torchs_clip() -> None:
    g = {"a": torch.full((4,), 3.0, dtype=torch.float64), "b": torch.full((2,), 4.0, dtype=torch.float64)}
    clipped, _ = rules.clip_by_global_norm(1.0).update(g, {}, g)
    ref = [t.clone().requires_grad_(True) for t in g.values()]
    for t, v in zip(ref, g.values()):
        t.grad = v.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for t, n in zip(ref, g):
        torch.testing.assert_close(clipped[n], t.grad, rtol=1e-12, atol=0)


def test_chain_bookkeeping() -> None:
    assert rules.clip_by_global_norm(0) is rules.IDENTITY and rules.trace(0.0, nesterov=True) is rules.IDENTITY
    assert rules.sgd(rules.Schedule(0.3)).sgd_lr == 0.3  # plain SGD says so (the `higher` backend replays it)
    assert rules.sgd(rules.Schedule(0.3, "cosine")).sgd_lr == 0.3  # its step size at progress 0 (a meta step's)
    assert rules.sgd(rules.Schedule(0.3), momentum=0.9).sgd_lr is None
    assert rules.chain().init({}) == {"progress": 0.0}
    with pytest.raises(ValueError, match="schedule must be one of"):
        rules.Schedule(0.1, "linear-ish")
    with pytest.raises(ValueError, match="progress must be in"):
        rules.Schedule(0.1)(1.5)


def test_host_clip_sgd_is_the_docttt_phases_former_hand_written_update() -> None:
    """The docttt phases' full-model SGD is ``rules.sgd(..., host_clip=True)``; it replaced this hand-written
    update (main before the change, copied here as the reference), bit for bit in float32: clip coefficient a
    double on the host, momentum, cosine step size over the steps."""
    g = torch.Generator().manual_seed(3)
    p0 = {"w": torch.randn(8, 5, generator=g), "b": torch.randn(7, generator=g)}
    steps = 24
    grads = [{n: torch.randn(t.shape, generator=g) * (0.05 if k % 3 else 2.0) for n, t in p0.items()}
             for k in range(steps)]  # some steps clipped, some not
    lr0, mu, clip = 0.01, 0.9, 1.0
    rule = rules.sgd(rules.Schedule(lr0, "cosine"), mu, grad_clip=clip, host_clip=True)
    cur, state = dict(p0), rule.init(p0)
    ref, mom = dict(p0), {n: torch.zeros_like(t) for n, t in p0.items()}
    clipped = 0
    for k, gs in enumerate(grads):
        u, changed = rule.update(gs, {**state, "progress": k / steps}, cur)
        state.update(changed)
        cur = {n: cur[n] - u[n] for n in cur}
        lr = lr0 * 0.5 * (1 + math.cos(math.pi * k / max(1, steps)))  # the former phase code, verbatim
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in gs.values()]))
        coef = min(1.0, clip / (float(norm) + 1e-6)) if clip > 0 else 1.0
        clipped += coef < 1.0
        for n, t in gs.items():
            mom[n] = mom[n] * mu + t * coef
            ref[n] = ref[n] - lr * mom[n]
    assert 0 < clipped < steps
    for n in ref:
        assert torch.equal(cur[n], ref[n]), n


def test_adamw_chain_is_doclora_fused_step() -> None:
    """DocLoRA's rule, ``chain(scale_by_adam, add_decayed_weights)``, takes the step its fused AdamW kernel takes
    (float tolerance: the kernel decays first and divides by sqrt(bias correction) apart) for documents at one
    step count."""
    from metattt.model.gpt import BankedGPT
    from metattt.ttt.doclora import DocLoRA, DocLoRAConfig
    from tiny import tiny_config

    m = BankedGPT(tiny_config())
    ad = DocLoRA(DocLoRAConfig(rank=3, lr=0.01, beta1=0.5, eps=1e-6, weight_decay=0.5, targets="q+head")).bind(m)
    base = {k: v.detach() for k, v in m.named_parameters()}
    tr = ad.start(base, 2)
    mine, st, rule = dict(tr), ad.init(tr), ad.rule()
    rst = rule.init(tr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in tr.items()}
        u, changed = rule.update(grads, rst, mine)
        rst.update(changed)
        mine = {k: mine[k] - u[k] for k in mine}
        tr, st = ad.step({k: v.clone() for k, v in tr.items()}, st, grads)
    for k in tr:
        torch.testing.assert_close(mine[k], tr[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(tr[k], ad.start(base, 2)[k])  # it moved
