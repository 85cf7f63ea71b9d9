from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from metattt.data import download as dl
from metattt.data.__main__ import main
from metattt.data.shards import write_shard


def test_remote_and_local_layout(tmp_path: Path) -> None:
    plan = dl.plan_downloads(tmp_path / "data", train_shards=2)
    got = [(f.remote_path, f.local_path.relative_to(tmp_path).as_posix()) for f in plan]
    assert got == [
        ("datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
         "data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"),
        ("datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
         "data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"),
        ("datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
         "data/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"),
        ("datasets/tokenizers/fineweb_1024_bpe.model", "data/tokenizers/fineweb_1024_bpe.model"),
        ("datasets/tokenizers/fineweb_1024_bpe.vocab", "data/tokenizers/fineweb_1024_bpe.vocab"),
    ]
    assert dl.hf_url(plan[0].remote_path) == (
        "https://huggingface.co/datasets/willdepueoai/parameter-golf/resolve/main/"
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    )
    with pytest.raises(ValueError, match="shard counts"):
        dl.plan_downloads(tmp_path, train_shards=-1)


def _fake_fetch(calls: list[str]):
    def fetch(remote_path: str, dest: Path) -> None:
        calls.append(remote_path)
        if remote_path.endswith(".bin"):
            write_shard(dest, np.arange(10))
        else:
            dest.write_text("tokenizer")

    return fetch


def test_download_fetches_missing_and_skips_complete(tmp_path: Path) -> None:
    calls: list[str] = []
    probes: list[int] = []
    paths = dl.download_fineweb(tmp_path, 1, fetch=_fake_fetch(calls), probe=lambda: probes.append(1))
    assert len(calls) == 4 and probes == [1] and all(p.is_file() for p in paths)
    calls.clear()
    dl.download_fineweb(tmp_path, 1, fetch=_fake_fetch(calls), probe=lambda: pytest.fail("no probe needed"))
    assert calls == []  # everything complete: no network touched
    # a truncated shard (size disagrees with its header) is fetched again, only that one
    shard = tmp_path / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    dl.download_fineweb(tmp_path, 1, fetch=_fake_fetch(calls), probe=lambda: None)
    assert calls == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"]


def test_download_rejects_bad_fetch_result(tmp_path: Path) -> None:
    def broken(remote_path: str, dest: Path) -> None:
        dest.write_bytes(b"<html>not a shard</html>")

    with pytest.raises(OSError, match="missing or invalid"):
        dl.download_fineweb(tmp_path, 0, fetch=broken, probe=lambda: None)


def test_offline_fails_fast_with_clear_message(tmp_path: Path, monkeypatch, capsys) -> None:
    def unreachable(address, timeout=None):
        assert timeout is not None and timeout <= 10  # the probe never waits long
        raise OSError("Network is unreachable")

    monkeypatch.setattr(dl.socket, "create_connection", unreachable)
    monkeypatch.setattr(dl, "default_fetch", lambda: pytest.fail("must not try to download when offline"))
    t0 = time.perf_counter()
    with pytest.raises(dl.OfflineError, match="no network: cannot reach huggingface.co:443") as e:
        dl.download_fineweb(tmp_path, 1)
    assert time.perf_counter() - t0 < 2
    assert "python -m metattt.data build" in str(e.value) and "synthetic" in str(e.value)
    assert main(["download", "--out", str(tmp_path), "--train-shards", "1"]) == 2
    assert "no network" in capsys.readouterr().err


class _FakeResponse:
    def __init__(self, body: bytes, length: int):
        self.body, self.headers = body, {"Content-Length": str(length)}

    def read(self, n: int) -> bytes:
        chunk, self.body = self.body[:n], self.body[n:]
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *a) -> None:
        pass


def test_urllib_fetch_uses_resolve_url_and_detects_short_reads(tmp_path: Path, monkeypatch) -> None:
    urls: list[str] = []
    body = b"x" * 3000

    def urlopen(url, timeout=None):
        urls.append(url)
        return _FakeResponse(body, len(body) + (100 if "short" in url else 0))

    monkeypatch.setattr(dl.urllib.request, "urlopen", urlopen)
    dest = tmp_path / "f.bin"
    dl._fetch_urllib("a/b/f.bin", dest, progress=False)
    assert urls == [dl.hf_url("a/b/f.bin")] and dest.read_bytes() == body
    with pytest.raises(OSError, match="incomplete download"):
        dl._fetch_urllib("short.bin", tmp_path / "short.bin", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no partial files left behind
