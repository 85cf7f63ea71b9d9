"""Meta-training step: the inner loop is the evaluator's update (bit for bit at first order), first-order
formula, exact second order vs finite differences / torch.func / higher, MetaSGD rate learning, Reptile."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT
from metattt.ttt import Registry, make_adapter
from metattt.train.schedule import meta_step_due
from metattt.ttt.meta import MetaConfig, meta_loss, reptile_loss, split_batch
from metattt.ttt.sgd import ReptileConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> BankedGPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, num_layers=num_layers, model_dim=32, num_heads=2, num_kv_heads=1,
                      mlp_mult=2.0, rope_dims=8, xsa_layers=(num_layers - 1,), ve_layers=(num_layers - 1,), ve_dim=8,
                      bigram_vocab=32, bigram_dim=8)
    m = BankedGPT(cfg)
    with torch.no_grad():
        for p in (m.qo_bank, m.mlp_down_bank):
            p.normal_(std=0.1)
    return m.to(dtype)


def batch(b: int = 4, t: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(4, 64, (b, t + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def grads_of(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}


@pytest.mark.parametrize("split, steps", [("same-batch", 1), ("cross-doc", 2), ("seq-half", 1)])
def test_fomaml_meta_gradient_equals_first_order_formula(split: str, steps: int) -> None:
    m = tiny_model()
    x, y = batch()
    alpha = 0.3
    a = make_adapter("fomaml", "banks:layers>=1+norms", lr=alpha).bind(m)
    cfg = MetaConfig(adapter="fomaml", inner_steps=steps, split=split, order="first", outer_weight=0.7,
                     log_pre=split != "cross-doc")
    loss, stats = meta_loss(m, a, x, y, cfg)
    loss.backward()
    got = grads_of(m)
    # by hand: theta' = theta - alpha * mask * grad L_in, k times; meta-grad = 0.7 * grad L_out(theta')
    (xi, yi), (xo, yo), start = split_batch(x, y, split)
    sel = a.sel
    theta = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(steps):
        leaves = {n: theta[n].clone().requires_grad_(True) for n in sel.names}
        gs = torch.autograd.grad(m(xi, yi, params={**theta, **leaves}), list(leaves.values()))
        for n, gr in zip(sel.names, gs):
            mask = sel.masks[n]
            theta[n] = theta[n] - alpha * (gr if mask is None else gr * mask)
    leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    lo = m(xo, yo, params=leaves, reduction="none")[:, start:].mean()
    want = dict(zip(leaves, torch.autograd.grad(0.7 * lo, list(leaves.values()))))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert abs(stats["meta/L_post"].item() - lo.item()) < 1e-5
    if split == "cross-doc":  # L_pre is not free there and log_pre is off: no extra forward, no gain stat
        assert "meta/L_pre" not in stats and "meta/L_inner" in stats
    else:
        assert stats["meta/gain"].item() > 0  # inner steps on (part of) the same rows help
    with torch.no_grad():  # the free statistic: mean loss of the first inner pass, at the current weights
        inner_pre = m(xi, yi).item()
    assert stats["meta/L_inner"].item() == pytest.approx(inner_pre, abs=1e-5)


def _second_order_grad(m: BankedGPT, a, x, y, backend: str, steps: int = 2) -> dict[str, torch.Tensor]:  # noqa: ANN001
    m.zero_grad(set_to_none=True)
    cfg = MetaConfig(adapter="x", inner_steps=steps, split="cross-doc", order="second", backend=backend)
    loss, _ = meta_loss(m, a, x, y, cfg)
    loss.backward()
    return grads_of(m)


class ToyLM(torch.nn.Module):
    """A float64 stand-in with BankedGPT's call signature (its logits stay float64, so finite differences
    resolve the small second-order term; BankedGPT returns float32 logits)."""

    def __init__(self, vocab: int = 16, d: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok_emb = torch.nn.Parameter(torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.5)
        self.mlp_up_bank = torch.nn.Parameter(torch.randn(2, d, d, generator=g, dtype=torch.float64) * 0.5)
        self.gain = torch.nn.Parameter(torch.ones(d, dtype=torch.float64))

    def named_bank_slices(self) -> list[tuple[str, int, int, str]]:
        return [("mlp_up_bank", 0, 0, "up"), ("mlp_up_bank", 1, 1, "up")]

    def forward(self, tokens, targets=None, *, params=None, reduction="mean", attn="auto"):  # noqa: ANN001, ANN201
        p = {**dict(self.named_parameters()), **(params or {})}
        h = p["tok_emb"][tokens]
        for i in range(2):
            h = h + torch.tanh(h @ p["mlp_up_bank"][i].T)
        logits = (h * p["gain"]) @ p["tok_emb"].T
        if targets is None:
            return logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return nll.view(targets.shape) if reduction == "none" else nll


def _directional_fd(m: torch.nn.Module, a, x, y, cfg: MetaConfig, direction, h: float) -> float:  # noqa: ANN001
    def value(sign: float) -> float:
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(sign * h * direction[n])
        v = meta_loss(m, a, x, y, cfg)[0].item()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.sub_(sign * h * direction[n])
        return v

    return (value(1.0) - value(-1.0)) / (2 * h)


@pytest.mark.parametrize("adapter, spec", [("fomaml", "mlp_up_bank:layers>=1+gains"), ("metasgd", "all"),
                                           ("sam", "all")])
def test_second_order_meta_gradient_equals_finite_differences(adapter: str, spec: str) -> None:
    m = ToyLM()
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, 16, (4, 9), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    kw = {"lr_init": 0.5} if adapter == "metasgd" else {"lr": 0.5}
    a = make_adapter(adapter, spec, **kw).bind(m)
    cfg = MetaConfig(adapter=adapter, inner_steps=2, split="cross-doc", order="second", log_pre=False)
    m.zero_grad(set_to_none=True)
    meta_loss(m, a, x, y, cfg)[0].backward()
    g2 = grads_of(m)
    m.zero_grad(set_to_none=True)
    meta_loss(m, a, x, y, MetaConfig(adapter=adapter, inner_steps=2, split="cross-doc", order="first"))[0].backward()
    g1 = grads_of(m)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in m.named_parameters()}
    fd = _directional_fd(m, a, x, y, cfg, direction, 1e-5)
    second = sum(float((g2[n] * direction[n]).sum()) for n in direction)
    first = sum(float((g1[n] * direction[n]).sum()) for n in direction)
    assert abs(fd - second) < 1e-7 * max(1.0, abs(second)), (fd, second)
    assert abs(fd - first) > 1e3 * abs(fd - second)  # the check resolves the second-order term


def test_second_order_backends_agree_on_banked_gpt() -> None:
    m = tiny_model(dtype=torch.float64)
    x, y = batch(b=4, t=10)
    a = make_adapter("fomaml", "banks:layers>=1+norms", lr=0.5).bind(m)
    g_auto = _second_order_grad(m, a, x, y, "autograd")
    g_func = _second_order_grad(m, a, x, y, "torch.func")
    for n in g_auto:
        torch.testing.assert_close(g_func[n], g_auto[n], rtol=1e-9, atol=1e-12, msg=n)
    m.zero_grad(set_to_none=True)
    meta_loss(m, a, x, y, MetaConfig(adapter="x", inner_steps=2, split="cross-doc", order="first"))[0].backward()
    g_first = grads_of(m)
    assert max(float((g_first[n] - g_auto[n]).abs().max()) for n in g_auto) > 1e-6
    if m(x).dtype == torch.float64:  # finite differences need float64 logits from the model
        cfg = MetaConfig(adapter="x", inner_steps=2, split="cross-doc", order="second", log_pre=False)
        gen = torch.Generator().manual_seed(3)
        direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-2 for n, p in m.named_parameters()}
        fd = _directional_fd(m, a, x, y, cfg, direction, 1e-4)
        analytic = sum(float((g_auto[n] * direction[n]).sum()) for n in direction)
        assert abs(fd - analytic) < 1e-6 * max(1.0, abs(analytic)), (fd, analytic)
    if importlib.util.find_spec("higher") is None:
        pytest.skip("optional package 'higher' not installed (pip install higher): higher cross-check skipped")
    g_higher = _second_order_grad(m, a, x, y, "higher")
    for n in g_auto:
        torch.testing.assert_close(g_higher[n], g_auto[n], rtol=1e-8, atol=1e-12, msg=n)


def test_metasgd_rates_get_gradients_and_learn() -> None:
    m = tiny_model()
    x, y = batch()
    a = make_adapter("metasgd", "banks+norms", lr_init=0.05).bind(m)
    meta = a.meta_parameters()
    n_bank_slices = len(m.named_bank_slices())
    assert meta["log_lr.qo_bank"].shape == (2 * 2,) and sum(meta[f"log_lr.{b}"].numel() for b in
                                                             ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")) == n_bank_slices
    before = {n: p.detach().clone() for n, p in meta.items()}
    opt = torch.optim.Adam(list(meta.values()), lr=0.1)
    loss, _ = meta_loss(m, a, x, y, MetaConfig(adapter="metasgd", split="cross-doc", order="first"))
    loss.backward()
    for n, p in meta.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert all(float(meta[f"log_lr.{b}"].grad.abs().min()) > 0 for b in ("qo_bank", "mlp_up_bank"))
    opt.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in meta.items() if p.grad.abs().sum() > 0)
    # rates reach the eval-time update too: doubling them doubles the first step
    a2 = make_adapter("metasgd", "banks", lr_init=0.05).bind(m)
    d1 = a2.params()["mlp_up_bank"].clone()
    a2.adapt(m, x, y)
    step1 = a2.params()["mlp_up_bank"] - d1
    a2.reset()
    with torch.no_grad():
        a2.meta_parameters()["log_lr.mlp_up_bank"].add_(torch.log(torch.tensor(2.0)))
    a2.adapt(m, x, y)
    scale = float(step1.abs().max())
    assert scale > 0
    torch.testing.assert_close(a2.params()["mlp_up_bank"] - d1, 2 * step1, rtol=0, atol=1e-3 * scale)


def test_metasgd_per_row_and_partial_slices() -> None:
    m = tiny_model(3)
    a = make_adapter("metasgd", "banks[q,v]:layers>=1", per_row=True).bind(m)
    assert a.meta_parameters()["log_lr.qo_bank"].shape == (2, 32)
    r = a.rate("qo_bank")
    assert r.shape == (6, 32, 1)
    assert torch.equal(r[[0, 3, 4, 5]], torch.zeros(4, 32, 1)) and bool((r[[1, 2]] > 0).all())


def test_reptile_runs_the_evaluated_passes_and_its_epsilon() -> None:
    """theta_k after the adapter's ``epochs`` plain steps (the evaluated update; no second pass count); the
    surrogate's gradient is epsilon * (theta - theta_k), so one SGD step of lr 1 on it is exactly the Reptile
    interpolation (and the trainer's meta step uses it)."""
    m = tiny_model()
    x, y = batch()
    assert make_adapter("reptile").cfg.epochs == 3
    a = make_adapter("reptile", "banks:layers>=1", lr=0.2, epochs=2, epsilon=0.25).bind(m)
    theta0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    sel = a.sel
    th = dict(theta0)
    for _ in range(2):  # theta_k by hand
        leaves = {n: th[n].clone().requires_grad_(True) for n in sel.names}
        gs = torch.autograd.grad(m(x, y, params={**th, **leaves}), list(leaves.values()))
        th.update({n: th[n] - 0.2 * gr * sel.masks[n] for n, gr in zip(sel.names, gs)})
    loss, stats = meta_loss(m, a, x, y, MetaConfig(adapter="reptile", outer_weight=1.0))
    loss.backward()
    for n in sel.names:
        torch.testing.assert_close(m.get_parameter(n).grad, 0.25 * (theta0[n] - th[n]), rtol=1e-5, atol=1e-8)
    assert stats["reptile/dist"].item() > 0
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    opt.step()
    for n, p in m.named_parameters():
        want = theta0[n] + 0.25 * (th[n] - theta0[n]) if n in sel.names else theta0[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7)
    assert torch.equal(m.qo_bank[0], theta0["qo_bank"][0])  # layer-0 slice frozen exactly
    m.zero_grad(set_to_none=True)
    reptile_loss(m, a, x, y, steps=2, epsilon=1.0)[0].backward()  # explicit overrides still work


def test_meta_config_validation_and_schedule() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        MetaConfig(split="random")
    with pytest.raises(ValueError, match="backend must be one of"):
        MetaConfig(backend="jax")
    c = MetaConfig(adapter="fomaml", every=4, start_frac=0.5)
    due = [meta_step_due(c.every, c.start_frac, s, 100, 0.0, 0.0) for s in (8, 48, 52, 53)]
    assert due == [False, False, True, False]
    assert c.make_adapter().name == "fomaml"
    with pytest.raises(ValueError, match="cross-doc"):
        split_batch(*batch(b=1), "cross-doc")


def test_delta_weight_combines_pre_and_post() -> None:
    m = tiny_model()
    x, y = batch()
    a = make_adapter("fomaml", "banks", lr=0.3).bind(m)
    loss, st = meta_loss(m, a, x, y, MetaConfig(adapter="fomaml", outer_weight=1.0, delta_weight=0.5))
    want = 1.5 * st["meta/L_post"] - 0.5 * st["meta/L_pre"]
    assert abs(loss.item() - want.item()) < 1e-6


# ----------------------------------------------------------------------------------------- one update rule
#: every adapter the registry knows (built-ins) plus the worked plug-in example, read from the registry itself: an
#: adapter added to either is covered without editing this file
EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "signsgd_norms.py")
DOC_EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "docsgd_head.py")  # a per-document plug-in
REGISTRY = Registry.build([EXAMPLE, DOC_EXAMPLE], use_entry_points=False)
#: extra hyper-parameters, per name, that make parts of a rule act which its defaults leave idle on a tiny batch
#: (clip below the gradient norm, nesterov, per-row rates); each adapter is also tested with its plain defaults
TUNED = {
    "sgd": dict(lr=0.05, grad_clip=0.5, nesterov=True),
    "metasgd": dict(lr_init=0.05, per_row=True, grad_clip=1.0, select="banks[q,v]+norms"),
    "sam": dict(lr=0.05, rho=0.1, grad_clip=0.5),
    "lora": dict(lr=0.01, rank=2, epochs=2, select="banks[q,v,up]:layers>=1"),
    "dyneval": dict(lr=0.001, decay=0.1, epochs=2),
    "signsgd": dict(momentum=0.9, epochs=2),
    "doclora": dict(rank=2, lr=0.01, beta1=0.9, weight_decay=0.1, alpha=4.0, targets="q+v+mlp+head"),
}
CASES = [(n, "defaults") for n in REGISTRY.names] + [(n, "tuned") for n in REGISTRY.names if n in TUNED]


def _spec(name: str, variant: str) -> str:
    # 2 rows a mini-batch, 2 tokens a chunk (per-document adapters): several steps on the tiny batch
    kw = {"batch_seqs": 2, **({"chunk": 2} if REGISTRY.get(name).per_document else {}),
          **(TUNED[name] if variant == "tuned" else {})}
    return name + ":" + ",".join(f"{k}={v}" for k, v in kw.items())


def _evaluated(a, m, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """The evaluator's update on rows (x, y) from the trained weights: (the overrides it reaches, its steps). A
    per-document adapter's evaluator is the doc-batched chunk loop, each row one document whose chunks it trains
    (all but its last, here one more target from the row)."""
    if not a.per_document:
        st = a.adapt(m, x, y, progress=0.0)
        return a.params(), st["steps"]
    from metattt.eval.docttt_batch import run_batch
    from metattt.eval.docttt_spec import DocTTTSpec
    from metattt.eval.ledger import Ledger

    n, length = x.shape
    tokens = torch.cat([x, y[:, -1:]], 1).reshape(-1)
    starts = np.arange(n) * (length + 1)
    base = {k: v.detach() for k, v in m.named_parameters()}
    with torch.no_grad():
        t0 = a.start(base, n)
    chunk = a.cfg.chunk
    spec = DocTTTSpec(a.name, chunk=chunk, registry=REGISTRY)
    out = run_batch(m, tokens, starts, starts + length // chunk * chunk + 1, spec, a, None, Ledger(),
                    init=(t0, a.init(t0)), autocast=False)
    return a.materialize(base, out.trainables), out.train_steps


def _outer(a, m, x: torch.Tensor, y: torch.Tensor, start: int, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return a.loss(m, x, y, params) if start == 0 else a.loss(m, x, y, params, reduction="none")[:, start:].mean()


@pytest.mark.parametrize("name, variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_meta_inner_loop_is_the_evaluation_update_bit_for_bit(name: str, variant: str) -> None:
    """The default meta step (MetaConfig with no inner_steps) runs the evaluator's update: its first-order inner
    loop reaches bit for bit the weights the evaluator reaches on the same rows (``adapt``; a per-document
    adapter: the doc-batched evaluator's chunk loop) (CPU, progress 0, the adapter's own epochs, momentum, clip,
    schedule and mini-batches or chunks), and its outer loss is the loss at exactly those weights. Generated from
    the registry, plug-in included."""
    assert {"sgd", "signsgd", "doclora", "docsgd"} <= set(REGISTRY.names)
    per_doc = REGISTRY.get(name).per_document
    cfg = MetaConfig(adapter=_spec(name, variant), adapter_modules=(EXAMPLE, DOC_EXAMPLE),
                     split="seq-half" if per_doc else "same-batch")
    m = tiny_model()
    x, y = batch(b=5, t=10, seed=4)
    a = cfg.make_adapter(REGISTRY).bind(m)
    with torch.no_grad():
        for p in a.meta_parameters().values():  # non-uniform learned rates
            p.add_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    base = {n: p.detach().clone() for n, p in m.named_parameters()}
    (xi, yi), (xo, yo), start = split_batch(x, y, cfg.split)
    if not a.trains_in_eval:
        assert a.adapt(m, x, y, progress=0.0) == {"steps": 0} and not a.params()
        with pytest.raises(ValueError, match="nothing to meta-train"):
            meta_loss(m, a, x, y, cfg)
        return
    evaluated, steps = _evaluated(a, m, xi, yi)
    passes = cfg.inner_passes(a)
    assert passes == a.cfg.epochs and cfg.inner_summary(a)["source"] == "adapter epochs"
    assert steps == passes * len(a.batches(xi, yi))  # epochs x mini-batches (chunks)
    assert steps == (2 if per_doc else passes * -(-5 // a.cfg.batch_seqs))
    assert evaluated and any(not torch.equal(evaluated[n], base[n]) if n in base else bool(evaluated[n].any())
                             for n in evaluated), "the update did nothing"
    adapted, _ = a.inner_loop(m, dict(m.named_parameters()), xi, yi, passes=passes, create_graph=False)
    assert set(evaluated) == set(adapted)
    for n in evaluated:
        assert torch.equal(evaluated[n], adapted[n]), n
    assert any(t.requires_grad for t in adapted.values())  # and the meta result carries the outer graph
    loss, stats = meta_loss(m, a, x, y, cfg)  # the trainer's call
    loss.backward()
    if isinstance(a.cfg, ReptileConfig):  # gradient epsilon * (theta - theta_k), theta_k the evaluated weights
        for n in evaluated:
            want = (base[n] - evaluated[n]) * (a.cfg.epsilon * cfg.outer_weight)
            assert torch.equal(m.get_parameter(n).grad, want), n
    else:
        with torch.no_grad():
            assert torch.equal(stats["meta/L_post"], _outer(a, m, xo, yo, start, evaluated)), \
                "outer loss not at the evaluated weights"


def test_inner_steps_overrides_the_adapters_epochs_and_is_recorded() -> None:
    m = tiny_model()
    x, y = batch()
    a = make_adapter("sgd", "banks", lr=0.05).bind(m)
    cfg = MetaConfig(adapter="sgd:lr=0.05", inner_steps=1)
    assert a.cfg.epochs == 3 and cfg.inner_passes(a) == 1
    assert cfg.inner_summary(a) == {"passes": 1, "source": "override inner_steps", "progress": 0.0}
    assert MetaConfig(adapter="sgd").to_dict()["inner_steps"] is None  # config.json: None = the adapter's epochs
    a.adapt(m, x, y)  # one evaluated epoch is not what the override-1 meta step computes with 3 epochs ...
    one, _ = a.inner_loop(m, dict(m.named_parameters()), x, y, passes=1, create_graph=False)
    assert any(not torch.equal(one[n], a.params()[n]) for n in one)
    with pytest.raises(ValueError, match="inner_steps"):
        MetaConfig(adapter="sgd", inner_steps=0)


SECOND = {  # a rule that acts in every part: momentum, clip, mini-batches
    "sgd": ("banks:layers>=1+norms", dict(lr=0.05, momentum=0.9, grad_clip=0.5, batch_seqs=2, nesterov=True)),
    "metasgd": ("banks[q,v]+norms", dict(lr_init=0.05, per_row=True, grad_clip=1.0, batch_seqs=2)),
    "sam": ("all", dict(lr=0.05, rho=0.1, momentum=0.9, batch_seqs=2)),
    "lora": ("banks[q,v,up]:layers>=1", dict(lr=0.01, rank=2, batch_seqs=2)),
    "dyneval": ("banks+norms", dict(lr=0.001, decay=0.1, batch_seqs=2)),
}


@pytest.mark.parametrize("name", list(SECOND))
def test_second_order_inner_loop_has_the_same_values(name: str) -> None:
    m = tiny_model()
    x, y = batch(b=5, t=10, seed=4)
    sel, kw = SECOND[name]
    a = make_adapter(name, sel, epochs=2, **kw).bind(m)
    if name == "dyneval":
        a.collect_stats(m, [(x, y)])
    with torch.no_grad():
        for p in a.meta_parameters().values():
            p.add_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    a.adapt(m, x, y, progress=0.0)
    evaluated = a.params()
    adapted, _ = a.inner_loop(m, dict(m.named_parameters()), x, y, passes=2, create_graph=True, attn="math")
    for n in evaluated:
        torch.testing.assert_close(adapted[n].detach(), evaluated[n], rtol=1e-5, atol=1e-6, msg=n)


def test_meta_parameters_and_state_dict_come_from_torch() -> None:
    m = tiny_model()
    a = make_adapter("metasgd", "banks+norms").bind(m)
    assert isinstance(a, torch.nn.Module)
    assert dict(a.named_parameters()) == a.meta_parameters()
    keys = set(a.state_dict())
    assert "log_lr.blocks.0.attn_scale" in keys and "log_lr.qo_bank" in keys
    assert set(a.artifact_extras()) == {f"ttt.metasgd.{k}" for k in keys}


def test_meta_step_pays_no_extra_forward() -> None:
    """Default meta step (same-batch, one inner mini-batch, first order): one inner forward+backward and one outer
    forward, L_pre taken from the inner loss for free (before the redesign a third, no-grad forward paid for it)."""
    m = tiny_model()
    x, y = batch()
    calls = []
    handle = m.register_forward_pre_hook(lambda mod, args: calls.append(1))
    a = make_adapter("fomaml", "banks", lr=0.3).bind(m)
    loss, st = meta_loss(m, a, x, y, MetaConfig(adapter="fomaml"))
    loss.backward()
    assert len(calls) == 2 and {"meta/L_pre", "meta/gain", "meta/L_post", "meta/L_inner"} <= set(st)
    calls.clear()
    meta_loss(m, a, x, y, MetaConfig(adapter="fomaml", split="cross-doc"))
    assert len(calls) == 2  # L_pre is not free here: it is skipped unless log_pre
    calls.clear()
    meta_loss(m, a, x, y, MetaConfig(adapter="fomaml", split="cross-doc", log_pre=True))
    assert len(calls) == 3
    handle.remove()
