"""The wallclock training loop: data → banked GPT → Muon/AdamW (+ optional meta-TTT outer loop) → artifact.

Why one function: a run is a single story (set up, step until the clock or the step budget ends, evaluate,
quantize, report); helpers hold the pieces (schedule, EMA, checkpoint, validation, data resolution).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..artifact.model_io import load_model_artifact, load_state_strict, save_model_artifact
from ..data.fingerprint import tokens_fingerprint
from ..data.loaders import TrainLoader, load_val_tokens
from ..devices import autocast_for
from ..model.gpt import BankedGPT
from ..optim.builder import build_optimizers
from ..track.progress import progress
from ..interrupts import SignalFlag, signal_name
from ..track.rundir import RunDir, unique_name, unwritable
from ..track.wandb_log import WandbLogger
from ..ttt.meta import meta_loss
from . import budgets as bud
from . import checkpoint as ckpt
from . import flops as flp
from .metalog import MetaLog, meta_param_summary
from .config import TrainConfig
from .data_setup import resolve_data
from .dist import DistInfo, agree, all_reduce_mean, setup, teardown
from .ema import EMA
from .schedule import lr_scale, meta_step_due
from .validate import flat_val_bpb

ARTIFACT_NAME = "artifact.ptz"


@dataclass
class _Batching:
    accum: int
    micro_tokens: int


def _batching(cfg: TrainConfig, world: int) -> _Batching:
    per_rank = cfg.train_batch_tokens // world
    micro = min(cfg.micro_batch_tokens, per_rank)
    if cfg.train_batch_tokens % world or per_rank % micro or micro % cfg.seq_len:
        raise ValueError(
            f"train_batch_tokens {cfg.train_batch_tokens} must split evenly over {world} ranks into micro-batches "
            f"of {micro} tokens, each a multiple of seq_len {cfg.seq_len}")
    return _Batching(per_rank // micro, micro)


def _run_name(cfg: TrainConfig, info: DistInfo) -> str:
    """Rank 0 picks the name (or the user does); other ranks learn it so they can find checkpoints."""
    name = cfg.run_name or unique_name()
    if info.distributed:
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return name


class RunNameClash(ValueError):
    """``--run-name`` names a run directory that already exists (bad input: nothing is written)."""


def _check_run_name(cfg: TrainConfig) -> None:
    if cfg.run_name and not cfg.resume:
        path = Path(cfg.run_root) / cfg.run_name
        if path.exists():
            raise RunNameClash(f"--run-name {cfg.run_name}: {path} already exists; choose another --run-name, or "
                               f"continue that run with --resume {path}")


def _print(info: DistInfo, *args: Any) -> None:
    if info.is_main:
        print(*args, flush=True)


def _init_from(cfg: TrainConfig, info: DistInfo) -> tuple[TrainConfig, Any]:
    """The artifact to start from: its model config replaces ``cfg.model`` (a differing preset is reported)."""
    from ..artifact.errors import ArtifactError
    from ..artifact.format import load_artifact
    from ..model.config import ModelConfig

    try:
        loaded = load_artifact(cfg.init_from)
    except (ArtifactError, FileNotFoundError, IsADirectoryError) as e:
        raise ValueError(f"--init-from {cfg.init_from}: cannot load artifact: {e}") from None
    model_cfg = ModelConfig.from_dict(loaded.config)
    diff = {k: (v, getattr(model_cfg, k)) for k, v in cfg.model.to_dict().items()
            if k != "extra" and model_cfg.to_dict().get(k) != v}
    if diff:
        _print(info, f"--init-from {cfg.init_from}: the artifact's model config replaces the preset's "
                     f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())})")
    return dataclasses.replace(cfg, model=model_cfg), loaded


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns the summary (also written to ``summary.json``), or, after a SIGINT /
    SIGTERM during the steps, ``{"interrupted": name, "signum": n, "halted_at_step": ..., "run_dir": ...}`` once the
    checkpoint is written (outside the steps the signal raises ``KeyboardInterrupt``)."""
    info = setup(cfg.device)
    try:
        with SignalFlag() as signals:
            return _train(cfg, info, signals)
    finally:
        teardown()


def _train(cfg: TrainConfig, info: DistInfo, signals: SignalFlag) -> dict[str, Any]:
    resume_from = None
    cfg.check_budgets()
    _check_run_name(cfg)  # before any data or run file is written
    branch: dict[str, Any] | None = None
    budget = flp.budget_of(cfg)  # a FLOPs budget sets the plain steps (a branch: its decay steps)
    if cfg.branch_seed and cfg.loader_mode != "random":
        raise ValueError("--branch-seed reseeds the block order of --loader-mode random (the sequential loader has "
                         "no order to reseed)")
    if cfg.resume:  # cfg is already the run's own config with this command's flags on top (cli.config_from_args)
        run_path, resume_from = ckpt.find(cfg.resume, info.rank)
        cfg.run_root, cfg.run_name = str(run_path.parent), run_path.name
        if cfg.branch_from:  # a resumed branch: the same schedule (saved), and its record for the summary
            _, branch = _branch(cfg, info, budget)
    elif cfg.branch_from:
        cfg, branch = _branch(cfg, info, budget)
    elif budget:
        cfg = dataclasses.replace(cfg, iterations=flp.steps_for_budget(
            budget, flp.plain_step_flops(cfg.model, cfg.train_batch_tokens, cfg.seq_len)))
    if info.is_main:
        why = unwritable(Path(cfg.run_root))
        if why:  # before the data and the training, not when the results are written
            raise ValueError(f"run directory root {cfg.run_root} is not writable: {why}; choose another --run-root")
    init = None
    if cfg.init_from and resume_from is None and branch is None:
        cfg, init = _init_from(cfg, info)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    batching = _batching(cfg, info.world_size)
    adapter = cfg.meta.make_adapter() if cfg.meta.adapter else None  # a bad spec or plug-in fails before any I/O
    src = resolve_data(cfg) if info.is_main else None  # bad data fails before a run dir exists
    if info.distributed:
        dist.barrier()
    if src is None:
        src = resolve_data(cfg)
    cfg, budgets, plan = _plan_budgets(cfg, src.train_pattern)  # sets iterations: the last budget or the pass cap
    name = _run_name(cfg, info)
    try:
        run = RunDir.create(cfg.run_root, name, cfg.to_dict(), rank=info.rank, exist_ok=resume_from is not None)
    except FileExistsError as e:  # made by someone else since _check_run_name
        raise RunNameClash(f"--run-name {name}: {Path(cfg.run_root) / name} already exists; choose "
                           "another --run-name") from e
    run_path = Path(cfg.run_root) / name
    on_gpu = info.device.type == "cuda"
    if budgets and info.is_main:
        bud.write_plan(run_path, budgets, plan)
    budget_due: dict[int, list[bud.Budget]] = {}
    for b in budgets:
        budget_due.setdefault(b.step, []).append(b)

    model = BankedGPT(cfg.model, cfg.runtime)
    if init is not None:
        load_state_strict(model, init.state_dict, cfg.init_from)
    model = model.to(info.device)
    counter = flp.FlopCounter(model)  # every forward of a training step, by category (plain / meta)
    opts = build_optimizers(model, cfg.optim, distributed=info.distributed)
    meta_opt = None
    if adapter is not None:
        adapter.bind(model)
        # meta-parameters the artifact carries for this adapter (e.g. MetaSGD rates); an artifact trained without
        # this adapter carries none, and meta-training from it starts them at their init
        if init is not None and any(k.startswith(f"ttt.{adapter.name}.") for k in init.extras):
            adapter.load_artifact_extras(init.extras, strict=False)
        meta_params = list(adapter.meta_parameters().values())
        if meta_params:
            meta_opt = torch.optim.Adam(meta_params, lr=cfg.meta.meta_lr)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if cfg.loader_mode == "stream":  # fresh synthetic documents, never an epoch
        from ..data.synthetic import SyntheticSpec
        from ..data.synthetic_stream import SyntheticStream, block_tokens_for, default_workers

        loader = SyntheticStream(SyntheticSpec.from_dict(src.meta["synthetic_spec"]), cfg.seq_len,
                                 batching.micro_tokens, info.rank, info.world_size, cfg.seed,
                                 block_tokens=block_tokens_for(batching.micro_tokens),
                                 workers=default_workers(info.world_size))
    else:
        loader = TrainLoader(src.train_pattern, cfg.seq_len, batching.micro_tokens, info.rank, info.world_size,
                             bud.branch_data_seed(cfg.seed, cfg.branch_seed), mode=cfg.loader_mode)
    val = load_val_tokens(src.val_pattern, vocab_size=cfg.model.vocab_size)
    # of the whole val stream behind the pattern, as the evaluator loads it: it refuses other data later
    src.meta["val_fingerprint"] = tokens_fingerprint(val)
    src.meta["val_n_tokens"] = int(val.numel())
    if cfg.val_tokens:
        val = val[: cfg.val_tokens + 1]
    fwd = model.compile_core() if cfg.compile else model
    step, elapsed = 0, 0.0
    if cfg.compile and cfg.compile_warmup_steps and resume_from is None and branch is None:
        _compile_warmup(cfg, fwd, model, opts, loader, batching, info)
    if resume_from is not None:
        step, elapsed = ckpt.restore(resume_from, model=model, opts=opts, ema=ema, loader=loader, adapter=adapter,
                                     meta_opt=meta_opt, device=info.device, flops=counter)
        _print(info, f"resumed {run_path} at step {step} ({elapsed:.1f}s trained)")
    elif branch is not None:
        step, elapsed = ckpt.restore(Path(branch["checkpoint"]), model=model, opts=opts, ema=ema, loader=loader,
                                     adapter=adapter, meta_opt=meta_opt, device=info.device, flops=counter,
                                     reseed=bool(cfg.branch_seed))
        counter.mark_start(counter.known_since_init)  # the branch's own FLOPs start here
        if cfg.branch_seed:  # this seed's own randomness from the branch point on (the loader's order too)
            torch.manual_seed(loader.seed)
        branch["parent_elapsed_s"] = elapsed
        _print(info, f"branch {run_path} from {branch['checkpoint']} at step {step}: lr decays linearly to 0 over "
                     f"{branch['decay_steps']} steps")
    wandb = WandbLogger(cfg.wandb or None, project=cfg.wandb_project, group=cfg.group or None,
                        tags=[t for t in ("train", cfg.meta.adapter.split(":")[0] if cfg.meta.adapter else "") if t],
                        config=cfg.to_dict(), run_dir=run.path) if info.is_main else None
    _print(info, f"run {run_path} | {model.num_params():,} params | world {info.world_size} | accum {batching.accum} "
                 f"x {batching.micro_tokens} tokens | device {info.device}")

    def log(record: dict[str, Any]) -> None:
        run.log_metrics(record)
        if wandb is not None:
            wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def validate(at_step: int) -> dict[str, float]:
        res = flat_val_bpb(model, val, src.lut, cfg.seq_len, cfg.val_batch_seqs, info, on_gpu)
        log({"kind": "val", "step": at_step, "time_s": elapsed, **res})
        _print(info, f"step {at_step:6d} | val_bpb {res['val_bpb']:.4f} | val_loss {res['val_loss']:.4f}")
        return res

    by_time = cfg.max_wallclock_s > 0  # under a clock cap the bar counts training seconds, not steps
    bar = progress(int(cfg.max_wallclock_s) if by_time else cfg.iterations,
                   desc="train [s]" if by_time else "train [steps]", enabled=cfg.progress and info.is_main)
    shown = int(elapsed) if by_time else step
    bar.update(shown)
    tokens_per_step = cfg.train_batch_tokens
    log_every = max(1, min(50, cfg.iterations // 20 or 1))
    loss_sum = torch.zeros((), device=info.device)
    loss_count, window_start, window_steps = 0, elapsed, 0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(info.device)
    first_step = step
    meta_sums: dict[str, torch.Tensor] = {}  # meta statistics of this rank's meta micro-batches since the last log
    meta_count = 0
    metalog = MetaLog()

    def log_train(scale: float, do_meta: bool) -> None:
        """One train record (metrics, wandb, the bar's postfix) for the steps since the last one."""
        nonlocal loss_count, window_start, window_steps, meta_sums, meta_count
        train_loss = all_reduce_mean(loss_sum.item() / max(loss_count, 1), info)
        dt = max(elapsed - window_start, 1e-9)
        rec = {"kind": "train", "step": step, "time_s": elapsed, "train_loss": train_loss, "lr_scale": scale,
               "ms_per_step": 1000 * dt / window_steps,
               "tokens_per_s": tokens_per_step * window_steps / dt, "meta": bool(do_meta)}
        if meta_count:  # rank 0's meta micro-batches (no collective: ranks may differ in meta steps)
            rec.update({k: float(v) / meta_count for k, v in meta_sums.items()})
            meta_sums, meta_count = {}, 0
        for meta_rec in metalog.flush():  # one record per meta step since the last log: the meta-objective's curve
            log(meta_rec)
        log(rec)
        bar.set_postfix(step=step, loss=f"{train_loss:.3f}", ms=f"{rec['ms_per_step']:.0f}")
        loss_sum.zero_()
        loss_count, window_start, window_steps = 0, elapsed, 0

    def save(path: Path | None = None) -> None:  # full precision: weights, optimiser/EMA state, data position, step
        ckpt.save(run_path, info.rank, step=step, elapsed=elapsed, model=model, opts=opts, ema=ema, loader=loader,
                  adapter=adapter, meta_opt=meta_opt, flops=counter, path=path)

    last_save = time.perf_counter()
    signals.armed = True  # from here a SIGINT / SIGTERM is a checkpoint at the next step boundary, then exit 130 / 143
    while True:
        stop = step >= cfg.iterations or (cfg.max_wallclock_s > 0 and elapsed >= cfg.max_wallclock_s)
        due = cfg.checkpoint_every_s > 0 and time.perf_counter() - last_save >= cfg.checkpoint_every_s
        stop, due, signum = agree(stop, due, signals.signum, info)  # rank 0's clock, any rank's signal
        halt = bool(cfg.halt_after and step - first_step >= cfg.halt_after)
        if signum or (halt and not stop):
            save()
            signals.armed = False
            bar.close()
            if wandb is not None:
                wandb.finish()
            if signum:
                return {"interrupted": signal_name(signum), "signum": signum, "halted_at_step": step,
                        "run_dir": str(run_path)}
            _print(info, f"halted after {cfg.halt_after} steps at step {step}; continue with --resume {run_path}")
            return {"halted_at_step": step, "run_dir": str(run_path)}
        if stop:
            break
        if due or (cfg.checkpoint_every and step > first_step and step % cfg.checkpoint_every == 0):
            save()  # at the top of the step, outside the training clock (elapsed counts step time only)
            last_save = time.perf_counter()
        if cfg.val_every and step > 0 and step % cfg.val_every == 0:
            validate(step)
        t0 = time.perf_counter()
        scale = lr_scale(step, elapsed, iterations=cfg.iterations, warmdown_iters=cfg.warmdown_iters,
                         max_wallclock_s=cfg.max_wallclock_s, warmdown_frac=cfg.warmdown_frac,
                         schedule=cfg.schedule, warmup_steps=cfg.lr_warmup_steps)
        opts.set_lr_scale(scale)
        opts.set_muon_momentum(cfg.optim.muon_momentum_at(step))
        do_meta = adapter is not None and meta_step_due(cfg.meta.every, cfg.meta.start_frac, step,
                                                                 cfg.iterations, elapsed, cfg.max_wallclock_s)
        for micro in range(batching.accum):
            x, y = loader.next_batch(info.device)
            with autocast_for(info.device):
                if do_meta and (cfg.meta.micro_batches == 0 or micro < cfg.meta.micro_batches):
                    counter.active = "meta"
                    loss, mstats = meta_loss(model, adapter, x, y, cfg.meta)
                    for k, v in mstats.items():
                        meta_sums[k] = meta_sums[k] + v.float() if k in meta_sums else v.float()
                    meta_count += 1
                    metalog.add(mstats)
                else:
                    counter.active = "plain"
                    loss = fwd(x, y)
            counter.active = None
            (loss / batching.accum).backward()
            loss_sum += loss.detach().float()
            loss_count += 1
        if do_meta:
            counter.meta_steps += 1
            metalog.end_step(step + 1)
        if meta_opt is not None and do_meta:
            _average_grads(meta_opt, info)
            meta_opt.step()
            meta_opt.zero_grad(set_to_none=True)
        opts.step()
        if ema is not None and step >= cfg.ema_start_step:
            ema.update(model)
        step += 1
        window_steps += 1
        if on_gpu and (step % log_every == 0):
            torch.cuda.synchronize(info.device)
        elapsed += time.perf_counter() - t0
        now = min(int(elapsed), int(cfg.max_wallclock_s)) if by_time else step
        bar.update(now - shown)
        shown = now
        if step % log_every == 0 or step == cfg.iterations:
            log_train(scale, do_meta)
        for b in budget_due.get(step, []):
            save(bud.checkpoint_path(run_path, b.label, info.rank))
    signals.armed = False
    if window_steps:  # a wallclock stop between log steps: the last step is logged and shown too
        log_train(scale, do_meta)
    bar.close()
    peak_mem = torch.cuda.max_memory_allocated(info.device) / 2**30 if on_gpu else 0.0
    if cfg.checkpoint_every:
        save()
    raw = validate(step)
    if ema is not None:
        ema.copy_to(model)
        final = validate(step)
    else:
        final = raw
    extra: dict[str, Any] = {
        "schedule": cfg.schedule, "non_embedding_params": model.num_non_embedding_params(),
        "train_stream_tokens": loader.n_tokens, "train_passes": step * cfg.train_batch_tokens / loader.n_tokens}
    if plan:
        extra["budget_plan"] = {**plan, "budgets": [
            {**b.to_dict(), "saved": bud.checkpoint_path(run_path, b.label, info.rank).is_file()} for b in budgets]}
    if branch is not None:
        extra["branch"] = branch
    plain_step = flp.plain_step_flops(cfg.model, cfg.train_batch_tokens, cfg.seq_len)
    extra["flops"] = counter.summary(lambda v: all_reduce_mean(v, info) * info.world_size, plain_step,
                                     step - (branch["from_step"] if branch is not None else 0))
    counter.close()
    if adapter is not None:
        extra["meta_params"] = meta_param_summary(adapter)
    summary = _finish(cfg, info, run, run_path, model, adapter, src, val, final, raw, step, elapsed, peak_mem,
                      extra)
    if wandb is not None:
        wandb.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        wandb.finish()
    return summary


def _branch(cfg: TrainConfig, info: DistInfo, budget: float = 0.0) -> tuple[TrainConfig, dict[str, Any]]:
    """A decay branch's schedule: from the checkpoint's step S, ``K = decay_frac * S`` steps with the lr falling
    linearly to 0 -- the warmdown schedule over ``S + K`` steps, so the branch is the run a warmdown from the start
    would have been (the parent's schedule up to S being constant). With a FLOPs ``budget``, K is the number of
    plain steps it buys (compute matching: a longer decay for the no-meta arm)."""
    parent, ck = bud.branch_paths(cfg.branch_from, info.rank)
    s = bud.checkpoint_step(ck)
    k = bud.decay_steps(cfg.decay_frac, s)
    if budget:
        k = flp.steps_for_budget(budget, flp.plain_step_flops(cfg.model, cfg.train_batch_tokens, cfg.seq_len))
    cfg = dataclasses.replace(cfg, iterations=s + k, warmdown_iters=k, warmdown_frac=0.0, max_wallclock_s=0.0,
                              schedule="warmdown", save_at_tokens=(), save_at_dn=(), max_passes=0.0)
    return cfg, {"checkpoint": str(ck), "parent_run": str(parent), "from_step": s, "decay_steps": k,
                 "decay_frac": cfg.decay_frac, "branch_seed": cfg.branch_seed, "flops_budget": budget or None, "from_tokens": s * cfg.train_batch_tokens,
                 "tokens": (s + k) * cfg.train_batch_tokens, "budget": bud.parent_budget(parent, ck)}


def _plan_budgets(cfg: TrainConfig, train_pattern: str) -> tuple[TrainConfig, list[bud.Budget], dict[str, Any]]:
    """Budget checkpoints and the pass cap: the run ends at the last budget (or at the cap, if sooner)."""
    from ..data.loaders import find_shards
    from ..data.shards import read_shard_header

    if not (cfg.save_at_tokens or cfg.save_at_dn or cfg.max_passes):
        return cfg, [], {}
    stream = sum(read_shard_header(p) for p in find_shards(train_pattern))
    total, non_emb = bud.param_counts(cfg.model)
    n = total if cfg.dn_params == "total" else non_emb
    budgets = bud.plan_budgets(save_at_tokens=cfg.save_at_tokens, save_at_dn=cfg.save_at_dn, n_params=n,
                               batch_tokens=cfg.train_batch_tokens, stream_tokens=stream, max_passes=cfg.max_passes)
    cap = bud.cap_steps(cfg.max_passes, stream, cfg.train_batch_tokens)
    end = budgets[-1].step if budgets else cfg.iterations
    end = min(end, cap) if cap is not None else end
    plan = {"n_params": n, "dn_params": cfg.dn_params, "total_params": total, "non_embedding_params": non_emb,
            "stream_tokens": stream, "batch_tokens": cfg.train_batch_tokens, "max_passes": cfg.max_passes,
            "cap_step": cap, "end_step": end}
    return dataclasses.replace(cfg, iterations=end), budgets, plan


def _compile_warmup(cfg: TrainConfig, fwd, model: BankedGPT, opts, loader: TrainLoader, batching: _Batching,
                    info: DistInfo) -> None:
    """Compile outside the clock (as the record does): take a few real steps, then restore the initial state."""
    t0 = time.perf_counter()
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opts.state_dict()), loader.state_dict())
    for _ in range(cfg.compile_warmup_steps):
        for _ in range(batching.accum):
            x, y = loader.next_batch(info.device)
            with autocast_for(info.device):
                (fwd(x, y) / batching.accum).backward()
        opts.step()
    model.load_state_dict(saved[0])
    opts.load_state_dict(saved[1])
    loader.load_state_dict(saved[2])
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    _print(info, f"compile warmup: {cfg.compile_warmup_steps} steps in {time.perf_counter() - t0:.1f}s (not timed)")


def _average_grads(opt: torch.optim.Optimizer, info: DistInfo) -> None:
    if not info.distributed:
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for p, s in zip(params, info.ctx.reduce_sum([p.grad for p in params])):
        p.grad.copy_(s).div_(info.world_size)


def _finish(cfg: TrainConfig, info: DistInfo, run: RunDir, run_path: Path, model: BankedGPT, adapter, src, val,
            final: dict[str, float], raw: dict[str, float], step: int, elapsed: float,
            peak_mem: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize to the artifact, score the round-tripped model, write and print the summary."""
    art_path = run_path / ARTIFACT_NAME
    extras = adapter.artifact_extras() if adapter is not None else {}
    meta = {"lut": src.lut.to_dict(), "data": src.kind, "val_pattern": src.val_pattern, "seq_len": cfg.seq_len,
            "bounds": src.bounds, **src.meta, "meta_adapter": cfg.meta.adapter or None, "steps": step}
    report = None
    if info.is_main:
        report = save_model_artifact(art_path, model, extras=extras or None, meta=meta, level=cfg.zstd_level,
                                     budget=cfg.artifact_budget, allow_over_budget=True)
    if info.distributed:
        dist.barrier()
    qmodel, loaded = load_model_artifact(art_path, device=info.device)
    on_gpu = info.device.type == "cuda"
    quant = flat_val_bpb(qmodel, val, src.lut, cfg.seq_len, cfg.val_batch_seqs, info, on_gpu)
    tokens = step * cfg.train_batch_tokens
    summary: dict[str, Any] = {
        "steps": step, "train_tokens": tokens, "train_time_s": elapsed,
        "ms_per_step": 1000 * elapsed / max(step, 1),
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "tokens_per_s_per_gpu": tokens / max(elapsed, 1e-9) / info.world_size,
        "world_size": info.world_size, "peak_mem_gib": peak_mem, "num_params": model.num_params(),
        "val_bpb_raw": raw["val_bpb"], "val_bpb": final["val_bpb"], "val_loss": final["val_loss"],
        "val_bpb_quant": quant["val_bpb"], "quant_gap_bpb": quant["val_bpb"] - final["val_bpb"],
        "val_tokens": final["val_tokens"], "artifact": str(art_path),
        "artifact_report": loaded.report.to_dict(), "bounds": src.bounds, "data": src.kind,
        "meta_adapter": cfg.meta.adapter or None,
        "meta_inner": cfg.meta.inner_summary(adapter) if adapter is not None else None,
        "data_fingerprint": {k: src.meta[k] for k in ("val_fingerprint", "val_n_tokens", "synthetic_fingerprint")
                             if k in src.meta},
        **(extra or {}),
    }
    run.write_summary(summary)
    if info.is_main:
        _print_report(summary, report)
    return summary


def _print_report(s: dict[str, Any], report) -> None:
    rows = [(f"model (EMA/final weights), all {int(s['val_tokens']):,} val targets", s["val_bpb"]),
            ("model after int6/int8 + zstd roundtrip, the same targets", s["val_bpb_quant"])]
    b = s.get("bounds") or {}
    named = [("unigram bound", "unigram_bpb"), ("global-chain bound (bigram)", "bigram_bpb"),
             ("Bayes bound, document statistics unknown", "bayes_unknown_bpb"),
             ("Bayes bound, document statistics known", "bayes_known_bpb")]
    rows += [(label, b[key]) for label, key in named if key in b]
    width = max(len(r[0]) for r in rows)
    print("\n== result (flat val bpb, lower is better) ==")
    for label, v in rows:
        print(f"  {label:<{width}}  {v:.4f}")
    if "unigram_bpb" in b and "bayes_unknown_bpb" in b:
        pos = (b["unigram_bpb"] - s["val_bpb_quant"]) / max(b["unigram_bpb"] - b["bayes_unknown_bpb"], 1e-9)
        print(f"  model closes {100 * pos:.1f}% of the gap from the unigram bound to the Bayes bound")
    print(f"  {s['steps']} steps, {s['train_tokens']:,} tokens in {s['train_time_s']:.1f}s "
          f"({s['tokens_per_s_per_gpu']:,.0f} tokens/s per device, {s['ms_per_step']:.1f} ms/step)")
    if report is not None:
        print(report)
    print(f"  artifact: {s['artifact']}")
    print(json.dumps({"val_bpb": round(s["val_bpb_quant"], 5), "artifact_bytes": s["artifact_report"].get("total_bytes")}))

