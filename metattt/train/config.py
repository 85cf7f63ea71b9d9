"""Typed training configuration and named presets.

A preset fills every field; CLI flags then override single fields (``--seq-len 1024``, ``--model.num-layers 9``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..model.config import LADDER_SHAPES, ModelConfig, ladder, pg_2026_03_23, tiny_synthetic
from ..model.gpt import Runtime
from ..optim.builder import OptimConfig
from ..ttt.meta import MetaConfig


@dataclass
class TrainConfig:
    """Everything a training run needs; saved verbatim as ``config.json``."""

    preset: str = "tiny-synthetic"
    # data: "synthetic" (embedded corpus, generated on first use) or a directory holding
    # fineweb_train_*.bin / fineweb_val_*.bin shards (the challenge layout).
    data: str = "synthetic"
    data_dir: str = "data/synthetic"  # where the synthetic corpus is written
    synthetic_spec: str = "document-language"  # the corpus design (metattt.data.synthetic.NAMED_SPECS)
    synthetic_train_tokens: int = 4_000_000
    synthetic_val_tokens: int = 200_000
    tokenizer: str = ""  # SentencePiece model for the byte LUT (real data)
    train_pattern: str = ""  # overrides <data>/fineweb_train_*.bin
    val_pattern: str = ""  # overrides <data>/fineweb_val_*.bin
    seq_len: int = 256
    train_batch_tokens: int = 8192  # global tokens per optimizer step (all ranks, all micro-steps)
    micro_batch_tokens: int = 8192  # tokens per forward on one rank; grad accumulation fills the rest
    loader_mode: str = "sequential"  # sequential | random (seeded block order), per-rank disjoint either way |
    # stream (synthetic data only: fresh documents generated on the fly, metattt.data.synthetic_stream)
    iterations: int = 400
    max_wallclock_s: float = 0.0  # 0 = no cap; training stops (and warms down) by the clock
    warmdown_iters: int = 100  # linear lr decay over the last N steps (estimated from step time under a cap)
    warmdown_frac: float = 0.0  # alternative: warm down over the last fraction of the wallclock budget
    # lr schedule: warmdown (the above) | wsd (constant after the warmup, no end decay: decay branches do that)
    schedule: str = "warmdown"
    lr_warmup_steps: int = 0  # linear lr ramp over the first N steps (either schedule); 0 = none, as the record
    # token-budget checkpoints (metattt/train/budgets.py): full-precision saves under <run>/budgets/ at these
    # token counts and D/N multiples; with any, the run ends at the last one (--iterations is not used)
    save_at_tokens: tuple[int, ...] = ()
    save_at_dn: tuple[float, ...] = ()
    dn_params: str = "non_embedding"  # the N of D/N: non_embedding | total parameters
    max_passes: float = 0.0  # cap on training tokens in passes over the training shards; 0 = none
    # a decay branch: start from this checkpoint (its run's config, weights, optimiser/EMA state, data position
    # and step) and decay the lr linearly to 0 over decay_frac of the checkpoint's steps, as a run of its own
    branch_from: str = ""
    decay_frac: float = 0.15
    # a decay branch's own data order: 0 = the parent's (the branch continues its stream); S > 0 reseeds the block
    # order (and torch's RNG) from (parent seed, S) at the branch point, so branches of one checkpoint are seeds
    branch_seed: int = 0
    # compute matching (metattt/train/flops.py): this run's own training FLOPs; the run takes the plain steps that
    # come nearest (a branch decays over them instead of decay_frac's); 0 = off. Or the counted FLOPs of another
    # run's own steps (its summary.json flops.run), e.g. a meta-trained branch of the same checkpoint
    flops_budget: float = 0.0
    match_flops_of: str = ""
    ema_decay: float = 0.0  # 0 = off; weights saved are the EMA when on
    ema_start_step: int = 0
    val_every: int = 100
    val_tokens: int = 0  # 0 = all val tokens for periodic and final flat evaluation
    val_batch_seqs: int = 32
    seed: int = 1337
    run_root: str = "runs"
    run_name: str = ""
    checkpoint_every: int = 0  # every N steps (and at the end); 0 = off
    # also every N seconds of wallclock (agreed by rank 0), so a killed run loses at most this much; 0 = off. A
    # SIGINT / SIGTERM checkpoints at the next step boundary whatever these say
    checkpoint_every_s: float = 300.0
    resume: str = ""  # run directory (or checkpoint file) to continue: its config.json, then the flags given now
    # start from an artifact's weights (ours, or a record model from ``python -m metattt import-pg``); its model
    # config replaces the preset's, a fresh optimiser state and schedule start (docs/interop.md)
    init_from: str = ""
    halt_after: int = 0  # leave after N steps in this process (checkpointed), as a preemption would; 0 = off
    device: str = "auto"
    # CPU threads for torch (training and the in-process final eval); 0 = torch's default (the core count). A
    # fixed count makes CPU runs bitwise repeatable across machines with different core counts.
    cpu_threads: int = 0
    compile: bool = False
    compile_warmup_steps: int = 2  # with compile: steps taken (then undone) before the clock starts
    artifact_budget: int = 16_000_000
    zstd_level: int = 22
    wandb: str = ""  # online | offline | off; "" = auto
    wandb_project: str = "metattt"
    group: str = ""  # ablation name (wandb group)
    progress: bool = True
    # after training, the legal evaluator on the artifact (metattt.train.final_eval): short (a val prefix in
    # small chunks, a minute on a CPU) | full (the evaluator's defaults) | off
    final_eval: str = "short"
    # an adapter spec the final evaluation also runs, as ttt:doc (e.g. "sgd:lr=0.05,reset=doc"); "" = none
    final_eval_adapter: str = ""
    model: ModelConfig = field(default_factory=tiny_synthetic)
    optim: OptimConfig = field(default_factory=OptimConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    runtime: Runtime = field(default_factory=Runtime)  # how the forward runs (not saved in artifacts)

    def __post_init__(self) -> None:
        self.save_at_tokens = tuple(int(t) for t in self.save_at_tokens)  # lists, once read from config.json
        self.save_at_dn = tuple(float(d) for d in self.save_at_dn)

    def check_budgets(self) -> None:
        """Bad schedule or budget settings, as one-line errors before anything is written."""
        from .schedule import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r}: choose from {SCHEDULES}")
        if self.dn_params not in ("non_embedding", "total"):
            raise ValueError(f"--dn-params {self.dn_params!r}: choose non_embedding or total")
        if self.lr_warmup_steps < 0 or self.max_passes < 0:
            raise ValueError("--lr-warmup-steps and --max-passes must be >= 0")
        if (self.save_at_tokens or self.save_at_dn) and self.max_wallclock_s > 0:
            raise ValueError("--save-at-tokens/--save-at-dn place checkpoints by tokens: give --max-wallclock-s 0")
        if self.loader_mode == "stream" and (self.data != "synthetic" or self.max_passes):
            raise ValueError("--loader-mode stream generates synthetic documents: it needs --data synthetic and no "
                             "--max-passes (the stream has no passes)")
        if not 0 < self.decay_frac <= 1:
            raise ValueError(f"--decay-frac must be in (0, 1], got {self.decay_frac}")
        if self.branch_seed < 0 or (self.branch_seed and not self.branch_from):
            raise ValueError(f"--branch-seed {self.branch_seed}: a non-negative seed of a decay branch "
                             "(give --branch-from)")
        planned = not self.branch_from and (self.save_at_tokens or self.save_at_dn or self.max_passes
                                            or self.max_wallclock_s > 0)  # a branch drops its parent's plan
        if (self.flops_budget or self.match_flops_of) and (self.meta.adapter or planned):
            raise ValueError("--flops-budget / --match-flops-of set the number of plain steps: not with "
                             "--meta.adapter, budget checkpoints, --max-passes or a wallclock cap")
        if self.meta.per_document and self.seq_len // 2 < self.meta.doc_chunk:  # its meta step trains whole chunks
            raise ValueError(f"--meta.adapter {self.meta.adapter_name}: the first half of a {self.seq_len}-token row holds no whole "
                             f"chunk of {self.meta.doc_chunk} tokens; give a longer --seq-len or chunk= in the "
                             "spec")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        # runtime: absent in configs written before it existed; mlp_kernel was removed (only speed, measured slower)
        runtime = {k: v for k, v in d.pop("runtime", {}).items() if k != "mlp_kernel"}
        return cls(model=ModelConfig.from_dict(d.pop("model")), optim=OptimConfig(**d.pop("optim")),
                   meta=MetaConfig(**d.pop("meta")), runtime=Runtime(**runtime), **d)


def _tiny_synthetic() -> TrainConfig:
    """The main job's default: the ``main-job`` synthetic corpus, a 2-layer model, a fixed 500 steps (the same
    numbers on every machine), then the short final evaluation; a few minutes on 2 CPU cores.

    Design by bounds (issue 30): the corpus was chosen from its analytic bounds before any training, so that the
    room TTT has beyond the evaluator's window (window bound − document bound, exact for sliding's contexts of
    65..128 tokens at stride 64, on the 65,536 scored tokens) is large against what a 2-core model leaves above
    the window bound. bpb of the bounds (``metattt.data.synthetic``), vocabulary V (half function, half content
    tokens), Dirichlet α of each document's content distribution, content probability range cp, document
    lengths 2048..8192 unless noted, context 128:

        V    α    cp        bigram  window  document  room   bigram−window
        256  0.05 .25-.6    6.44    5.05    4.98      0.069  1.39   (the old default, context 256; its model
                                                                    stayed 1.6 bpb above the window bound)
        36   1    .5-.8     4.083   3.836   3.760     0.075  0.247
        68   1    .5-.8     5.036   4.797   4.667     0.130  0.239
        68   2    .5-.8     5.033   4.929   4.827     0.101  0.104
        68   4    .5-.8     5.038   4.999   4.931     0.067  0.039  <- chosen
        132  2    .5-.8     6.029   5.953   5.821     0.132  0.076
        132  4    .5-.8     6.024   6.002   5.929     0.072  0.023

    (bounds on a 65,536-token val stream of each spec.) Small α makes each document use a few content words, which
    a reader of the window already learns: the room is small beside bigram−window, which a small model must close
    by in-context learning before TTT's gain means anything. Large α makes the documents alike (little room, and a
    weak per-document signal to adapt to). V = 68 keeps the global chain learnable in a few hundred CPU steps; at
    V = 132 it is learned more slowly (2 layers, dim 64, 500 steps, α = 2: 0.11 bpb above the window bound).

    Trained (2 layers, dim 64, 500 steps, one thread; the main job's final evaluation, room exact for sliding):
    α = 2: flat 0.009 above the bigram bound, little in-context learning, sliding 0.112 above the window bound
    (more than the room, 0.0985); ``ttt:sgd`` (the records' lr 0.002, weights carried across documents) +0.0007
    [−0.0007, +0.0020]; on that artifact ``sgd:lr=0.05,reset=doc`` +0.0153 [+0.0096, +0.0203] (15.6% of the
    room), ``sgd:lr=0.05`` carried across documents −0.0304, ``dyneval:lr=0.003`` −0.0055 [−0.0143, +0.0020].
    α = 4 (chosen): flat 0.013 above the bigram bound, sliding 0.051 above the window bound, within the room
    (0.0646); ``ttt:sgd`` +0.0012 [−0.0047, +0.0071], the document-reset SGD (``ttt:doc``) +0.0250
    [+0.0169, +0.0326] = 38.7% [26.2%, 50.5%] of the room. So the main job also runs ``ttt:doc``.
    One CPU thread: results do not depend on the core count (two runs in fresh clones printed identical
    numbers), ≈ 165 s of CPU time for the whole command.
    """
    model = tiny_synthetic(68)
    model = dataclasses.replace(model, num_layers=2, model_dim=64, xsa_layers=(1,), ve_layers=(1,))
    cfg = TrainConfig(synthetic_spec="main-job", seq_len=128, iterations=500, max_wallclock_s=0.0,
                      warmdown_iters=150, val_every=0, cpu_threads=1, model=model,
                      final_eval_adapter="sgd:lr=0.05,reset=doc")
    cfg.optim = dataclasses.replace(cfg.optim, muon_momentum_warmup_steps=50, grad_clip=1.0)
    return cfg


def _pg_2026_03_23() -> TrainConfig:
    """The public record's training recipe (2026-03-23) on the challenge's data layout."""
    return TrainConfig(
        preset="pg-2026-03-23", data="data/datasets/fineweb10B_sp1024",
        tokenizer="data/tokenizers/fineweb_1024_bpe.model", seq_len=2048, train_batch_tokens=786_432,
        micro_batch_tokens=98_304,  # 8-fold accumulation on one GPU reproduces the 8-GPU batch
        iterations=20_000, max_wallclock_s=600.0, warmdown_iters=3500, ema_decay=0.997, val_every=1000,
        val_batch_seqs=32, model=pg_2026_03_23(), optim=OptimConfig(), compile=True,
        final_eval="off")  # the evaluator runs as its own command (docs/reproduction.md)


# global tokens per step of each ladder size: >= ~230 steps at its smallest budget (D/N = 25)
LADDER_BATCH_TOKENS = {"0.6m": 65_536, "1.2m": 98_304, "2m": 131_072, "4m": 196_608, "8m": 262_144}


def _ladder(size: str) -> TrainConfig:
    """A ladder size (issue 29) trained as budget runs: the record's recipe and lrs at seq 2048 (the evaluators'
    window; FineWeb documents are ≈ 2,000 tokens), with ``--schedule wsd`` (decay branches do the decay), no EMA
    (an EMA with the record's 0.997 averages over ≈ 300 steps, longer than most decay branches), no wallclock
    cap (``--save-at-dn`` places the checkpoints), Muon momentum warm-up over 100 steps (the record's 1,500 are
    more than a small rung's whole run), one micro-batch per step (no accumulation at these sizes), and the
    ``random`` loader (a fresh seeded block order and offset each pass: the large budgets take several passes)."""
    cfg = _pg_2026_03_23()
    batch = LADDER_BATCH_TOKENS[size]
    return dataclasses.replace(
        cfg, preset=f"ladder-{size}", model=ladder(*LADDER_SHAPES[size]), train_batch_tokens=batch,
        micro_batch_tokens=batch, max_wallclock_s=0.0, schedule="wsd", ema_decay=0.0, val_every=0, loader_mode="random",
        optim=dataclasses.replace(cfg.optim, muon_momentum_warmup_steps=100))


PRESETS = {"tiny-synthetic": _tiny_synthetic, "pg-2026-03-23": _pg_2026_03_23,
           **{f"ladder-{k}": (lambda k=k: _ladder(k)) for k in LADDER_SHAPES}}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
