"""The update-rule transforms against torch.optim (an independent implementation of the same textbook rules), and
the chain's bookkeeping: progress in the state, identities dropped, the plain-SGD marker."""
from __future__ import annotations

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
