#!/usr/bin/env python
"""Fingerprint every registered adapter's update on a tiny CPU model, to show a refactor is numerically neutral.

    python benchmarks/adapter_fingerprint.py --root CHECKOUT_A --out a.pt
    python benchmarks/adapter_fingerprint.py --root CHECKOUT_B --out b.pt
    python benchmarks/adapter_fingerprint.py --compare a.pt b.pt     # exit 0: identical bit for bit, 1: not
    (``--ignore TEXT`` skips differences whose path contains TEXT, e.g. a stat an adapter now reports)

A fingerprint holds, for every adapter of the checkout's registry (built-ins plus examples/signsgd_norms.py) with
its defaults and with a tuned variant that makes clip / momentum / nesterov / per-row rates / Adam act: the
weights after ``adapt`` on three chunks at progress 0, 0.5 and 1 (cosine schedules move), the adapt stats, the
first-order and second-order inner loops, the meta loss with its gradients, the weights under the pg-record
compat rounding (bf16 trainables and state), and the evaluator's bpb of a ``ttt:`` protocol on a synthetic
stream; for the per-document ``doclora``, the bpb of two ``docttt:`` protocols and its meta step. Everything is
seeded; ``--root`` picks whose ``metattt`` is imported (default: this checkout).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

TUNED = {
    "sgd": dict(lr=0.05, grad_clip=0.5, nesterov=True),
    "fomaml": dict(lr=0.05, epochs=2),
    "reptile": dict(lr=0.05, epsilon=0.5),
    "metasgd": dict(lr_init=0.05, per_row=True, grad_clip=1.0, select="banks[q,v]+norms"),
    "sam": dict(lr=0.05, rho=0.1, grad_clip=0.5),
    "lora": dict(lr=0.01, rank=2, epochs=2, schedule="cosine", select="banks[q,v,up]:layers>=1"),
    "lora-sgd": dict(lr=0.05, rank=2, optimizer="sgd", grad_clip=0.1),
    "dyneval": dict(lr=0.001, decay=0.1, epochs=2, schedule="cosine"),
    "signsgd": dict(momentum=0.9, epochs=2),
}


def _spec(name: str, kw: dict) -> str:
    return name + ":" + ",".join(f"{k}={v}" for k, v in {"batch_seqs": 2, **kw}.items())


def fingerprint(root: Path) -> dict:
    sys.path.insert(0, str(root))
    import torch

    import metattt
    from metattt.data.loaders import load_val_tokens
    from metattt.data.synthetic import SyntheticSpec, make_synthetic_dataset, synthetic_lut
    from metattt.eval.protocols import EvalConfig, evaluate, parse_protocols, prepare_stream
    from metattt.eval.report import build_report
    from metattt.model.config import ModelConfig
    from metattt.model.gpt import BankedGPT
    from metattt.ttt import Registry
    from metattt.ttt.meta import MetaConfig, meta_loss

    if not Path(metattt.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"metattt was imported from {metattt.__file__}, not from {root}")
    torch.set_num_threads(1)
    example = str(root / "examples" / "signsgd_norms.py")
    reg = Registry.build([example], use_entry_points=False)
    mcfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                       rope_dims=8, xsa_layers=(), ve_layers=(), bigram_vocab=0, smear_gate=False, unet_skips=False)
    spec = SyntheticSpec(vocab_size=64, n_train_tokens=20_000, n_val_tokens=3000, min_doc_len=300, max_doc_len=800,
                         alpha=0.02, content_prob_min=0.4, content_prob_max=0.7)
    with tempfile.TemporaryDirectory() as tmp:
        meta = make_synthetic_dataset(Path(tmp) / "data", spec)
        data = prepare_stream(load_val_tokens(meta["val_pattern"]), synthetic_lut(spec), "cpu", 256)
    ecfg = EvalConfig(seq_len=64, context=64, stride=16, chunk_tokens=256, batch_tokens=4096, n_boot=20)

    def model() -> BankedGPT:
        torch.manual_seed(0)
        return BankedGPT(mcfg).eval()

    def rows(seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 64, (5, 11), generator=g)
        return x[:, :-1], x[:, 1:]

    def make(spec_text: str, m):  # noqa: ANN001, ANN202
        cfg = MetaConfig(adapter=spec_text, adapter_modules=(example,))
        a = cfg.make_adapter(reg).bind(m)
        with torch.no_grad():
            for p in a.meta_parameters().values():
                p.add_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
        return cfg, a

    out: dict = {}
    # per-document adapters (doclora) have their own evaluator: the section after this loop
    cases = [(n, n, {}) for n in reg.names if not getattr(reg.get(n), "per_document", False)]
    cases += [(k, k.split("-")[0], kw) for k, kw in TUNED.items()]
    for key, name, kw in cases:
        variant = "defaults" if not kw else "tuned"
        s = _spec(name, kw)
        rec: dict = {}
        m = model()
        cfg, a = make(s, m)
        for i, prog in enumerate((0.0, 0.5, 1.0)):
            st = a.adapt(m, *rows(10 + i), progress=prog)
            rec[f"adapt{i}.stats"] = {k: v for k, v in st.items()}
            rec[f"adapt{i}.params"] = {n: t.clone() for n, t in a.params().items()}
        if a.trains_in_eval:
            m = model()
            cfg, a = make(s, m)
            x, y = rows(20)
            if name == "dyneval":
                a.collect_stats(m, [(x, y)])
            first, _ = a.inner_loop(m, dict(m.named_parameters()), x, y, passes=cfg.inner_passes(a),
                                    create_graph=False)
            rec["inner.first"] = {n: t.detach().clone() for n, t in first.items()}
            second, _ = a.inner_loop(m, dict(m.named_parameters()), x, y, passes=2, create_graph=True, attn="math")
            rec["inner.second"] = {n: t.detach().clone() for n, t in second.items()}
            loss, stats = meta_loss(m, a, x, y, cfg)
            loss.backward()
            rec["meta.loss"] = loss.detach().clone()
            rec["meta.stats"] = {k: v.clone() for k, v in stats.items()}
            rec["meta.grads"] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            rec["meta.adapter_grads"] = {n: p.grad.clone() for n, p in a.meta_parameters().items()
                                         if p.grad is not None}
            m = model()
            _, a = make(s, m)
            a.storage_dtypes = {n: torch.bfloat16 for n in a._cur}
            a.storage_state = True
            for i, prog in enumerate((0.0, 0.5)):
                a.adapt(m, *rows(30 + i), progress=prog)
            rec["storage.params"] = {n: t.clone() for n, t in a.params().items()}
        m = model()
        _, a = make(s, m)
        ev = evaluate(m, data, parse_protocols(f"ttt:{name}"), {name: a}, ecfg)
        rec["eval.bpb"] = build_report(ev)["protocols"][f"ttt:{name}"]["bpb"]
        rec["eval.params"] = {n: t.clone() for n, t in a.params().items()}
        out[f"{key}/{variant}"] = rec
        print(f"{key}/{variant}: bpb {rec['eval.bpb']!r}", flush=True)
    # the doc-batched LoRA: its evaluator protocol and its meta step (the same calls in checkouts from before and
    # after it joined the registry)
    for opts in ("rank=2/lr=0.01", "rank=2/lr=0.01/weight_decay=0.1/beta1=0.9/alpha=4/targets=q+v+head/keep_a=1"):
        proto = f"docttt:doclora@chunk=16/docs=4/window=64/{opts}"
        ev = evaluate(model(), data, parse_protocols(proto), {}, ecfg)
        rec = {"eval.bpb": build_report(ev)["protocols"][proto]["bpb"]}
        m = model()
        spec = "doclora:" + opts.replace("/", ",").replace(",keep_a=1", "") + ",chunk=2"
        cfg = MetaConfig(adapter=spec, split="seq-half", inner_steps=2)
        a = cfg.make_adapter().bind(m)
        with torch.no_grad():
            for p in a.meta_parameters().values():
                p.add_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
        loss, stats = meta_loss(m, a, *rows(40), cfg)
        loss.backward()
        rec["meta.loss"] = loss.detach().clone()
        rec["meta.stats"] = {k: v.clone() for k, v in stats.items()}
        rec["meta.grads"] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        rec["meta.adapter_grads"] = {n: p.grad.clone() for n, p in a.meta_parameters().items()}
        out[f"doclora/{opts}"] = rec
        print(f"doclora/{opts}: bpb {rec['eval.bpb']!r}", flush=True)
    return out


def _diff(a, b, path: str, bad: list[str]) -> None:  # noqa: ANN001
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                bad.append(f"{path}/{k}: only in {'second' if k not in a else 'first'}")
            else:
                _diff(a[k], b[k], f"{path}/{k}", bad)
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            bad.append(f"{path}: tensors differ (max abs {float((a.double() - b.double()).abs().max()):.3g})")
    elif not (a == b or (a != a and b != b)):  # NaN equals NaN here
        bad.append(f"{path}: {a!r} != {b!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to import")
    ap.add_argument("--out", type=Path, help="write the fingerprint here")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two fingerprints")
    ap.add_argument("--ignore", action="append", default=[], metavar="TEXT",
                    help="with --compare: skip differences whose path contains TEXT (repeatable)")
    args = ap.parse_args(argv)
    import torch

    if args.compare:
        a, b = (torch.load(p, weights_only=False) for p in args.compare)
        bad: list[str] = []
        _diff(a, b, "", bad)
        bad = [d for d in bad if not any(t in d.split(":")[0] for t in args.ignore)]
        print("\n".join(bad) if bad else f"identical: {len(a)} adapter cases, every tensor and number bit for bit")
        return 1 if bad else 0
    if args.out is None:
        ap.error("give --out FILE (or --compare A B)")
    torch.save(fingerprint(args.root.resolve()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
