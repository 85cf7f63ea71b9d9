"""Evaluation-time adapters: exact update rules on a quadratic, LoRA identity, dyneval decay, meta-parameter
loading, inference-mode robustness, distributed averaging, and real loss reduction on the synthetic corpus."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metattt.data.synthetic import SyntheticSpec, generate_split
from metattt.model.config import ModelConfig
from metattt.model.gpt import BankedGPT
from metattt.ttt import ADAPTERS, MissingMetaParamsError, make_adapter


pytestmark = pytest.mark.usefixtures("one_thread")

A_MAT = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=torch.float64)
C_VEC = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
W0 = torch.tensor([0.3, 0.8, -2.0], dtype=torch.float64)


class Quad(nn.Module):
    """L(w) = 0.5 (w-c)^T A (w-c), with the model call signature (tokens are ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(W0.clone())

    def forward(self, tokens, targets=None, *, params=None, reduction="mean"):  # noqa: ANN001, ANN201
        w = (params or {}).get("w", self.w)
        d = w - C_VEC
        return 0.5 * d @ A_MAT @ d


def qgrad(w: torch.Tensor) -> torch.Tensor:
    return A_MAT @ (w - C_VEC)


XQ = torch.zeros(4, 3, dtype=torch.long)


def tiny_model(num_layers: int = 2, seed: int = 0) -> BankedGPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, num_layers=num_layers, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                      rope_dims=8, xsa_layers=(num_layers - 1,), ve_layers=(num_layers - 1,), ve_dim=8,
                      bigram_vocab=32, bigram_dim=8)
    m = BankedGPT(cfg)
    with torch.no_grad():
        for p in (m.qo_bank, m.mlp_down_bank):
            p.normal_(std=0.1)
    return m


def batch(b: int = 4, t: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(4, 64, (b, t + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


# ----------------------------------------------------------------------------------------- exact update rules
def test_sgd_momentum_clip_and_cosine_match_hand_computation() -> None:
    m = Quad()
    a = make_adapter("sgd", "all", lr=0.1, momentum=0.9, epochs=2, batch_seqs=4, grad_clip=1.0).bind(m)
    st = a.adapt(m, XQ, XQ, progress=0.5)
    lr = 0.1 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert st["lr"] == pytest.approx(lr) and st["steps"] == 2

    def clip(g: torch.Tensor) -> torch.Tensor:
        return g * min(1.0, 1.0 / (float(g.norm()) + 1e-6))

    g0 = clip(qgrad(W0))
    w1 = W0 - lr * g0
    buf = 0.9 * g0 + clip(qgrad(w1))
    w2 = w1 - lr * buf
    torch.testing.assert_close(a.params()["w"], w2, rtol=1e-12, atol=1e-12)
    assert torch.equal(m.w.detach(), W0)  # module untouched
    a.reset()
    torch.testing.assert_close(a.params()["w"], W0)
    assert a.adapt(m, XQ, XQ, progress=1.0)["lr"] == pytest.approx(0.0, abs=1e-12)


def test_sam_step_equals_analytic_on_quadratic() -> None:
    m = Quad()
    lr, rho = 0.1, 0.05
    a = make_adapter("sam", "all", lr=lr, rho=rho, momentum=0.0, epochs=1, grad_clip=0.0,
                     schedule="constant").bind(m)
    a.adapt(m, XQ, XQ)
    g = qgrad(W0)
    want = W0 - lr * qgrad(W0 + rho * g / g.norm())
    torch.testing.assert_close(a.params()["w"], want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(want, W0 - lr * g)  # differs from a plain step


def test_dyneval_decay_one_returns_to_trained_weights() -> None:
    m = Quad()
    a = make_adapter("dyneval", "all", lr=0.0, decay=1.0, epochs=1).bind(m)
    a.collect_stats(m, [(XQ, XQ)])
    torch.testing.assert_close(a.state_dict()["rms.w"], qgrad(W0).abs())
    with torch.no_grad():
        a.params()["w"].add_(torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64))  # drifted weights
    a.adapt(m, XQ, XQ)
    assert torch.equal(a.params()["w"], W0)
    # with lr > 0 and decay 1 the result is one normalised step from the trained weights, whatever the history
    b = make_adapter("dyneval", "all", lr=0.01, decay=1.0, eps=1e-8, max_update=100.0).bind(m)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.params()["w"].add_(0.5)
    drifted = b.params()["w"].clone()
    b.adapt(m, XQ, XQ)
    want = W0 - 0.01 * qgrad(drifted) / (qgrad(W0).abs() + 1e-8)
    torch.testing.assert_close(b.params()["w"], want, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="no gradient statistics"):
        make_adapter("dyneval", "all", auto_stats=False).bind(m).adapt(m, XQ, XQ)


def test_lora_identity_at_init_and_reset() -> None:
    m = tiny_model(3)
    a = make_adapter("lora", "banks[q,v]:layers>=1", rank=2, lr=0.01, epochs=2, batch_seqs=2).bind(m)
    named = dict(m.named_parameters())
    p0 = a.params()
    assert set(p0) == {"qo_bank", "kv_bank"}
    for n, t in p0.items():
        assert torch.equal(t, named[n])
    assert a.adapted_count == 2 * (2 * 32 + 32 * 2) + 2 * (2 * 32 + 16 * 2)  # per slice: A (r,in) + B (out,r)
    assert "LoRA rank 2" in a.selection_report()
    x, y = batch()
    a.adapt(m, x, y)
    p1 = a.params()
    for bank, idx, layer, kind in m.named_bank_slices():
        if bank in p1:
            changed = not torch.equal(p1[bank][idx], named[bank][idx])
            assert changed == (layer >= 1 and kind in ("q", "v")), (bank, idx)
    a.reset()
    assert all(torch.equal(t, named[n]) for n, t in a.params().items())
    with pytest.raises(ValueError, match="bank slices only"):
        make_adapter("lora", "banks+norms").bind(m)


def test_metasgd_meta_params_roundtrip_and_missing_error() -> None:
    m = tiny_model()
    a = make_adapter("metasgd", "banks", lr_init=0.01).bind(m)
    with torch.no_grad():
        for p in a.meta_parameters().values():
            p.add_(torch.randn_like(p))
    extras = a.artifact_extras()
    assert set(extras) == {f"ttt.metasgd.log_lr.{b}" for b in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")}
    b = make_adapter("metasgd", "banks").bind(m)
    b.load_artifact_extras({**extras, "other.key": torch.zeros(1)})
    for n, p in b.meta_parameters().items():
        assert torch.equal(p.detach(), a.meta_parameters()[n].detach())
    c = make_adapter("metasgd", "banks").bind(m)
    with pytest.raises(MissingMetaParamsError, match=r"ttt\.metasgd\.log_lr\.qo_bank"):
        c.load_artifact_extras({})
    with pytest.raises(MissingMetaParamsError, match="log_lr.kv_bank"):
        c.load_state_dict({"log_lr.qo_bank": torch.zeros(4)}, strict=False)


def test_none_adapter_and_generic_contract() -> None:
    m = tiny_model()
    x, y = batch()
    assert ADAPTERS == ("none", "sgd", "fomaml", "metasgd", "sam", "lora", "dyneval", "reptile", "doclora")
    n = make_adapter("none").bind(m)
    assert n.params() == {} and n.adapt(m, x, y)["steps"] == 0 and n.adapted_count == 0
    for name in ADAPTERS:
        a = make_adapter(name)
        assert a.training_positions(5) == 5
        assert a.cfg.reset in ("never", "chunk", "doc")
    with pytest.raises(RuntimeError, match="not bound"):
        make_adapter("sgd").params() or make_adapter("sgd").adapt(m, x, y)
    doc = make_adapter("doclora", rank=2).bind(m)  # per-document: the doc-batched evaluator runs it, not adapt
    assert doc.per_document and doc.params() == {}
    with pytest.raises(ValueError, match="evaluate it as docttt:doclora"):
        doc.adapt(m, x, y)
    with pytest.raises(ValueError, match="no per-document rows"):
        make_adapter("sgd").step({}, {}, {}, active=torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="drop select="):
        make_adapter("doclora", select="banks").bind(m)


def test_adapt_works_when_called_under_inference_mode() -> None:
    m = tiny_model()
    x, y = batch()
    with torch.inference_mode():
        a = make_adapter("sgd", "banks", lr=0.05, epochs=1).bind(m)
        before = m(x, y, params=a.params()).item()
        st = a.adapt(m, x, y)
        after = m(x, y, params=a.params()).item()
    assert st["steps"] == 1 and after < before


# ----------------------------------------------------------------------------------------- distributed
def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = tiny_model()
        x, y = batch(b=4, t=10, seed=7)
        # batch_seqs 3 over 4 rows: mini-batch 1 splits 2 + 1 rows, mini-batch 2 gives rank 1 no rows at all
        a = make_adapter("sgd", "banks:layers>=1+norms", lr=0.05, momentum=0.9, epochs=2, batch_seqs=3).bind(m)
        a.adapt(m, x, y, progress=0.25)
        torch.save({k: v.clone() for k, v in a.params().items()}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_adapt_averages_gradients_and_ranks_agree() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"r{r}.pt")) for r in (0, 1))
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    # the same adapt in one process: mini-batches rows {0,1,2} then {3}
    m = tiny_model()
    x, y = batch(b=4, t=10, seed=7)
    ref = make_adapter("sgd", "banks:layers>=1+norms", lr=0.05, momentum=0.9, epochs=2, batch_seqs=3).bind(m)
    ref.adapt(m, x, y, progress=0.25)
    for n, t in ref.params().items():
        torch.testing.assert_close(r0[n], t, rtol=1e-5, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------- real adaptation
T = 32


@pytest.fixture(scope="module")
def trained_and_docs():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test thread fixture
    spec = SyntheticSpec(vocab_size=64, n_train_tokens=30_000, n_val_tokens=4_000, min_doc_len=700, max_doc_len=900)
    train = torch.from_numpy(generate_split(spec, "train").astype(np.int64))
    val = torch.from_numpy(generate_split(spec, "val").astype(np.int64))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                      rope_dims=8, xsa_layers=(), ve_layers=(), bigram_vocab=0, init_std=0.05)
    m = BankedGPT(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        idx = torch.randint(0, len(train) - T - 1, (16,), generator=g).tolist()
        seq = torch.stack([train[i:i + T + 1] for i in idx])
        loss = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    starts = (val == 1).nonzero().flatten().tolist()
    docs = [val[s:e] for s, e in zip(starts, starts[1:])][:3]
    assert len(docs) == 3 and all(len(d) > 20 * T for d in docs)
    torch.set_num_threads(prev)
    return m, docs


def _rows(doc: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.stack([doc[i * T:i * T + T + 1] for i in range(a, b)])
    return seq[:, :-1], seq[:, 1:]


EVAL_SPECS = {
    "sgd": dict(lr=0.05, epochs=3, batch_seqs=7),
    "fomaml": dict(lr=0.1, epochs=3),
    "metasgd": dict(lr_init=0.1, epochs=3),
    "sam": dict(lr=0.05, rho=0.05, epochs=3, batch_seqs=7),
    "lora": dict(lr=0.01, epochs=3, rank=4),
    "dyneval": dict(lr=0.001, epochs=3),
    "reptile": dict(lr=0.1, epochs=3),
}


@pytest.mark.parametrize("name", list(EVAL_SPECS))
def test_adapter_lowers_held_out_loss_of_the_same_document(name: str, trained_and_docs) -> None:  # noqa: ANN001
    """Adapt on a document's first 14 windows (already scored), score its next 6: the loss must drop, and drop
    more than when adapting on a *different* document (the gain is document-specific, not generic)."""
    m, docs = trained_and_docs
    a = make_adapter(name, **EVAL_SPECS[name]).bind(m)
    own, other = [], []
    for i, d in enumerate(docs[:2]):
        xh, yh = _rows(d, 14, 20)
        with torch.no_grad():
            before = m(xh, yh).item()
        for src, acc in ((d, own), (docs[2], other)):
            a.reset()
            xp, yp = _rows(src, 0, 14)
            a.adapt(m, xp, yp, progress=0.0)
            with torch.no_grad():
                acc.append(before - m(xh, yh, params=a.params()).item())
    assert min(own) > 0.05, own  # nats per token; observed 0.14-0.75
    assert sum(own) / 2 > sum(other) / 2 + 0.1, (own, other)


# ----------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_bf16_adapt_and_meta_losses() -> None:
    from metattt.ttt.meta import MetaConfig, meta_loss

    dev = torch.device("cuda")
    m = tiny_model(3).to(dev)
    x, y = (t.to(dev) for t in batch(b=8, t=64))
    with torch.inference_mode():
        a = make_adapter("sgd", "banks:layers>=1", lr=0.05, epochs=2, batch_seqs=4).bind(m)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            before = m(x, y).item()
        st = a.adapt(m, x, y)  # bf16 autocast inside
        with torch.autocast("cuda", dtype=torch.bfloat16):
            after = m(x, y, params=a.params()).item()
    assert after < before and st["steps"] == 4
    assert all(t.dtype == torch.float32 and t.is_cuda for t in a.params().values())
    assert torch.equal(a.params()["qo_bank"][0], m.qo_bank[0].detach())
    for order, backend in (("first", "autograd"), ("second", "autograd"), ("second", "torch.func")):
        m.zero_grad(set_to_none=True)
        f = make_adapter("metasgd", "banks:layers>=1+norms").bind(m)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, stats = meta_loss(m, f, x, y, MetaConfig(adapter="metasgd", order=order, backend=backend,
                                                           split="seq-half"))
        loss.backward()
        assert torch.isfinite(loss) and m.qo_bank.grad is not None and torch.isfinite(m.qo_bank.grad).all()
        assert all(p.grad is not None for p in f.meta_parameters().values()), (order, backend)
