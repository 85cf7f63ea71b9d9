"""Streaming synthetic training data (issue 30): the fast generator draws the corpus's process, the stream is
deterministic per seed and rank and resumes exactly, and the trainer trains from it (exact resume included)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from metattt.data.synthetic import BOS_ID, SyntheticSpec, _target_nats, document_params, generate_split, make_chain
from metattt.data.synthetic_stream import SyntheticStream, generate_documents, stream_block
from metattt.train.cli import parse_config
from metattt.train.loop import train

SPEC = SyntheticSpec(vocab_size=64, n_train_tokens=10, n_val_tokens=60_000, min_doc_len=50, max_doc_len=900,
                     alpha=0.5, content_types=40, seed=5)


def _known_bpb(spec, tokens, lengths, theta) -> float:
    r = _target_nats(spec, tokens.astype(np.int64), make_chain(spec), lengths, theta)
    return float(r["known"].sum() / math.log(2) / (~r["is_bos"]).sum())


def test_fast_generator_draws_the_corpus_process() -> None:
    """Whole BOS-led documents of the drawn lengths, and the true model's cross-entropy on them (its entropy rate)
    matches generate_split's val stream of the same spec within sampling noise; a wrong chain would not."""
    tok, lengths, theta = generate_documents(SPEC, make_chain(SPEC), np.random.default_rng(0), 60_000)
    starts = np.flatnonzero(tok == BOS_ID)
    assert starts[0] == 0 and np.array_equal(np.diff(np.append(starts, tok.size)) - 1, lengths)
    assert tok.size >= 60_000 and tok.max() < SPEC.vocab_size
    val = generate_split(SPEC, "val")
    ref = _known_bpb(SPEC, val, *document_params(SPEC, "val"))
    got = _known_bpb(SPEC, tok, lengths, theta)
    assert got == pytest.approx(ref, rel=0.02)
    other = SyntheticSpec(**{**SPEC.to_dict(), "seed": 6})  # another chain: the stream is not its process
    assert _known_bpb(other, tok, lengths, theta) > ref * 1.05


def test_stream_is_deterministic_per_seed_and_rank_and_resumes() -> None:
    def batches(stream, n):
        return [stream.next_batch()[0].numpy() for _ in range(n)]

    a = batches(SyntheticStream(SPEC, 32, 256, rank=0, world_size=2, seed=1, block_tokens=700), 12)
    b = batches(SyntheticStream(SPEC, 32, 256, rank=0, world_size=2, seed=1, block_tokens=700), 12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    r1 = batches(SyntheticStream(SPEC, 32, 256, rank=1, world_size=2, seed=1, block_tokens=700), 12)
    s2 = batches(SyntheticStream(SPEC, 32, 256, rank=0, world_size=2, seed=2, block_tokens=700), 12)
    assert not np.array_equal(np.stack(a), np.stack(r1)) and not np.array_equal(np.stack(a), np.stack(s2))
    # consecutive batches continue the stream (blocks joined without a gap): rank 0's tokens are its blocks
    s = SyntheticStream(SPEC, 32, 256, rank=0, world_size=2, seed=1, block_tokens=700)
    x, y = s.next_batch()
    flat = np.concatenate([stream_block(SPEC.to_dict(), 1, 0, k, 700) for k in range(3)])
    assert np.array_equal(x.numpy().reshape(-1), flat[:256]) and np.array_equal(y.numpy()[-1], flat[225:257])
    # resume: a fresh stream loaded with the state after 5 batches gives batches 6..12
    s = SyntheticStream(SPEC, 32, 256, rank=0, world_size=2, seed=1, block_tokens=700)
    batches(s, 5)
    state = json.loads(json.dumps(s.state_dict()))
    t = SyntheticStream(SPEC, 32, 256, rank=0, world_size=2, seed=1, block_tokens=700)
    t.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(batches(t, 7), a[5:]))
    with pytest.raises(ValueError, match="seed"):
        SyntheticStream(SPEC, 32, 256, seed=9, block_tokens=700).load_state_dict(state)


def test_worker_processes_give_the_same_stream() -> None:
    s0 = SyntheticStream(SPEC, 32, 512, seed=3, block_tokens=2000)
    s1 = SyntheticStream(SPEC, 32, 512, seed=3, block_tokens=2000, workers=1)
    try:
        for _ in range(6):
            assert np.array_equal(s0.next_batch()[0].numpy(), s1.next_batch()[0].numpy())
    finally:
        s1.close()


TINY = ["--model.num-layers", "1", "--model.model-dim", "32", "--model.num-heads", "2", "--model.num-kv-heads", "1",
        "--model.xsa-layers", "0", "--model.ve-layers", "0", "--model.ve-dim", "8", "--model.bigram-vocab", "64",
        "--model.bigram-dim", "8", "--model.rope-dims", "8", "--model.vocab-size", "64", "--seq-len", "64",
        "--train-batch-tokens", "512", "--micro-batch-tokens", "256", "--synthetic-spec", "main-job",
        "--synthetic-train-tokens", "10", "--synthetic-val-tokens", "3000", "--val-every", "0",
        "--max-wallclock-s", "0", "--progress", "false", "--wandb", "off", "--warmdown-iters", "2",
        "--final-eval", "off", "--loader-mode", "stream"]


def test_trainer_trains_from_the_stream_and_resumes_exactly(tmp_path: Path) -> None:
    """--loader-mode stream: a run on a 10-token training shard (the stream supplies the data), and a resumed
    run takes exactly the uninterrupted run's steps."""
    def args(*extra):
        return [*TINY, "--data-dir", str(tmp_path / "syn"), "--run-root", str(tmp_path / "runs"), *extra]

    with pytest.raises(ValueError, match="stream"):
        parse_config(args("--data", str(tmp_path / "shards"))).check_budgets()
    full = train(parse_config(args("--iterations", "4", "--run-name", "full")))
    assert full["steps"] == 4 and math.isfinite(full["val_bpb"])
    cut = train(parse_config(args("--iterations", "4", "--run-name", "cut", "--checkpoint-every", "2",
                                  "--halt-after", "2")))
    assert cut["halted_at_step"] == 2
    resumed = train(parse_config(["--resume", str(tmp_path / "runs" / "cut"), "--progress", "false"]))
    assert resumed["val_bpb"] == full["val_bpb"]
