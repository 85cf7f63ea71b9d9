"""Train a model with the Parameter Golf record script itself, for record-fidelity checks (issue 32, docs/interop.md).

Why: ``--compat pg-record`` is judged against what the record's *own* evaluators print for a model its *own* trainer
made. The record script is not part of this project (its licence and its size); this tool takes a copy of it
(``records/track_10min_16mb/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon/train_gpt.py`` of the Parameter Golf
repository), applies the two changes a single GPU without FlashAttention-3 needs, runs it, and collects what it
printed:

* its ``flash_attn_interface`` import becomes a PyTorch SDPA function with only the flash kernel enabled (the same
  causal GQA attention, (B, T, H, D) layout);
* its hard-coded EMA decay 0.997 reads ``EMA_DECAY`` (a run of a few hundred steps at 0.997 keeps much of its
  initial weights in the EMA).

    python benchmarks/record_model.py --script PATH/train_gpt.py --train 'data/ladder/train_*.bin' \
        --val "$METATTT_DATA/fineweb_sp1024_valprefix/fineweb_val_*.bin" \
        --tokenizer "$METATTT_DATA/tokenizers/fineweb_1024_bpe.model" --out runs/pg549-seed7 \
        --env SEED=7 MAX_WALLCLOCK_SECONDS=200 WARMDOWN_ITERS=150 TTT_ENABLED=1 EMA_DECAY=0.99

writes ``OUT/final_model.int6.ptz`` (the record's artifact), ``OUT/train.log`` and ``OUT/printed.json`` (the
``*_exact`` numbers of its log). Nothing of the record script is kept in this repository.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

IMPORT_LINE = "from flash_attn_interface import flash_attn_func as flash_attn_3_func"
SDPA_SHIM = '''
def flash_attn_3_func(q, k, v, causal=True):  # metattt record_model.py: FA3 -> SDPA (flash kernel only)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)
'''.strip("\n")
EMA_LINE = "ema_decay = 0.997"
EMA_ENV = 'ema_decay = float(os.environ.get("EMA_DECAY", "0.997"))'
# the record README's run command (2026-03-23), all of it but the launcher; --readme-env starts from it
README_ENV = dict(kv.split("=", 1) for kv in """NUM_LAYERS=11 BIGRAM_VOCAB_SIZE=1536 XSA_LAST_N=4 EMA_ENABLED=1
    EMA_DECAY=0.997 SWA_ENABLED=1 SWA_EVERY=50 ROPE_DIMS=16 LN_SCALE=1 LATE_QAT=1 LATE_QAT_THRESHOLD=0.15 VE_ENABLED=1
    VE_DIM=128 VE_LAYERS=9,10 TTT_ENABLED=1 TTT_LR=0.002 TTT_EPOCHS=3 TTT_CHUNK_TOKENS=32768 TTT_FREEZE_BLOCKS=0
    TTT_MOMENTUM=0.9 TTT_BATCH_SEQS=32 TTT_GRAD_CLIP=1.0 MUON_WD=0.04 ADAM_WD=0.04 MATRIX_LR=0.025 SCALAR_LR=0.025
    TIED_EMBED_LR=0.035 MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92 MUON_MOMENTUM_WARMUP_STEPS=1500
    WARMDOWN_ITERS=3500 ITERATIONS=9000 MAX_WALLCLOCK_SECONDS=600 EVAL_STRIDE=64 SEED=1337""".split())
EXACT = re.compile(r"^(\w+_exact)\b.*?val_bpb[:=]\s*([0-9.]+)")


class PatchError(ValueError):
    """The given script is not the record script this tool knows how to patch."""


def patch(source: str) -> str:
    """The record script with FA3 replaced by SDPA and the EMA decay read from ``EMA_DECAY``; each change must apply
    exactly once, so another script (or another version of it) is refused rather than half-patched."""
    for needle, what in ((IMPORT_LINE, "the FlashAttention-3 import"), ("    " + EMA_LINE, "the EMA decay line")):
        n = source.count(needle)
        if n != 1:
            raise PatchError(f"expected {what} ({needle.strip()!r}) once in the script, found it {n} times")
    return source.replace(IMPORT_LINE, SDPA_SHIM).replace("    " + EMA_LINE, "    " + EMA_ENV)


def printed_numbers(log: str) -> dict[str, float]:
    """The ``*_exact`` lines of the record's log (``final_int6_roundtrip_exact``, ``..._sliding_window_exact``,
    ``legal_ttt_exact``) as {name: val_bpb}; the last of each wins."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        m = EXACT.match(line.strip())
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def data_dir(out: Path, train: str, val: str) -> Path:
    """A folder in the layout the record script globs (``fineweb_train_*.bin``, ``fineweb_val_*.bin``), made of links
    to our shards (same format: 256 int32 header, uint16 tokens)."""
    found = {kind: sorted(glob.glob(pattern)) for kind, pattern in (("train", train), ("val", val))}
    for kind, pattern in (("train", train), ("val", val)):
        if not found[kind]:
            raise FileNotFoundError(f"--{kind} {pattern!r} matched no file")
    d = (out / "data").resolve()  # absolute: the record script runs with cwd=out, where a relative path would miss
    d.mkdir(parents=True, exist_ok=True)
    for kind, files in found.items():
        for i, f in enumerate(files):
            link = d / f"fineweb_{kind}_{i:06d}.bin"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(f).resolve())
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--script", required=True, help="the record's train_gpt.py (a copy from the Parameter Golf repo)")
    ap.add_argument("--train", required=True, help="training shard glob")
    ap.add_argument("--val", required=True, help="val shard glob (the official val prefix)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="the record's environment settings")
    ap.add_argument("--readme-env", action="store_true",
                    help="start from the record README's environment (README_ENV); --env overrides single keys")
    ap.add_argument("--nproc", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        patched = patch(Path(args.script).read_text())
        bad = [kv for kv in args.env if "=" not in kv]
        if bad:
            raise ValueError(f"--env takes KEY=VALUE, got {bad[0]!r}")
        settings = {**(README_ENV if args.readme_env else {}), **dict(kv.split("=", 1) for kv in args.env)}
    except (OSError, PatchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        data = data_dir(args.out, args.train, args.val)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (args.out / "train_gpt_patched.py").write_text(patched)  # data_dir made args.out
    env = {**os.environ, "DATA_PATH": str(data), "TOKENIZER_PATH": str(Path(args.tokenizer).resolve()), **settings}
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", "train_gpt_patched.py"]
    with open(args.out / "train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=args.out, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    nums = printed_numbers((args.out / "train.log").read_text())
    (args.out / "printed.json").write_text(json.dumps({"rc": rc, "env": settings, "printed": nums}, indent=1) + "\n")
    print(json.dumps(nums, indent=1))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
