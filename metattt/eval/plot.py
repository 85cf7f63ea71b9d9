"""PNG of the running Δ_TTT: cumulative bpb(base) - bpb(ttt) against chunk index, one line per adapter.

A curve that rises over chunks means the adapter keeps learning from the stream; one that is flat from the
first chunk means the gain is a one-off (e.g. a global bias), not adaptation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metattt.atomic import atomic_path


def plot_running_delta(report: dict[str, Any], path: str | Path) -> Path | None:
    """Write the plot to ``path``; returns None when the report has no TTT/oracle protocol."""
    running = report.get("running_delta") or {}
    if not running:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for key, r in running.items():
        ys = [float("nan") if v is None else v for v in r["delta_bpb"]]
        legal = report["deltas"].get(key, {}).get("legal", True)
        label = f"{r['from']} -> {r['to']}" + ("" if legal else " (oracle, not legal)")
        ax.plot(r["chunk"], ys, linestyle="-" if legal else "--", marker="." if len(ys) < 60 else None, label=label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    block = next(iter(running.values()))["block_tokens"]
    ax.set_xlabel(f"chunk index ({block:,} target tokens per chunk)")
    ax.set_ylabel("cumulative Δ bpb (positive = TTT better)")
    ax.set_title("Running Δ_TTT over the validation stream")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # never half a PNG, never a stale one left by a failed write
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
