"""One PNG per suite: delivered msgs/s and latency (p50, p99) per system (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, progress


def plot(scenario: str, rows: list[dict[str, Any]], title: str, latency_label: str = "latency µs") -> Path | None:
    """``rows``: {"label", "msgs_per_s", "p50_us", "p99_us"}; writes results/<scenario>.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress(f"  {scenario}: no plot (matplotlib is not installed: pip install matplotlib)")
        return None
    rows = [r for r in rows if r.get("msgs_per_s") or r.get("p50_us")]
    if not rows:
        return None
    labels = [r["label"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(9, 0.75 * len(rows) + 5), 4.8))
    y = range(len(rows))
    ax1.barh(list(y), [r.get("msgs_per_s") or 0 for r in rows], color="#4477aa")
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("delivered msgs/s")
    ax1.set_title("throughput (saturated)")
    for i, r in enumerate(rows):
        if r.get("msgs_per_s"):
            ax1.text(r["msgs_per_s"], i, f" {r['msgs_per_s']:,.0f}", va="center", fontsize=7)
    h = 0.4
    p50 = [r.get("p50_us") or 0 for r in rows]
    p99 = [r.get("p99_us") or 0 for r in rows]
    ax2.barh([i - h / 2 for i in y], p50, height=h, label="p50", color="#228833")
    ax2.barh([i + h / 2 for i in y], p99, height=h, label="p99", color="#ee6677")
    ax2.set_yticks(list(y), labels, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel(latency_label)
    ax2.set_xscale("log")
    ax2.set_title("latency (paced)")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{scenario}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    progress(f"  wrote results/{path.name}")
    return path
