from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metattt.data.loaders import TrainLoader, find_shards, load_val_tokens
from metattt.data.shards import write_shard

SIZES = (1000, 0, 1500, 777)  # an empty shard in the middle must simply be skipped
N = sum(SIZES)


@pytest.fixture
def stream_dir(tmp_path: Path) -> Path:
    """Shards whose token at global stream position i is i (N < 65536), written out of name order."""
    starts = np.cumsum((0,) + SIZES)
    for i in reversed(range(len(SIZES))):
        write_shard(tmp_path / f"train_{i:06d}.bin", np.arange(starts[i], starts[i + 1]))
    return tmp_path


def _pattern(d: Path) -> str:
    return str(d / "train_*.bin")


def test_find_shards_sorted_and_clear_errors(stream_dir: Path) -> None:
    assert [p.name for p in find_shards(_pattern(stream_dir))] == [f"train_{i:06d}.bin" for i in range(4)]
    with pytest.raises(FileNotFoundError, match="no shard files match pattern .*nothing_\\*.bin"):
        find_shards(str(stream_dir / "nothing_*.bin"))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        find_shards([stream_dir / "train_000000.bin", stream_dir / "missing.bin"])


def test_sequential_batches_are_the_stream(stream_dir: Path) -> None:
    T, L = 16, 64
    loader = TrainLoader(_pattern(stream_dir), T, L)
    for step in range(N // L + 3):  # crosses shard boundaries, the empty shard, and the wrap to the start
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (L // T, T) and y.shape == x.shape
        expected = (step * L + np.arange(L + 1)) % N
        assert x.flatten().tolist() == expected[:-1].tolist()
        assert y.flatten().tolist() == expected[1:].tolist()
    assert loader.epoch == 1
    # an explicit list of paths and a device argument work the same way
    listed = TrainLoader(find_shards(_pattern(stream_dir)), T, L)
    x, y = listed.next_batch(device="cpu")
    assert x.device.type == "cpu" and x.flatten().tolist() == list(range(L))


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_ranks_disjoint_within_each_step(stream_dir: Path, mode: str) -> None:
    T, L, W = 8, 32, 3
    loaders = [TrainLoader(_pattern(stream_dir), T, L, rank=r, world_size=W, seed=5, mode=mode) for r in range(W)]
    seen_targets: list[int] = []
    for step in range(12):
        xs, ys = zip(*(ld.next_batch() for ld in loaders))
        for x, y in zip(xs, ys):
            assert torch.equal(x[:, 1:], y[:, :-1])
            assert torch.equal((x + 1) % N, y)  # every row is a window of the true stream
        all_x = torch.cat([x.flatten() for x in xs]).tolist()
        all_y = torch.cat([y.flatten() for y in ys]).tolist()
        assert len(set(all_x)) == len(all_x) == W * L
        assert len(set(all_y)) == len(all_y)
        if mode == "sequential":
            assert sorted(all_x) == sorted(((step * W * L) + np.arange(W * L)) % N)
        seen_targets += all_y
    if mode == "random":  # within one epoch no block repeats (12 * 3 * 4 blocks < (N-1)//8 blocks)
        assert len(set(seen_targets)) == len(seen_targets)


def test_random_mode_seeded_and_varies_offsets(stream_dir: Path) -> None:
    T, L = 8, 64
    a = TrainLoader(_pattern(stream_dir), T, L, seed=1, mode="random")
    b = TrainLoader(_pattern(stream_dir), T, L, seed=1, mode="random")
    c = TrainLoader(_pattern(stream_dir), T, L, seed=2, mode="random")
    xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    # the row starts are not all on one fixed grid across epochs: epoch shifts are random
    shifts = set()
    for _ in range(160):
        x, _ = a.next_batch()
        shifts |= set((x[:, 0] % T).tolist())
    assert a.epoch >= 2 and len(shifts) > 1


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_resume_gives_identical_next_batches(stream_dir: Path, mode: str) -> None:
    args = (_pattern(stream_dir), 16, 64)
    ref = TrainLoader(*args, rank=1, world_size=2, seed=3, mode=mode)
    for _ in range(41):  # past an epoch boundary
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # must survive serialisation
    resumed = TrainLoader(*args, rank=1, world_size=2, seed=3, mode=mode)
    resumed.load_state_dict(state)
    for _ in range(30):
        xr, yr = ref.next_batch()
        xs, ys = resumed.next_batch()
        assert torch.equal(xr, xs) and torch.equal(yr, ys)
    assert resumed.state_dict() == ref.state_dict()


def test_state_mismatch_and_config_errors(stream_dir: Path) -> None:
    p = _pattern(stream_dir)
    state = TrainLoader(p, 16, 64).state_dict()
    with pytest.raises(ValueError, match="mismatch on 'seq_len'"):
        TrainLoader(p, 32, 64).load_state_dict(state)
    with pytest.raises(ValueError, match="mismatch on 'mode'"):
        TrainLoader(p, 16, 64, mode="random").load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of seq_len"):
        TrainLoader(p, 16, 60)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainLoader(p, 16, 2048, world_size=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainLoader(p, 16, 64, mode="shuffled")
    with pytest.raises(ValueError, match="rank 2 out of range"):
        TrainLoader(p, 16, 64, rank=2, world_size=2)


def test_load_val_tokens(stream_dir: Path) -> None:
    v = load_val_tokens(_pattern(stream_dir))
    assert v.dtype == torch.int64 and v.tolist() == list(range(N))
    with pytest.raises(FileNotFoundError, match="val_\\*"):
        load_val_tokens(str(stream_dir / "val_*.bin"))
