"""Streaming synthetic training data: fresh documents generated on the fly, never an epoch (issue 30).

On the synthetic corpus the data is unlimited, so a model can be trained to convergence without ever seeing a
document twice. ``SyntheticStream`` is a drop-in for ``TrainLoader`` (same ``next_batch`` / ``state_dict``
interface): rank r's training tokens are the concatenation of blocks b = 0, 1, ... of whole documents, block b
generated from ``SeedSequence([spec.seed, 3, seed, rank, b])`` -- deterministic per (spec, seed, rank), disjoint
from the val stream (another seed stream) and between ranks. Resuming regenerates the current block.

Generation (``generate_documents``) is the same chain as ``synthetic.generate_split`` but built for speed: the
documents of a block are sorted by length so each step of the token loop touches only the documents still
running (no padding), and the random draws are made in bulk per chunk of steps. Large blocks (8M tokens by
default: some 480 long documents advance together) amortise numpy's per-call cost; measured with
experiments/synth_stream_bench.py. Optional worker processes
generate the next blocks ahead of the trainer (``workers``); the blocks and their order do not depend on it.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from .synthetic import BOS_ID, FIRST_REGULAR, Chain, SyntheticSpec, _doc_params, make_chain

_STREAM_TRAIN_STREAM = 3  # SeedSequence stream id (0: chain, 1: val, 2: train shards)
_STEP_CHUNK = 256  # token-loop steps whose random draws are made in one call


def generate_documents(spec: SyntheticSpec, chain: Chain, rng: np.random.Generator,
                       n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole BOS-led documents of ``spec`` drawn from ``rng``: the uint16 stream (at least ``n_tokens`` tokens),
    and the documents' lengths and content distributions in stream order (what the bounds need)."""
    lengths, theta = _doc_params(spec, rng, n_tokens)
    order = np.argsort(-lengths, kind="stable")  # longest first: the running documents are a prefix
    ln = lengths[order].astype(np.int64)
    off = np.concatenate([[0], np.cumsum(ln)])
    # each document's content draws, made up front (it uses at most its length of them), in its own slice
    cum = np.cumsum(theta[order], axis=1)
    u = rng.random(int(off[-1]))
    pool = np.empty(int(off[-1]), dtype=np.int64)
    for d in range(ln.size):
        a, b = off[d], off[d + 1]
        pool[a:b] = np.searchsorted(cum[d], u[a:b], side="right")
    np.minimum(pool, spec.n_content - 1, out=pool)
    pool += spec.first_content
    body = np.empty(int(off[-1]), dtype=np.int64)  # document d's regular tokens at body[off[d]:off[d + 1]]
    x = np.full(ln.size, BOS_ID, dtype=np.int64)
    used = off[:-1].copy()
    starts = off[:-1]
    neg = -ln
    for t0 in range(0, int(ln[0]), _STEP_CHUNK):
        na0 = int(np.searchsorted(neg, -t0, side="left"))  # documents longer than t0
        steps = min(_STEP_CHUNK, int(ln[0]) - t0)
        u_c = rng.random((steps, na0))
        j_f = rng.integers(spec.n_function, size=(steps, na0))
        u_f = rng.random((steps, na0))
        for s in range(steps):
            na = int(np.searchsorted(neg, -(t0 + s), side="left"))
            xa = x[:na]
            is_c = u_c[s, :na] < chain.content_prob[xa]
            j = j_f[s, :na]
            func = np.where(u_f[s, :na] < chain.alias_prob[xa, j], j, chain.alias_idx[xa, j]) + FIRST_REGULAR
            y = np.where(is_c, pool[used[:na]], func)
            used[:na] += is_c
            body[starts[:na] + t0 + s] = y
            x[:na] = y
    # back to the drawn (random) order, each document led by BOS
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    ln_o = ln[inv]
    out_off = np.concatenate([[0], np.cumsum(ln_o + 1)])
    out = np.empty(int(out_off[-1]), dtype=np.uint16)
    out[out_off[:-1]] = BOS_ID
    body_pos = np.repeat(off[:-1][inv] - out_off[:-1] - 1, ln_o + 1)  # body index minus out index, per doc
    is_body = np.ones(out.size, dtype=bool)
    is_body[out_off[:-1]] = False
    idx = np.flatnonzero(is_body)
    out[idx] = body[idx + body_pos[idx]]
    return out, lengths, theta


def stream_block(spec_dict: dict[str, Any], seed: int, rank: int, block: int, block_tokens: int) -> np.ndarray:
    """Block ``block`` of rank ``rank``'s stream (a plain function: worker processes run it)."""
    spec = SyntheticSpec.from_dict(spec_dict)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _STREAM_TRAIN_STREAM, seed, rank, block]))
    return generate_documents(spec, _chain_cached(spec), rng, block_tokens)[0]


def default_workers(world_size: int = 1) -> int:
    """Generator processes per rank: the machine's spare cores shared by the ranks (at most 4, 0 on 2 cores or
    fewer: the trainer itself needs them). The blocks do not depend on it."""
    spare = (os.cpu_count() or 1) - 2 * world_size
    return max(0, min(4, spare // max(world_size, 1)))


def block_tokens_for(batch_tokens: int) -> int:
    """The trainer's block size for micro-batches of ``batch_tokens``: 64 batches, within [64K, 8M] tokens (large
    enough to amortise the generator's per-step cost, small enough that a short run does not wait for 8M)."""
    return min(1 << 23, max(1 << 16, 64 * batch_tokens))


_CHAINS: dict[SyntheticSpec, Chain] = {}  # per process: the chain is a pure function of the spec


def _chain_cached(spec: SyntheticSpec) -> Chain:
    if spec not in _CHAINS:
        _CHAINS.clear()
        _CHAINS[spec] = make_chain(spec)
    return _CHAINS[spec]


class SyntheticStream:
    """``(x, y)`` training batches of ``(local_batch_tokens // seq_len, seq_len)`` from fresh synthetic documents.

    Each batch takes the next ``local_batch_tokens + 1`` tokens of this rank's stream (rows of ``seq_len + 1``,
    the last token of a batch is the first of the next, as in ``TrainLoader``'s sequential mode), so documents are
    cut across rows exactly as the shard loaders cut them. The position is two integers (block, offset), so
    ``state_dict`` / ``load_state_dict`` resume with the same next batch. ``workers`` > 0 generates up to
    ``workers + 1`` blocks ahead in that many processes.
    """

    def __init__(self, spec: SyntheticSpec, seq_len: int, local_batch_tokens: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, block_tokens: int = 1 << 23, workers: int = 0):
        if seq_len <= 0 or local_batch_tokens <= 0 or local_batch_tokens % seq_len:
            raise ValueError(f"local_batch_tokens ({local_batch_tokens}) must be a positive multiple of seq_len "
                             f"({seq_len})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if block_tokens < 1 or workers < 0:
            raise ValueError("block_tokens must be positive and workers >= 0")
        self.spec, self.seq_len, self.local_batch_tokens = spec, seq_len, local_batch_tokens
        self.batch_size = local_batch_tokens // seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.block_tokens, self.workers = block_tokens, workers
        self.mode = "stream"
        self.block = 0  # the block holding the next batch's first token ...
        self.pos = 0  # ... and its offset there
        self.step = 0
        self._blocks: dict[int, np.ndarray] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._ahead: dict[int, Future] = {}

    @property
    def n_tokens(self) -> int:
        """Tokens served to all ranks so far (the stream is unbounded: no token is ever served twice, so a run's
        passes are 1)."""
        return max(1, self.step * self.local_batch_tokens * self.world_size)

    def _get(self, block: int) -> np.ndarray:
        if block in self._blocks:
            return self._blocks[block]
        args = (self.spec.to_dict(), self.seed, self.rank)
        if self.workers == 0:
            arr = stream_block(*args, block, self.block_tokens)
        else:
            if self._pool is None:
                # spawn, not fork: the trainer may hold CUDA state, which a forked child must not inherit
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            for b in range(block, block + self.workers + 1):
                if b not in self._ahead:
                    self._ahead[b] = self._pool.submit(stream_block, *args, b, self.block_tokens)
            arr = self._ahead.pop(block).result()
        self._blocks[block] = arr
        return arr

    def _next_tokens(self) -> np.ndarray:
        """This rank's ``(B, seq_len + 1)`` int64 rows; advances the position by ``local_batch_tokens``."""
        need, parts, b, off = self.local_batch_tokens + 1, [], self.block, self.pos
        while need > 0:
            arr = self._get(b)
            take = arr[off:off + need]
            parts.append(take)
            need -= take.size
            b, off = (b + 1, 0) if need > 0 else (b, off)
        flat = np.concatenate(parts).astype(np.int64)
        adv = self.pos + self.local_batch_tokens
        while adv >= self._get(self.block).size:
            adv -= self._blocks.pop(self.block).size
            self.block += 1
        self.pos = adv
        for k in [k for k in self._blocks if k < self.block]:
            del self._blocks[k]
        T = self.seq_len
        return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(flat, T + 1)[::T])

    def next_batch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` int64 tensors of shape ``(B, seq_len)`` with ``y[:, t] = x[:, t+1]`` in the stream."""
        buf = torch.from_numpy(self._next_tokens())
        self.step += 1
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if device is not None:
            dev = torch.device(device)
            if dev.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "mode": self.mode, "spec": self.spec.to_dict(), "seq_len": self.seq_len,
                "seed": self.seed, "rank": self.rank, "block_tokens": self.block_tokens, "block": self.block,
                "pos": self.pos, "step": self.step, "local_batch_tokens": self.local_batch_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the spec, seq_len, seed, rank and block size must match the saved run."""
        checks = {"mode": self.mode, "spec": self.spec.to_dict(), "seq_len": self.seq_len, "seed": self.seed,
                  "rank": self.rank, "block_tokens": self.block_tokens}
        for key, mine in checks.items():
            if state.get(key) != mine:
                raise ValueError(f"SyntheticStream state mismatch on {key!r}: saved {state.get(key)!r}, "
                                 f"stream has {mine!r}")
        self.block, self.pos, self.step = int(state["block"]), int(state["pos"]), int(state["step"])
        self._blocks = {k: v for k, v in self._blocks.items() if k >= self.block}

    def __del__(self) -> None:  # the trainer drops its loader on every way out: prefetched blocks are not waited for
        self.close()

    def close(self) -> None:
        """Stop the worker processes (blocks already made are kept)."""
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._ahead.clear()
