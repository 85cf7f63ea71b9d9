"""Single-rank tests of metattt.optim: Newton–Schulz, Muon math, builder routing/clipping/state."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from metattt.optim import (
    Muon,
    OptimConfig,
    ParallelMuon,
    build_optimizers,
    route_parameters,
    shape_scale,
    zeropower_via_newtonschulz,
)
from metattt.optim.ns import NS5_COEFFS, POLAR_EXPRESS_COEFFS


def _svals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


# ----------------------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("shape", [(4, 24, 64), (4, 64, 24), (3, 32, 40)])
def test_ns5_singular_values_in_band(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g)
    s = _svals(zeropower_via_newtonschulz(G))
    # NS5 does not converge to 1: its quintic maps the spectrum into a band around 1 (measured ~[0.68, 1.14]).
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    # ...and the input spectrum really was spread out (otherwise the band check says nothing).
    s_in = _svals(G)
    assert (s_in.max() / s_in.min()) > 2.0


def test_polar_express_tighter_than_ns5_and_closer_to_polar_factor():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(4, 24, 64, generator=g, dtype=torch.float64)
    G = G * torch.logspace(0, -2, 24, dtype=torch.float64)[:, None]  # condition number ~100+
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    dev, err = {}, {}
    for pe in (False, True):
        Z = zeropower_via_newtonschulz(G, polar_express=pe, dtype=torch.float64)
        dev[pe] = (_svals(Z) - 1).abs().max().item()
        err[pe] = ((Z - polar).norm() / polar.norm()).item()
    assert dev[True] < 0.2, dev
    assert dev[True] < 0.7 * dev[False], dev
    assert err[True] < 0.6 * err[False], err


def test_ns_batched_equals_per_slice_and_transpose_symmetric():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(5, 16, 40, generator=g)
    for pe in (False, True):
        batched = zeropower_via_newtonschulz(G, polar_express=pe)
        loop = torch.stack([zeropower_via_newtonschulz(G[i], polar_express=pe) for i in range(5)])
        torch.testing.assert_close(batched, loop, atol=1e-6, rtol=1e-5)
        tall = zeropower_via_newtonschulz(G.mT, polar_express=pe)
        torch.testing.assert_close(tall, batched.mT, atol=1e-6, rtol=1e-5)


def test_ns_matches_handwritten_quintic_and_zero_and_errors():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(12, 20, generator=g, dtype=torch.float64)
    X = G / (G.norm() + 1e-7)
    a, b, c = NS5_COEFFS
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(zeropower_via_newtonschulz(G, dtype=torch.float64), X)
    # Polar Express uses a different (a,b,c) per step and the 1.02 safety normalisation.
    X = G / (G.norm() * 1.02 + 1e-7)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(zeropower_via_newtonschulz(G, polar_express=True, dtype=torch.float64), X)
    assert torch.count_nonzero(zeropower_via_newtonschulz(torch.zeros(2, 3, 4))) == 0
    with pytest.raises(ValueError, match="m, n"):
        zeropower_via_newtonschulz(torch.randn(5))
    with pytest.raises(ValueError, match="floating"):
        zeropower_via_newtonschulz(torch.ones(3, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- Muon


def _ref_ns(u: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Independent per-matrix reference (float64)."""
    X = u.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    a, b, c = NS5_COEFFS
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_reference(nesterov):
    g = torch.Generator().manual_seed(4)
    p0 = torch.randn(3, 12, 6, generator=g)  # tall slices → scale sqrt(2)
    grads = [torch.randn(3, 12, 6, generator=g) for _ in range(3)]
    lr, mom, wd = 0.05, 0.9, 0.1
    p = nn.Parameter(p0.clone())
    opt = Muon([p], lr=lr, momentum=mom, nesterov=nesterov, weight_decay=wd)
    ref = p0.double().clone()
    buf = torch.zeros_like(ref)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
        buf = mom * buf + gr.double()
        u = gr.double() + mom * buf if nesterov else buf
        upd = torch.stack([_ref_ns(u[i]) for i in range(3)]) * math.sqrt(12 / 6)
        ref = ref * (1 - lr * wd) - lr * upd
    torch.testing.assert_close(p.detach().double(), ref, atol=2e-5, rtol=1e-5)


def test_weight_decay_is_decoupled():
    g = torch.Generator().manual_seed(5)
    p0 = torch.randn(2, 8, 8, generator=g)
    grad = torch.randn(2, 8, 8, generator=g)
    lr, wd = 0.1, 0.5
    out = {}
    for w in (0.0, wd):
        p = nn.Parameter(p0.clone())
        p.grad = grad.clone()
        Muon([p], lr=lr, momentum=0.9, weight_decay=w).step()
        out[w] = p.detach()
    # Decay does not pass through momentum/NS: the difference is exactly -lr*wd*p0.
    torch.testing.assert_close(out[wd] - out[0.0], -lr * wd * p0, atol=1e-6, rtol=1e-5)
    p = nn.Parameter(p0.clone())
    p.grad = torch.zeros_like(p0)
    Muon([p], lr=lr, momentum=0.9, weight_decay=wd).step()
    torch.testing.assert_close(p.detach(), p0 * (1 - lr * wd))


def test_shape_scale_per_slice_shape():
    assert shape_scale(64, 16) == 2.0 and shape_scale(16, 64) == 1.0 and shape_scale(8, 8) == 1.0
    g = torch.Generator().manual_seed(6)
    for rows, cols, scale in ((32, 8, 2.0), (8, 32, 1.0)):
        grad = torch.randn(2, rows, cols, generator=g)
        p = nn.Parameter(torch.zeros(2, rows, cols))
        p.grad = grad.clone()
        Muon([p], lr=1.0, momentum=0.0).step()
        torch.testing.assert_close(-p.detach(), scale * zeropower_via_newtonschulz(grad))


def test_momentum_changes_through_param_groups():
    g = torch.Generator().manual_seed(7)
    p = nn.Parameter(torch.zeros(1, 6, 6))
    opt = Muon([p], lr=1.0, momentum=0.95)
    for _ in range(2):
        p.grad = torch.randn(1, 6, 6, generator=g)
        opt.step()
    before = p.detach().clone()
    for group in opt.param_groups:
        group["momentum"] = 0.0  # nesterov with momentum 0: update is NS(g) whatever the buffer holds
    grad = torch.randn(1, 6, 6, generator=g)
    p.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(before - p.detach(), zeropower_via_newtonschulz(grad))


def test_muon_rejects_bad_shapes_and_hparams():
    with pytest.raises(ValueError, match="3-D banks"):
        Muon([nn.Parameter(torch.zeros(2, 2, 2, 2))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        Muon([nn.Parameter(torch.zeros(2, 2))], lr=0.1, momentum=1.0)


def test_parallel_muon_world1_is_muon():
    g = torch.Generator().manual_seed(8)
    p0 = torch.randn(3, 6, 10, generator=g)
    grads = [torch.randn(3, 6, 10, generator=g) for _ in range(2)]
    a, b = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    oa = Muon([a], lr=0.1, momentum=0.9, weight_decay=0.04)
    ob = ParallelMuon([b], lr=0.1, momentum=0.9, weight_decay=0.04)
    assert ob.world_size == 1
    for gr in grads:
        a.grad, b.grad = gr.clone(), gr.clone()
        ob.launch_reduce_scatter()  # no-op without collectives
        oa.step()
        ob.step()
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- builder


class TinyBanked(nn.Module):
    """Model-like module with the contract's parameter names (banks + AdamW params)."""

    def __init__(self, V: int = 16, d: int = 8, L: int = 2, kv: int = 4, h: int = 12) -> None:
        super().__init__()
        self.L = L
        self.tok_emb = nn.Parameter(torch.randn(V, d) * 0.5)
        self.qo_bank = nn.Parameter(torch.randn(2 * L, d, d) / d**0.5)
        self.kv_bank = nn.Parameter(torch.randn(2 * L, kv, d) / d**0.5)
        self.mlp_up_bank = nn.Parameter(torch.randn(L, h, d) / d**0.5)
        self.mlp_down_bank = nn.Parameter(torch.randn(L, d, h) / h**0.5)
        self.blocks = nn.ModuleList(nn.ParameterDict({"attn_scale": nn.Parameter(torch.ones(d)),
                                                      "mlp_scale": nn.Parameter(torch.ones(d))})
                                    for _ in range(L))
        self.skip_weights = nn.Parameter(torch.ones(1, d))
        self.bigram_emb = nn.Parameter(torch.randn(V, 4) * 0.1)
        self.bigram_proj = nn.Parameter(torch.randn(d, 4) * 0.1)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        L = self.L
        x = self.tok_emb[tokens] + self.bigram_emb[tokens] @ self.bigram_proj.T
        steps = torch.arange(1, tokens.size(1) + 1, dtype=x.dtype)[:, None]
        for i in range(L):
            blk = self.blocks[i]
            k = torch.tanh(x @ self.kv_bank[i].T)
            v = x @ self.kv_bank[L + i].T
            mix = torch.cumsum(k * v, dim=1) / steps
            y = torch.cat([mix, mix], dim=-1) * torch.tanh(x @ self.qo_bank[i].T)
            x = x + blk["attn_scale"] * (y @ self.qo_bank[L + i].T)
            x = x + blk["mlp_scale"] * (torch.relu(x @ self.mlp_up_bank[i].T).square() @ self.mlp_down_bank[i].T)
        x = x * self.skip_weights
        logits = x @ self.tok_emb.T
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def _batch(step: int, V: int = 16, B: int = 4, T: int = 6):
    g = torch.Generator().manual_seed(100 + step)
    t = torch.randint(0, V, (B, T + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def test_routing():
    model = TinyBanked()
    routes = {k: sorted(n for n, _ in v) for k, v in route_parameters(model).items()}
    assert routes["bank"] == ["kv_bank", "mlp_down_bank", "mlp_up_bank", "qo_bank"]
    assert routes["embed"] == ["bigram_emb", "tok_emb"]
    assert routes["head"] == []
    assert "bigram_proj" in routes["scalar"] and "blocks.0.attn_scale" in routes["scalar"]
    opts = build_optimizers(model, OptimConfig(), distributed=False)
    assert isinstance(opts.muon, Muon) and not isinstance(opts.muon, ParallelMuon)
    assert [g["param_groups"][0]["lr"] for g in (a.state_dict() for a in opts.adams)] == [0.035, 0.025]
    with pytest.raises(ValueError, match="_bank"):
        build_optimizers(nn.Linear(3, 3), OptimConfig())
    bad = nn.Module()
    bad.qo_bank = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="3-D"):
        build_optimizers(bad, OptimConfig())
    with pytest.raises(ValueError, match="initialised"):
        build_optimizers(model, OptimConfig(), distributed=True)


def test_config_schedule_validation_roundtrip():
    cfg = OptimConfig()
    assert cfg.muon_momentum_at(0) == pytest.approx(0.92)
    assert cfg.muon_momentum_at(750) == pytest.approx(0.955)
    assert cfg.muon_momentum_at(10_000) == pytest.approx(0.99)
    assert OptimConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="muon_momentum"):
        OptimConfig(muon_momentum=1.2)
    with pytest.raises(ValueError, match="unknown"):
        OptimConfig.from_dict({"lr": 1.0})


def test_lr_scale_and_momentum_setters():
    opts = build_optimizers(TinyBanked(), OptimConfig(), distributed=False)
    opts.set_lr_scale(0.5)
    lrs = [(g["lr"], g["base_lr"]) for o in opts.all() for g in o.param_groups]
    assert all(lr == pytest.approx(base * 0.5) for lr, base in lrs) and len(lrs) == 3
    opts.set_muon_momentum(0.97)
    assert opts.muon.param_groups[0]["momentum"] == 0.97
    with pytest.raises(ValueError):
        opts.set_muon_momentum(1.5)


def _train(model, opts, steps, start=0):
    out = []
    for s in range(start, start + steps):
        x, y = _batch(s)
        model(x, y).backward()
        out.append(opts.step())
    return out


def test_clipping_equals_prescaled_gradient():
    torch.manual_seed(0)
    base = TinyBanked()
    clip = 0.05
    m_clip, m_ref = copy.deepcopy(base), copy.deepcopy(base)
    o_clip = build_optimizers(m_clip, OptimConfig(grad_clip=clip), distributed=False)
    o_ref = build_optimizers(m_ref, OptimConfig(grad_clip=0.0), distributed=False)
    for s in range(2):
        x, y = _batch(s)
        m_clip(x, y).backward()
        stats = o_clip.step()
        m_ref(x, y).backward()
        grads = [p.grad for p in m_ref.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norm > clip  # clipping is active, so the test distinguishes clip from no clip
        torch.testing.assert_close(stats["grad_norm"], norm)
        for g in grads:
            g.mul_(clip / (norm + 1e-6))
        o_ref.step()
    for (n, a), (_, b) in zip(m_clip.named_parameters(), m_ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    assert all(p.grad is None for p in m_clip.parameters())  # step() zeroes grads


def test_state_dict_roundtrip_gives_identical_next_step():
    torch.manual_seed(0)
    cfg = OptimConfig(muon_momentum_warmup_steps=4)
    model = TinyBanked()
    opts = build_optimizers(model, cfg, distributed=False)
    for s in range(2):
        opts.set_muon_momentum(cfg.muon_momentum_at(s))
        _train(model, opts, 1, start=s)
    opts.set_lr_scale(0.7)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opts.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)

    model2 = TinyBanked()
    model2.load_state_dict(ck["model"])
    opts2 = build_optimizers(model2, cfg, distributed=False)
    opts2.load_state_dict(ck["opt"])
    assert opts2.muon.param_groups[0]["lr"] == pytest.approx(0.7 * cfg.matrix_lr)
    assert opts2.muon.param_groups[0]["momentum"] == pytest.approx(cfg.muon_momentum_at(1))
    _train(model, opts, 1, start=2)
    _train(model2, opts2, 1, start=2)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="AdamW"):
        opts2.load_state_dict({"muon": ck["opt"]["muon"], "adams": []})
