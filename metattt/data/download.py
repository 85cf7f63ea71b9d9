"""Download the challenge's FineWeb sp1024 shards and tokenizer from the HuggingFace hub.

Local layout (as in the Parameter Golf repository): ``<out>/datasets/fineweb10B_sp1024/fineweb_{train,val}_NNNNNN.bin``
and ``<out>/tokenizers/fineweb_1024_bpe.{model,vocab}``. The remote layout lives only in the constants below.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metattt.data.shards import ShardFormatError, read_shard_header
from metattt.atomic import atomic_path

# --- remote layout (the one place that knows it) -------------------------------------------------------
HF_REPO_ID = "willdepueoai/parameter-golf"
HF_REPO_TYPE = "dataset"
HF_HOST = "huggingface.co"
HF_URL_TEMPLATE = "https://huggingface.co/datasets/{repo}/resolve/main/{path}"
REMOTE_DATASET_DIR = "datasets/datasets/fineweb10B_sp1024"
REMOTE_TOKENIZER_DIR = "datasets/tokenizers"
TRAIN_SHARD_NAME = "fineweb_train_{:06d}.bin"
VAL_SHARD_NAME = "fineweb_val_{:06d}.bin"
N_VAL_SHARDS = 1
TOKENIZER_FILES = ("fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab")
# --- local layout --------------------------------------------------------------------------------------
LOCAL_DATASET_DIR = "datasets/fineweb10B_sp1024"
LOCAL_TOKENIZER_DIR = "tokenizers"

PROBE_TIMEOUT_S = 5.0


class OfflineError(ConnectionError):
    """The HuggingFace hub cannot be reached."""


@dataclass(frozen=True)
class RemoteFile:
    remote_path: str  # path inside the hub repository
    local_path: Path
    is_shard: bool


def hf_url(remote_path: str, repo_id: str = HF_REPO_ID) -> str:
    return HF_URL_TEMPLATE.format(repo=repo_id, path=remote_path)


def plan_downloads(out: str | os.PathLike, train_shards: int, val_shards: int = N_VAL_SHARDS) -> list[RemoteFile]:
    """Every file to fetch: val shards, ``train_shards`` train shards, and the tokenizer."""
    if train_shards < 0 or val_shards < 0:
        raise ValueError(f"shard counts must be >= 0, got train {train_shards}, val {val_shards}")
    root = Path(out)
    shards = [VAL_SHARD_NAME.format(i) for i in range(val_shards)] + [TRAIN_SHARD_NAME.format(i)
                                                                      for i in range(train_shards)]
    return ([RemoteFile(f"{REMOTE_DATASET_DIR}/{n}", root / LOCAL_DATASET_DIR / n, True) for n in shards]
            + [RemoteFile(f"{REMOTE_TOKENIZER_DIR}/{n}", root / LOCAL_TOKENIZER_DIR / n, False)
               for n in TOKENIZER_FILES])


def is_complete(f: RemoteFile) -> bool:
    """A shard is complete when its size matches its header; other files when non-empty."""
    if not f.local_path.is_file():
        return False
    if not f.is_shard:
        return f.local_path.stat().st_size > 0
    try:
        read_shard_header(f.local_path)
        return True
    except (ShardFormatError, OSError):
        return False


def check_online(host: str = HF_HOST, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast (within ``timeout`` seconds) when the hub is unreachable, instead of hanging in a download."""
    t0 = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise OfflineError(f"no network: cannot reach {host}:{port} ({e.__class__.__name__}: {e}; gave up after "
                           f"{time.monotonic() - t0:.1f}s). To work offline, copy the shards into "
                           f"data/{LOCAL_DATASET_DIR}/ and the tokenizer into data/{LOCAL_TOKENIZER_DIR}/ on a machine "
                           "with internet, build shards from local text with `python -m metattt.data build`, or use "
                           "the embedded synthetic corpus (`python -m metattt.data synthetic --out DIR`).") from e


def _fetch_urllib(remote_path: str, dest: Path, progress: bool = True) -> None:
    from tqdm import tqdm

    url = hf_url(remote_path)
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is not None and tmp.stat().st_size != total:
                raise OSError(f"incomplete download of {url}: got {tmp.stat().st_size} of {total} bytes")
    except urllib.error.HTTPError as e:
        raise OSError(f"download failed: {url}: HTTP {e.code} {e.reason}") from e


def _fetch_hub(remote_path: str, dest: Path, progress: bool = True) -> None:
    from huggingface_hub import hf_hub_download

    cached = Path(hf_hub_download(repo_id=HF_REPO_ID, filename=remote_path, repo_type=HF_REPO_TYPE)).resolve()
    with atomic_path(dest) as tmp:
        shutil.copyfile(cached, tmp)


def default_fetch() -> Callable[[str, Path], None]:
    """``huggingface_hub`` when installed (resumable, cached), else plain urllib."""
    import importlib.util

    return _fetch_hub if importlib.util.find_spec("huggingface_hub") is not None else _fetch_urllib


def download_fineweb(out: str | os.PathLike = "data", train_shards: int = 1, *, val_shards: int = N_VAL_SHARDS,
                     fetch: Callable[[str, Path], None] | None = None,
                     probe: Callable[[], None] | None = None) -> list[Path]:
    """Fetch what is missing (complete files are skipped) and return all planned local paths."""
    plan = plan_downloads(out, train_shards, val_shards)
    todo = [f for f in plan if not is_complete(f)]
    if todo:
        (probe or check_online)()
        fetch = fetch or default_fetch()
        for f in todo:
            f.local_path.parent.mkdir(parents=True, exist_ok=True)
            fetch(f.remote_path, f.local_path)
            if not is_complete(f):
                raise OSError(f"downloaded {f.remote_path} but {f.local_path} is missing or invalid")
    return [f.local_path for f in plan]
