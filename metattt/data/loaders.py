"""Token loaders: a resumable, rank-disjoint training stream and the validation token loader.

The training data is the concatenation of all shards (sorted by name), read cyclically. Two modes:

* ``sequential``: each step the ranks take ``world_size`` consecutive spans of ``local_batch_tokens`` tokens
  (plus one target token) from the stream, then the global position advances by ``world_size *
  local_batch_tokens``. Ranks never share an input or a target token within a step, and nothing is skipped.
* ``random``: the stream is cut into blocks of ``seq_len`` tokens at a seeded random shift per epoch, the
  blocks are visited in a seeded random permutation per epoch, and each step the ranks take disjoint slices
  of that permutation. Every block is seen once per epoch.

All state is two integers (``epoch``, ``pos``) plus the step counter, so ``state_dict`` /
``load_state_dict`` resume with exactly the same next batch.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metattt.data.shards import read_shard, read_shard_header

_MODES = ("sequential", "random")


def find_shards(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Resolve a glob pattern (or an explicit list of paths) to a sorted list of existing shard files."""
    if isinstance(pattern, (str, os.PathLike)):
        paths = sorted(Path(p) for p in glob.glob(os.fspath(pattern)))
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise FileNotFoundError(f"no shard files match pattern {os.fspath(pattern)!r}")
        return paths
    paths = [Path(p) for p in pattern]
    if not paths:
        raise FileNotFoundError("empty list of shard files given")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard files not found: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    return paths


class _TokenStream:
    """The cyclic concatenation of several shards, read lazily through memory maps."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        counts = [read_shard_header(p) for p in paths]
        self.cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.n_tokens = int(self.cum[-1])
        self._maps: dict[int, np.ndarray] = {}

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = read_shard(self.paths[i])
        return self._maps[i]

    def read(self, start: int, n: int) -> np.ndarray:
        """``n`` tokens starting at stream position ``start``, wrapping from the end to the beginning."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        pos = start % self.n_tokens
        while filled < n:
            i = int(np.searchsorted(self.cum, pos, side="right")) - 1
            off = pos - int(self.cum[i])
            take = min(n - filled, int(self.cum[i + 1]) - pos)
            out[filled : filled + take] = self._shard(i)[off : off + take]
            filled += take
            pos = (pos + take) % self.n_tokens
        return out


class TrainLoader:
    """Streams ``(x, y)`` training batches of shape ``(local_batch_tokens // seq_len, seq_len)`` for one rank."""

    def __init__(self, pattern: str | os.PathLike | Sequence[str | os.PathLike], seq_len: int, local_batch_tokens: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, mode: str = "sequential"):
        if mode not in _MODES:
            raise ValueError(f"TrainLoader mode must be one of {_MODES}, got {mode!r}")
        if seq_len <= 0 or local_batch_tokens <= 0:
            raise ValueError(f"seq_len ({seq_len}) and local_batch_tokens ({local_batch_tokens}) must be positive")
        if local_batch_tokens % seq_len:
            raise ValueError(f"local_batch_tokens ({local_batch_tokens}) must be a multiple of seq_len ({seq_len})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.paths = find_shards(pattern)
        self.seq_len, self.local_batch_tokens = seq_len, local_batch_tokens
        self.batch_size = local_batch_tokens // seq_len
        self.rank, self.world_size, self.seed, self.mode = rank, world_size, seed, mode
        self._stream = _TokenStream(self.paths)
        n = self._stream.n_tokens
        need = world_size * local_batch_tokens + 1
        if n < need:
            raise ValueError(f"shards {self._describe()} hold {n} tokens, fewer than one global batch needs "
                             f"({world_size} ranks x {local_batch_tokens} tokens + 1 = {need})")
        self.n_blocks = (n - 1) // seq_len
        self.epoch = 0
        self.pos = 0  # sequential: stream token position; random: index into the epoch's block permutation
        self.step = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None
        self._shift = 0

    def _describe(self) -> str:
        names = [p.name for p in self.paths]
        return f"{names[:3]}{' ...' if len(names) > 3 else ''} ({len(names)} files)"

    @property
    def n_tokens(self) -> int:
        return self._stream.n_tokens

    def _epoch_perm(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._shift = int(rng.integers(self.seq_len))
            self._perm = rng.permutation(self.n_blocks)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm, self._shift

    def _next_tokens(self) -> np.ndarray:
        """This rank's ``(B, seq_len + 1)`` int64 window array; advances the shared state."""
        B, T, W = self.batch_size, self.seq_len, self.world_size
        if self.mode == "sequential":
            L = self.local_batch_tokens
            flat = self._stream.read(self.pos + self.rank * L, L + 1)
            rows = np.lib.stride_tricks.sliding_window_view(flat, T + 1)[::T]
            self.pos += W * L
            if self.pos >= self.n_tokens:
                self.pos -= self.n_tokens
                self.epoch += 1
            return np.ascontiguousarray(rows)
        if self.pos + W * B > self.n_blocks:
            self.epoch += 1
            self.pos = 0
        perm, shift = self._epoch_perm(self.epoch)
        mine = perm[self.pos + self.rank * B : self.pos + (self.rank + 1) * B]
        out = np.stack([self._stream.read(shift + int(k) * T, T + 1) for k in mine])
        self.pos += W * B
        return out

    def next_batch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` int64 tensors of shape ``(B, seq_len)`` with ``y[:, t] = x[:, t+1]`` in the stream."""
        buf = torch.from_numpy(self._next_tokens())
        self.step += 1
        x = buf[:, :-1].contiguous()
        y = buf[:, 1:].contiguous()
        if device is not None:
            dev = torch.device(device)
            if dev.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "mode": self.mode, "seq_len": self.seq_len, "seed": self.seed, "epoch": self.epoch,
                "pos": self.pos, "step": self.step, "world_size": self.world_size,
                "local_batch_tokens": self.local_batch_tokens, "shards": [p.name for p in self.paths],
                "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. Mode, seq_len, seed and the shard set must match the saved run."""
        checks = {"mode": self.mode, "seq_len": self.seq_len, "seed": self.seed, "n_tokens": self.n_tokens,
                  "shards": [p.name for p in self.paths]}
        for key, mine in checks.items():
            if state.get(key) != mine:
                raise ValueError(f"TrainLoader state mismatch on {key!r}: saved {state.get(key)!r}, loader has "
                                 f"{mine!r}")
        self.epoch, self.pos, self.step = int(state["epoch"]), int(state["pos"]), int(state["step"])


def load_val_tokens(pattern: str | os.PathLike | Sequence[str | os.PathLike],
                    vocab_size: int | None = None) -> torch.Tensor:
    """All validation shards matching ``pattern`` (sorted) concatenated into one 1-D int64 tensor."""
    paths = find_shards(pattern)
    parts = [np.asarray(read_shard(p, vocab_size=vocab_size), dtype=np.int64) for p in paths]
    return torch.from_numpy(np.concatenate(parts))
